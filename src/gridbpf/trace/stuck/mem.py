"""`gridbpf trace mem`: RSS (anon, file) over time, page-fault rate, mmap/brk growth, and JVM
GC pauses through HotSpot's USDT probes (bpf/mem.bpf.c). RSS comes from /proc/PID/status at each
sample; the rest is counted in the kernel."""
from __future__ import annotations

import struct
import time

from ...bpf import BpfObject
from .offcpu import target_pids
from ..session import BpfSession
from ..symbols import read_maps

STAT_NAMES = ["procs_full"]
COUNTERS = ["faults_user", "faults_kernel", "mmap_calls", "mmap_bytes", "munmap_calls",
            "munmap_bytes", "mremap_calls", "mremap_growth", "brk_calls", "brk_growth",
            "gc_count", "gc_full", "gc_total_ns", "gc_max_ns"]


def usdt_probes(path: str) -> dict[tuple[str, str], int]:
    """(provider, name) -> file offset of each SystemTap SDT probe (.note.stapsdt) in PATH."""
    from elftools.elf.elffile import ELFFile
    out = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        notes = elf.get_section_by_name(".note.stapsdt")
        if notes is None:
            return out
        base_sec = elf.get_section_by_name(".stapsdt.base")
        loads = [(s["p_offset"], s["p_vaddr"], s["p_filesz"]) for s in elf.iter_segments()
                 if s["p_type"] == "PT_LOAD"]
        data = notes.data()
    i = 0
    while i + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, i)
        i += 12
        name = data[i:i + namesz].rstrip(b"\0")
        i += (namesz + 3) & ~3
        desc = data[i:i + descsz]
        i += (descsz + 3) & ~3
        if name != b"stapsdt" or ntype != 3 or len(desc) < 24:
            continue
        pc, base, _sem = struct.unpack_from("<QQQ", desc, 0)
        provider, probe = desc[24:].split(b"\0")[:2]
        if base_sec is not None and base:   # prelinked: move by the section's actual address
            pc += base_sec["sh_addr"] - base
        for off, vaddr, size in loads:
            if vaddr <= pc < vaddr + size:
                out[(provider.decode(), probe.decode())] = pc - vaddr + off
                break
    return out


def read_status(pid: int) -> dict[str, int]:
    """RSS parts and data size from /proc/PID/status, in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmData", "VmSize"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemTracer(BpfSession):
    def __init__(self, targets, gc: bool = True):
        self.tgids = target_pids(targets)
        self.obj = BpfObject.open("mem")
        self.links = []
        self.jvms: dict[int, str] = {}   # pid -> libjvm.so with GC probes attached
        self.started = time.monotonic()
        self._last = None
        try:
            self.obj.load()
            for t in self.tgids:
                self.obj.map("targets")[t] = 1
            for name in ("mem_fault_user", "mem_fault_kernel", "mem_sys_exit"):
                self.links.append(self.obj.program(name).attach())
            for t in self.tgids:
                self._seed_brk(t)
                if gc:
                    self._attach_gc(t)
        except BaseException:
            self.close()
            raise

    def _seed_brk(self, pid: int) -> None:
        """The program break now (end of [heap], or start_brk if there is no heap yet), so the
        first brk() we see counts as growth too."""
        brk = 0
        try:
            brk = next((m.end for m in read_maps(pid) if m.path == "[heap]"), 0)
            if not brk:
                with open(f"/proc/{pid}/stat") as f:
                    brk = int(f.read().rsplit(")", 1)[1].split()[44])   # field 47: start_brk
        except (OSError, IndexError, ValueError):
            return
        if brk:
            self.obj.map("mem")[pid] = {"last_brk": brk}

    def _attach_gc(self, pid: int) -> None:
        """HotSpot's gc__begin/gc__end, when the process maps a libjvm.so built with them."""
        try:
            libs = {m.path for m in read_maps(pid) if m.path.endswith("/libjvm.so")}
        except OSError:
            return
        for lib in libs:
            path = f"/proc/{pid}/root{lib}"
            probes = usdt_probes(path)
            begin, end = probes.get(("hotspot", "gc__begin")), probes.get(("hotspot", "gc__end"))
            if begin is None or end is None:
                continue
            self.links.append(self.obj.program("mem_gc_begin").attach_uprobe(path, offset=begin, pid=pid))
            self.links.append(self.obj.program("mem_gc_end").attach_uprobe(path, offset=end, pid=pid))
            self.jvms[pid] = lib

    def poll(self, timeout_ms: int = 200) -> int:
        time.sleep(timeout_ms / 1000)
        return 0

    def sample(self) -> list[dict]:
        """One row per process: RSS now and the kernel's counters so far, with rates since the
        previous sample."""
        now = time.monotonic()
        counters = {int(k): v for k, v in self.obj.map("mem").lookup_batch()}
        rows = []
        prev = self._last or {}
        for pid in sorted(self.tgids):
            c = counters.get(pid)
            status = read_status(pid)
            row = {"pid": pid, "t_s": round(now - self.started, 3), "exited": not status, **status,
                   **{k: int(getattr(c, k)) if c is not None else 0 for k in COUNTERS},
                   "jvm_gc_probes": pid in self.jvms}
            p = prev.get(pid)
            if p is not None and now > p["_at"]:
                row["faults_per_s"] = (row["faults_user"] + row["faults_kernel"] -
                                       p["faults_user"] - p["faults_kernel"]) / (now - p["_at"])
            rows.append(row)
        self._last = {r["pid"]: {**r, "_at": now} for r in rows}
        return rows

    def stats(self) -> dict:
        m = self.obj.map("mem_stats")
        return {name: int(m.sum(i) or 0) for i, name in enumerate(STAT_NAMES)}


def format_row(r: dict) -> str:
    mb = lambda k: f"{r.get(k, 0) / 2**20:8.1f}"
    gc = (f" gc {r['gc_count']} ({r['gc_total_ns'] / 1e6:.1f}ms, max {r['gc_max_ns'] / 1e6:.1f}ms)"
          if r["jvm_gc_probes"] else "")
    return (f"+{r['t_s']:7.1f}s pid {r['pid']} rss {mb('VmRSS')}M anon {mb('RssAnon')}M file "
            f"{mb('RssFile')}M faults/s {r.get('faults_per_s', 0):9.0f} mmap {r['mmap_bytes'] / 2**20:.1f}M "
            f"munmap {r['munmap_bytes'] / 2**20:.1f}M brk {r['brk_growth'] / 2**20:+.1f}M{gc}")
