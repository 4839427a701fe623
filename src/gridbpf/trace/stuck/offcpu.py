"""Off-CPU time of a process: the kernel side is bpf/offcpu.bpf.c; this loads it and reads it.

`OffcpuTracer` owns the BPF object. `stuck` reads its live `blocked` map and its events;
`offcpu` reads the per-stack totals and writes folded stacks (flame-graph input) and pprof.
"""
from __future__ import annotations

import gzip
import struct
import time
from dataclasses import dataclass

from ...bpf import BpfObject, RingBuffer
from ..session import BpfSession
from ..symbols import Frame, Symbolizer
from ..targets import TargetError, TargetSpec

STACK_DEPTH = 127
STAT_NAMES = ["kernel_stack_errors", "user_stack_errors", "blocked_map_full", "offcpu_map_full",
              "switch_in_missed"]


def parse_duration(text: str) -> float:
    """'2s', '500ms', '1.5', '2m' -> seconds; a clear error otherwise."""
    s = str(text).strip()
    units = (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    for unit, scale in units:
        if s.endswith(unit):
            num = s[:-len(unit)]
            break
    else:
        num, scale = s, 1.0
    try:
        value = float(num) * scale
    except ValueError:
        raise ValueError(f"bad duration {text!r} (use e.g. 2s, 500ms, 1.5)") from None
    if value < 0:
        raise ValueError(f"bad duration {text!r}: negative")
    return value


def target_pids(targets) -> set[int]:
    """Validate the targets (pids, or a TargetSpec from --pid/--comm/--cgroup/--unit; a clear
    one-line TargetError otherwise) and return the tgids selected now, children included."""
    spec = targets if isinstance(targets, TargetSpec) else TargetSpec(pids=[int(p) for p in targets])
    spec.validate()
    tgids = spec.resolve()
    if not tgids:
        raise TargetError(f"no running process matches {spec.describe()}")
    return tgids


@dataclass
class StackKey:
    tgid: int
    tid: int
    kstack: int
    ustack: int


@dataclass
class StackValue:
    total_ns: int
    count: int
    comm: bytes


class OffcpuTracer(BpfSession):
    """Loads offcpu.bpf.o for some processes. Use as a context manager (detaches on exit)."""

    def __init__(self, pids, min_event_s: float = 1.0, min_block_s: float = 0.0,
                 user_stacks: bool = True, events: bool = True, waker: bool = True,
                 syscalls: bool = False, floor: bool = False, live: bool = True):
        """live: keep blocked threads in a map userspace reads (stuck needs it); False keeps
        them in task-local storage, cheaper per context switch (offcpu totals only)."""
        self.tgids = target_pids(pids)
        self.obj = BpfObject.open("offcpu")
        self.links = []
        self.ring = None
        self.live = bool(live)
        self._insys: dict[int, int] = {}
        try:
            ro = self.obj.rodata
            ro["min_event_ns"] = int(min_event_s * 1e9)
            ro["min_block_ns"] = int(min_block_s * 1e9)
            ro["user_stacks"] = bool(user_stacks)
            ro["want_events"] = bool(events)
            ro["want_waker"] = bool(waker)
            ro["want_syscalls"] = bool(syscalls)
            ro["live_map"] = bool(live)
            for name in ("stuck_sys_enter", "stuck_sys_exit"):   # every syscall: only if asked
                self.obj.program(name).autoload = bool(syscalls)
            # programs that would only return: not attached at all (each costs a call per event)
            self.obj.program("offcpu_waking").autoload = bool(waker)
            self.obj.program("offcpu_exit").autoload = bool(live)
            # floor: benchmarks only, the target check alone instead of everything else
            for name, prog in self.obj.programs.items():
                if floor:
                    prog.autoload = name == "offcpu_floor"
                elif name == "offcpu_floor":
                    prog.autoload = False
            self.obj.load()
            targets = self.obj.map("targets")
            for t in self.tgids:
                targets[t] = 1
            for prog in self.obj.programs.values():
                if prog.autoload:
                    self.links.append(prog.attach())
            self.ring = RingBuffer(self.obj, "events")
            self.event_dtype = self.obj.btf.dtype("struct offcpu_event")
        except BaseException:
            self.close()
            raise
        self._stacks = self.obj.map("stacks")

    # --- reading ---------------------------------------------------------------------------------

    def stack(self, stack_id: int) -> list[int]:
        """Instruction pointers of a stack id (innermost first); [] if it was not captured."""
        if stack_id < 0:
            return []
        raw = self._stacks.get(struct.pack("<I", stack_id))
        if raw is None:
            return []
        ips = struct.unpack(f"<{STACK_DEPTH}Q", bytes(raw))
        out = []
        for ip in ips:
            if not ip:
                break
            out.append(ip)
        return out

    def blocked_now(self) -> list:
        """Entries of `blocked` (struct blocked) of target threads off CPU now (end_ns 0), or
        running for a moment inside a followed syscall in which they blocked (end_ns set, and
        in `insys`). Entries of threads that ran again otherwise stay only for reuse."""
        self._insys = {int(k): int(v.start_ns) for k, v in self.obj.map("insys").lookup_batch()}
        return [v for _k, v in self.obj.map("blocked").lookup_batch()
                if not v.end_ns or v.tid in self._insys]

    def syscall_start(self, tid: int) -> int | None:
        """When the thread entered the syscall it is in (followed syscalls only), as of the
        last blocked_now()."""
        return self._insys.get(tid)

    def poll_events(self, timeout_ms: int = 0):
        """Blocks that ended and lasted at least min_event (numpy array of struct offcpu_event)."""
        return self.ring.poll_array(self.event_dtype, timeout_ms=timeout_ms)

    def wait(self, timeout_ms: int) -> bool:
        return self.ring.wait(timeout_ms)

    def totals(self) -> list[tuple]:
        """(key, value) per (thread, kernel stack, user stack): the `offcpu` map plus what the
        threads' `blocked` entries accumulated since (see struct blocked, acc_ns)."""
        merged: dict[tuple, list] = {}
        for k, v in self.obj.map("offcpu").lookup_batch():
            merged[(k.tgid, k.tid, k.kstack, k.ustack)] = [int(v.total_ns), int(v.count), bytes(v.comm)]
        for _k, b in (self.obj.map("blocked").lookup_batch() if self.live else []):
            if b.acc_count:
                m = merged.setdefault((b.tgid, b.tid, b.kstack, b.ustack), [0, 0, bytes(b.comm)])
                m[0] += int(b.acc_ns)
                m[1] += int(b.acc_count)
        return [(StackKey(*k), StackValue(*v)) for k, v in merged.items()]

    def stats(self) -> dict[str, int]:
        m = self.obj.map("stats")
        out = {name: int(m.sum(i) or 0) for i, name in enumerate(STAT_NAMES)}
        out["events_lost"] = int(self.ring.lost)
        return out

    def add_target(self, tgid: int) -> None:
        self.obj.map("targets")[tgid] = 1
        self.tgids.add(tgid)


# --- user stacks: the frame that frame pointers miss ---------------------------------------------

def read_memory(pid: int, addr: int, size: int) -> bytes:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(size)
    except (OSError, ValueError, OverflowError):
        return b""


def _after_call(code_reader, ret: int) -> bool:
    """Is RET a return address, i.e. right after an x86 call instruction?"""
    code = code_reader(ret - 7, 7)
    if len(code) != 7:
        return False
    if code[2] == 0xE8:                                   # call rel32
        return True
    if code[5] == 0xFF and (code[6] >> 3) & 7 == 2:        # call *reg
        return True
    if code[4] == 0xFF and (code[5] >> 3) & 7 == 2:        # call *disp8(reg) / *(reg,idx)
        return True
    if code[1] == 0xFF and (code[2] >> 3) & 7 == 2:        # call *disp32(reg)
        return True
    return False


def repair_leaf(pid: int, ips: list[int], sp: int, bp: int, proc, stack: bytes | None = None) -> list[int]:
    """Frame-pointer unwinding loses the caller of a leaf function built without frame pointers
    (glibc's syscall wrappers): its return address sits on the stack between SP and the frame
    that BP points to. Read that part of the stack (STACK: a copy taken by the kernel; else live
    from /proc/PID/mem, valid while the thread is still blocked) and put back the return
    addresses found there (checked: inside code, right after a call instruction). PROC is the
    process's ProcessSymbols (mappings, code bytes)."""
    if len(ips) < 1 or not (sp and bp) or not (0 < bp - sp <= 64 * 1024):
        return ips
    raw = stack[:bp - sp] if stack is not None else read_memory(pid, sp, bp - sp)
    found = []
    for (word,) in struct.iter_unpack("<Q", raw[:len(raw) // 8 * 8]):
        if word and proc.is_code(word) and word not in found and _after_call(proc.code, word):
            found.append(word)
    known = set(ips)
    return ips[:1] + [w for w in found if w not in known] + ips[1:]


# --- stacks of a process, folded and pprof ------------------------------------------------------

@dataclass
class StackTotal:
    thread: str
    tid: int
    kernel: list[Frame]
    user: list[Frame]
    total_ns: int
    count: int


def collect_totals(tracer: OffcpuTracer, sym: Symbolizer | None = None) -> list[StackTotal]:
    sym = sym or Symbolizer()
    out = []
    tops = tracer.obj.map("stack_top")
    for key, val in tracer.totals():
        kernel = sym.kernel(tracer.stack(key.kstack))
        ips = tracer.stack(key.ustack)
        top = tops.get(key.ustack) if key.ustack >= 0 else None
        if top is not None and top.sp:
            # the frame that frame pointers miss, from the stack top saved at the first capture
            words = struct.pack(f"<{len(top.words)}Q", *top.words)
            ips = repair_leaf(key.tgid, ips, int(top.sp), int(top.bp), sym.process(key.tgid),
                              stack=words)
        user = sym.user(key.tgid, ips)
        out.append(StackTotal(bytes(val.comm).split(b"\0")[0].decode(errors="replace"), key.tid,
                              kernel, user, int(val.total_ns), int(val.count)))
    out.sort(key=lambda s: -s.total_ns)
    return out


def frame_label(f: Frame) -> str:
    if f.name.startswith("["):
        return f"{f.name} {f.addr:#x}" if f.name != "[jit]" else "[jit]"
    return f.name


def folded(totals: list[StackTotal], by_thread: bool = True) -> str:
    """Brendan Gregg's folded format: root;...;leaf VALUE (microseconds off CPU)."""
    agg: dict[str, int] = {}
    for s in totals:
        parts = [s.thread] if by_thread else []
        parts += [frame_label(f) for f in reversed(s.user)]
        parts += [frame_label(f) + "_[k]" for f in reversed(s.kernel)]
        line = ";".join(p.replace(";", ":").replace(" ", "_") for p in parts) or "[no stack]"
        agg[line] = agg.get(line, 0) + s.total_ns // 1000
    return "".join(f"{k} {v}\n" for k, v in sorted(agg.items(), key=lambda kv: -kv[1]) if v)


# pprof (profile.proto) written by hand: a handful of varint and length-delimited fields.

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return _varint(num << 3) + _varint(value)


def _field_bytes(num: int, data: bytes) -> bytes:
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _packed(num: int, values: list[int]) -> bytes:
    return _field_bytes(num, b"".join(_varint(v) for v in values))


def pprof(totals: list[StackTotal], duration_s: float, by_thread: bool = True) -> bytes:
    """A gzipped profile.proto: sample types off-cpu count and nanoseconds, one location per frame."""
    strings: dict[str, int] = {"": 0}

    def s(text: str) -> int:
        if text not in strings:
            strings[text] = len(strings)
        return strings[text]

    functions: dict[tuple[str, str], int] = {}
    locations: dict[tuple[int, str, str], int] = {}
    body = bytearray()
    # sample_type (1): ValueType {type=1, unit=2}
    body += _field_bytes(1, _field_varint(1, s("offcpu")) + _field_varint(2, s("count")))
    body += _field_bytes(1, _field_varint(1, s("offcpu_time")) + _field_varint(2, s("nanoseconds")))

    def location(addr: int, name: str, module: str) -> int:
        key = (addr, name, module)
        if key not in locations:
            fkey = (name, module)
            if fkey not in functions:
                functions[fkey] = len(functions) + 1
            locations[key] = len(locations) + 1
        return locations[key]

    samples = bytearray()
    for st in totals:
        ids = [location(f.addr, frame_label(f), f.module) for f in st.kernel]
        ids += [location(f.addr, frame_label(f), f.module) for f in st.user]
        if by_thread:   # the thread as the root "frame", as in the folded output
            ids.append(location(0, f"{st.thread} ({st.tid})", "[thread]"))
        sample = _packed(1, ids) + _packed(2, [st.count, st.total_ns])
        sample += _field_bytes(3, _field_varint(1, s("thread_id")) + _field_varint(3, st.tid))
        samples += _field_bytes(2, sample)
    body += samples
    for (addr, name, module), lid in locations.items():
        fid = functions[(name, module)]
        line = _field_varint(1, fid)
        body += _field_bytes(4, _field_varint(1, lid) + _field_varint(3, addr) + _field_bytes(4, line))
    for (name, module), fid in functions.items():
        body += _field_bytes(5, _field_varint(1, fid) + _field_varint(2, s(name)) +
                             _field_varint(3, s(name)) + _field_varint(4, s(module)))
    for text in strings:   # string_table (6) in index order (dicts keep insertion order)
        body += _field_bytes(6, text.encode())
    now = time.time_ns()
    body += _field_varint(9, now - int(duration_s * 1e9))           # time_nanos
    body += _field_varint(10, int(duration_s * 1e9))                # duration_nanos
    body += _field_bytes(11, _field_varint(1, s("offcpu_time")) + _field_varint(2, s("nanoseconds")))
    body += _field_varint(12, 1)                                    # period
    return gzip.compress(bytes(body))


def run_offcpu(pids: list[int], duration_s: float, min_block_s: float = 0.0,
               user_stacks: bool = True, stop=None) -> tuple[list[StackTotal], dict]:
    """Trace for DURATION_S seconds (or until stop() is true) and return totals and stats."""
    sym = Symbolizer()
    with OffcpuTracer(pids, min_block_s=min_block_s, user_stacks=user_stacks, events=False,
                      waker=False, live=False) as tr:
        # Mappings are read while the processes live (they may exit before we symbolize),
        # and again now and then for libraries loaded and code generated meanwhile.
        end = time.monotonic() + duration_s
        next_maps = 0.0
        while time.monotonic() < end:
            if time.monotonic() >= next_maps:
                for t in tr.tgids:
                    sym.process(t).refresh()
                next_maps = time.monotonic() + 2.0
            if stop is not None and stop():
                break
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))
        return collect_totals(tr, sym), tr.stats()

