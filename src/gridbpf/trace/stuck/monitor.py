"""`gridbpf trace stuck`: threads of a process that are off CPU longer than a threshold, live.

The kernel keeps, per blocked target thread, when it blocked, its stacks and the syscall
registers (bpf/offcpu.bpf.c, map `blocked`). Every poll interval we read that map (a few
entries) and report threads past the threshold, decoding the syscall arguments while the thread
is still blocked (fd -> path or socket peer, poll sets, futex words, sleep lengths). When such a
thread runs again, the kernel sends one event with the total time and who woke it.
Threads that were already blocked when tracing started are found in /proc and entered into the
same map, so their wakeup is reported too.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass, field

from .offcpu import OffcpuTracer, read_memory, repair_leaf
from .syscalls import SYSCALLS_X86_64
from ..symbols import Frame, Symbolizer, kernel_symbols

# bits of task->__state (include/linux/sched.h)
TASK_INTERRUPTIBLE, TASK_UNINTERRUPTIBLE, TASK_STOPPED, TASK_TRACED = 1, 2, 4, 8
TASK_PARKED, TASK_NOLOAD = 0x40, 0x400

FD_FIRST = {"read", "write", "pread64", "pwrite64", "readv", "writev", "preadv", "pwritev",
            "preadv2", "pwritev2", "fsync", "fdatasync", "sync_file_range", "recvfrom", "sendto",
            "recvmsg", "sendmsg", "recvmmsg", "sendmmsg", "accept", "accept4", "connect", "close",
            "flock", "fcntl", "ioctl", "getdents64", "ftruncate", "fallocate", "lseek",
            "epoll_wait", "epoll_pwait", "epoll_pwait2", "sendfile", "splice", "shutdown"}
FUTEX_OPS = {0: "FUTEX_WAIT", 1: "FUTEX_WAKE", 6: "FUTEX_LOCK_PI", 9: "FUTEX_WAIT_BITSET",
             11: "FUTEX_WAIT_REQUEUE_PI", 13: "FUTEX_WAITV"}
CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 7: "CLOCK_BOOTTIME"}
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING"}
# Kernel entry points of hardware interrupts: a waker under one ran in interrupt context, on top
# of whatever task was current, so that task's user stack is not the waker's. (Softirqs run from
# local_bh_enable inside a syscall, e.g. loopback delivery, do belong to the task.)
IRQ_MARKERS = ("asm_sysvec_", "asm_common_interrupt", "irq_exit_rcu", "run_ksoftirqd")


def state_name(state: int) -> str:
    if state & TASK_UNINTERRUPTIBLE:
        return "I (idle)" if state & TASK_NOLOAD else "D (uninterruptible)"
    if state & TASK_INTERRUPTIBLE:
        return "S (sleeping)"
    if state & TASK_STOPPED:
        return "T (stopped)"
    if state & TASK_TRACED:
        return "t (traced)"
    if state & TASK_PARKED:
        return "P (parked)"
    return f"{state:#x}"


# --- describing file descriptors ---------------------------------------------------------------

def _socket_table(pid: int) -> dict[int, str]:
    """inode -> "proto local -> remote STATE" from the process's network namespace."""
    out = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{proto}") as f:
                next(f)
                for line in f:
                    p = line.split()
                    if len(p) < 10:
                        continue
                    local, remote = _hexaddr(p[1]), _hexaddr(p[2])
                    st = int(p[3], 16)
                    state = TCP_STATES.get(st, str(st)) if proto.startswith("tcp") else ""
                    out[int(p[9])] = f"{proto} {local} -> {remote} {state}".rstrip()
        except (OSError, StopIteration):
            continue
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            next(f)
            for line in f:
                p = line.split()
                if len(p) >= 7:
                    out.setdefault(int(p[6]), "unix " + (p[7] if len(p) > 7 else "(unnamed)"))
    except (OSError, StopIteration):
        pass
    return out


def _hexaddr(text: str) -> str:
    addr, port = text.split(":")
    raw = bytes.fromhex(addr)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
        return f"{ip}:{int(port, 16)}"
    # /proc prints IPv6 as four host-order 32-bit words
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def describe_fd(pid: int, fd: int) -> str:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return "(closed)"
    if target.startswith("socket:["):
        ino = int(target[8:-1])
        return _socket_table(pid).get(ino, target)
    return target


# --- decoding the syscall a thread is blocked in ---------------------------------------------------

