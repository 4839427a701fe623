"""The kernel side of SciTags: load scitags.bpf.o, attach it at tc, register flows, read counters.

Each registered flow is two entries of the `st_flows` LRU hash (struct st_flow_key/val in
bpf/include/gridbpf/scitags.h, read here through the object's BTF): its forward direction,
marked at egress, and its reverse direction, only counted.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from ..bpf import BpfObject, to_python
from .flows import PROTOCOLS, FiveTuple

ST_F_MARK, ST_F_REVERSE, ST_F_IPV4 = 1, 2, 4
STATS = ("matched", "marked", "v4_unmarkable", "store_failed", "unparsed")


def _addr16(a) -> bytes:
    if a.version == 4:
        return ipaddress.IPv6Address(f"::ffff:{a}").packed
    return a.packed


@dataclass
class Interface:
    name: str
    netns: str | None = None

    def __str__(self):
        return self.name + (f"@{self.netns}" if self.netns else "")


class Marker:
    """Owns the BPF object and its tc links; close() detaches everything it attached."""

    def __init__(self, interfaces: list[Interface], count_ingress: bool = True, priority: int = 1):
        """Load and attach at tc on INTERFACES (none: loaded only, for test runs)."""
        self.obj = None
        self.links = []
        self.obj = BpfObject.open("scitags")
        self.interfaces = interfaces
        try:
            if not count_ingress:
                self.obj.program("st_ingress").autoload = False
            self.obj.load()
            self.flows = self.obj.map("st_flows")
            self.stats_map = self.obj.map("st_stats")
            self.capacity = self.flows.max_entries // 2        # two directions per flow
            for iface in interfaces:
                self.links.append(self.obj.program("st_egress").attach_tc(
                    iface.name, "egress", netns=iface.netns, priority=priority))
                if count_ingress:
                    self.links.append(self.obj.program("st_ingress").attach_tc(
                        iface.name, "ingress", netns=iface.netns, priority=priority))
        except BaseException:
            self.close()
            raise

    # --- flows ---------------------------------------------------------------------------------

    @staticmethod
    def key(flow: FiveTuple) -> dict:
        return {"saddr": _addr16(flow.src), "daddr": _addr16(flow.dst),
                "sport": socket.htons(flow.src_port), "dport": socket.htons(flow.dst_port),
                "proto": PROTOCOLS[flow.protocol]}

    def add(self, flow: FiveTuple, label: int, mark: bool = True, mark_reverse: bool = False) -> None:
        """(Re)register FLOW with fresh counters. IPv4 flows keep ST_F_MARK (they were asked to
        be marked) but are only counted: the kernel tallies their packets as v4_unmarkable."""
        v4 = ST_F_IPV4 if flow.src.version == 4 else 0
        fwd = {"label": label, "flags": (ST_F_MARK if mark else 0) | v4}
        rev = {"label": label, "flags": ST_F_REVERSE | v4 | (ST_F_MARK if mark_reverse else 0)}
        self.flows[self.key(flow)] = fwd
        self.flows[self.key(flow.reversed())] = rev

    def remove(self, flow: FiveTuple) -> dict | None:
        """Unregister FLOW; returns its last counters (None if the kernel had lost it)."""
        counters = self.counters(flow)
        for k in (self.key(flow), self.key(flow.reversed())):
            try:
                del self.flows[k]
            except KeyError:
                pass
        return counters

    def counters(self, flow: FiveTuple) -> dict | None:
        """{"sent": bytes src->dst, "received": bytes dst->src, packets both ways, first/last
        packet time (bpf_ktime ns)}, or None if FLOW is not in the map (never added, evicted)."""
        fwd, rev = self.flows.get(self.key(flow)), self.flows.get(self.key(flow.reversed()))
        if fwd is None and rev is None:
            return None
        f, r = to_python(fwd) if fwd is not None else {}, to_python(rev) if rev is not None else {}
        firsts = [x["first_ns"] for x in (f, r) if x.get("first_ns")]
        return {"sent": f.get("bytes", 0), "received": r.get("bytes", 0),
                "sent_packets": f.get("packets", 0), "received_packets": r.get("packets", 0),
                "first_ns": min(firsts) if firsts else 0,
                "last_ns": max(f.get("last_ns", 0), r.get("last_ns", 0)),
                "label": f.get("label", r.get("label")), "complete": fwd is not None and rev is not None}

    def entries(self) -> int:
        return sum(1 for _ in self.flows.keys())

    def stats(self) -> dict[str, int]:
        return {name: self.stats_map.sum(i) for i, name in enumerate(STATS)}

    def close(self) -> None:
        # ingress links before egress: the first link made the clsact qdisc and removes it
        for link in reversed(self.links):
            try:
                link.detach()
            except Exception:       # already gone with its interface
                pass
        self.links.clear()
        if self.obj is not None:
            self.obj.close()
            self.obj = None
