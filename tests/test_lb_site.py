"""End to end: the virtual site (client, ECMP router running BIRD, two balancer nodes announcing
the VIPs by BGP, three nginx WebDAV backends) with `gridbpf lb run` on both nodes, native XDP,
real TCP connections. Node failures: tests/test_lb_bgp.py."""
import http.client
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gridbpf.lab import Lab
from gridbpf.lb import maglev
from gridbpf.lb.site import build_site, start_nginx, start_udp_echo, stop_nginx

WEIGHTS = [1, 1, 2]
UDP_PORT = 5353
# generous timeout and fall count: a busy 2-core box must not fail a healthy backend
HEALTH = {"check": "http", "path": "/whoami", "interval": 0.5, "timeout": 1.5, "fall": 3, "rise": 2}


@pytest.fixture(scope="module")
def site():
    with Lab("lbsite") as lab:
        s = build_site(lab)
        try:
            for b in s.backends:
                start_udp_echo(b, UDP_PORT)
            s.start(weights=WEIGHTS, health=HEALTH, udp_port=UDP_PORT)
            yield s
        finally:
            s.close()


def connect(site, vip, sport=None, timeout=5):
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with site.client.enter():
        sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sport:
        sock.bind(("fd00:1::2" if ":" in vip else "10.1.0.2", sport))
    sock.settimeout(timeout)
    sock.connect((vip, 80))
    conn = http.client.HTTPConnection(vip, 80, timeout=timeout)
    conn.sock = sock
    return conn


def whoami(conn):
    conn.request("GET", "/whoami")
    r = conn.getresponse()
    body = r.read().decode().strip()
    assert r.status == 200, (r.status, body)
    return body


def predicted(site, vip, sports, proto=6):
    """Which backend Maglev (computed here) gives each client port: the datapath must agree."""
    fam = 6 if ":" in vip else 4
    client = "fd00:1::2" if fam == 6 else "10.1.0.2"
    addrs = [site.backend_addr(i, fam) for i in range(len(site.backends))]
    names, table = maglev.build_table(dict(zip(addrs, WEIGHTS)))
    n = len(sports)
    src = np.tile(np.frombuffer(maglev.addr16(client), np.uint8), (n, 1))
    dst = np.tile(np.frombuffer(maglev.addr16(vip), np.uint8), (n, 1))
    port = 80 if proto == 6 else UDP_PORT
    h = maglev.flow_hash(src, dst, np.array(sports), np.full(n, port), np.full(n, proto))
    return [site.backends[addrs.index(names[i])].name for i in table[h % maglev.DEFAULT_SIZE]]


def totals(site):
    """Per-service and per-backend counters summed over both nodes, from `lb status --json`."""
    out = Counter()
    for node in site.nodes:
        for s in site.status(node)["services"]:
            out[(s["name"], "new_flows")] += s["new_flows"]
            out[(s["name"], "packets")] += s["packets"]
            out[(s["name"], "bytes")] += s["bytes"]
            for b in s["backends"]:
                out[(s["name"], b["address"])] += b["new_flows"]
    return out


CLIENT_COUNTERS = """
table inet lbcount {
  counter to_vip4 {}
  counter to_vip6 {}
  chain out {
    type filter hook output priority 0;
    ip daddr %s tcp dport 80 counter name to_vip4
    ip6 daddr %s tcp dport 80 counter name to_vip6
  }
}
"""


def client_counters(site):
    """What the client sent to the VIPs (nftables counters in its output hook)."""
    import json as _json
    out = _json.loads(site.client.run(["nft", "-j", "list", "counters", "table", "inet", "lbcount"]).stdout)
    return {c["counter"]["name"]: (c["counter"]["packets"], c["counter"]["bytes"])
            for c in out["nftables"] if "counter" in c}


