"""The balancer's state in its BPF maps: services, backends, Maglev tables, stats.

The maps are the one copy of the state. The daemon and the `gridbpf lb` commands both read them,
change them and write them back under a file lock, so a change made from the command line and a
health-check transition in the daemon never overwrite each other. The datapath sees each change
as a few map writes; the program is never reloaded.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import mmap
import os
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from ..bpf import PIN_ROOT, BpfObject, remove_pins
from . import maglev

PIN_DIR = "lb"                  # /sys/fs/bpf/gridbpf/lb/<instance>/<map>
LOCK_DIR = "/run/gridbpf"
MAPS = ("lb_services", "lb_vips", "lb_ring", "lb_backends", "lb_conntrack", "lb_service_stats",
        "lb_backend_stats", "lb_reasons", "lb_encap", "lb_service_ctl", "lb_backend_ctl",
        "lb_conn_events", "lb_syn_seen")
PROTOCOLS = {"tcp": 6, "udp": 17}
PROTO_NAMES = {v: k for k, v in PROTOCOLS.items()}
MODES = {"dsr-l2": 0, "ipip": 1, "gue": 2}
MODE_NAMES = {v: k for k, v in MODES.items()}
SVC_NO_SPORT = 1
BE_DOWN = 1
STATE_ACTIVE, STATE_DRAINING = 0, 1
BENCH_PROGRAMS = ("xdp_lb_bench", "xdp_restore_bench", "xdp_macswap_bench")


@dataclass
class ConntrackPolicy:
    """How the datapath keeps its connection table (lb.toml [balancer], docs/lb.md)."""
    tcp_idle_timeout: float = 900.0     # seconds without a packet before a TCP entry is ignored
    udp_idle_timeout: float = 60.0      # same for UDP
    new_entry_limit: int = 20000        # new entries per CPU per second; 0: no limit
    on_syn: bool = False                # record a flow at its SYN (a SYN flood then churns it)
    syn_filter: bool = True             # record a TCP flow only if this node saw its SYN


CLOCK_MONOTONIC_COARSE = 6     # <linux/time.h>; Python's time module does not name it


def datapath_now_ns() -> int:
    """The datapath's clock (bpf_ktime_get_coarse_ns), for the seen_ns of connection entries."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


class LbError(RuntimeError):
    """A problem to report in one line."""


def addr_words(addr: str) -> list[int]:
    """An address as the u32[4] of the C structs (network byte order bytes, IPv4 first)."""
    return list(struct.unpack("<4I", maglev.addr16(addr)))


def words_addr(words, family: int) -> str:
    raw = struct.pack("<4I", *list(words))
    return str(ipaddress.ip_address(raw[:4] if family == 4 else raw))


def mac_bytes(mac: str) -> list[int]:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    try:
        return [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"bad MAC address {mac!r}") from None


def htons(n: int) -> int:
    return ((n & 0xFF) << 8) | (n >> 8)


@dataclass
class Backend:
    id: int
    address: str
    mac: str
    weight: int
    state: str          # active | draining
    down: bool          # failed health checks
    gen: int

    @property
    def in_table(self) -> bool:
        return self.state == "active" and not self.down and self.weight > 0


@dataclass
class Service:
    id: int
    name: str
    vip: str
    port: int
    protocol: str
    mode: str
    no_sport: bool
    gen: int
    backends: dict[str, Backend] = field(default_factory=dict)   # by address

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.vip).version


