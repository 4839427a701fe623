"""Named topologies shared by tests, benchmarks, the demo and `gridbpf lab up`."""
from __future__ import annotations

import os
import sys
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
    router.sysctl("net.ipv4.fib_multipath_hash_policy", 1)    # L4: ports in the hash
    router.sysctl("net.ipv6.fib_multipath_hash_policy", 1)
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
