"""The virtual grid site in a Lab: shared by the lb tests, the benchmark and the demo.

    client -- router ==ECMP==> switch (bridge) -- lb1, lb2   (balancer nodes, XDP on eth0)
                                               -- srv1..N  (nginx WebDAV, VIP on loopback)

The router spreads flows to the VIP over the balancer nodes, hashing packet headers like a
hardware router; it runs BIRD and learns the VIP routes only from the nodes (each node's
`gridbpf lb run` announces them by BGP with BFD), unless the site is built with bgp=False
(static ECMP routes). Each node runs the same lb.toml (but its own interface), so any node
picks the same backend for a flow; backends answer the client directly (DSR) through the router.

Lab facts this relies on (design.md): native XDP_TX on a veth reaches its peer only if the peer
runs an XDP program (xdp_pass on the switch ports of the balancers), and native XDP does not
complete partial checksums, so the senders' veths have tx checksum offload off.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ..bpf import BpfObject, remove_pins
from ..lab import Host, Lab
from ..lab.topologies import BirdRouter, bird_router, hash_like_hardware
from .bgp import alive, run_dir
from .datapath import PIN_DIR

VIP4, VIP6 = "10.99.0.1", "fd00:99::1"
ROUTER_AS, NODE_AS = 65000, 65001
FAILURES = ("kill", "blackhole", "sigterm")
BLACKHOLE = """
table netdev blackhole_%(name)s {
  chain in { type filter hook ingress device "%(port)s" priority 0; policy drop; }
  chain out { type filter hook egress device "%(port)s" priority 0; policy drop; }
}
"""
NGINX_CONF = """
worker_processes 1;
user root;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
include /etc/nginx/modules-enabled/*.conf;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    client_max_body_size 0;
    keepalive_requests 100000;
    server {{
        listen 80 reuseport;
        listen [::]:80 ipv6only=on reuseport;
        root {work}/www;
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path on;
            dav_access user:rw group:rw all:r;
        }}
    }}
}}
"""


@dataclass
class Site:
    lab: Lab
    client: Host
    router: Host
    switch: Host
    nodes: list[Host]
    backends: list[Host]
    mode: str
    configs: dict[str, str] = field(default_factory=dict)    # node name -> lb.toml path
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    decap: BpfObject | None = None        # tc_decap on the backends (ipip/gue sites)
    _pass_objs: list = field(default_factory=list)
    _links: list = field(default_factory=list)
    vip4: str = VIP4
    vip6: str = VIP6
    bird: BirdRouter | None = None        # the router's BIRD (bgp sites)

    def node_addr(self, node: Host, family: int = 4) -> str:
        i = self.nodes.index(node)
        return f"10.2.0.{2 + i}" if family == 4 else f"fd00:2::{2 + i:x}"

    def backend_addr(self, i: int, family: int = 4) -> str:
        return f"10.2.0.{11 + i}" if family == 4 else f"fd00:2::{11 + i:x}"

    def config_text(self, node: Host, metrics_port: int, health: dict | None = None,
                    weights: list[int] | None = None, udp_port: int | None = None,
                    bgp: dict | None = None, table_size: int | None = None, bfd: bool = True,
                    balancer: dict | None = None, n_backends: int | None = None) -> str:
        """lb.toml of a node: the same services and backends everywhere, only the interface's
        namespace, the instance name and the metrics port differ. Services webdav4/webdav6
        (TCP 80), and with UDP_PORT also udp4/udp6 (no health checks: see start_udp_echo).
        On bgp sites a [bgp] table (keys in BGP override the lab's defaults: announce_delay
        1 s, BFD every 100 ms) with the router as IPv4 and IPv6 peer. TABLE_SIZE: Maglev slots
        (nodes that disagree on it send a moved flow to another backend). BALANCER: more keys of
        [balancer]. N_BACKENDS: only the first N backends are in the services."""
        h = {"check": "http", "interval": 0.5, "timeout": 0.5, "rise": 2, "fall": 2, "path": "/whoami"}
        h.update(health or {})
        hl = "\n".join(f"{k} = {json.dumps(v)}" for k, v in h.items())
        out = [f'[balancer]\ninterface = "eth0"\nnetns = "{node.netns}"\nxdp_mode = "native"\n'
               f'instance = "{self.lab.name}-{node.name}"\nmetrics = "127.0.0.1:{metrics_port}"\n'
               + (f"table_size = {table_size}\n" if table_size else "")
               + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (balancer or {}).items()),
               f"[health]\n{hl}\n"]
        if self.bird:
            b = {"local_as": NODE_AS, "router_id": self.node_addr(node), "announce_delay": 1.0,
                 "bfd_interval": 0.1}
            b.update(bgp or {})
            out.append("[bgp]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in b.items()))
            for peer in ("10.2.0.1", "fd00:2::1"):
                out.append(f'[[bgp.peer]]\naddress = "{peer}"\nremote_as = {ROUTER_AS}\n'
                           + ("" if bfd else "bfd = false\n"))
        services = [(f"webdav{fam}", vip, 80, "tcp", "") for fam, vip in ((4, self.vip4), (6, self.vip6))]
        if udp_port:
            services += [(f"udp{fam}", vip, udp_port, "udp", 'health = { check = "none" }\n')
                         for fam, vip in ((4, self.vip4), (6, self.vip6))]
        for name, vip, port, proto, extra in services:
            fam = 6 if ":" in vip else 4
            out.append(f'[[service]]\nname = "{name}"\nvip = "{vip}"\nport = {port}\n'
                       f'protocol = "{proto}"\nmode = "{self.mode}"\n{extra}')
            for i, b in enumerate(self.backends[:n_backends]):
                w = weights[i] if weights else 1
                out.append(f'[[service.backend]]\naddress = "{self.backend_addr(i, fam)}"\n'
                           f'mac = "{b.mac("eth0")}"\nweight = {w}\n')
        return "\n".join(out)

    def write_configs(self, base_port: int = 0, table_sizes: list[int] | None = None, **kw) -> None:
        """TABLE_SIZES: per node (in order), to make nodes disagree."""
        for n, node in enumerate(self.nodes):
            port = self.metrics_ports.get(node.name) or (base_port + n if base_port else _free_port())
            self.metrics_ports[node.name] = port
            path = os.path.join(self.lab.workdir, f"lb-{node.name}.toml")
            with open(path, "w") as f:
                f.write(self.config_text(node, port, table_size=table_sizes[n] if table_sizes else None, **kw))
            self.configs[node.name] = path

    def start(self, **config) -> "Site":
        """Write every node's lb.toml (keyword arguments: see config_text) and start them all."""
        self.write_configs(**config)
        for n in self.nodes:
            self.start_balancer(n)
        self.wait_routes(self.nodes)
        return self

    def wait_routes(self, nodes: list[Host], timeout: float = 30) -> float:
        """On a bgp site: wait until the router forwards both VIPs to exactly NODES."""
        t = time.monotonic()
        if self.bird:
            for fam, vip in ((4, self.vip4), (6, self.vip6)):
                t = self.bird.wait_next_hops(vip, [self.node_addr(n, fam) for n in nodes], timeout)
        return t

    def start_balancer(self, node: Host, timeout: float = 20) -> subprocess.Popen:
        """`gridbpf lb run` for NODE, in the root namespace (pins live in the host's bpffs);
        returns once its pins exist."""
        _kill_leftover(self.instance(node))
        log = open(os.path.join(self.lab.workdir, f"lb-{node.name}.log"), "ab")
        p = subprocess.Popen([sys.executable, "-m", "gridbpf", "lb", "run", "--config", self.configs[node.name]],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.daemons[node.name] = p
        pin = f"/sys/fs/bpf/gridbpf/lb/{self.lab.name}-{node.name}/lb_ring"
        deadline = time.monotonic() + timeout
        while not os.path.exists(pin):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lb on {node.name} did not start: {self.daemon_log(node)[-800:]}")
            time.sleep(0.05)
        return p

    def stop_balancer(self, node: Host, sig: int = signal.SIGTERM) -> int | None:
        p = self.daemons.pop(node.name, None)
        if p is None:
            return None
        if p.poll() is None:
            os.killpg(p.pid, sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        return p.returncode

    def fail_node(self, node: Host, kind: str) -> float:
        """Make NODE fail; returns when (time.monotonic()). Kinds (FAILURES):
        kill:      kill -9 of its `lb run` (only that process: BIRD must go by itself) and
                   its link down;
        blackhole: its switch port drops every frame both ways; the daemon and BIRD run on,
                   so only BFD can tell;
        sigterm:   a graceful stop (withdraw, wait, detach)."""
        p = self.daemons[node.name]
        port = f"p-{node.name}"[:15]
        t = time.monotonic()
        if kind == "kill":
            node.ip("link", "set", "eth0", "down")      # first: no FIN reaches the router
            os.kill(p.pid, signal.SIGKILL)
        elif kind == "blackhole":
            # on the switch port, not in the node: the node's XDP program sees frames before any
            # hook there could drop them (and its XDP_TX frames skip the node's egress hooks)
            self.switch.run(["nft", "-f", "-"], input=BLACKHOLE % {"port": port, "name": node.name})
        elif kind == "sigterm":
            os.kill(p.pid, signal.SIGTERM)
        else:
            raise ValueError(f"unknown failure {kind!r} (one of {', '.join(FAILURES)})")
        return t

    def heal_node(self, node: Host, kind: str) -> None:
        """Undo fail_node: the node is back on the network with its balancer stopped."""
        if kind == "kill":
            p = self.daemons.pop(node.name)
            p.wait(10)
            # what a killed daemon leaves (the next start would clear it too)
            remove_pins(f"{PIN_DIR}/{self.instance(node)}")
            shutil.rmtree(run_dir(self.instance(node)), ignore_errors=True)
            node.ip("link", "set", "eth0", "up")
            node.run("ip route replace default via 10.2.0.1 && ip -6 route replace default via fd00:2::1")
        elif kind == "blackhole":
            self.switch.run(["nft", "delete", "table", "netdev", f"blackhole_{node.name}"])
            self.stop_balancer(node)
        else:
            self.stop_balancer(node)

    def daemon_log(self, node: Host) -> str:
        with open(os.path.join(self.lab.workdir, f"lb-{node.name}.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def instance(self, node: Host) -> str:
        return f"{self.lab.name}-{node.name}"

    def status(self, node: Host) -> dict:
        out = subprocess.run([sys.executable, "-m", "gridbpf", "lb", "status", "--json",
                              "--instance", self.instance(node)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def backend_totals(self) -> dict[str, dict[str, int]]:
        """Per backend host (srv1...): packets, bytes, new flows summed over the running
        nodes and both services (IPv4 and IPv6), from `lb status --json`."""
        by_addr = {self.backend_addr(i, f): b.name for i, b in enumerate(self.backends) for f in (4, 6)}
        out = {b.name: {"packets": 0, "bytes": 0, "new_flows": 0} for b in self.backends}
        for node in self.nodes:
            if node.name not in self.daemons:
                continue
            for s in self.status(node)["services"]:
                for b in s["backends"]:
                    name = by_addr.get(b["address"])
                    if name:
                        for k in out[name]:
                            out[name][k] += b[k]
        return out

    def close(self) -> None:
        for name in list(self.daemons):
            self.stop_balancer(next(n for n in self.nodes if n.name == name))
        for link in self._links:
            try:
                link.detach()
            except Exception:
                pass
        for o in self._pass_objs:
            o.close()


def _kill_leftover(instance: str) -> None:
    """A balancer of this lab's instance left running by an earlier run that was killed."""
    try:
        with open(f"/run/gridbpf/lb-{instance}.pid") as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except (OSError, ValueError):
        return
    if b"lb" in cmd and b"run" in cmd and any(f"lb-{instance.split('-', 1)[1]}.toml".encode() in c for c in cmd):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(host: Host) -> None:
    work = os.path.join(host.lab.workdir, f"nginx-{host.name}")
    for d in ("www", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(work, d), exist_ok=True)
    with open(os.path.join(work, "www", "whoami"), "w") as f:
        f.write(host.name + "\n")
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(work=work))
    host.popen(["nginx", "-c", conf, "-g", "daemon off;"], name="nginx")


UDP_ECHO = r"""
import socket, sys
name, port = sys.argv[1].encode(), int(sys.argv[2])
socks = []
for fam, vip in ((socket.AF_INET, sys.argv[3]), (socket.AF_INET6, sys.argv[4])):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.bind((vip, port))          # bound to the VIP: replies leave from the VIP (DSR)
    socks.append(s)
import selectors
sel = selectors.DefaultSelector()
for s in socks:
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(2048)
        key.fileobj.sendto(name + b" " + data, peer)
"""


def start_udp_echo(host: Host, port: int) -> None:
    """A UDP server on the VIPs that answers 'HOSTNAME <datagram>' (the UDP services' backend)."""
    path = os.path.join(host.lab.workdir, "udp_echo.py")
    with open(path, "w") as f:
        f.write(UDP_ECHO)
    p = host.popen([sys.executable, path, host.name, str(port), VIP4, VIP6], name="udpecho")
    deadline = time.monotonic() + 10
    while "ready" not in p.output():
        if not p.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"udp echo on {host.name} did not start: {p.output()[-300:]}")
        time.sleep(0.05)


def stop_nginx(host: Host) -> None:
    for p in host.processes:
        if p.cmd and p.cmd[0] == "nginx" and p.alive():
            p.stop()


def build_site(lab: Lab, backends: int = 3, nodes: int = 2, mode: str = "dsr-l2",
               nginx: bool = True, bgp: bool = True) -> Site:
    """Build the site's namespaces, links, routes and nginx backends. Balancers are not
    started: site.start() (or write_configs() then start_balancer(node) per node, then
    wait_routes). With BGP the router runs BIRD and has no VIP route until nodes announce it;
    without, static ECMP routes to every node. The demo:

        with Lab("demo") as lab:
            site = build_site(lab).start()
            try: ... site.client.run(["curl", f"http://{site.vip4}/whoami"]); site.status(site.nodes[0])
            finally: site.close()
    """
    client, router, switch = lab.host("client"), lab.host("router", forwarding=True), lab.host("switch")
    lab.link(client, router, ["10.1.0.2/24", "fd00:1::2/64"], ["10.1.0.1/24", "fd00:1::1/64"], "eth0", "eth0")
    lab.bridge(switch, "br0")
    lab.attach_to_bridge(switch, "br0", router, ["10.2.0.1/24", "fd00:2::1/64"], host_if="eth1")
    client.route("default via 10.1.0.1")
    client.route("default via fd00:1::1")
    hash_like_hardware(router)
    site = Site(lab, client, router, switch, [], [], mode)
    for i in range(nodes):
        n = lab.host(f"lb{i + 1}")
        lab.attach_to_bridge(switch, "br0", n, [f"10.2.0.{2 + i}/24", f"fd00:2::{2 + i:x}/64"])
        # A NIC drops frames for other MACs before XDP runs; a veth does not. Without this, a
        # dead node's port going down makes the bridge flood its frames to the other nodes,
        # whose XDP program forwards them: a failure that heals with no route change.
        switch.run(["bridge", "link", "set", "dev", f"p-{n.name}"[:15], "flood", "off"])
        n.route("default via 10.2.0.1")
        n.route("default via fd00:2::1")
        for conf in ("all", "eth0"):    # IPv6 addresses survive a link down (failure tests)
            n.sysctl(f"net.ipv6.conf.{conf}.keep_addr_on_down", 1)
        site.nodes.append(n)
    for i in range(backends):
        s = lab.host(f"srv{i + 1}")
        lab.attach_to_bridge(switch, "br0", s, [f"10.2.0.{11 + i}/24", f"fd00:2::{11 + i:x}/64"])
        s.add_addrs("lo", [f"{VIP4}/32", f"{VIP6}/128"])
        # only the VIP's real owner (the balancer path) may answer ARP/ND for it
        s.sysctl("net.ipv4.conf.all.arp_ignore", 1)
        s.sysctl("net.ipv4.conf.all.arp_announce", 2)
        s.sysctl("net.ipv4.conf.all.rp_filter", 0)
        s.sysctl("net.ipv4.conf.eth0.rp_filter", 0)
        s.route("default via 10.2.0.1")
        s.route("default via fd00:2::1")
        site.backends.append(s)
    if bgp:
        site.bird = bird_router(router, "10.2.0.1", ROUTER_AS,
                                [(site.node_addr(n, fam), NODE_AS) for n in site.nodes for fam in (4, 6)])
    else:
        hops4 = " ".join(f"nexthop via 10.2.0.{2 + i} dev eth1" for i in range(nodes))
        hops6 = " ".join(f"nexthop via fd00:2::{2 + i:x} dev eth1" for i in range(nodes))
        router.ip("-4", "route", "add", f"{VIP4}/32", *hops4.split())
        router.ip("-6", "route", "add", f"{VIP6}/128", *hops6.split())
    # native XDP on veth: senders' partial checksums are not completed by XDP
    for h, ifname in [(client, "eth0"), (router, "eth0"), (router, "eth1")] + [(s, "eth0") for s in site.backends]:
        h.run(["ethtool", "-K", ifname, "tx", "off"])
    # ... and XDP_TX reaches the peer veth only if the peer runs an XDP program
    obj = BpfObject.open("decap")
    obj.load()
    site._pass_objs.append(obj)
    for n in site.nodes:
        site._links.append(obj.program("xdp_pass").attach_xdp(f"p-{n.name}"[:15], "native", switch.netns))
    if mode in ("ipip", "gue"):
        dobj = BpfObject.open("decap")
        dobj.rodata["gue_port"] = ((6080 & 0xFF) << 8) | (6080 >> 8)
        dobj.load()
        site._pass_objs.append(dobj)
        site.decap = dobj
        for s in site.backends:
            site._links.append(dobj.program("tc_decap").attach_tc("eth0", "ingress", s.netns))
    if nginx:
        for s in site.backends:
            start_nginx(s)
        for s in site.backends:
            s.wait_port("127.0.0.1", 80)
    return site


class Uploads:
    """N concurrent long PUTs from the client to the VIPs (every third one over IPv6), each
    CHUNKS chunks of 64 KiB sent at a steady pace over SECONDS, one TCP connection each. For
    every upload: the HTTP status or the error, and the longest stall: the longest time its
    acknowledged byte count (TCP_INFO tcpi_bytes_acked, sampled every 10 ms) did not move
    while data was outstanding. check_files() then compares what the backends stored."""

    CHUNK = 64 * 1024

    def __init__(self, site: Site, n: int = 24, seconds: float = 6.0, chunks: int = 60, tag: str = "up",
                 sports: list[int] | None = None):
        import threading
        self.site, self.n, self.seconds, self.chunks, self.tag = site, n, seconds, chunks, tag
        self.sports = sports          # per upload: the client's source port (None: any)
        self.results: dict[int, dict] = {}
        self._socks: dict[int, object] = {}
        self._mu = threading.Lock()
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._upload, args=(k,), daemon=True) for k in range(n)]
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self.connected = threading.Semaphore(0)

    def body_chunk(self, k: int, i: int) -> bytes:
        import hashlib
        return hashlib.sha256(b"%s-%d-%d" % (self.tag.encode(), k, i)).digest() * (self.CHUNK // 32)

    def path(self, k: int) -> str:
        return f"/{self.tag}-{k}.dat"

    def start(self) -> "Uploads":
        for t in self._threads:
            t.start()
        self._monitor.start()
        return self

    def wait_connected(self, timeout: float = 20) -> None:
        for _ in range(self.n):
            if not self.connected.acquire(timeout=timeout):
                raise TimeoutError("uploads did not all connect")

    def _upload(self, k: int) -> None:
        import http.client
        import socket
        vip = self.site.vip6 if k % 3 == 2 else self.site.vip4
        res = {"vip": vip, "status": None, "error": None, "stall": 0.0, "size": self.CHUNK * self.chunks}
        self.results[k] = res
        try:
            with self.site.client.enter():
                s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_STREAM)
            if self.sports:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if ":" in vip else "0.0.0.0", self.sports[k]))
            s.settimeout(30)
            s.connect((vip, 80))
            res["sport"] = s.getsockname()[1]
            c = http.client.HTTPConnection(vip, 80, timeout=30)
            c.sock = s
            with self._mu:
                self._socks[k] = s
            self.connected.release()
            c.putrequest("PUT", self.path(k))
            c.putheader("Content-Length", str(res["size"]))
            c.endheaders()
            t0 = time.monotonic()
            for i in range(self.chunks):
                c.send(self.body_chunk(k, i))
                pause = t0 + (i + 1) * self.seconds / self.chunks - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            r = c.getresponse()
            r.read()
            res["status"] = r.status
            c.close()
        except Exception as e:
            res["error"] = repr(e)[:120]
            self.connected.release()
        finally:
            with self._mu:
                self._socks.pop(k, None)

    def _watch(self) -> None:
        import socket
        import struct
        last: dict[int, tuple[int, float]] = {}
        while any(t.is_alive() for t in self._threads):
            now = time.monotonic()
            with self._mu:
                socks = dict(self._socks)
            for k, s in socks.items():
                try:
                    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 136)
                except OSError:
                    continue
                acked = struct.unpack_from("Q", info, 120)[0]      # tcpi_bytes_acked
                unacked = struct.unpack_from("I", info, 24)[0]     # tcpi_unacked (segments)
                self.results[k]["retrans"] = struct.unpack_from("I", info, 100)[0]   # tcpi_total_retrans
                prev = last.get(k)
                if prev is None or acked != prev[0] or not unacked:
                    last[k] = (acked, now)
                else:
                    self.results[k]["stall"] = max(self.results[k]["stall"], now - prev[1])
            time.sleep(0.01)

    def abort(self) -> None:
        """End every upload still running (its thread records the error)."""
        import socket
        with self._mu:
            socks = list(self._socks.values())
        for so in socks:
            try:
                so.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def wait(self, timeout: float = 120) -> dict[int, dict]:
        for t in self._threads:
            t.join(timeout)
        self._monitor.join(5)
        return self.results

    def failed(self) -> list[tuple[int, dict]]:
        return [(k, r) for k, r in sorted(self.results.items()) if r["error"] or r["status"] not in (201, 204)]

    def check_files(self) -> list[str]:
        """Uploads that did not arrive whole on exactly one backend (size and SHA-256)."""
        import hashlib
        bad = []
        for k, r in sorted(self.results.items()):
            if r["status"] not in (201, 204):
                continue
            want = hashlib.sha256()
            for i in range(self.chunks):
                want.update(self.body_chunk(k, i))
            found = []
            for b in self.site.backends:
                p = os.path.join(self.site.lab.workdir, f"nginx-{b.name}", "www", self.path(k).lstrip("/"))
                if os.path.exists(p):
                    with open(p, "rb") as f:
                        found.append(hashlib.sha256(f.read()).hexdigest())
            if found != [want.hexdigest()]:
                bad.append(f"{self.path(k)}: {len(found)} copies, whole: {want.hexdigest() in found}")
        return bad

    def remove_files(self) -> None:
        for k in range(self.n):
            for b in self.site.backends:
                p = os.path.join(self.site.lab.workdir, f"nginx-{b.name}", "www", self.path(k).lstrip("/"))
                if os.path.exists(p):
                    os.unlink(p)


def node_flows(site: Site, node: Host) -> int:
    return sum(s["new_flows"] for s in site.status(node)["services"])


def wait_dead(pid: int, timeout: float) -> float:
    """When PID was seen dead (gone or a zombie); fails after TIMEOUT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return time.monotonic()
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} still alive after {timeout} s")


def fail_during_uploads(site: Site, kind: str, uploads: int = 24, seconds: float = 6.0) -> dict:
    """UPLOADS long uploads (SECONDS each) through both nodes; lb2 fails KIND 1.5 s in.
    Returns how many flows went through lb2, when the router's FIB dropped it (per family,
    seconds after the failure), when BIRD died (kill), the failed uploads, the files that did
    not arrive whole, the longest stall of any upload and the router's `show protocols`."""
    lb1, lb2 = site.nodes
    before = node_flows(site, lb2)
    with open(os.path.join(run_dir(site.instance(lb2)), "bird.pid")) as f:
        bird_pid = int(f.read())
    up = Uploads(site, n=uploads, seconds=seconds, chunks=round(seconds * 10), tag=kind).start()
    try:
        up.wait_connected()
        time.sleep(1.5)
        if site.bird:      # the lab's nodes run BFD every 100 ms (config_text)
            site.bird.wait_bfd_up([site.node_addr(lb2, fam) for fam in (4, 6)], 0.1)
        via_lb2 = node_flows(site, lb2) - before
        t = site.fail_node(lb2, kind)
        bird_gone = wait_dead(bird_pid, 2) - t if kind == "kill" else None
        fib = [site.bird.wait_next_hops(vip, [site.node_addr(lb1, fam)], timeout=10) - t
               for fam, vip in ((4, site.vip4), (6, site.vip6))]
        router_view = site.bird.birdc("show", "protocols")
        up.wait()
        return {"via_lb2": via_lb2, "fib_s": fib, "bird_gone_s": bird_gone, "failed": up.failed(),
                "bad_files": up.check_files(), "stall": max(r["stall"] for r in up.results.values()),
                "router_view": router_view}
    finally:
        up.wait()
        up.remove_files()
        site.heal_node(lb2, kind)


# --- a SYN flood through a node while long flows run and a backend is added -----------------------

def ports_moved_by_adding(site: Site, vip: str, n_before: int, n: int, first_port: int = 20000,
                          table_size: int | None = None) -> list[int]:
    """N client source ports (from the client's address to VIP port 80) whose backend changes
    when backend N_BEFORE joins backends 0..N_BEFORE-1 (all weight 1): the flows that only
    the connection table keeps where they are."""
    import numpy as np

    from . import maglev
    size = table_size or maglev.DEFAULT_SIZE
    fam = 6 if ":" in vip else 4
    client = "fd00:1::2" if fam == 6 else "10.1.0.2"
    addrs = [site.backend_addr(i, fam) for i in range(n_before + 1)]
    sports = np.arange(first_port, min(first_port + 30000, 65536))
    k = len(sports)
    h = maglev.flow_hash(np.tile(np.frombuffer(maglev.addr16(client), np.uint8), (k, 1)),
                         np.tile(np.frombuffer(maglev.addr16(vip), np.uint8), (k, 1)),
                         sports, np.full(k, 80), np.full(k, 6))
    before_names, before = maglev.build_table({a: 1 for a in addrs[:-1]}, size)
    after_names, after = maglev.build_table({a: 1 for a in addrs}, size)
    moved = np.array(before_names)[before[h % size]] != np.array(after_names)[after[h % size]]
    return [int(p) for p in sports[moved][:n]]


def keepalive(site: Site, vip: str, sport: int, timeout: float = 5):
    """An HTTP keep-alive connection from the client's SPORT to VIP:80."""
    import http.client
    import socket
    fam = socket.AF_INET6 if ":" in vip else socket.AF_INET
    with site.client.enter():
        sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", sport))
    sock.settimeout(timeout)
    sock.connect((vip, 80))
    conn = http.client.HTTPConnection(vip, 80, timeout=timeout)
    conn.sock = sock
    return conn


def whoami(conn) -> str:
    """The backend that answers GET /whoami on CONN, or "error: ..." (reset, timeout)."""
    try:
        conn.request("GET", "/whoami")
        r = conn.getresponse()
        body = r.read().decode().strip()
        return body if r.status == 200 else f"error: HTTP {r.status}"
    except Exception as e:
        return f"error: {type(e).__name__}"


def syn_flood(site: Site, count: int, seconds: float = 20.0, vip: str | None = None,
              ack: bool = False, cpu: int | None = None) -> list:
    """Start one spoofed-SYN sender per CPU (or one on CPU) in the client's namespace, COUNT
    SYNs in all, from the client's /24 (not its own or the router's address)
    to VIP:80; returns the processes once they all send. Each prints its JSON summary."""
    cpus = [cpu] if cpu is not None else list(range(os.cpu_count() or 1))
    ncpu = len(cpus)
    procs = []
    for c in cpus:
        procs.append(site.client.popen(
            [sys.executable, "-m", "gridbpf.lb.flood", "--iface", "eth0", "--src-mac", site.client.mac("eth0"),
             "--dst-mac", site.router.mac("eth0"), "--src-net", "10.1.0.0/24", "--avoid", "10.1.0.1",
             "--avoid", "10.1.0.2", "--dst", vip or site.vip4, "--count", str(count // ncpu),
             "--seconds", str(seconds), "--seed", str(c + 1), "--cpu", str(c)] + (["--ack"] if ack else []),
            name=f"synflood{c}"))
    deadline = time.monotonic() + 30
    while not all("ready" in p.output() for p in procs):
        if any(not p.alive() and "ready" not in p.output() for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.stop()
            raise RuntimeError(f"SYN flood did not start: {[p.output()[-300:] for p in procs]}")
        time.sleep(0.02)
    return procs


def flood_summary(procs, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    for p in procs:
        while p.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        p.stop()
    sums = []
    for p in procs:
        try:
            sums.append(json.loads(p.output().strip().splitlines()[-1]))
        except (ValueError, IndexError):
            raise RuntimeError(f"SYN flood sender failed: {p.output()[-500:]}") from None
    sent = sum(s["sent"] for s in sums)
    start, end = min(s["start"] for s in sums), max(s["end"] for s in sums)
    secs = round(end - start, 3)
    return {"sent": sent, "seconds": secs, "pps": round(sent / secs) if secs else 0, "start": start, "end": end}


def flood_with_backend_change(site: Site, node: Host, flood_count: int, legit: int = 40,
                              upload_seconds: float = 0.0, n_before: int = 3, ack: bool = False,
                              cpu: int = 0) -> dict:
    """LEGIT keep-alive connections (and with UPLOAD_SECONDS one paced upload) whose Maglev
    slot moves to backend N_BEFORE when it is added; a spoofed SYN flood of FLOOD_COUNT
    through NODE; the backend added by `gridbpf lb backend add` 0.5 s into the flood. Then each
    connection asks again who it talks to. Returns the share of connections that kept their
    backend, the upload's outcome, the flood's rate and NODE's connection-table events.

    Everything that sends (the flood, the connections, the upload) runs on CPU: the lab's veth
    has one RX queue, so the XDP program runs on whichever CPU sends into it, and the per-CPU
    LRU lists of the connection table (BPF_F_NO_COMMON_LRU) would otherwise keep the flood
    and the legitimate flows apart. A real flood reaches every RX queue (RSS), so every CPU's list."""
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})        # this thread and the threads it starts
    try:
        return _flood_with_backend_change(site, node, flood_count, legit, upload_seconds, n_before, ack, cpu)
    finally:
        os.sched_setaffinity(0, affinity)


def _flood_with_backend_change(site, node, flood_count, legit, upload_seconds, n_before, ack, cpu):
    vip = site.vip4
    ports = ports_moved_by_adding(site, vip, n_before, legit + 1)
    conns = [keepalive(site, vip, p) for p in ports[1:]]
    first = [whoami(c) for c in conns]
    if any(f.startswith("error") for f in first):
        raise RuntimeError(f"connections failed before the flood: {first}")
    up = None
    if upload_seconds:
        up = Uploads(site, n=1, seconds=upload_seconds, chunks=max(2, round(upload_seconds)),
                     tag="flood", sports=[ports[0]]).start()
        up.wait_connected()
        time.sleep(1.0)
    before = site.status(node)["conntrack"]
    procs = syn_flood(site, flood_count, ack=ack, cpu=cpu)
    time.sleep(0.5)
    new = site.backends[n_before]
    subprocess.run([sys.executable, "-m", "gridbpf", "lb", "backend", "add", "webdav4",
                    site.backend_addr(n_before), "--mac", new.mac("eth0"), "--instance",
                    site.instance(node), "--json"], check=True, capture_output=True)
    added_at = time.time()
    fl = flood_summary(procs)
    after = site.status(node)["conntrack"]
    second = [whoami(c) for c in conns]
    for c in conns:
        c.close()
    kept = sum(1 for a, b in zip(first, second) if a == b)
    out = {"legit_flows": len(conns), "kept": kept, "kept_share": round(kept / len(conns), 3),
           "moved_or_broken": [f"{a} -> {b}" for a, b in zip(first, second) if a != b][:5],
           "flood": {k: fl[k] for k in ("sent", "seconds", "pps")},
           "backend_added_s": [round(added_at - fl["start"], 2), "into a flood of", fl["seconds"]],
           "added_during_flood": fl["start"] < added_at < fl["end"],
           "conntrack_events": {k: after[k] - before[k] for k in after}}
    if up:
        res = up.wait(upload_seconds + 60)[0]
        stored = [b.name for b in site.backends
                  if os.path.exists(os.path.join(site.lab.workdir, f"nginx-{b.name}", "www", up.path(0).lstrip("/")))]
        out["upload"] = {"seconds": upload_seconds, "status": res["status"], "error": res["error"],
                         "stall_s": round(res["stall"], 2), "stored_on": stored, "bad_files": up.check_files()}
        up.remove_files()
    return out