def test_requests_spread_by_weight_and_counters_match(site):
    n4, n6 = 8000, 2000
    site.client.run(["nft", "-f", "-"], input=CLIENT_COUNTERS % (site.vip4, site.vip6))
    before = totals(site)
    sports4 = list(range(20000, 20000 + n4))
    sports6 = list(range(30000, 30000 + n6))

    def one(args):
        vip, sport = args
        for attempt in range(3):
            try:
                c = connect(site, vip, sport)
                try:
                    return whoami(c)
                finally:
                    c.close()
            except OSError:
                if attempt == 2:
                    raise
                time.sleep(0.2)     # a lost SYN on this busy box: retry the same 5-tuple

    jobs = [(site.vip4, p) for p in sports4] + [(site.vip6, p) for p in sports6]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    want = predicted(site, site.vip4, sports4) + predicted(site, site.vip6, sports6)
    assert got == want                                    # every response, from the predicted backend
    share = Counter(got)
    for i, b in enumerate(site.backends):
        ideal = (n4 + n6) * WEIGHTS[i] / sum(WEIGHTS)
        assert abs(share[b.name] - ideal) <= 0.05 * ideal, (share, ideal)
    after = totals(site)
    # connections counted once, on whichever node the router chose, on the right backend
    assert after[("webdav4", "new_flows")] - before[("webdav4", "new_flows")] == n4
    assert after[("webdav6", "new_flows")] - before[("webdav6", "new_flows")] == n6
    for fam, svc, sports in ((4, "webdav4", sports4), (6, "webdav6", sports6)):
        per = Counter(predicted(site, site.vip4 if fam == 4 else site.vip6, sports))
        for i, b in enumerate(site.backends):
            key = (svc, site.backend_addr(i, fam))
            assert after[key] - before[key] == per[b.name]
    # every packet the client sent to a VIP was forwarded and counted once, by one of the nodes
    # (the balancer counts Ethernet frames: 14 bytes more per packet than the IP packet)
    sent = client_counters(site)
    site.client.run(["nft", "delete", "table", "inet", "lbcount"])
    for svc, name in (("webdav4", "to_vip4"), ("webdav6", "to_vip6")):
        pkts = after[(svc, "packets")] - before[(svc, "packets")]
        assert pkts == sent[name][0]
        assert after[(svc, "bytes")] - before[(svc, "bytes")] == sent[name][1] + 14 * pkts
    assert sent["to_vip4"][0] >= 4 * n4          # SYN, ACK, request, FIN at least


def test_udp_datagrams_go_to_their_flows_backend(site):
    before = totals(site)
    got = {}
    for vip, base in ((site.vip4, 23000), (site.vip6, 24000)):
        fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
        sports = list(range(base, base + 200))
        for p in sports:
            with site.client.enter():
                s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind(("fd00:1::2" if ":" in vip else "10.1.0.2", p))
            s.settimeout(3)
            answers = set()
            for i in range(3):                       # three datagrams of one flow
                s.sendto(b"ping %d" % i, (vip, UDP_PORT))
                name, _, echo = s.recv(2048).decode().partition(" ")
                assert echo == f"ping {i}"
                answers.add(name)
            s.close()
            assert len(answers) == 1
            got[(vip, p)] = answers.pop()
        assert [got[(vip, p)] for p in sports] == predicted(site, vip, sports, proto=17)
    after = totals(site)
    assert after[("udp4", "new_flows")] - before[("udp4", "new_flows")] == 200
    assert after[("udp4", "packets")] - before[("udp4", "packets")] == 600
    assert after[("udp6", "packets")] - before[("udp6", "packets")] == 600


