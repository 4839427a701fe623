"""VIPs announced by BGP (BIRD 2 with BFD, driven by `gridbpf lb run`) on the lab site whose
router runs BIRD too, learns the VIPs only from the nodes and hashes packet headers like a
hardware router (fib_multipath_hash_policy 3, fields 0x37). Node failures during 24 long
uploads, each with its negative control (nodes whose Maglev tables disagree); withdrawal when
every backend is down; what `lb status` and /metrics say; lb.toml's [bgp] validation."""
import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import gridbpf_cli
from gridbpf.lab import Lab
from gridbpf.lb import config as lbconfig
from gridbpf.lb.bgp import bird_config, run_dir
from gridbpf.lb.site import (FAILURES, Uploads, build_site, fail_during_uploads, start_nginx,
                             stop_nginx, wait_dead)

# generous timeout and fall count: a busy 2-core box must not fail a healthy backend
HEALTH = {"check": "http", "path": "/whoami", "interval": 0.5, "timeout": 1.5, "fall": 3, "rise": 2}
AGREE, DISAGREE = [65537, 65537], [65537, 65521]


@pytest.fixture(scope="module")
def site():
    with Lab("lbbgp") as lab:
        s = build_site(lab)
        try:
            yield s
        finally:
            s.close()


@pytest.fixture
def nodes(site):
    """start(**config): both balancers running and announced; stopped again after the test."""
    def start(**config):
        config.setdefault("health", HEALTH)
        site.write_configs(**config)
        for n in site.nodes:
            site.start_balancer(n)
        site.wait_routes(site.nodes)
    yield start
    for n in site.nodes:
        site.stop_balancer(n)


@pytest.mark.parametrize("kind", FAILURES)
def test_node_failure_heals_by_bgp(site, nodes, kind):
    """The router drops the failed node within 1 s (BFD, or the withdrawal on SIGTERM), and no
    upload breaks; the same failure with disagreeing tables breaks uploads (negative control)."""
    nodes(table_sizes=AGREE)
    r = fail_during_uploads(site, kind)
    print(f"{kind}: router FIB changed after {r['fib_s'][0]:.3f} s (IPv4), {r['fib_s'][1]:.3f} s "
          f"(IPv6); longest stall {r['stall']:.2f} s; {r['via_lb2']} uploads via lb2; "
          f"BIRD gone after {r['bird_gone_s']}")
    assert r["via_lb2"] >= 3                       # the failure hit uploads
    if kind == "kill":
        assert r["bird_gone_s"] < 0.5                  # BIRD died with its daemon
    assert max(r["fib_s"]) < 1.0, r["fib_s"]
    assert not r["failed"], r["failed"][:3]
    assert not r["bad_files"], r["bad_files"][:3]
    # the router's BIRD: lb2's sessions are down (it reports them; on SIGTERM they stay up
    # while the node waits after its withdrawal), lb1's stay up
    lines = {ln.split()[0]: ln for ln in r["router_view"].splitlines() if ln.startswith("n")}
    assert "Established" in lines["n0_4"] and "Established" in lines["n1_6"]
    if kind != "sigterm":
        assert "Established" not in lines["n2_4"] and "Established" not in lines["n3_6"]
    for n in site.nodes:
        site.stop_balancer(n)

    nodes(table_sizes=DISAGREE)
    r = fail_during_uploads(site, kind)
    print(f"{kind}, tables disagree: {len(r['failed'])} of 24 uploads failed")
    assert max(r["fib_s"]) < 1.0, r["fib_s"]
    assert r["failed"], "nodes with different tables should have broken moved connections"


def test_control_a_route_left_alone_strands_the_dead_nodes_flows():
    """The lab itself can fail the tests above: with static ECMP routes that nobody changes,
    the flows hashed to a killed node stall for good (the router hashes headers, so they do
    not move by themselves; the switch does not flood the dead node's frames to the other)."""
    with Lab("lbbgps") as lab:
        s = build_site(lab, bgp=False, backends=2)
        try:
            s.start(health=HEALTH)
            up = Uploads(s, n=12, seconds=6.0, chunks=60, tag="static").start()
            try:
                up.wait_connected()
                time.sleep(1.5)
                s.fail_node(s.nodes[1], "kill")
                time.sleep(4.0)
                stalled = [k for k, r in up.results.items() if r["stall"] >= 3.0]
            finally:
                up.abort()
                up.wait()
            print(f"static route: {len(stalled)} of 12 uploads stood still for 3+ s after the kill")
            assert len(stalled) >= 2
            s.heal_node(s.nodes[1], "kill")
        finally:
            s.close()


