"""lb.toml: the balancer's configuration, validated with one-line errors naming the key.

    [balancer]
    interface = "eth0"            # required: where the XDP program attaches
    netns = "gb-site-lb1"         # optional: the interface's network namespace
    xdp_mode = "native"           # native | generic
    instance = "eth0"             # name of the pins under /sys/fs/bpf/gridbpf/lb/ (default: netns-interface)
    table_size = 65537            # Maglev slots per service, a prime
    conntrack_size = 262144       # connection-table entries (an LRU: the oldest go first)
    tcp_idle_timeout = 900        # seconds: a TCP entry idle longer counts as absent
    udp_idle_timeout = 60         # seconds, likewise for UDP (at most tcp_idle_timeout)
    new_entry_limit = 20000       # new entries per CPU per second, then placement by hash alone; 0: no limit
    conntrack_on_syn = false      # true: record flows at their SYN (a SYN flood then flushes the table)
    syn_filter = true             # record a TCP flow only if this node saw its SYN (spoofed ACKs are not)
    metrics = "127.0.0.1:9470"    # Prometheus /metrics; "" for none

    [encap]                       # ipip and gue services
    source_v4 = "172.16.0.0/16"   # outer sources: this prefix, host part from the flow hash
    source_v6 = "fd00:ffff::/96"
    gue_port = 6080

    [health]                      # defaults of every service's [service.health]
    check = "tcp"                 # tcp | http | https | none
    interval = 2.0                # seconds
    timeout = 1.0
    rise = 2                      # successes to come back
    fall = 3                      # failures to go out
    port = 0                      # 0: the service's port
    path = "/"                    # http/https
    expect = 200                  # http/https status

    [[service]]
    name = "webdav"
    vip = "10.99.0.1"
    port = 80
    protocol = "tcp"              # tcp | udp
    mode = "dsr-l2"               # dsr-l2 | ipip | gue
    hash = "5-tuple"              # 5-tuple | no-sport

      [[service.backend]]
      address = "10.2.0.11"
      mac = "02:00:00:00:00:0b"   # dsr-l2: the backend's MAC; ipip/gue: the next hop's
      weight = 1
      state = "active"            # active | draining

    [bgp]                         # optional: announce the VIPs with BIRD (see lb/bgp.py)
    local_as = 65001              # required
    router_id = "10.2.0.2"        # optional: BIRD picks the lowest IPv4 address otherwise
    announce_delay = 5.0          # seconds a VIP must be eligible before it is announced
    min_healthy = 1               # healthy backends every service on a VIP needs
    withdraw_wait = 2.0           # SIGTERM: seconds between the withdrawal and the exit
    bfd_interval = 0.3            # seconds between BFD packets (rx and tx)
    bfd_multiplier = 3            # missed packets before BFD declares the peer down

      [[bgp.peer]]                # IPv4 peers carry the IPv4 VIPs (/32), IPv6 peers the IPv6 ones (/128)
      address = "10.2.0.1"        # required
      remote_as = 65000           # required
      bfd = true
      hold_time = 9               # seconds (3..65535)
      port = 179
"""
from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field

from . import maglev
from .datapath import MODES, PROTOCOLS, ConntrackPolicy, mac_bytes


class ConfigError(ValueError):
    """One line naming the file, the key and the problem."""


@dataclass
class Health:
    check: str = "tcp"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    port: int = 0
    path: str = "/"
    expect: int = 200


@dataclass
class BackendConfig:
    address: str
    mac: str
    weight: int = 1
    state: str = "active"


@dataclass
class ServiceConfig:
    name: str
    vip: str
    port: int
    protocol: str
    mode: str = "dsr-l2"
    hash: str = "5-tuple"
    health: Health = field(default_factory=Health)
    backends: list[BackendConfig] = field(default_factory=list)


@dataclass
class PeerConfig:
    address: str
    remote_as: int
    bfd: bool = True
    hold_time: int = 9
    port: int = 179


@dataclass
class BgpConfig:
    local_as: int
    router_id: str | None = None
    announce_delay: float = 5.0
    min_healthy: int = 1
    withdraw_wait: float = 2.0
    bfd_interval: float = 0.3
    bfd_multiplier: int = 3
    peers: list[PeerConfig] = field(default_factory=list)


