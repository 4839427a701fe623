"""The lab: namespaces, veth, bridge, ECMP; XDP and tc on lab interfaces with real traffic;
and nothing left behind afterwards."""
import os
import socket
import subprocess
import time

import pytest

from conftest import TESTS, gridbpf_cli
from gridbpf.bpf import BpfObject, list_pins
from gridbpf.lab import Lab, ecmp, namespaces


def root_links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def alive(pids) -> list[int]:
    return [p for p in pids if os.path.exists(f"/proc/{p}")]


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_xdp_on_veth_counts_every_packet_sent(mode):
    with Lab("cx" + mode[0]) as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, ["10.3.0.1/24"], ["10.3.0.2/24"], "eth0", "eth0")
        a.run(["ethtool", "-K", "eth0", "tx", "off"])   # native XDP does not finish partial checksums
        with BpfObject.open(TESTS / "bpf" / "selftest.bpf.o") as obj:
            obj.rodata["count_udp_port"] = 7777
            obj.load()
            with obj.program("xdp_count").attach_xdp("eth0", mode=mode, netns=b.netns):
                with b.enter():
                    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                rx.bind(("10.3.0.2", 7777))
                rx.settimeout(2)
                with a.enter():
                    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sent = received = 0
                for _batch in range(6):    # bursts the socket buffer holds; the first resolves ARP
                    for i in range(1 if sent == 0 else 50):
                        tx.sendto(b"%d" % i, ("10.3.0.2", 7777))
                        sent += 1
                    while received < sent:
                        rx.recv(64)
                        received += 1
                counts = obj.map("xdp_counts").sum(1)
            assert counts["packets"] == sent          # every packet passed through our program
            assert received == sent                    # and XDP_PASS delivered each to the socket
            flows = list(obj.map("flows").items())
            assert len(flows) == 1 and flows[0][1] == sent


def test_tc_attach_in_namespace_and_clean_detach():
    with Lab("ctc") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, ["10.4.0.1/24"], ["10.4.0.2/24"], "eth0", "eth0")
        with BpfObject.open("probe") as obj:
            for name, prog in obj.programs.items():
                prog.autoload = name == "probe_tc"
            obj.load()
            with obj.program("probe_tc").attach_tc("eth0", "egress", netns=a.netns):
                shown = a.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
                assert "probe_tc" in shown and "direct-action" in shown
            assert "clsact" not in a.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


def test_ecmp_lab_passes_tcp_and_leaves_nothing_behind():
    before = root_links()
    with Lab("cecmp") as lab:
        t = ecmp(lab, servers=2)
        assert len(namespaces()) >= 5 and len([n for n in namespaces() if n.startswith("gb-cecmp-")]) == 5
        assert "br0" in t["switch"].ip("-o", "link", "show", "type", "bridge").stdout
        for i in (1, 2):
            t[f"srv{i}"].wait_port(f"10.2.0.{10 + i}", 80)
        seen = {}
        for sport in range(40000, 40024):     # distinct source ports: the L4 hash spreads them
            out = t["client"].run(["curl", "-s", "--max-time", "5", "--local-port", str(sport),
                                   "http://10.99.0.1/whoami"]).stdout
            seen[out] = seen.get(out, 0) + 1
        assert set(seen) == {"srv1", "srv2"} and sum(seen.values()) == 24
        six = t["client"].run(["curl", "-sS", "--max-time", "5", "http://[fd00:99::1]/whoami"]).stdout
        assert six in ("srv1", "srv2")
        pids = [p.pid for h in lab.hosts.values() for p in h.processes]
        assert len(alive(pids)) == 2    # the two HTTP servers
        obj = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o").load()
        obj.map("flows").pin(f"{lab.pin_prefix}/flows")
        assert list_pins("lab/cecmp")
        obj.close()
    assert not [n for n in namespaces() if n.startswith("gb-cecmp-")]
    assert root_links() == before
    assert not alive(pids)
    assert not list_pins("lab/cecmp")


def test_teardown_after_exception():
    before = root_links()
    with pytest.raises(RuntimeError, match="test body failed"):
        with Lab("cfail") as lab:
            h = lab.host("a")
            lab.link(h, lab.host("b"), ["10.5.0.1/24"], ["10.5.0.2/24"])
            talker = h.popen(["sh", "-c", "echo hello from $(ip -o link show to-b | cut -d: -f2); exec sleep 300"])
            pids = [talker.pid]
            deadline = time.monotonic() + 5
            while "hello" not in talker.output() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert talker.output().strip() == "hello from to-b@if2"   # kept, and run inside the netns
            talker.stop()
            assert "hello from" in talker.output()                     # still readable once stopped
            obj = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o").load()
            obj.map("flows").pin(f"{lab.pin_prefix}/flows")
            obj.close()
            assert list_pins("lab/cfail")
            raise RuntimeError("test body failed")
    assert not [n for n in namespaces() if n.startswith("gb-cfail-")]
    assert not list_pins("lab/cfail")
    assert root_links() == before
    assert not alive(pids)


def test_lab_cli_up_list_down():
    run = lambda *a: gridbpf_cli("lab", *a, "--json")
    try:
        up = run("up", "web", "--name", "ccli")
        assert '"gb-ccli-server"' in up.stdout
        assert "ccli" in run("list").stdout
    finally:
        down = run("down", "ccli")
    assert "gb-ccli-client" in down.stdout
    assert not [n for n in namespaces() if n.startswith("gb-ccli-")]
