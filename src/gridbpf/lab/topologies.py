"""Named topologies shared by tests, benchmarks, the demo and `gridbpf lab up`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .core import Host, Lab

# Addresses live only inside the lab's namespaces.
VIP4, VIP6 = "10.99.0.1", "fd00:99::1"


@dataclass
class Topology:
    lab: Lab
    hosts: dict[str, Host] = field(default_factory=dict)
    addrs: dict[str, str] = field(default_factory=dict)   # role -> address clients use

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


def http_server(host: Host, port: int = 80, body: str | None = None, addr: str = "::"):
    """A Python HTTP server in HOST serving a directory with 'whoami' (its host name)."""
    root = os.path.join(host.lab.workdir, f"www-{host.name}-{port}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "whoami"), "w") as f:
        f.write(body if body is not None else host.name)
    proc = host.popen([sys.executable, "-m", "http.server", "--bind", addr, "--directory", root,
                       str(port)], name=f"http{port}")
    return proc


def hash_like_hardware(router: Host) -> None:
    """ECMP over packet headers only (addresses, protocol, ports), as a hardware router does.
    Policy 1 would reuse the skb hash a veth carries over from the sender's socket, and TCP
    draws a new one after a retransmission timeout: flows would leave a dead next hop by
    themselves and hide the failure."""
    for fam in ("ipv4", "ipv6"):
        router.sysctl(f"net.{fam}.fib_multipath_hash_fields", "0x37")
        router.sysctl(f"net.{fam}.fib_multipath_hash_policy", 3)


BIRD_ROUTER = """\
# the lab's site router: learns routes by BGP from the neighbours below, installs them
# (several equal ones as one ECMP route) into the kernel; originates nothing
router id {router_id};
protocol device {{ scan time 10; }}
protocol bfd {{
  interface "*" {{ min rx interval {bfd_ms} ms; min tx interval {bfd_ms} ms; multiplier {mult}; }};
}}
protocol kernel kernel4 {{ ipv4 {{ import none; export all; }}; merge paths on; learn off; }}
protocol kernel kernel6 {{ ipv6 {{ import none; export all; }}; merge paths on; learn off; }}
{neighbours}
"""
BIRD_NEIGHBOUR = """\
protocol bgp {name} {{
  local as {local_as};
  neighbor {address} as {remote_as};
  hold time 9;
  bfd on;
  graceful restart off;
  connect delay time 1;
  connect retry time 2;
  error wait time 1, 2;
  ipv{fam} {{ import where net.len = {hostlen}; export none; }};
}}
"""


@dataclass
class BirdRouter:
    """BIRD running as a lab router (see bird_router)."""
    host: Host
    ctl: str
    conf: str
    process: object

    def birdc(self, *args: str) -> str:
        return subprocess.run(["birdc", "-s", self.ctl, *args], capture_output=True, text=True,
                              timeout=10).stdout

    def next_hops(self, prefix: str) -> list[str]:
        """The gateways of PREFIX in the router's kernel FIB (what forwarding uses), sorted."""
        fam = "-6" if ":" in prefix else "-4"
        out = self.host.ip(fam, "route", "show", prefix, check=False).stdout.split()
        return sorted(out[i + 1] for i, w in enumerate(out) if w == "via")

    def bfd_sessions(self) -> dict[str, tuple[str, float]]:
        """Neighbour address -> (state, transmit interval in seconds), from `show bfd sessions`."""
        out = {}
        for line in self.birdc("show", "bfd", "sessions").splitlines():
            f = line.split()
            if len(f) >= 6 and f[2] in ("Up", "Down", "Init", "AdminDown"):
                try:
                    out[f[0]] = (f[2], float(f[-2]))
                except ValueError:
                    pass
        return out

    def wait_bfd_up(self, addresses: list[str], interval: float, timeout: float = 20) -> None:
        """Poll until the BFD sessions with ADDRESSES are Up at the fast INTERVAL: a session
        still coming up (or still at its idle rate) detects a failure seconds later, not in
        3 intervals."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.bfd_sessions()
            if all(a in s and s[a][0] == "Up" and s[a][1] <= interval + 1e-6 for a in addresses):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host.name}: BFD sessions {s}, want {addresses} Up "
                                   f"at {interval} s, after {timeout} s")
            time.sleep(0.05)

    def wait_next_hops(self, prefix: str, want: list[str], timeout: float = 20) -> float:
        """Poll the FIB until PREFIX has exactly the gateways WANT; returns the monotonic time."""
        deadline = time.monotonic() + timeout
        while True:
            if self.next_hops(prefix) == sorted(want):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.host.name}: {prefix} via {self.next_hops(prefix)}, "
                                   f"not {sorted(want)}, after {timeout} s")
            time.sleep(0.01)


def bird_router(router: Host, router_id: str, local_as: int, neighbours: list[tuple[str, int]],
                bfd_ms: int = 100, multiplier: int = 3) -> BirdRouter:
    """Start BIRD on ROUTER with a BGP session (BFD on, graceful restart off) to every
    (address, AS) in NEIGHBOURS; it accepts host routes only (/32, /128) and merges equal
    ones into ECMP routes. Neighbours may come and go: failed sessions are retried within 2 s."""
    conf = os.path.join(router.lab.workdir, f"bird-{router.name}.conf")
    ctl = os.path.join(router.lab.workdir, f"bird-{router.name}.ctl")
    hosts = []
    for i, (addr, asn) in enumerate(neighbours):
        fam = 6 if ":" in addr else 4
        hosts.append(BIRD_NEIGHBOUR.format(name=f"n{i}_{fam}", local_as=local_as, address=addr,
                                           remote_as=asn, fam=fam, hostlen=32 if fam == 4 else 128))
    with open(conf, "w") as f:
        f.write(BIRD_ROUTER.format(router_id=router_id, bfd_ms=bfd_ms, mult=multiplier,
                                   neighbours="".join(hosts)))
    proc = router.popen(["bird", "-f", "-c", conf, "-s", ctl, "-P", conf + ".pid"], name="bird")
    r = BirdRouter(router, ctl, conf, proc)
    deadline = time.monotonic() + 10
    while "BIRD" not in r.birdc("show", "status"):
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"bird on {router.name} did not start: {proc.output()[-400:]}")
        time.sleep(0.05)
    return r


def web(lab: Lab) -> Topology:
    """client -- router -- server, IPv4 and IPv6, a Python HTTP server on the server."""
    t = Topology(lab)
    client, router, server = lab.host("client"), lab.host("router", forwarding=True), lab.host("server")
    lab.link(client, router, ["10.1.0.2/24", "fd00:1::2/64"], ["10.1.0.1/24", "fd00:1::1/64"], "eth0", "eth0")
    lab.link(router, server, ["10.2.0.1/24", "fd00:2::1/64"], ["10.2.0.2/24", "fd00:2::2/64"], "eth1", "eth0")
    client.route("default via 10.1.0.1")
    client.route("default via fd00:1::1")
    server.route("default via 10.2.0.1")
    server.route("default via fd00:2::1")
    http_server(server, 80)
    t.hosts = {"client": client, "router": router, "server": server}
    t.addrs = {"server": "10.2.0.2", "server6": "fd00:2::2"}
    return t


def ecmp(lab: Lab, servers: int = 2) -> Topology:
    """client -- router ==ECMP(L4 hash)==> bridge in 'switch' --> N servers that all hold the VIP
    on loopback (the shape of a DSR site: arp_ignore/arp_announce so only the router's next hop
    answers for its own address)."""
    t = Topology(lab)
    client, router = lab.host("client"), lab.host("router", forwarding=True)
    switch = lab.host("switch")
    lab.link(client, router, ["10.1.0.2/24", "fd00:1::2/64"], ["10.1.0.1/24", "fd00:1::1/64"], "eth0", "eth0")
    lab.bridge(switch, "br0")
    lab.attach_to_bridge(switch, "br0", router, ["10.2.0.1/24", "fd00:2::1/64"], host_if="eth1")
    hash_like_hardware(router)
    client.route("default via 10.1.0.1")
    client.route("default via fd00:1::1")
    hops4, hops6 = [], []
    for i in range(1, servers + 1):
        s = lab.host(f"srv{i}")
        lab.attach_to_bridge(switch, "br0", s, [f"10.2.0.{10 + i}/24", f"fd00:2::{10 + i}/64"])
        s.add_addrs("lo", [f"{VIP4}/32", f"{VIP6}/128"])
        s.sysctl("net.ipv4.conf.all.arp_ignore", 1)
        s.sysctl("net.ipv4.conf.all.arp_announce", 2)
        s.route("default via 10.2.0.1")
        s.route("default via fd00:2::1")
        http_server(s, 80)
        # Static neighbours on the router: the first flows need no ARP/ND round (no racy start).
        mac = s.mac("eth0")
        router.ip_batch([f"neigh replace 10.2.0.{10 + i} lladdr {mac} dev eth1 nud permanent",
                         f"neigh replace fd00:2::{10 + i} lladdr {mac} dev eth1 nud permanent"])
        hops4.append(f"nexthop via 10.2.0.{10 + i} dev eth1")
        hops6.append(f"nexthop via fd00:2::{10 + i} dev eth1")
        t.hosts[s.name] = s
    router.ip("-4", "route", "add", f"{VIP4}/32", *" ".join(hops4).split())
    router.ip("-6", "route", "add", f"{VIP6}/128", *" ".join(hops6).split())
    t.hosts.update({"client": client, "router": router, "switch": switch})
    t.addrs = {"vip": VIP4, "vip6": VIP6}
    # Ready when the client reaches every server over both families (new IPv6 paths can need
    # a moment before they forward).
    for i in range(1, servers + 1):
        client.wait_port(f"10.2.0.{10 + i}", 80)
        client.wait_port(f"fd00:2::{10 + i}", 80)
    return t


TOPOLOGIES = {"web": web, "ecmp": ecmp}