@dataclass
class Config:
    interface: str
    netns: str | None = None
    xdp_mode: str = "native"
    instance: str = ""
    table_size: int = maglev.DEFAULT_SIZE
    conntrack_size: int = 262144
    conntrack: ConntrackPolicy = field(default_factory=ConntrackPolicy)
    metrics: str = "127.0.0.1:9470"
    source_v4: str = "172.16.0.0/16"
    source_v6: str = "fd00:ffff::/96"
    gue_port: int = 6080
    services: list[ServiceConfig] = field(default_factory=list)
    bgp: BgpConfig | None = None
    path: str = ""

    @property
    def metrics_addr(self) -> tuple[str, int] | None:
        if not self.metrics:
            return None
        host, _, port = self.metrics.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


class _Checker:
    def __init__(self, path: str):
        self.path = path

    def fail(self, key: str, msg: str):
        raise ConfigError(f"{self.path}: {key}: {msg}")

    def table(self, data, key: str, allowed: set[str]) -> dict:
        if not isinstance(data, dict):
            self.fail(key, "must be a table")
        for k in data:
            if k not in allowed:
                self.fail(f"{key}.{k}" if key else k, f"unknown key (known: {', '.join(sorted(allowed))})")
        return data

    def get(self, data: dict, name: str, key: str, typ, default=None, required=False,
            choices=None, check=None):
        full = f"{key}.{name}" if key else name
        if name not in data:
            if required:
                self.fail(full, "missing (required)")
            return default
        v = data[name]
        types = typ if isinstance(typ, tuple) else (typ,)
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            self.fail(full, f"must be {' or '.join(t.__name__ for t in types)}, not {v!r}")
        if choices and v not in choices:
            self.fail(full, f"{v!r} is not one of {', '.join(choices)}")
        if check:
            msg = check(v)
            if msg:
                self.fail(full, msg)
        return v