def decode_syscall(pid: int, nr: int, args: list[int], kernel: list[Frame], live: bool) -> dict:
    """Name and useful arguments. LIVE: the thread is still blocked, so its memory and fds
    are as they were when it entered the syscall and may be read."""
    names = {f.name for f in kernel}
    if any(n in names for n in ("exc_page_fault", "asm_exc_page_fault", "handle_mm_fault")):
        return {"name": "page fault", "nr": None, "args": {}, "text": "page fault"}
    if nr is None or nr < 0 or nr > 0xFFFF:
        return {"name": None, "nr": None, "args": {}, "text": "not in a syscall"}
    name = SYSCALLS_X86_64.get(nr, f"syscall_{nr}")
    a: dict = {}
    if name in FD_FIRST:
        fd = _s32(args[0])
        a["fd"] = fd
        if live:
            a["file"] = describe_fd(pid, fd)
        if name in ("read", "write", "pread64", "pwrite64", "recvfrom", "sendto"):
            a["count"] = args[2]
    elif name in ("poll", "ppoll"):
        n = min(int(args[1]), 64)
        a["nfds"] = int(args[1])
        if name == "poll":
            a["timeout_ms"] = _s32(args[2])
        if live:
            raw = read_memory(pid, args[0], 8 * n)
            fds = []
            for fd, events, _rev in struct.iter_unpack("<ihh", raw[:len(raw) // 8 * 8]):
                fds.append({"fd": fd, "events": events, "file": describe_fd(pid, fd)})
            a["fds"] = fds
    elif name in ("futex", "futex_waitv"):
        a["uaddr"] = f"{args[0]:#x}"
        op = int(args[1]) & 0x7F
        a["op"] = FUTEX_OPS.get(op & 0xF, str(op)) + ("|PRIVATE" if args[1] & 128 else "")
        a["val"] = _s32(args[2])
        if live:
            raw = read_memory(pid, args[0], 4)
            if len(raw) == 4:
                a["word_now"] = struct.unpack("<i", raw)[0]
    elif name in ("nanosleep", "clock_nanosleep"):
        ptr = args[0] if name == "nanosleep" else args[2]
        if name == "clock_nanosleep":
            a["clock"] = CLOCKS.get(int(args[0]), str(args[0]))
            a["flags"] = "TIMER_ABSTIME" if args[1] & 1 else 0
        if live:
            raw = read_memory(pid, ptr, 16)
            if len(raw) == 16:
                sec, nsec = struct.unpack("<qq", raw)
                a["request_s"] = sec + nsec / 1e9
    elif name in ("wait4", "waitid"):
        a["pid"] = _s32(args[0] if name == "wait4" else args[1])
    elif name in ("openat", "openat2"):
        if live:
            a["path"] = read_memory(pid, args[1], 256).split(b"\0")[0].decode(errors="replace")
    elif name in ("select", "pselect6"):
        a["nfds"] = int(args[0])
    return {"name": name, "nr": nr, "args": a, "text": _syscall_text(name, a)}


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def _syscall_text(name: str, a: dict) -> str:
    parts = []
    for k, v in a.items():
        if k == "fds":
            parts.append("fds=[" + ", ".join(f"{x['fd']}: {x['file']}" for x in v) + "]")
        else:
            parts.append(f"{k}={v}")
    return f"{name}({', '.join(parts)})"


# --- reports ------------------------------------------------------------------------------------

@dataclass
class Block:
    """What we know of one block of one thread (the `blocked` entry, decoded once, live)."""
    tid: int
    tgid: int
    comm: str
    start_ns: int
    state: str
    syscall: dict
    kernel: list[Frame]
    user: list[Frame]
    since_before_tracing: bool = False
    scanned: bool = False   # user stack found by scanning for return addresses (approximate)
    reported: bool = False
    extra: dict = field(default_factory=dict)


def _frames_json(frames: list[Frame]) -> list[dict]:
    return [f.to_json() for f in frames]


def _cstr(raw) -> str:
    return bytes(raw).split(b"\0")[0].decode(errors="replace")


class StuckMonitor:
    """Reports threads of PIDS that block longer than THRESHOLD_S, and their wakeups."""

    def __init__(self, pids: list[int], threshold_s: float = 2.0, user_stacks: bool = True):
        if threshold_s <= 0:
            raise ValueError("--threshold must be positive")
        self.threshold_ns = int(threshold_s * 1e9)
        # Only blocks past the threshold are aggregated: stuck needs the events and the live map.
        self.tracer = OffcpuTracer(pids, min_event_s=threshold_s, min_block_s=threshold_s,
                                   user_stacks=user_stacks, syscalls=True)
        self.sym = Symbolizer()
        kernel_symbols()   # load kallsyms now, not in the middle of the first report
        self.blocks: dict[tuple[int, int], Block] = {}
        self._adopt_blocked()

    def close(self) -> None:
        self.tracer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- threads blocked before we started ---------------------------------------------------

    def _adopt_blocked(self) -> None:
        """Put threads already off CPU into `blocked` with their start estimated from the
        scheduler's last run time, so they are reported like the others (without stacks from
        the kernel: /proc gives their kernel stack, and a scan of their user stack)."""
        clocks: dict = {}           # cpu -> (its scheduler clock, monotonic) read together
        m = self.tracer.obj.map("blocked")
        known = {int(k) for k in m.keys()}
        for tgid in self.tracer.tgids:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{tgid}/task")]
            except OSError:
                continue
            for tid in tids:
                st = _task_state(tgid, tid)
                if st not in ("S", "D"):
                    continue
                last = _exec_start_ns(tgid, tid)
                if last is None or tid in known:
                    continue
                cpu = _last_cpu(tgid, tid)
                if cpu not in clocks:
                    now_rq = _own_exec_start_ns(cpu)
                    clocks[cpu] = (now_rq, time.monotonic_ns())
                now_rq, now_mono = clocks[cpu]
                if now_rq is None:
                    continue
                start = now_mono - max(0, now_rq - last)
                sc = _proc_syscall(tgid, tid)
                v = m.value_type()
                v.start_ns, v.tgid, v.tid = start, tgid, tid
                v.state = TASK_UNINTERRUPTIBLE if st == "D" else TASK_INTERRUPTIBLE
                v.syscall = sc[0] if sc else -1
                if sc:
                    for i in range(6):
                        v.args[i] = sc[1][i]
                    v.user_sp, v.user_ip = sc[2], sc[3]
                v.kstack = v.ustack = v.waker_kstack = v.waker_ustack = -1
                comm = (_read(f"/proc/{tgid}/task/{tid}/comm") or "").strip().encode()[:15]
                v.comm = comm
                m[tid] = v
                if _task_state(tgid, tid) not in ("S", "D"):   # it woke meanwhile
                    try:
                        del m[tid]
                    except KeyError:
                        pass
                    continue
                # decode now, while it is still blocked: /proc stack and memory are still its own
                self.blocks[(tid, start)] = None
                self.blocks[(tid, start)] = self._decode(v, live=True)

    # --- polling -----------------------------------------------------------------------------

    def poll(self, timeout_ms: int = 200) -> list[dict]:
        """Reports since the last call: 'woke' for blocks past the threshold that ended,
        'blocked' for threads past the threshold now (once per block)."""
        reports = []
        # live ones first: their memory and fds can only be read while they are still blocked
        now = time.monotonic_ns()
        for b in self.tracer.blocked_now():
            # inside a followed syscall, the time counts from its start (it may have run
            # briefly between blocks, e.g. fsync waiting for one page after another)
            since = self.tracer.syscall_start(b.tid) or b.start_ns
            if since > b.start_ns or now - since < self.threshold_ns:
                continue   # (a newer syscall than this block: it woke while we read)
            key = (b.tid, since)
            blk = self.blocks.get(key)
            if blk is not None and blk.reported:
                continue
            blk = self._decode(b, live=True, key=key)
            blk.reported = True
            self.blocks[key] = blk
            self.blocks[(b.tid, b.start_ns)] = blk   # the wakeup event may name only the block
            reports.append(self._report("blocked", blk, blocked_ns=now - since,
                                        offcpu_ns=now - b.start_ns))
        for e in self.tracer.poll_events(timeout_ms=0):
            reports.append(self._woke(e))
        if not reports and timeout_ms:
            self.tracer.wait(timeout_ms)
        return reports

    def _decode(self, b, live: bool, key=None) -> Block:
        key = key or (b.tid, b.start_ns)
        old = self.blocks.get(key)
        if old is not None:
            return old
        adopted = b.kstack < 0 and b.ustack < 0 and b.waker_ns == 0 and key in self.blocks
        scanned = adopted
        if adopted:
            kernel = _proc_kernel_stack(b.tgid, b.tid)
            user = [f for f in self.sym.user(b.tgid, _scan_user_stack(
                b.tgid, b.user_ip, b.user_sp, self.sym.process(b.tgid)))
                if not (f.offset == 0 and not f.name.startswith("["))]   # not return addresses
        else:
            kernel = self.sym.kernel(self.tracer.stack(b.kstack))
            ips = self.tracer.stack(b.ustack)
            proc = self.sym.process(b.tgid)
            if live and len(ips) <= 2 and b.user_sp:
                # The frame-pointer chain broke in code that uses rbp for data (glibc's futex
                # and condition-variable waits): scan the stack instead, marked approximate.
                ips = ips[:1] + [a for a in _scan_user_stack(b.tgid, 0, b.user_sp, proc)
                                 if a not in ips[:1]]
                scanned = True
            elif live:
                ips = repair_leaf(b.tgid, ips, b.user_sp, b.user_bp, proc)
            user = self.sym.user(b.tgid, ips)
            if scanned:
                user = [f for f in user if not (f.offset == 0 and not f.name.startswith("["))]
        syscall = decode_syscall(b.tgid, int(b.syscall), [int(x) for x in b.args], kernel, live)
        return Block(b.tid, b.tgid, _cstr(b.comm), int(b.start_ns), state_name(int(b.state)),
                     syscall, kernel, user, since_before_tracing=adopted, scanned=scanned)

    def _woke(self, e) -> dict:
        b = e["b"]
        rec = _Rec(b)
        sys_start = int(e["sys_start_ns"])
        key = (rec.tid, sys_start or rec.start_ns)
        if key not in self.blocks and (rec.tid, rec.start_ns) in self.blocks:
            key = (rec.tid, rec.start_ns)
        blk = self._decode(rec, live=False, key=key)
        self.blocks.pop(key, None)
        self.blocks.pop((rec.tid, rec.start_ns), None)
        if sys_start:   # a followed syscall: its whole length, and its time off CPU
            report = self._report("woke", blk, blocked_ns=int(e["sys_end_ns"]) - sys_start,
                                  offcpu_ns=int(e["sys_offcpu_ns"]), blocks=int(e["sys_blocks"]))
        else:
            total = int(e["end_ns"]) - rec.start_ns
            report = self._report("woke", blk, blocked_ns=total, offcpu_ns=total, blocks=1)
        waker = None
        if rec.waker_ns:
            wk = self.sym.kernel(self.tracer.stack(rec.waker_kstack))
            in_irq = rec.waker_tgid == 0 or any(f.name.startswith(IRQ_MARKERS) for f in wk)
            wu = []
            if not in_irq:
                ips = self.tracer.stack(rec.waker_ustack)
                wm = e["waker"]
                if int(wm["sp"]):
                    ips = repair_leaf(rec.waker_tgid, ips, int(wm["sp"]), int(wm["bp"]),
                                      self.sym.process(rec.waker_tgid),
                                      stack=wm["words"].tobytes())
                wu = self.sym.user(rec.waker_tgid, ips)
            waker = {"tid": rec.waker_tid, "pid": rec.waker_tgid, "comm": _cstr(rec.waker_comm),
                     "context": "interrupt" if in_irq else "task",
                     "after_s": (rec.waker_ns - (sys_start or rec.start_ns)) / 1e9,
                     "kernel_stack": _frames_json(wk), "user_stack": _frames_json(wu),
                     "_k": wk, "_u": wu}
        report["waker"] = waker
        return report

    def _report(self, kind: str, blk: Block, blocked_ns: int, offcpu_ns: int,
                blocks: int | None = None) -> dict:
        """blocked_s: time in the syscall (or the block when not in one), offcpu_s: of that,
        time off CPU (the current block only, in a live report), blocks: how many times."""
        return {"event": kind, "pid": blk.tgid, "tid": blk.tid, "thread": blk.comm,
                "state": blk.state, "blocked_s": blocked_ns / 1e9, "offcpu_s": offcpu_ns / 1e9,
                "blocks": blocks,
                "since_before_tracing": blk.since_before_tracing,
                "user_stack_scanned": blk.scanned,
                "syscall": blk.syscall, "kernel_stack": _frames_json(blk.kernel),
                "user_stack": _frames_json(blk.user), "_k": blk.kernel, "_u": blk.user}

    def stats(self) -> dict:
        return self.tracer.stats()


class _Rec:
    """A struct offcpu_event's `b` from numpy, with the attribute names of the map's ctypes value."""

    def __init__(self, b):
        for name in b.dtype.names:
            v = b[name]
            setattr(self, name, v.tolist() if getattr(v, "shape", ()) else v.item()
                    if hasattr(v, "item") else v)
        self.comm, self.waker_comm = bytes(b["comm"]), bytes(b["waker_comm"])


def format_report(r: dict) -> str:
    """Human text of one report."""
    sc = r["syscall"]["text"]
    blocks = f" ({r['offcpu_s']:.3f}s off CPU in {r['blocks']} blocks)" if (r["blocks"] or 0) > 1 else ""
    head = (f"[{r['event']}] pid {r['pid']} tid {r['tid']} ({r['thread']}) "
            f"{'blocked for' if r['event'] == 'woke' else 'blocked'} {r['blocked_s']:.3f}s{blocks}"
            f"{' (at least: blocked before tracing started)' if r['since_before_tracing'] else ''}"
            f", state {r['state']}, in {sc}")
    lines = [head]
    lines += _stack_lines("kernel", r["_k"])
    lines += _stack_lines("user (scanned, approximate)" if r["user_stack_scanned"] else "user",
                          r["_u"])
    w = r.get("waker")
    if r["event"] == "woke":
        if w is None:
            lines.append("  woken by: not seen")
        else:
            lines.append(f"  woken by tid {w['tid']} ({w['comm']}, pid {w['pid']}) in {w['context']} "
                         f"context after {w['after_s']:.3f}s")
            lines += _stack_lines("  waker kernel", w["_k"])
            lines += _stack_lines("  waker user", w["_u"])
    return "\n".join(lines)


def _stack_lines(label: str, frames: list[Frame]) -> list[str]:
    if not frames:
        return []
    return [f"  {label} stack:"] + [f"    {f}" for f in frames]


def public(report: dict) -> dict:
    """The report without the Frame objects kept for text output (for --json)."""
    out = {k: v for k, v in report.items() if not k.startswith("_")}
    if out.get("waker"):
        out["waker"] = {k: v for k, v in out["waker"].items() if not k.startswith("_")}
    return out


# --- /proc helpers for threads blocked before tracing -----------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _task_state(tgid: int, tid: int) -> str | None:
    stat = _read(f"/proc/{tgid}/task/{tid}/stat")
    return stat[stat.rindex(")") + 2] if stat else None


def _exec_start_ns(tgid: int, tid: int) -> int | None:
    text = _read(f"/proc/{tgid}/task/{tid}/sched")
    for line in (text or "").splitlines():
        if line.startswith("se.exec_start"):
            return int(float(line.split(":")[1]) * 1e6)
    return None


def _own_exec_start_ns(cpu: int | None = None) -> int | None:
    """The scheduler clock of CPU now, roughly: our own last-run time right after a
    reschedule there. Each CPU has its own clock, and they drift apart on VMs (measured here:
    0.64 s between the two vCPUs after an hour), so a thread's last-run time is compared with
    the clock of the CPU it last ran on."""
    if cpu is None:
        os.sched_yield()
        return _exec_start_ns(os.getpid(), _gettid())
    mask = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
        os.sched_yield()
        return _exec_start_ns(os.getpid(), _gettid())
    except OSError:
        return None
    finally:
        os.sched_setaffinity(0, mask)


def _last_cpu(tgid: int, tid: int) -> int | None:
    """The CPU a thread last ran on (field 39 of its stat)."""
    text = _read(f"/proc/{tgid}/task/{tid}/stat")
    try:
        return int(text.rsplit(")", 1)[1].split()[36])
    except (AttributeError, IndexError, ValueError):
        return None


def _gettid() -> int:
    return os.gettid() if hasattr(os, "gettid") else os.getpid()


def _proc_syscall(tgid: int, tid: int):
    """(nr, args, sp, pc) from /proc/TID/syscall, None when running or unknown."""
    text = (_read(f"/proc/{tgid}/task/{tid}/syscall") or "").split()
    if len(text) < 9 or text[0] == "running":
        return None
    nr = int(text[0])
    return nr, [int(x, 16) for x in text[1:7]], int(text[7], 16), int(text[8], 16)


def _proc_kernel_stack(tgid: int, tid: int) -> list[Frame]:
    out = []
    for line in (_read(f"/proc/{tgid}/task/{tid}/stack") or "").splitlines():
        sym = line.split("] ", 1)[-1].split("+")[0].strip()
        if sym:
            out.append(Frame(0, sym, "[kernel]"))
    return out


def _scan_user_stack(pid: int, ip: int, sp: int, proc, limit: int = 32) -> list[int]:
    """Without frame registers: the return addresses found on the stack above SP (approximate)."""
    if not sp:
        return [ip] if ip else []
    m = proc.mapping(sp)   # not past the end of the stack's mapping
    size = min(32 * 1024, m.end - sp) if m else 4096
    raw = read_memory(pid, sp, size)
    out = [ip] if ip else []
    from .offcpu import _after_call
    for (word,) in struct.iter_unpack("<Q", raw[:len(raw) // 8 * 8]):
        if len(out) >= limit:
            break
        if word and proc.is_code(word) and _after_call(proc.code, word):
            out.append(word)
    return out
