"""What the running kernel offers gridbpf, probed rather than read off its version number.

Each feature carries the Linux version that added it, so what is missing is named in one line
with the version a site would need. Probes: tracepoints from the kernel's BTF (a tp_btf target
`X` is the typedef `btf_trace_X` there), helpers and map types through libbpf's feature probes,
and flags of helpers that older kernels refuse at run time by a test run of bpf/probe.bpf.c.
docs/core.md's kernel table is this catalogue written out for people.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from . import libbpf as L
from .errors import BpfError

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
TRACEFS_EVENTS = ("/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events")

# enum bpf_prog_type values used to probe helpers in the program type that calls them
_SCHED_CLS, _TRACEPOINT, _XDP = 3, 5, 6


@dataclass(frozen=True)
class Feature:
    name: str           # as messages and docs name it
    kind: str           # tracepoint | helper | map | flag
    since: str          # the Linux version that added it
    needed_by: tuple    # capabilities (and trace tools) that use it
    probe: tuple        # tracepoint: (name,); helper: (prog_type, id, more ids); map: (type,); flag: (name,)
    without: str = ""   # what is lost without it when gridbpf has a fallback; "" means required


FEATURES = [
    # map types
    Feature("BPF_MAP_TYPE_HASH/ARRAY", "map", "3.19", ("lb", "trace", "checksum", "scitags"), (1,)),
    Feature("BPF_MAP_TYPE_PERCPU_ARRAY", "map", "4.6", ("lb", "trace", "checksum", "scitags"), (6,)),
    Feature("BPF_MAP_TYPE_STACK_TRACE", "map", "4.6", ("trace stuck",), (7,)),
    Feature("BPF_MAP_TYPE_LRU_HASH", "map", "4.10", ("lb", "checksum"), (9,)),
    Feature("BPF_MAP_TYPE_RINGBUF", "map", "5.8", ("trace", "checksum"), (27,)),
    Feature("BPF_MAP_TYPE_TASK_STORAGE", "map", "5.11", ("trace stuck",), (29,)),
    # helpers (enum bpf_func_id)
    Feature("bpf_skb_store_bytes", "helper", "4.1", ("lb decap", "scitags"), (_SCHED_CLS, 9)),
    Feature("bpf_skb_load_bytes", "helper", "4.5", ("scitags",), (_SCHED_CLS, 26)),
    Feature("bpf_get_stackid", "helper", "4.6", ("trace stuck",), (_TRACEPOINT, 27)),
    Feature("bpf_get_current_task", "helper", "4.8", ("trace", "checksum"), (_TRACEPOINT, 35)),
    Feature("bpf_xdp_adjust_head", "helper", "4.10", ("lb",), (_XDP, 44)),
    Feature("bpf_skb_adjust_room", "helper", "4.13", ("lb decap",), (_SCHED_CLS, 50)),
    Feature("bpf_get_current_cgroup_id", "helper", "4.18", ("trace http",), (_TRACEPOINT, 80)),
    Feature("bpf_probe_read_user/kernel", "helper", "5.5", ("trace", "checksum"), (_TRACEPOINT, 112, 113, 114, 115)),
    Feature("bpf_get_current_ancestor_cgroup_id", "helper", "5.6", ("checksum",), (_TRACEPOINT, 123)),
    Feature("bpf_ringbuf_reserve/submit/output", "helper", "5.8", ("trace", "checksum"), (_TRACEPOINT, 131, 130, 132)),
    Feature("bpf_get_current_task_btf", "helper", "5.11", ("trace",), (_TRACEPOINT, 158)),
    Feature("bpf_ktime_get_coarse_ns", "helper", "5.11", ("scitags",), (_SCHED_CLS, 160)),
    Feature("bpf_for_each_map_elem", "helper", "5.13", ("trace http", "checksum"), (_TRACEPOINT, 164)),
    Feature("bpf_task_pt_regs", "helper", "5.15", ("trace",), (_TRACEPOINT, 175)),
    Feature("bpf_loop", "helper", "5.17", ("checksum",), (_TRACEPOINT, 181)),
    Feature("bpf_xdp_store_bytes", "helper", "5.18", ("lb",), (_XDP, 190)),
    Feature("bpf_skb_adjust_room DECAP_L3 flags", "flag", "6.3", ("lb decap",), ("adjust_room_decap",),
            without="backends cannot decapsulate a tunnel whose inner family differs from the outer "
                    "(IPv4 in IPv6, IPv6 in GUE over IPv4); same-family tunnels work"),
    # tracepoints (tp_btf targets; raw_syscalls:sys_enter/sys_exit are the tp_btf sys_enter/sys_exit)
    Feature("raw_syscalls:sys_enter/sys_exit", "tracepoint", "2.6.35", ("trace",), ("sys_exit",)),
    Feature("sched:sched_switch/sched_process_*", "tracepoint", "2.6.32", ("trace", "checksum"),
            ("sched_switch",)),
    Feature("sched:sched_waking", "tracepoint", "4.3", ("trace stuck",), ("sched_waking",)),
    Feature("exceptions:page_fault_user/kernel", "tracepoint", "3.13", ("trace mem",),
            ("page_fault_user",)),
    Feature("tcp:tcp_retransmit_skb/tcp_send_reset/tcp_receive_reset", "tracepoint", "4.15",
            ("trace tcp",), ("tcp_retransmit_skb",)),
    Feature("sock:inet_sock_set_state", "tracepoint", "4.16", ("trace tcp",), ("inet_sock_set_state",)),
    Feature("sock:sock_send_length/sock_recv_length", "tracepoint", "6.3", ("trace tcp",),
            ("sock_send_length", "sock_recv_length"),
            without="trace tcp counts no bytes each way and learns a socket's owner only from its "
                    "state changes"),
]

BY_NAME = {f.name: f for f in FEATURES}
# tp_btf targets of our objects whose absence has a fallback: target -> feature
OPTIONAL_TRACEPOINTS = {"sock_send_length": "sock:sock_send_length/sock_recv_length",
                        "sock_recv_length": "sock:sock_send_length/sock_recv_length"}


HELPER_FEATURES = {i: f for f in FEATURES if f.kind == "helper" for i in f.probe[1:]}
MAP_FEATURES = {f.probe[0]: f for f in FEATURES if f.kind == "map"}
MAP_FEATURES[2] = MAP_FEATURES[1]          # ARRAY goes with HASH
HIDE_ENV = "GRIDBPF_HIDE_FEATURES"


class MissingFeature(BpfError):
    """A kernel feature gridbpf needs is absent; the message is one line naming it."""

    def __init__(self, feature: str, since: str, consequence: str):
        self.feature, self.since = feature, since
        super().__init__(f"kernel {platform.release()} lacks {feature} (added in Linux {since}): {consequence}")


def hidden() -> set[str]:
    """Features to treat as absent (GRIDBPF_HIDE_FEATURES, comma-separated names or tracepoints):
    shows a site, on a kernel that has them, what gridbpf does without them."""
    return {n.strip() for n in os.environ.get(HIDE_ENV, "").split(",") if n.strip()}


@functools.lru_cache(maxsize=1)
def _btf_tracepoints() -> frozenset[bytes] | None:
    """Names of the kernel BTF's btf_trace_* typedefs (tp_btf targets), None without kernel
    BTF. Only the names are kept: the 5-6 MB file is read once and let go (a long-running agent
    would otherwise carry it)."""
    import re
    try:
        with open(VMLINUX_BTF, "rb") as f:
            btf = f.read()
    except OSError:
        return None
    return frozenset(re.findall(rb"\0btf_trace_([A-Za-z0-9_]+)(?=\0)", btf))


def has_tracepoint(name: str) -> bool:
    """Whether tp_btf/NAME can attach: the kernel's BTF has its btf_trace_NAME typedef. Without
    kernel BTF, fall back to tracefs (any group), which at least says whether the event exists."""
    if name in hidden() or any(name in BY_NAME[n].probe for n in hidden() if n in BY_NAME):
        return False
    names = _btf_tracepoints()
    if names is not None:
        return name.encode() in names
    return any(os.path.isdir(os.path.join(root, group, name))
               for root in TRACEFS_EVENTS if os.path.isdir(root) for group in os.listdir(root))


@functools.lru_cache(maxsize=None)
def _flag_works(probe: str) -> bool:
    """Helper flags older kernels refuse with EINVAL at run time, found by a test run."""
    if probe == "adjust_room_decap":
        from .object import BpfObject
        obj = BpfObject.open("probe")
        try:
            for name, prog in obj.programs.items():
                prog.autoload = name == "probe_adjust_room_decap"
            obj.load()
            # IPv4/TCP inside IPv6 (next header 4), behind an Ethernet header
            inner = bytes([0x45, 0, 0, 40]) + bytes(4) + bytes([64, 6, 0, 0]) + bytes(8) + bytes(20)
            outer = bytes([0x60, 0, 0, 0]) + len(inner).to_bytes(2, "big") + bytes([4, 64]) + bytes(32)
            eth = bytes(12) + b"\x86\xdd"
            return obj.program("probe_adjust_room_decap").test_run(eth + outer + inner).retval == 0
        except BpfError:
            return False
        finally:
            obj.close()
    raise KeyError(probe)


def has(name: str) -> bool:
    return name not in hidden() and _probe(name)


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> bool:
    f = BY_NAME[name]
    if f.kind == "tracepoint":
        return has_tracepoint(f.probe[0])
    if f.kind == "helper":
        return L.libbpf_probe_bpf_helper(f.probe[0], f.probe[1], None) == 1
    if f.kind == "map":
        return L.libbpf_probe_bpf_map_type(f.probe[0], None) == 1
    return _flag_works(f.probe[0])


def require(name: str, consequence: str | None = None) -> None:
    """Raise MissingFeature (one line) unless the kernel has feature NAME."""
    if not has(name):
        f = BY_NAME[name]
        raise MissingFeature(f.name, f.since, consequence or f.without or f"needed by {', '.join(f.needed_by)}")


def note(name: str) -> str | None:
    """The one-line note for an optional feature that is missing, else None."""
    if has(name):
        return None
    f = BY_NAME[name]
    return str(MissingFeature(f.name, f.since, f.without))


def drop_missing_tracepoints(obj) -> list[str]:
    """Before load: turn off the programs of OBJ whose tp_btf target this kernel lacks. A target
    with a fallback gives its one-line note; any other raises MissingFeature naming it."""
    notes = []
    for prog in obj.programs.values():
        kind, _, target = prog.section.partition("/")
        if kind != "tp_btf" or not prog.autoload or has_tracepoint(target):
            continue
        feature = OPTIONAL_TRACEPOINTS.get(target)
        if feature is None:
            raise MissingFeature(f"tracepoint {target}", "?", f"{prog.name} cannot attach")
        prog.autoload = False
        n = note(feature)
        if n and n not in notes:
            notes.append(n)
    return notes


def helpers_called(path, sections: set[str] | None = None) -> set[int]:
    """Helper ids called by the code of an object file (in SECTIONS, plus shared subprograms)."""
    import struct
    from elftools.elf.elffile import ELFFile
    ids = set()
    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if sec["sh_type"] != "SHT_PROGBITS" or not sec["sh_flags"] & 4:     # SHF_EXECINSTR
                continue
            if sections is not None and sec.name not in sections and sec.name != ".text":
                continue
            data = sec.data()
            for off in range(0, len(data) - 7, 8):
                op, regs, _, imm = struct.unpack_from("<BBhi", data, off)
                if op == 0x85 and regs >> 4 == 0:        # BPF_JMP|BPF_CALL to a helper
                    ids.add(imm)
    return ids


def missing_for(obj) -> MissingFeature | None:
    """The first feature that OBJ (opened, programs chosen) needs and this kernel lacks."""
    for m in obj.maps.values():
        f = MAP_FEATURES.get(m.type)
        if f and not has(f.name):
            return MissingFeature(f.name, f.since, f"{obj.path.name} cannot create map {m.name}")
    progs = [p for p in obj.programs.values() if p.autoload]
    for p in progs:
        kind, _, target = p.section.partition("/")
        if kind == "tp_btf" and not has_tracepoint(target):
            f = BY_NAME.get(OPTIONAL_TRACEPOINTS.get(target, ""))
            return MissingFeature(f"tracepoint {target}", f.since if f else "?", f"{p.name} cannot attach")
    for i in sorted(helpers_called(obj.path, {p.section for p in progs})):
        f = HELPER_FEATURES.get(i)
        if f and not has(f.name):
            return MissingFeature(f.name, f.since, f"{obj.path.name} calls it")
    return None


def report() -> list[dict]:
    """Every feature with whether this kernel has it (for `gridbpf doctor`)."""
    out = []
    for f in FEATURES:
        try:
            present = has(f.name)
        except Exception as e:       # a probe that cannot run is reported, not raised
            present, f_err = False, str(e).splitlines()[0]
        else:
            f_err = ""
        out.append({"feature": f.name, "kind": f.kind, "since": f.since, "present": present,
                    "needed_by": list(f.needed_by), "fallback": f.without or None,
                    **({"probe_error": f_err} if f_err else {})})
    return out