class Datapath:
    """lb.bpf.o's maps, loaded fresh (the daemon) or opened from their pins (the commands)."""

    def __init__(self, obj: BpfObject, instance: str):
        self.obj, self.instance = obj, instance
        self.maps = {n: obj.map(n) for n in MAPS}
        self._ring_mm = None
        self._ring = None
        self._views: dict[str, tuple[mmap.mmap, np.ndarray]] = {}

    # --- life cycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, instance: str, table_size: int = maglev.DEFAULT_SIZE,
               conntrack_size: int | None = None, bench: bool = False,
               policy: ConntrackPolicy | None = None) -> "Datapath":
        if not maglev.is_prime(table_size):
            raise LbError(f"table_size {table_size} is not prime")
        obj = BpfObject.open("lb")
        try:
            capacity = obj.map("lb_ring").max_entries
            if table_size > capacity:
                raise LbError(f"table_size {table_size} is larger than the ring capacity {capacity}")
            obj.rodata["ring_size"] = table_size
            policy = policy or ConntrackPolicy()
            obj.rodata["tcp_idle_ns"] = int(policy.tcp_idle_timeout * 1e9)
            obj.rodata["udp_idle_ns"] = int(policy.udp_idle_timeout * 1e9)
            obj.rodata["new_entry_limit"] = policy.new_entry_limit
            obj.rodata["conntrack_on_syn"] = int(policy.on_syn)
            obj.rodata["syn_filter"] = int(policy.syn_filter)
            for name in BENCH_PROGRAMS:
                obj.program(name).autoload = bench      # benchmark wrappers only
            if conntrack_size:
                obj.map("lb_conntrack").max_entries = conntrack_size
            obj.load()
        except Exception:
            obj.close()
            raise
        return cls(obj, instance)

    @classmethod
    def open_pinned(cls, instance: str | None = None) -> "Datapath":
        instance = instance or only_instance()
        where = os.path.join(PIN_ROOT, PIN_DIR, instance)
        if not os.path.exists(os.path.join(where, "lb_ring")):   # look without creating anything
            raise LbError(f"no balancer instance {instance!r} is running (no pins under {where})")
        obj = BpfObject.open("lb")
        try:
            for n in MAPS:
                obj.map(n).open_pinned(f"{PIN_DIR}/{instance}/{n}")
        except FileNotFoundError as e:
            obj.close()
            raise LbError(f"balancer instance {instance!r}: {e}") from None
        return cls(obj, instance)

    def pin(self) -> None:
        for n in MAPS:
            self.maps[n].pin(f"{PIN_DIR}/{self.instance}/{n}")

    def unpin(self) -> None:
        remove_pins(f"{PIN_DIR}/{self.instance}")

    def close(self) -> None:
        self._ring = None
        if self._ring_mm is not None:
            self._ring_mm.close()
            self._ring_mm = None
        self._views.clear()      # the mappings go with their last numpy view
        self.obj.close()

    def view(self, name: str) -> np.ndarray:
        """A memory-mapped array map (BPF_F_MMAPABLE) as a numpy structured array, its dtype
        from BTF (elements are 8-byte aligned in the kernel)."""
        if name not in self._views:
            m = self.maps[name]
            dt = self.obj.btf.dtype(m.value_type)
            stride = (dt.itemsize + 7) // 8 * 8
            dt = np.dtype({"names": dt.names, "formats": [dt.fields[n][0] for n in dt.names],
                           "offsets": [dt.fields[n][1] for n in dt.names], "itemsize": stride})
            size = (m.max_entries * stride + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            mm = mmap.mmap(m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._views[name] = (mm, np.frombuffer(mm, dtype=dt, count=m.max_entries))
        return self._views[name][1]

    @contextlib.contextmanager
    def locked(self):
        """Serialise read-modify-write of the state between the daemon and the commands."""
        os.makedirs(LOCK_DIR, exist_ok=True)
        with open(os.path.join(LOCK_DIR, f"lb-{self.instance}.ctl"), "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- the Maglev ring, memory-mapped ------------------------------------------------------------

    @property
    def table_size(self) -> int:
        """The loaded program's ring_size; commands read the copy kept in lb_encap."""
        if not hasattr(self, "_tsize"):
            if self.obj.loaded:
                self._tsize = int(self.obj.rodata["ring_size"])
            else:
                self._tsize = int(self.maps["lb_encap"][0].table_size) or maglev.DEFAULT_SIZE
        return self._tsize

    def ring(self) -> np.ndarray:
        """The ring as a numpy view of the map's memory. The kernel stores array elements
        8-byte aligned, so a u32 slot is every other u32 of the mapping."""
        if self._ring is None:
            m = self.maps["lb_ring"]
            size = m.max_entries * 8
            size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            self._ring_mm = mmap.mmap(m.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._ring = np.frombuffer(self._ring_mm, dtype=np.uint32, count=2 * m.max_entries)[::2]
        return self._ring

    def max_services(self) -> int:
        return min(256, self.maps["lb_ring"].max_entries // self.table_size)

    # --- reading the state -----------------------------------------------------------------------

    def services(self) -> dict[str, Service]:
        out: dict[str, Service] = {}
        by_id: dict[int, Service] = {}
        ctl = self.maps["lb_service_ctl"]
        for key, val in self.maps["lb_services"].items():
            c = ctl.get(val.id)
            name = c.name.decode() if c is not None else f"service{val.id}"
            s = Service(id=val.id, name=name, vip=words_addr(key.addr, key.family),
                        port=htons(key.port), protocol=PROTO_NAMES.get(key.proto, str(key.proto)),
                        mode=MODE_NAMES.get(val.mode, str(val.mode)),
                        no_sport=bool(val.flags & SVC_NO_SPORT), gen=val.gen)
            out[name] = s
            by_id[s.id] = s
        bes = self.maps["lb_backends"]
        ctl_all = self.view("lb_backend_ctl")
        for bid in np.nonzero(ctl_all["used"])[0]:
            bid = int(bid)
            c = self.maps["lb_backend_ctl"][bid]
            if not c.used or c.service not in by_id:
                continue
            b = bes.get(bid)
            svc = by_id[c.service]
            addr = words_addr(b.addr, b.family)
            svc.backends[addr] = Backend(id=bid, address=addr, mac=":".join(f"{x:02x}" for x in b.mac),
                                         weight=c.weight,
                                         state="draining" if c.state == STATE_DRAINING else "active",
                                         down=bool(b.flags & BE_DOWN), gen=b.gen)
        return out

    def service(self, name: str) -> Service:
        svcs = self.services()
        if name not in svcs:
            raise LbError(f"unknown service {name!r} (have: {', '.join(sorted(svcs)) or 'none'})")
        return svcs[name]

    # --- changing it ---------------------------------------------------------------------------------

    def set_encap(self, v4_src: str = "172.16.0.0/16", v6_src: str = "fd00:ffff::/96",
                  gue_port: int = 6080) -> None:
        n4, n6 = ipaddress.ip_network(v4_src), ipaddress.ip_network(v6_src)
        host4 = (1 << (32 - n4.prefixlen)) - 1
        host6 = (1 << min(32, 128 - n6.prefixlen)) - 1
        self.maps["lb_encap"][0] = {
            "v4_src": addr_words(str(n4.network_address))[0], "v4_hash_mask": host4,
            "v6_src": addr_words(str(n6.network_address)), "v6_hash_mask": host6,
            "gue_port": htons(gue_port), "table_size": self.table_size}

    def add_service(self, name: str, vip: str, port: int, protocol: str, mode: str,
                    no_sport: bool = False) -> Service:
        if len(name.encode()) >= 32:
            raise LbError(f"service name {name!r} is longer than 31 bytes")
        svcs = self.services()
        if name in svcs:
            raise LbError(f"service {name!r} exists already")
        key = self._vip_key(vip, port, protocol)
        used = {s.id for s in svcs.values()}
        free = [i for i in range(self.max_services()) if i not in used]
        if not free:
            raise LbError(f"no room for another service (at most {self.max_services()} with "
                          f"table_size {self.table_size})")
        sid = free[0]
        ctl = self.maps["lb_service_ctl"].value_type()
        ctl.name, ctl.used = name.encode(), 1     # char[] fields take bytes, set them directly
        self.maps["lb_service_ctl"][sid] = ctl
        self.ring()[sid * self.table_size:(sid + 1) * self.table_size] = 0
        # a fresh epoch from the clock: a service re-added under the same id never meets an
        # entry of its predecessor's epoch
        self.maps["lb_services"][key] = {"id": sid, "flags": SVC_NO_SPORT if no_sport else 0,
                                         "mode": MODES[mode], "gen": 1,
                                         "epoch": (datapath_now_ns() >> 20) & 0xFFFFFFFF or 1}
        vk = self._vip_key(vip, 0, None)
        self.maps["lb_vips"][vk] = (self.maps["lb_vips"].get(vk) or 0) + 1
        return self.service(name)

    def remove_service(self, name: str) -> None:
        svc = self.service(name)
        del self.maps["lb_services"][self._vip_key(svc.vip, svc.port, svc.protocol)]
        vk = self._vip_key(svc.vip, 0, None)
        n = (self.maps["lb_vips"].get(vk) or 1) - 1
        if n > 0:
            self.maps["lb_vips"][vk] = n
        else:
            with contextlib.suppress(KeyError):
                del self.maps["lb_vips"][vk]
        for b in svc.backends.values():
            self._free_backend(b)
        self.ring()[svc.id * self.table_size:(svc.id + 1) * self.table_size] = 0
        self.maps["lb_service_ctl"][svc.id] = {"used": 0}

    def add_backend(self, service: str, address: str, mac: str, weight: int = 1,
                    state: str = "active", rebuild: bool = True) -> Backend | None:
        """Add a backend; rebuild=False leaves the table for one rebuild() after many adds."""
        svc = self.service(service)
        addr = str(ipaddress.ip_address(address))
        if addr in svc.backends:
            raise LbError(f"backend {addr} is already in service {service!r}")
        if weight < 0:
            raise LbError(f"weight {weight} of backend {addr} is negative")
        if svc.mode == "dsr-l2" and ipaddress.ip_address(addr).version != svc.family:
            raise LbError(f"backend {addr} is not of the family of VIP {svc.vip} (dsr-l2)")
        ctl = self.maps["lb_backend_ctl"]
        unused = np.nonzero(self.view("lb_backend_ctl")["used"][1:] == 0)[0]
        if not len(unused):
            raise LbError("no room for another backend")
        free = int(unused[0]) + 1               # id 0 means "no backend"
        old = self.maps["lb_backends"].get(free)
        gen = (old.gen + 1) & 0xFFFFFFFF or 1
        self.maps["lb_backends"][free] = {"addr": addr_words(addr), "mac": mac_bytes(mac),
                                          "family": ipaddress.ip_address(addr).version, "flags": 0,
                                          "gen": gen}
        ctl[free] = {"service": svc.id, "weight": weight,
                     "state": STATE_DRAINING if state == "draining" else STATE_ACTIVE, "used": 1}
        if not rebuild:
            return None
        self.rebuild(service)
        return self.service(service).backends[addr]

    def remove_backend(self, service: str, address: str) -> None:
        b = self.backend(service, address)
        self.maps["lb_backend_ctl"][b.id] = {"used": 0}
        self.rebuild(service)          # out of the table first, then invalidate its flows
        self._free_backend(b)

    def _free_backend(self, b: Backend) -> None:
        # a new generation makes every connection-table entry that still names this id stale
        self.maps["lb_backends"][b.id] = {"gen": (b.gen + 1) & 0xFFFFFFFF or 1, "flags": BE_DOWN}
        self.maps["lb_backend_ctl"][b.id] = {"used": 0}
        self.maps["lb_backend_stats"][b.id] = bytes(24)

    def backend(self, service: str, address: str) -> Backend:
        svc = self.service(service)
        addr = str(ipaddress.ip_address(address))
        if addr not in svc.backends:
            raise LbError(f"service {service!r} has no backend {addr}")
        return svc.backends[addr]

    def set_weight(self, service: str, address: str, weight: int) -> None:
        if weight < 0:
            raise LbError(f"weight {weight} is negative")
        b = self.backend(service, address)
        c = self.maps["lb_backend_ctl"][b.id]
        c.weight = weight
        self.maps["lb_backend_ctl"][b.id] = c
        self.rebuild(service)

    def set_mac(self, service: str, address: str, mac: str) -> None:
        b = self.backend(service, address)
        v = self.maps["lb_backends"][b.id]
        v.mac = type(v.mac)(*mac_bytes(mac))
        self.maps["lb_backends"][b.id] = v

    def set_state(self, service: str, address: str, state: str) -> None:
        b = self.backend(service, address)
        c = self.maps["lb_backend_ctl"][b.id]
        c.state = STATE_DRAINING if state == "draining" else STATE_ACTIVE
        self.maps["lb_backend_ctl"][b.id] = c
        self.rebuild(service)

    def set_down(self, service: str, address: str, down: bool) -> None:
        b = self.backend(service, address)
        v = self.maps["lb_backends"][b.id]
        if down:
            # out of the table first, then established flows move (the datapath re-places them)
            v.flags |= BE_DOWN
            self.rebuild(service, extra_down={b.address})
            self.maps["lb_backends"][b.id] = v
        else:
            v.flags &= ~BE_DOWN
            self.maps["lb_backends"][b.id] = v
            self.rebuild(service)

    def rebuild(self, service: str, extra_down: set[str] = frozenset()) -> np.ndarray:
        """Recompute SERVICE's Maglev table from its backends and write it into the ring."""
        svc = self.service(service)
        weights = {a: (b.weight if b.in_table and a not in extra_down else 0)
                   for a, b in svc.backends.items()}
        names, table = maglev.build_table(weights, self.table_size)
        ids = np.array([svc.backends[n].id for n in names] + [0], dtype=np.uint32)
        # -1 (no backend) indexes the trailing 0: "no backend" in the datapath
        self.ring()[svc.id * self.table_size:(svc.id + 1) * self.table_size] = ids[table]
        self._new_epoch(svc)
        return table

    def _new_epoch(self, svc: Service) -> None:
        """After writing a service's table (never before): entries placed from now on carry the
        new epoch, so the datapath knows they point where the hash does (a SYN skips its lookup)."""
        key = self._vip_key(svc.vip, svc.port, svc.protocol)
        v = self.maps["lb_services"][key]
        v.epoch = (v.epoch + 1) & 0xFFFFFFFF or 1
        self.maps["lb_services"][key] = v

    def _vip_key(self, vip: str, port: int, protocol: str | None) -> dict:
        a = ipaddress.ip_address(vip)
        return {"addr": addr_words(str(a)), "port": htons(port),
                "proto": PROTOCOLS[protocol] if protocol else 0, "family": a.version}

    # --- counters --------------------------------------------------------------------------------------

    def reasons(self) -> dict[str, int]:
        names = dict((v, n) for n, v in self.obj.btf.find("enum lb_reason").members)
        m = self.maps["lb_reasons"]
        return {names[i][3:].lower(): m.sum(i) for i in range(m.max_entries)}

    def conn_events(self) -> dict[str, int]:
        """What happened to the connection table (enum lb_conn_event), summed over CPUs."""
        names = dict((v, n) for n, v in self.obj.btf.find("enum lb_conn_event").members)
        m = self.maps["lb_conn_events"]
        return {names[i][6:].lower(): m.sum(i) for i in range(m.max_entries)}

    def status(self) -> dict:
        sstats, bstats = self.maps["lb_service_stats"], self.maps["lb_backend_stats"]
        out = {"instance": self.instance, "table_size": self.table_size, "services": [],
               "reasons": self.reasons(), "conntrack": self.conn_events()}
        for s in sorted(self.services().values(), key=lambda s: s.id):
            st = sstats.sum(s.id)
            out["services"].append({
                "name": s.name, "id": s.id, "vip": s.vip, "port": s.port, "protocol": s.protocol,
                "mode": s.mode, "hash": "no-sport" if s.no_sport else "5-tuple", **st,
                "backends": [{"address": b.address, "id": b.id, "mac": b.mac, "weight": b.weight,
                              "state": b.state, "healthy": not b.down,
                              "in_table": b.in_table, **bstats.sum(b.id)}
                             for b in sorted(s.backends.values(), key=lambda b: b.address)]})
        return out


def instances() -> list[str]:
    root = os.path.join(PIN_ROOT, PIN_DIR)
    return sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "lb_ring"))) \
        if os.path.isdir(root) else []


def only_instance() -> str:
    names = instances()
    if len(names) == 1:
        return names[0]
    if not names:
        raise LbError(f"no balancer is running (nothing pinned under {os.path.join(PIN_ROOT, PIN_DIR)})")
    raise LbError(f"several balancers are running ({', '.join(names)}): choose one with --instance")


__all__ = ["Backend", "ConntrackPolicy", "Datapath", "LbError", "Service", "instances"]