def _addr(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"bad IP address {v!r}"
    return None


def _net(family: int):
    def check(v: str) -> str | None:
        try:
            n = ipaddress.ip_network(v, strict=False)
        except ValueError:
            return f"bad prefix {v!r}"
        if n.version != family:
            return f"{v!r} is not an IPv{family} prefix"
        return None
    return check


def _mac(v: str) -> str | None:
    try:
        mac_bytes(v)
    except ValueError as e:
        return str(e)
    return None


def _port(v: int) -> str | None:
    return None if 0 < v < 65536 else f"port {v} out of 1..65535"


def _positive(v) -> str | None:
    return None if v > 0 else f"{v} must be positive"


HEALTH_KEYS = {"check", "interval", "timeout", "rise", "fall", "port", "path", "expect"}


def _health(c: _Checker, data, key: str, base: Health) -> Health:
    c.table(data, key, HEALTH_KEYS)
    h = Health(**vars(base))
    h.check = c.get(data, "check", key, str, h.check, choices=("tcp", "http", "https", "none"))
    h.interval = float(c.get(data, "interval", key, (int, float), h.interval, check=_positive))
    h.timeout = float(c.get(data, "timeout", key, (int, float), h.timeout, check=_positive))
    h.rise = c.get(data, "rise", key, int, h.rise, check=_positive)
    h.fall = c.get(data, "fall", key, int, h.fall, check=_positive)
    h.port = c.get(data, "port", key, int, h.port, check=lambda v: None if 0 <= v < 65536 else f"port {v} out of 0..65535")
    h.path = c.get(data, "path", key, str, h.path, check=lambda v: None if v.startswith("/") else "must start with /")
    h.expect = c.get(data, "expect", key, int, h.expect, check=lambda v: None if 100 <= v < 600 else f"{v} is no HTTP status")
    return h


def parse(text: str, path: str = "lb.toml") -> Config:
    c = _Checker(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    c.table(data, "", {"balancer", "encap", "health", "service", "bgp"})
    b = c.table(data.get("balancer", {}), "balancer",
                {"interface", "netns", "xdp_mode", "instance", "table_size", "conntrack_size", "metrics",
                 "tcp_idle_timeout", "udp_idle_timeout", "new_entry_limit", "conntrack_on_syn",
                 "syn_filter"})
    cfg = Config(interface=c.get(b, "interface", "balancer", str, required=True), path=path)
    cfg.netns = c.get(b, "netns", "balancer", str, None)
    cfg.xdp_mode = c.get(b, "xdp_mode", "balancer", str, cfg.xdp_mode, choices=("native", "generic"))
    cfg.instance = c.get(b, "instance", "balancer", str, "",
                         check=lambda v: None if v.replace("-", "").replace("_", "").isalnum() else
                         "letters, digits, - and _ only")
    if not cfg.instance:
        cfg.instance = f"{cfg.netns}-{cfg.interface}" if cfg.netns else cfg.interface
    cfg.table_size = c.get(b, "table_size", "balancer", int, cfg.table_size,
                           check=lambda v: None if maglev.is_prime(v) and v < 2**24 else f"{v} is not a prime below 2^24")
    cfg.conntrack_size = c.get(b, "conntrack_size", "balancer", int, cfg.conntrack_size, check=_positive)
    ct = cfg.conntrack
    # at least 2 s: an entry's last-seen time is refreshed once per second
    timeout = lambda v: None if 2 <= v <= 86400 * 7 else f"{v} out of 2..604800 seconds"  # noqa: E731
    ct.tcp_idle_timeout = float(c.get(b, "tcp_idle_timeout", "balancer", (int, float), ct.tcp_idle_timeout, check=timeout))
    ct.udp_idle_timeout = float(c.get(b, "udp_idle_timeout", "balancer", (int, float), ct.udp_idle_timeout, check=timeout))
    if ct.udp_idle_timeout > ct.tcp_idle_timeout:
        c.fail("balancer.udp_idle_timeout", f"{ct.udp_idle_timeout:g} s is longer than tcp_idle_timeout "
               f"({ct.tcp_idle_timeout:g} s)")
    ct.new_entry_limit = c.get(b, "new_entry_limit", "balancer", int, ct.new_entry_limit,
                               check=lambda v: None if 0 <= v < 2**32 else f"{v} out of 0..4294967295")
    ct.on_syn = c.get(b, "conntrack_on_syn", "balancer", bool, ct.on_syn)
    ct.syn_filter = c.get(b, "syn_filter", "balancer", bool, ct.syn_filter)
    cfg.metrics = c.get(b, "metrics", "balancer", str, cfg.metrics,
                        check=lambda v: None if not v or v.rpartition(":")[2].isdigit() else "must be HOST:PORT or \"\"")

    e = c.table(data.get("encap", {}), "encap", {"source_v4", "source_v6", "gue_port"})
    cfg.source_v4 = c.get(e, "source_v4", "encap", str, cfg.source_v4, check=_net(4))
    cfg.source_v6 = c.get(e, "source_v6", "encap", str, cfg.source_v6, check=_net(6))
    cfg.gue_port = c.get(e, "gue_port", "encap", int, cfg.gue_port, check=_port)

    health = _health(c, data.get("health", {}), "health", Health())

    services = data.get("service", [])
    if not isinstance(services, list):
        c.fail("service", "must be an array of tables ([[service]])")
    names, keys = set(), set()
    for i, s in enumerate(services):
        key = f"service[{i}]"
        c.table(s, key, {"name", "vip", "port", "protocol", "mode", "hash", "health", "backend"})
        name = c.get(s, "name", key, str, required=True,
                     check=lambda v: None if 0 < len(v.encode()) < 32 else "1 to 31 bytes")
        if name in names:
            c.fail(f"{key}.name", f"service {name!r} is defined twice")
        names.add(name)
        key = f"service.{name}"
        svc = ServiceConfig(
            name=name,
            vip=str(ipaddress.ip_address(c.get(s, "vip", key, str, required=True, check=_addr))),
            port=c.get(s, "port", key, int, required=True, check=_port),
            protocol=c.get(s, "protocol", key, str, "tcp", choices=tuple(PROTOCOLS)),
            mode=c.get(s, "mode", key, str, "dsr-l2", choices=tuple(MODES)),
            hash=c.get(s, "hash", key, str, "5-tuple", choices=("5-tuple", "no-sport")))
        if (svc.vip, svc.port, svc.protocol) in keys:
            c.fail(key, f"{svc.vip} port {svc.port}/{svc.protocol} is already another service")
        keys.add((svc.vip, svc.port, svc.protocol))
        svc.health = _health(c, s.get("health", {}), f"{key}.health", health)
        bes = s.get("backend", [])
        if not isinstance(bes, list):
            c.fail(f"{key}.backend", "must be an array of tables ([[service.backend]])")
        seen = set()
        vip_family = ipaddress.ip_address(svc.vip).version
        for j, be in enumerate(bes):
            bkey = f"{key}.backend[{j}]"
            c.table(be, bkey, {"address", "mac", "weight", "state"})
            addr = str(ipaddress.ip_address(c.get(be, "address", bkey, str, required=True, check=_addr)))
            if addr in seen:
                c.fail(f"{bkey}.address", f"{addr} is listed twice")
            seen.add(addr)
            if svc.mode == "dsr-l2" and ipaddress.ip_address(addr).version != vip_family:
                c.fail(f"{bkey}.address", f"{addr} is not IPv{vip_family} like VIP {svc.vip} "
                       "(dsr-l2 needs the same family; ipip/gue may mix)")
            svc.backends.append(BackendConfig(
                address=addr, mac=c.get(be, "mac", bkey, str, required=True, check=_mac).lower(),
                weight=c.get(be, "weight", bkey, int, 1,
                             check=lambda v: None if 0 <= v < 2**16 else f"{v} out of 0..65535"),
                state=c.get(be, "state", bkey, str, "active", choices=("active", "draining"))))
        cfg.services.append(svc)
    if "bgp" in data:
        cfg.bgp = _bgp(c, data["bgp"], cfg.services)
    return cfg


def _asn(v: int) -> str | None:
    return None if 0 < v < 2**32 else f"{v} is no AS number (1..4294967295)"


def _bgp(c: _Checker, data, services: list[ServiceConfig]) -> BgpConfig:
    c.table(data, "bgp", {"local_as", "router_id", "announce_delay", "min_healthy", "withdraw_wait",
                          "bfd_interval", "bfd_multiplier", "peer"})
    b = BgpConfig(local_as=c.get(data, "local_as", "bgp", int, required=True, check=_asn))
    b.router_id = c.get(data, "router_id", "bgp", str, None, check=lambda v: None if _is_v4(v) else
                        f"{v!r} is not an IPv4 address (BGP router ids are written like one)")
    b.announce_delay = float(c.get(data, "announce_delay", "bgp", (int, float), b.announce_delay,
                                   check=lambda v: None if v >= 0 else f"{v} must not be negative"))
    b.min_healthy = c.get(data, "min_healthy", "bgp", int, b.min_healthy, check=_positive)
    b.withdraw_wait = float(c.get(data, "withdraw_wait", "bgp", (int, float), b.withdraw_wait,
                                  check=lambda v: None if 0 <= v <= 60 else f"{v} out of 0..60"))
    b.bfd_interval = float(c.get(data, "bfd_interval", "bgp", (int, float), b.bfd_interval,
                                 check=lambda v: None if 0.01 <= v <= 60 else f"{v} out of 0.01..60 seconds"))
    b.bfd_multiplier = c.get(data, "bfd_multiplier", "bgp", int, b.bfd_multiplier,
                             check=lambda v: None if 1 <= v <= 255 else f"{v} out of 1..255")
    peers = data.get("peer", [])
    if not isinstance(peers, list) or not peers:
        c.fail("bgp.peer", "needs at least one [[bgp.peer]] table")
    seen = set()
    for i, p in enumerate(peers):
        key = f"bgp.peer[{i}]"
        c.table(p, key, {"address", "remote_as", "bfd", "hold_time", "port"})
        addr = str(ipaddress.ip_address(c.get(p, "address", key, str, required=True, check=_addr)))
        if addr in seen:
            c.fail(f"{key}.address", f"{addr} is listed twice")
        seen.add(addr)
        b.peers.append(PeerConfig(
            address=addr, remote_as=c.get(p, "remote_as", key, int, required=True, check=_asn),
            bfd=c.get(p, "bfd", key, bool, True),
            hold_time=c.get(p, "hold_time", key, int, 9,
                            check=lambda v: None if 3 <= v <= 65535 else f"{v} out of 3..65535 seconds"),
            port=c.get(p, "port", key, int, 179, check=_port)))
    families = {ipaddress.ip_address(p.address).version for p in b.peers}
    for s in services:
        fam = ipaddress.ip_address(s.vip).version
        if fam not in families:
            c.fail("bgp.peer", f"no IPv{fam} peer to announce VIP {s.vip} of service {s.name} to "
                   "(IPv4 VIPs go to IPv4 peers, IPv6 VIPs to IPv6 peers)")
    return b


def _is_v4(v: str) -> bool:
    try:
        return ipaddress.ip_address(v).version == 4
    except ValueError:
        return False


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            text = f.read().decode()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    return parse(text, path)