def test_kill_9_takes_bird_and_the_routes(site, nodes):
    """The link stays up: BIRD dies with the daemon (parent-death signal), its sessions close
    and the router drops the node at once, without waiting for BFD."""
    nodes(table_sizes=AGREE)
    lb1, lb2 = site.nodes
    with open(os.path.join(run_dir(site.instance(lb2)), "bird.pid")) as f:
        bird_pid = int(f.read())
    daemon = site.daemons.pop(lb2.name)
    t = time.monotonic()
    os.kill(daemon.pid, signal.SIGKILL)
    gone = wait_dead(bird_pid, 2) - t
    fib = site.bird.wait_next_hops(site.vip4, [site.node_addr(lb1)], timeout=5) - t
    daemon.wait(5)
    st = json.loads(gridbpf_cli("lb", "status", "--json", "--instance", site.instance(lb2)).stdout)["bgp"]
    assert st["bird_running"] is False and st["announced"] == []     # the pins outlive a kill -9
    site.daemons[lb2.name] = daemon
    site.heal_node(lb2, "kill")      # clears the pins and BIRD's directory
    print(f"BIRD dead {gone * 1000:.0f} ms after the daemon's kill -9; router FIB {fib * 1000:.0f} ms")
    assert gone < 0.5 and fib < 1.0


def test_detached_program_is_withdrawn(site, nodes):
    """Someone detaches lb2's XDP link (bpftool): its VIPs are withdrawn at once."""
    nodes(table_sizes=AGREE)
    lb1, lb2 = site.nodes
    prog = json.loads(lb2.ip("-j", "link", "show", "dev", "eth0").stdout)[0]["xdp"]["prog"]["id"]
    link = next(x["id"] for x in json.loads(subprocess.run(["bpftool", "-j", "link", "show"], check=True,
                                                              capture_output=True, text=True).stdout)
                if x.get("prog_id") == prog)
    t = time.monotonic()
    subprocess.run(["bpftool", "link", "detach", "id", str(link)], check=True)
    fib = site.bird.wait_next_hops(site.vip4, [site.node_addr(lb1)], timeout=5) - t
    print(f"detached: withdrawn from the router's FIB after {fib * 1000:.0f} ms")
    assert fib < 1.0
    # the daemon writes its state once BIRD took the withdrawal: the router's FIB can be first
    deadline = time.monotonic() + 2
    while bgp_state(site, lb2)["vips"][site.vip4]["why_not"] != "program detached":
        assert time.monotonic() < deadline, bgp_state(site, lb2)
        time.sleep(0.05)