def test_backend_removal_keeps_other_connections(site):
    conns = []
    for p in range(40000, 40060):
        c = connect(site, site.vip4, p)
        conns.append((c, whoami(c)))
    victim = site.backends[0]
    addr = site.backend_addr(0)
    for node in site.nodes:
        out = subprocess.run([sys.executable, "-m", "gridbpf", "lb", "backend", "remove", "webdav4", addr,
                              "--instance", site.instance(node), "--json"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    try:
        for node in site.nodes:
            st = {s["name"]: s for s in site.status(node)["services"]}["webdav4"]
            assert addr not in [b["address"] for b in st["backends"]]
        survivors = [(c, b) for c, b in conns if b != victim.name]
        assert len(survivors) > 20
        for c, b in survivors:                        # keep-alive: same connection, same backend
            assert whoami(c) == b
        for p in range(41000, 41100):                 # new flows: never the removed backend
            c = connect(site, site.vip4, p)
            assert whoami(c) != victim.name
            c.close()
    finally:
        for c, _ in conns:
            c.close()
        for node in site.nodes:
            subprocess.run([sys.executable, "-m", "gridbpf", "lb", "backend", "add", "webdav4", addr,
                            "--mac", victim.mac("eth0"), "--weight", str(WEIGHTS[0]),
                            "--instance", site.instance(node)], check=True, capture_output=True)


def backend_healthy(site, node, addr):
    st = {s["name"]: s for s in site.status(node)["services"]}["webdav4"]
    return {b["address"]: b["healthy"] for b in st["backends"]}[addr]


def wait_for(cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_health_checks_take_a_backend_out_and_back(site):
    srv, addr = site.backends[1], site.backend_addr(1)
    # a stopped server refuses at once: out after `fall` checks, `interval` apart
    stop_nginx(srv)
    t0 = time.monotonic()
    try:
        for node in site.nodes:
            t = wait_for(lambda: not backend_healthy(site, node, addr), 8)
            # fall time, plus one interval of phase, plus the status command's own latency
            assert t - t0 < HEALTH["fall"] * HEALTH["interval"] + HEALTH["interval"] + 2.0
        for p in range(42000, 42100):               # every request succeeds, none to the stopped one
            c = connect(site, site.vip4, p)
            assert whoami(c) != srv.name
            c.close()
    finally:
        start_nginx(srv)
    srv.wait_port("127.0.0.1", 80)
    for node in site.nodes:
        wait_for(lambda: backend_healthy(site, node, addr), 8)
    got = set()
    for p in range(43000, 43100):
        c = connect(site, site.vip4, p)
        got.add(whoami(c))
        c.close()
    assert srv.name in got


def test_packet_too_big_reaches_the_backend_of_the_flow(site):
    """A narrow link between router and client: the router's ICMP "fragmentation needed" /
    ICMPv6 "packet too big" about the backends' DSR replies goes to the VIP, so to a balancer
    node; only if the node sends it on to the flow's backend does the backend lower its path
    MTU, and the download complete."""
    body = os.urandom(300_000)
    srv = site.backends[2]
    with open(os.path.join(site.lab.workdir, f"nginx-{srv.name}", "www", "big"), "wb") as f:
        f.write(body)
    before = sum(site.status(n)["reasons"]["fwd_icmp"] for n in site.nodes)
    site.router.ip("link", "set", "eth0", "mtu", "1280")
    try:
        for vip, base in ((site.vip4, 44000), (site.vip6, 45000)):
            # a client port whose flow Maglev gives to srv3, where the file is
            sport = next(p for p in range(base, base + 500) if predicted(site, vip, [p])[0] == srv.name)
            c = connect(site, vip, sport, timeout=10)
            c.request("GET", "/big")
            r = c.getresponse()
            assert r.status == 200 and r.read() == body
            c.close()
    finally:
        site.router.ip("link", "set", "eth0", "mtu", "1500")
    assert sum(site.status(n)["reasons"]["fwd_icmp"] for n in site.nodes) >= before + 2


@pytest.mark.parametrize("mode", ["ipip", "gue"])
def test_encapsulating_modes_end_to_end(mode):
    with Lab("lbenc") as lab:
        s = build_site(lab, nodes=1, mode=mode)
        try:
            s.write_configs(weights=WEIGHTS)
            s.start_balancer(s.nodes[0])
            s.wait_routes(s.nodes)          # the router learns the VIPs by BGP
            for vip, base in ((s.vip4, 21000), (s.vip6, 22000)):
                sports = list(range(base, base + 150))
                got = []
                for p in sports:
                    c = connect(s, vip, p)
                    got.append(whoami(c))
                    c.close()
                assert got == predicted(s, vip, sports)
            kind = 1 if mode == "gue" else 0          # decap_reasons: DECAP_IPIP, DECAP_GUE
            assert s.decap.map("decap_reasons").sum(kind) >= 300 * 4
        finally:
            s.close()
