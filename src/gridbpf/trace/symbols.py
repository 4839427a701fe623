"""Addresses to function names: kernel (/proc/kallsyms), ELF files (pyelftools), JIT perf maps.

User addresses are resolved through the process's mappings (/proc/PID/maps): a file-backed
executable mapping is looked up in that file's .symtab/.dynsym (or its separate debug file
under /usr/lib/debug/.build-id); an anonymous executable mapping is JIT code, named from
/tmp/perf-PID.map when the runtime wrote one (a JVM does with `jcmd PID Compiler.perfmap`),
otherwise shown as "[jit]". Everything is read lazily and cached per file: symbolizing runs
when a report is printed, never per event in the kernel's hot path.
"""
from __future__ import annotations

import bisect
import os
import struct
import subprocess
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Frame:
    addr: int
    name: str            # function, "[jit]", "[unknown]"
    module: str          # file name, "[kernel]", "[jit]", "[anon]"
    offset: int = 0      # addr - function start (0 when unknown)

    def __str__(self) -> str:
        off = f"+{self.offset:#x}" if self.offset else ""
        if self.name.startswith("["):
            return f"{self.name} {self.addr:#x}" + (f" ({self.module})" if self.module != self.name else "")
        return f"{self.name}{off} ({self.module})"

    def to_json(self) -> dict:
        return {"addr": f"{self.addr:#x}", "function": self.name, "module": self.module,
                "offset": self.offset}


class SymbolTable:
    """Sorted (start, size, name) entries; lookup returns (name, offset) or None."""

    def __init__(self, entries: list[tuple[int, int, str]], unsized_max: int | None = None):
        # unsized_max: how far a symbol without a size may reach (None: to the next symbol,
        # right for kallsyms; ELF files get a bound, or an address in a stripped static
        # function would take the name of whatever exported symbol precedes it)
        self.unsized_max = unsized_max
        entries.sort()
        self.starts = [e[0] for e in entries]
        self.entries = entries

    def lookup(self, addr: int):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i < 0:
            return None
        start, size, name = self.entries[i]
        # Symbols without a size (assembly, kallsyms) cover up to the next symbol.
        if size and addr >= start + size:
            return None
        if not size and self.unsized_max is not None and addr - start >= self.unsized_max:
            return None
        return name, addr - start

    def __len__(self) -> int:
        return len(self.entries)


# --- kernel ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def kernel_symbols() -> SymbolTable:
    entries = []
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("t", "T", "w", "W"):
                addr = int(parts[0], 16)
                if addr:
                    entries.append((addr, 0, parts[2]))
    if not entries:
        raise PermissionError("/proc/kallsyms shows no addresses (run as root or lower kptr_restrict)")
    return SymbolTable(entries)


def kernel_frame(addr: int) -> Frame:
    hit = kernel_symbols().lookup(addr)
    if hit is None:
        return Frame(addr, "[unknown]", "[kernel]")
    return Frame(addr, hit[0], "[kernel]", hit[1])


# --- ELF files ------------------------------------------------------------------------------------

class ElfFile:
    """Function symbols and loadable segments of one ELF file."""

    def __init__(self, path: str):
        from elftools.elf.elffile import ELFFile
        self.path = path
        self.segments: list[tuple[int, int, int]] = []   # (file offset, vaddr, file size)
        entries: list[tuple[int, int, str]] = []
        build_id = None
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self.segments.append((seg["p_offset"], seg["p_vaddr"], seg["p_filesz"]))
                elif seg["p_type"] == "PT_NOTE":
                    for note in seg.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            build_id = note["n_desc"]
            entries = _func_symbols(elf)
        if build_id:   # Debian's -dbg/-dbgsym packages put full symbol tables here
            debug = f"/usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
            if os.path.exists(debug):
                with open(debug, "rb") as f:
                    entries += _func_symbols(ELFFile(f))
        # keep one name per start address (symtab and dynsym repeat each other)
        seen: dict[int, tuple[int, int, str]] = {}
        for e in entries:
            if e[0] not in seen or (not seen[e[0]][1] and e[1]):
                seen[e[0]] = e
        self.symbols = SymbolTable(list(seen.values()), unsized_max=4096)

    def vaddr(self, file_offset: int) -> int | None:
        for off, vaddr, size in self.segments:
            if off <= file_offset < off + max(size, 1):
                return file_offset - off + vaddr
        return None


def _func_symbols(elf) -> list[tuple[int, int, str]]:
    """Function symbols of .symtab and .dynsym, read straight from the section bytes
    (pyelftools' per-symbol parsing takes seconds for libjvm.so's 40,000 symbols)."""
    from elftools.elf.sections import SymbolTableSection
    out = []
    if elf.elfclass != 64 or not elf.little_endian:
        return out
    for name in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(name)
        if not isinstance(sec, SymbolTableSection):   # absent, or NOBITS in a debug file
            continue
        strtab = elf.get_section(sec["sh_link"]).data()
        for st_name, st_info, _other, _shndx, value, size in struct.iter_unpack("<IBBHQQ", sec.data()):
            # STT_FUNC 2, STT_GNU_IFUNC 10
            if value and (st_info & 0xF) in (2, 10):
                end = strtab.index(b"\0", st_name)
                out.append((value, size, strtab[st_name:end].decode(errors="replace")))
    return out


@lru_cache(maxsize=64)
def _elf(_identity: tuple, path: str) -> ElfFile | None:
    try:
        return ElfFile(path)
    except Exception:   # not ELF, unreadable, deleted: its frames stay unnamed
        return None