def test_bird_that_dies_is_restarted(site, nodes):
    """BIRD killed under a running daemon: the router drops the node (its sessions closed),
    the daemon starts BIRD again and the node is announced again."""
    nodes(table_sizes=AGREE)
    lb1, lb2 = site.nodes
    with open(os.path.join(run_dir(site.instance(lb2)), "bird.pid")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    site.bird.wait_next_hops(site.vip4, [site.node_addr(lb1)], timeout=5)
    t = time.monotonic()
    site.wait_routes(site.nodes, timeout=20)
    print(f"BIRD restarted; announced again after {time.monotonic() - t:.2f} s")
    assert "BIRD exited" in site.daemon_log(lb2)


def bgp_state(site, node) -> dict:
    with open(os.path.join(run_dir(site.instance(node)), "state.json")) as f:
        return json.load(f)


def test_all_backends_down_withdraws_then_announces_after_delay(site, nodes):
    interval, delay = 0.5, 2.0
    nodes(health={**HEALTH, "interval": interval, "timeout": 0.5, "fall": 1, "rise": 1},
          bgp={"announce_delay": delay})
    for b in site.backends:
        stop_nginx(b)
    t0 = time.monotonic()
    try:
        t = site.bird.wait_next_hops(site.vip4, [], timeout=10)
        site.bird.wait_next_hops(site.vip6, [], timeout=5)
        print(f"withdrawn {t - t0:.3f} s after the backends stopped (interval {interval} s)")
        assert t - t0 < interval + 1.0
        # the node writes its state once `birdc configure` has returned: the router may have
        # dropped the routes a moment before (measured once in the full suite)
        deadline = time.monotonic() + 3
        while (st := bgp_state(site, site.nodes[0]))["announced"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert st["announced"] == [] and "0 healthy backends" in st["vips"][site.vip4]["why_not"]
    finally:
        for b in site.backends:
            start_nginx(b)
    t1 = time.monotonic()
    t = site.wait_routes(site.nodes)
    wall = time.time() - (time.monotonic() - t)
    since = max(bgp_state(site, n)["vips"][site.vip4]["eligible_since"] for n in site.nodes)
    print(f"announced again {t - t1:.3f} s after the backends restarted, "
          f"{wall - since:.3f} s after the last node found them healthy (announce_delay {delay} s)")
    assert t - t1 >= delay
    assert delay <= wall - since + 0.05 < delay + 1.5      # + BGP update and FIB, on a busy box


def test_status_and_metrics_show_sessions_and_announced_vips(site, nodes):
    nodes(table_sizes=AGREE)
    node = site.nodes[0]
    deadline = time.monotonic() + 10
    while True:
        st = json.loads(gridbpf_cli("lb", "status", "--json", "--instance", site.instance(node)).stdout)["bgp"]
        if all(s["bfd"] == "Up" for s in st["sessions"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["announced"] == [site.vip4, site.vip6]
    assert [(s["peer"], s["state"], s["bfd"]) for s in st["sessions"]] == \
        [("10.2.0.1", "Established", "Up"), ("fd00:2::1", "Established", "Up")]
    text = gridbpf_cli("lb", "status", "--instance", site.instance(node)).stdout
    assert "bgp: announcing 10.99.0.1, fd00:99::1" in text and "peer 10.2.0.1 AS65000: Established" in text
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{site.metrics_ports[node.name]}/metrics",
                                     timeout=5).read().decode()
    assert 'gridbpf_lb_bgp_session_up{peer="10.2.0.1",remote_as="65000",state="Established"} 1.0' in metrics
    assert 'gridbpf_lb_bgp_bfd_up{peer="fd00:2::1"} 1.0' in metrics
    assert 'gridbpf_lb_vip_announced{vip="fd00:99::1"} 1.0' in metrics
    # the router's own view: both nodes' routes, as one ECMP route in its FIB
    routes = site.bird.birdc("show", "route", "for", site.vip4, "all")
    assert "AS65001" in routes and "10.2.0.2" in routes and "10.2.0.3" in routes
    # the node's BIRD has no kernel protocol: its own FIB holds no VIP route
    assert site.vip4 not in node.ip("-4", "route", "show", "table", "all").stdout.replace("local", "")


BASE = """
[balancer]
interface = "eth0"
[[service]]
name = "web"
vip = "10.99.0.1"
port = 80
[[service]]
name = "web6"
vip = "fd00:99::1"
port = 80
"""
GOOD_BGP = """
[bgp]
local_as = 65001
router_id = "10.2.0.2"
[[bgp.peer]]
address = "10.2.0.1"
remote_as = 65000
[[bgp.peer]]
address = "fd00:2::1"
remote_as = 65000
bfd = false
hold_time = 30
port = 1179
"""


@pytest.mark.parametrize("bgp, message", [
    ("[bgp]\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 1\n", "bgp.local_as: missing"),
    ("[bgp]\nlocal_as = 0\n", "bgp.local_as: 0 is no AS number"),
    ("[bgp]\nlocal_as = 65001\n", "bgp.peer: needs at least one"),
    ("[bgp]\nlocal_as = 65001\nrouter_id = \"fd00::1\"\n", "bgp.router_id: 'fd00::1' is not an IPv4"),
    ("[bgp]\nlocal_as = 65001\nflap = 1\n", "bgp.flap: unknown key"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.300\"\nremote_as = 2\n",
     "bgp.peer[0].address: bad IP address"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\n", "bgp.peer[0].remote_as: missing"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 2\nhold_time = 2\n",
     "bgp.peer[0].hold_time: 2 out of 3..65535"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 2\nbfd = 1\n",
     "bgp.peer[0].bfd: must be bool"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 2\nport = 0\n",
     "bgp.peer[0].port: port 0 out of"),
    ("[bgp]\nlocal_as = 1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 2\n",
     "bgp.peer: no IPv6 peer to announce VIP fd00:99::1"),
    ("[bgp]\nlocal_as = 1\nannounce_delay = -1\n[[bgp.peer]]\naddress = \"10.2.0.1\"\nremote_as = 2\n",
     "bgp.announce_delay: -1 must not be negative"),
])
def test_bgp_config_errors_name_the_key(tmp_path, bgp, message):
    path = tmp_path / "lb.toml"
    path.write_text(BASE + bgp)
    with pytest.raises(lbconfig.ConfigError) as e:
        lbconfig.load(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    out = gridbpf_cli("lb", "check", "--config", str(path), check=False)
    assert out.returncode != 0 and message in out.stderr


def test_generated_bird_config_is_what_bird_accepts(tmp_path):
    cfg = lbconfig.parse(BASE + GOOD_BGP)
    assert cfg.bgp.peers[1].port == 1179 and cfg.bgp.peers[0].hold_time == 9 and cfg.bgp.peers[0].bfd
    for announced in (set(), {"10.99.0.1", "fd00:99::1"}):
        text = bird_config(cfg, announced)
        conf = tmp_path / "bird.conf"
        conf.write_text(text)
        p = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr + text
        assert "protocol kernel" not in text and text.count("graceful restart off") == 2
    assert "route 10.99.0.1/32 blackhole" in text and "route fd00:99::1/128 blackhole" in text
    assert "neighbor fd00:2::1 port 1179 as 65000" in text and "bfd off" in text
