"""The binding against the running kernel: test runs, maps, tracepoints, uprobes, ring buffers,
verifier errors."""
import contextlib
import os
import socket
import subprocess

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether

from conftest import TESTS, build_c
from gridbpf.bpf import BpfError, BpfObject, RingBuffer, VerifierError

XDP_PASS = 2


def udp_packet(dport: int, payload: bytes = b"x" * 10) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1234, dport=dport) / payload)


def test_xdp_test_run_counts_scapy_packets(selftest):
    selftest.rodata["count_udp_port"] = 9999
    selftest.load()
    prog = selftest.program("xdp_count")
    hit, miss = udp_packet(9999), udp_packet(53)
    r = prog.test_run(hit, repeat=7)
    assert r.retval == XDP_PASS and r.data == hit and r.duration_ns > 0
    prog.test_run(miss, repeat=3)
    counts = selftest.map("xdp_counts")
    assert counts.sum(0) == {"packets": 10, "bytes": 7 * len(hit) + 3 * len(miss)}
    assert counts.sum(1) == {"packets": 7, "bytes": 7 * len(hit)}
    flows = list(selftest.map("flows").items())
    assert len(flows) == 1
    (key, n), = flows
    assert n == 7 and key.proto == 17
    assert (key.dport, key.sport) == (socket.htons(9999), socket.htons(1234))
    assert socket.inet_ntoa(key.saddr.to_bytes(4, "little")) == "10.0.0.1"
    # batch lookup agrees with iteration
    assert [(bytes(k), v) for k, v in selftest.map("flows").lookup_batch()] == [(bytes(key), 7)]


def test_map_update_delete_and_typed_errors(selftest):
    selftest.load()
    flows = selftest.map("flows")
    key = {"saddr": 1, "daddr": 2, "sport": 3, "dport": 4, "proto": 6}
    flows[key] = 41
    assert flows[key] == 41 and key in flows
    del flows[key]
    assert flows.get(key) is None
    with pytest.raises(KeyError):
        flows[key]
    with pytest.raises(KeyError, match="no field 'bogus'"):
        flows[{"bogus": 1}] = 1
    with pytest.raises(KeyError, match="no global 'nope'"):
        selftest.rodata["nope"]
    with pytest.raises(BpfError, match="before load"):
        selftest.rodata["target_tgid"] = 1


@contextlib.contextmanager
def getppid_events(selftest):
    """The selftest's getppid() tracepoint program attached for this process, and its ring."""
    selftest.rodata["target_tgid"] = os.getpid()
    selftest.load()
    with selftest.program("on_getppid").attach_tracepoint("syscalls", "sys_enter_getppid"), \
            RingBuffer(selftest, "events") as rb:
        yield rb


def test_tracepoint_events_through_ring_buffer(selftest):
    dtype = selftest.btf.dtype("event")
    with getppid_events(selftest) as rb:
        for _ in range(25):
            os.getppid()
        events = rb.poll_array(dtype, timeout_ms=1000)
        assert rb.lost == 0
    assert len(events) == 25
    # .bss after load is the kernel's copy (libbpf 1.1 maps it so only for skeletons)
    assert selftest.bss["getppid_calls"] == 25
    selftest.bss["getppid_calls"] = 0
    assert selftest.bss["getppid_calls"] == 0
    assert set(events["tgid"]) == {os.getpid()} and set(events["kind"]) == {1}
    assert all(events["time_ns"][1:] >= events["time_ns"][:-1])
    assert events["comm"][0].startswith(b"py")


def test_ring_buffer_lends_records_in_chunks_and_gives_the_space_back(selftest):
    """lend_chunks: every record once, as views of the ring in chunks, its space given back
    as the next chunk is asked for (a second drain finds nothing), also when the reader stops
    early; a backlog of more than half the ring comes as copies instead of views."""
    dtype = selftest.btf.dtype("event")
    with getppid_events(selftest) as rb:
        for _ in range(25):
            os.getppid()
        chunks = [(c.base is not None, c["time_ns"].copy()) for c in rb.lend_chunks(dtype, 10)]
        assert [len(t) for _v, t in chunks] == [10, 10, 5] and all(v for v, _t in chunks)
        times = np.concatenate([t for _v, t in chunks])
        assert all(times[1:] > times[:-1])
        assert list(rb.lend_chunks(dtype, 10)) == [] and rb.received == 25
        for _ in range(7):
            os.getppid()
        for chunk in rb.lend_chunks(dtype, 3):
            break                                # a reader that stops: that chunk is consumed
        del chunk                                # a view of the ring: it must go before close
        assert sum(len(c) for c in rb.lend_chunks(dtype, 3)) == 4
        stride = (dtype.itemsize + 8 + 7) & ~7
        n = rb.size // 2 // stride + 2           # more than half the ring waiting
        for _ in range(n):
            os.getppid()
        copied = [c for c in rb.lend_chunks(dtype, 4096)]
        assert sum(len(c) for c in copied) == n and all(c.base is None or c.flags.owndata
                                                       or c.base.flags.owndata for c in copied)
        assert rb.lost == 0
        del chunks, copied