def elf_file(path: str) -> ElfFile | None:
    """The parsed file, cached by identity (device, inode, mtime): the same library seen through
    different /proc/PID/root paths is parsed once."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _elf((st.st_dev, st.st_ino, st.st_mtime_ns), path)


# --- processes ------------------------------------------------------------------------------------

@dataclass
class Mapping:
    start: int
    end: int
    perms: str
    offset: int
    path: str


def read_maps(pid: int) -> list[Mapping]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append(Mapping(start, end, parts[1], int(parts[2], 16), path))
    return out


def read_perf_map(pid: int) -> SymbolTable | None:
    """/tmp/perf-PID.map: lines "START SIZE NAME" in hex, written by JITs (JVM, node, ...)."""
    path = f"/tmp/perf-{pid}.map"
    try:
        f = open(path, errors="replace")
    except OSError:
        return None
    entries = []
    with f:
        for line in f:
            parts = line.rstrip("\n").split(" ", 2)
            if len(parts) == 3:
                try:
                    entries.append((int(parts[0], 16), int(parts[1], 16), parts[2]))
                except ValueError:
                    continue
    return SymbolTable(entries)


class ProcessSymbols:
    """Symbolizes user addresses of one process (snapshot of its mappings, refreshed on a miss)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._maps: list[Mapping] = []
        self._starts: list[int] = []
        self._perf_map: SymbolTable | None = None
        self._perf_mtime = None
        self.refresh()

    def refresh(self) -> None:
        try:
            maps = read_maps(self.pid)
        except OSError:
            return              # the process is gone: keep the mappings we saw last
        if maps:                # (a zombie shows none)
            self._maps = maps
        self._starts = [m.start for m in self._maps]

    def _mapping(self, addr: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and addr < self._maps[i].end:
            return self._maps[i]
        return None

    def mapping(self, addr: int, refresh: bool = True) -> Mapping | None:
        m = self._mapping(addr)
        if m is None and refresh:
            self.refresh()
            m = self._mapping(addr)
        return m

    def _jit(self, addr: int) -> Frame:
        path = f"/tmp/perf-{self.pid}.map"
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            mtime = None
        if mtime != self._perf_mtime:
            self._perf_map, self._perf_mtime = read_perf_map(self.pid), mtime
        if self._perf_map is not None:
            hit = self._perf_map.lookup(addr)
            if hit:
                return Frame(addr, hit[0], "[jit]", hit[1])
        return Frame(addr, "[jit]", "[jit]")

    def frame(self, addr: int) -> Frame:
        m = self.mapping(addr)
        if m is None:
            return Frame(addr, "[unknown]", "[unknown]")
        if not m.path or m.path.startswith("[") or m.path.startswith("/memfd:"):
            # executable anonymous memory is generated code (JIT); a perf map names it
            if "x" in m.perms:
                return self._jit(addr)
            return Frame(addr, "[unknown]", m.path or "[anon]")
        path = m.path.removesuffix(" (deleted)")
        module = os.path.basename(path)
        elf = elf_file(f"/proc/{self.pid}/root{path}") or elf_file(path)
        if elf is None:
            return Frame(addr, "[unknown]", module)
        vaddr = elf.vaddr(addr - m.start + m.offset)
        hit = elf.symbols.lookup(vaddr) if vaddr is not None else None
        if hit is None:
            return Frame(addr, "[unknown]", module)
        return Frame(addr, hit[0], module, hit[1])

    def is_code(self, addr: int) -> bool:
        m = self.mapping(addr, refresh=False)
        return m is not None and "x" in m.perms

    def code(self, addr: int, size: int) -> bytes:
        """SIZE bytes of code at ADDR: from the mapped file (still readable after the process
        exited), else from the process's memory (JIT code)."""
        m = self.mapping(addr, refresh=False)
        if m is None:
            return b""
        if m.path.startswith("/"):
            path = m.path.removesuffix(" (deleted)")
            for candidate in (f"/proc/{self.pid}/root{path}", path):
                try:
                    with open(candidate, "rb") as f:
                        f.seek(addr - m.start + m.offset)
                        return f.read(size)
                except OSError:
                    continue
        try:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as f:
                f.seek(addr)
                return f.read(size)
        except (OSError, ValueError, OverflowError):
            return b""


class Symbolizer:
    """Symbolizes stacks of any process (one ProcessSymbols per pid) and the kernel."""

    def __init__(self):
        self._procs: dict[int, ProcessSymbols] = {}

    def process(self, pid: int) -> ProcessSymbols:
        p = self._procs.get(pid)
        if p is None:
            p = self._procs[pid] = ProcessSymbols(pid)
        return p

    def user(self, pid: int, addrs: list[int]) -> list[Frame]:
        if not addrs:
            return []
        proc = self.process(pid)
        return demangle([proc.frame(a) for a in addrs])

    def kernel(self, addrs: list[int]) -> list[Frame]:
        frames = [kernel_frame(a) for a in addrs]
        # the innermost frames are the tracing machinery itself (our program, its trampoline)
        while frames and frames[0].name.startswith(("bpf_prog_", "bpf_trace_run", "__bpf_trace_")):
            frames.pop(0)
        return frames


_DEMANGLED: dict[str, str] = {}


def demangle(frames: list[Frame]) -> list[Frame]:
    """C++ names (_Z...) through c++filt (optional), one call for all names not seen before."""
    new = sorted({f.name for f in frames if f.name.startswith("_Z") and f.name not in _DEMANGLED})
    if new:
        try:
            out = subprocess.run(["c++filt", "-p"], input="\n".join(new), capture_output=True,
                                 text=True, timeout=10).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            out = []
        _DEMANGLED.update(zip(new, out) if len(out) == len(new) else ((n, n) for n in new))
    return [Frame(f.addr, _DEMANGLED.get(f.name, f.name), f.module, f.offset) for f in frames]