def test_uprobe_on_function_of_started_process(selftest, tmp_path):
    binary = build_c("marker", tmp_path)
    proc = subprocess.Popen([str(binary), "40"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        selftest.rodata["target_tgid"] = proc.pid
        selftest.load()
        with selftest.program("on_marker").attach_uprobe(str(binary), "marker", pid=proc.pid), \
                RingBuffer(selftest, "events") as rb:
            out, _ = proc.communicate("go\n", timeout=10)
            records = rb.poll(timeout_ms=1000)
    finally:
        proc.kill()
    assert out.strip() == str(sum(2 * i for i in range(1, 41)))
    event_t = selftest.btf.struct("event")
    values = [event_t.from_buffer_copy(r).arg for r in records]
    assert values == list(range(1, 41))
    assert rb.lost == 0


def test_ring_buffer_loss_is_counted_exactly(selftest):
    selftest.rodata["target_tgid"] = os.getpid()
    selftest.map("events").max_entries = 4096        # one page: about 73 records of 56 bytes
    selftest.load()
    sent = 1000
    with selftest.program("on_getppid").attach_tracepoint("syscalls", "sys_enter_getppid"), \
            RingBuffer(selftest, "events") as rb:
        for _ in range(sent):
            os.getppid()          # nobody reads meanwhile: the buffer fills up
        received = len(rb.poll())
        assert 0 < received < sent
        assert rb.lost == sent - received
        for _ in range(10):      # after draining, there is room again
            os.getppid()
        assert len(rb.poll()) == 10
        assert rb.lost == sent - received


def test_verifier_rejection_names_the_reason():
    obj = BpfObject.open(TESTS / "bpf" / "reject.bpf.o")
    with pytest.raises(VerifierError) as err:
        obj.load()
    msg = str(err.value)
    assert "Permission denied (EACCES)" in msg
    assert "invalid mem access 'map_value_or_null'" in msg.splitlines()[0]
    assert "bpf_map_lookup_elem" in msg          # the verifier's own log lines come along
    assert err.value.reason == "R0 invalid mem access 'map_value_or_null'"
    obj.close()


def test_clear_errors_for_bad_input(selftest):
    with pytest.raises(FileNotFoundError, match="run `make bpf`"):
        BpfObject.open("no-such-capability")
    selftest.load()
    with pytest.raises(ValueError, match="unknown interface 'nope0'"):
        selftest.program("xdp_count").attach_xdp("nope0")
    with pytest.raises(KeyError, match="no program 'nope'"):
        selftest.program("nope")
    with pytest.raises(LookupError, match="symbol 'no_such_function' not found"):
        selftest.program("on_marker").attach_uprobe("/bin/true", "no_such_function")


def test_uprobe_in_shared_library_found_in_process_maps(selftest):
    from gridbpf.bpf.elf import library_of
    libc = library_of(os.getpid(), "libc.so")
    assert libc and os.path.exists(libc)
    selftest.rodata["target_tgid"] = os.getpid()
    selftest.load()
    with selftest.program("on_marker").attach_uprobe(libc, "getppid", pid=os.getpid()), \
            RingBuffer(selftest, "events") as rb:
        for _ in range(12):
            os.getppid()
        events = rb.poll_array(selftest.btf.dtype("event"), timeout_ms=1000)
    assert len(events) == 12 and set(events["kind"]) == {2}


def test_xdp_replace_semantics():
    from gridbpf.lab import Lab
    with Lab("crep") as lab:
        a = lab.host("a")
        lab.link(a, lab.host("b"), a_if="eth0", b_if="eth0")
        first = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o").load()
        second = BpfObject.open("probe")
        for name, prog in second.programs.items():
            prog.autoload = name == "probe_xdp"
        second.load()

        def attached():
            return a.ip("-d", "link", "show", "eth0").stdout

        # netlink mode: a second program is refused unless replace=True
        with first.program("xdp_count").attach_xdp("eth0", mode="generic", netns=a.netns, link=False):
            assert "xdp_count" in attached()
            with pytest.raises(BpfError, match="EBUSY|EEXIST"):
                second.program("probe_xdp").attach_xdp("eth0", mode="generic", netns=a.netns, link=False)
            with second.program("probe_xdp").attach_xdp("eth0", mode="generic", netns=a.netns,
                                                        link=False, replace=True):
                assert "probe_xdp" in attached()
        assert "prog/xdp" not in attached()
        # link mode: update swaps the program atomically
        with first.program("xdp_count").attach_xdp("eth0", mode="generic", netns=a.netns) as link:
            link.update(second.program("probe_xdp"))
            assert "probe_xdp" in attached()
        assert "prog/xdp" not in attached()
        first.close()
        second.close()


def test_run_time_accounting(selftest):
    from gridbpf.bpf import run_time_stats
    selftest.load()
    prog = selftest.program("xdp_count")
    with run_time_stats():
        prog.test_run(udp_packet(1), repeat=100)
        during = prog.stats()
    assert during["run_cnt"] == 100 and during["run_time_ns"] > 0
    assert during["recursion_misses"] == 0
    # (once our reference is dropped, counting stops unless someone else holds stats on)


def test_verifier_verdict_survives_a_long_log():
    obj = BpfObject.open(TESTS / "bpf" / "reject_long.bpf.o")
    with pytest.raises(VerifierError) as err:
        obj.load()
    assert sum(len(l) for l in err.value.log) > 8192      # the log really is long
    assert err.value.reason == "R0 invalid mem access 'map_value_or_null'"
    obj.close()
