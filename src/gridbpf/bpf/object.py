"""BPF objects, their programs and global data, over libbpf."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from . import libbpf as L
from .btf import Btf, from_python, to_python
from .errors import BpfError, VerifierError
from .links import FdLink, LibbpfLink, Link, TcLink
from .maps import Map

OBJECT_DIR = Path(__file__).resolve().parent.parent / "_objects"

# enum bpf_attach_type / XDP flags (uapi)
BPF_XDP = 37
XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE = 1, 2, 4, 16
XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE, "auto": 0}
TC_POINTS = {"ingress": 1, "egress": 2}


def object_path(name: str) -> Path:
    """The compiled object of a capability ('lb') or an explicit path."""
    p = Path(name)
    if p.suffix == ".o" or p.is_absolute() or "/" in name:
        path = p
    else:
        path = OBJECT_DIR / f"{name}.bpf.o"
    if not path.exists():
        raise FileNotFoundError(f"BPF object {path} not found (run `make bpf`)")
    return path


@dataclass
class TestRunResult:
    retval: int
    data: bytes
    duration_ns: int        # kernel's average per repetition
    repeat: int


class Program:
    def __init__(self, obj: "BpfObject", ptr: int):
        self._obj, self._ptr = obj, ptr
        self.name = L.bpf_program__name(ptr).decode()
        self.section = L.bpf_program__section_name(ptr).decode()

    @property
    def fd(self) -> int:
        fd = L.bpf_program__fd(self._ptr)
        if fd < 0:
            raise BpfError(f"program {self.name} is not loaded")
        return fd

    @property
    def autoload(self) -> bool:
        return bool(L.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, value: bool) -> None:
        L.check(L.bpf_program__set_autoload(self._ptr, bool(value)), f"autoload of {self.name}")

    def _libbpf_link(self, ptr, what: str, mark: int) -> LibbpfLink:
        L.check_ptr(ptr, f"attaching {self.name} ({what})", mark)
        return LibbpfLink(ptr, f"{self.name} -> {what}", owner=self)

    # --- attach --------------------------------------------------------------------------------

    def attach(self) -> Link:
        """Attach by section name (tracepoint/..., raw_tp/..., tp_btf/..., uprobe with path...)."""
        mark = L.mark_log()
        return self._libbpf_link(L.bpf_program__attach(self._ptr), self.section, mark)

    def attach_tracepoint(self, category: str, name: str) -> Link:
        mark = L.mark_log()
        return self._libbpf_link(L.bpf_program__attach_tracepoint(
            self._ptr, category.encode(), name.encode()), f"tracepoint {category}:{name}", mark)

    def attach_raw_tracepoint(self, name: str) -> Link:
        mark = L.mark_log()
        return self._libbpf_link(L.bpf_program__attach_raw_tracepoint(self._ptr, name.encode()),
                                 f"raw_tp {name}", mark)

    def attach_trace(self) -> Link:
        """tp_btf/fentry/fexit: the target is in the section name."""
        mark = L.mark_log()
        return self._libbpf_link(L.bpf_program__attach_trace(self._ptr), self.section, mark)

    def attach_uprobe(self, binary: str, symbol: str | None = None, *, offset: int | None = None,
                      pid: int = -1, retprobe: bool = False) -> Link:
        """uprobe on SYMBOL (resolved with pyelftools) or a file OFFSET in BINARY; pid -1 = all."""
        from .elf import symbol_file_offset
        if offset is None:
            if symbol is None:
                raise ValueError("attach_uprobe needs a symbol or an offset")
            offset = symbol_file_offset(binary, symbol)
        mark = L.mark_log()
        what = f"u{'ret' if retprobe else ''}probe {binary}:{symbol or hex(offset)}"
        return self._libbpf_link(L.bpf_program__attach_uprobe(
            self._ptr, retprobe, pid, os.fsencode(binary), offset), what, mark)

    def attach_perf_event(self, perf_fd: int) -> Link:
        mark = L.mark_log()
        return self._libbpf_link(L.bpf_program__attach_perf_event(self._ptr, perf_fd),
                                 f"perf event fd {perf_fd}", mark)

    def attach_xdp(self, ifname: str, mode: str = "native", netns: str | None = None,
                   link: bool = True, replace: bool = False) -> Link:
        """XDP on an interface. link=True: a BPF link (gone when closed, unless pinned).
        link=False: netlink attach; replace=True replaces whatever XDP program is there."""
        from ..netns import enter, ifindex
        if mode not in XDP_MODES:
            raise ValueError(f"unknown XDP mode {mode!r} (native, generic, auto)")
        idx = ifindex(ifname, netns)
        flags = XDP_MODES[mode]
        what = f"xdp {mode} on {ifname}" + (f" in netns {netns}" if netns else "")
        if link:
            opts = L.LinkCreateOpts(sz=ctypes.sizeof(L.LinkCreateOpts), flags=flags)
            with enter(netns):   # the kernel reads the ifindex in the caller's namespace
                fd = L.bpf_link_create(self.fd, idx, BPF_XDP, ctypes.byref(opts))
            if fd < 0:
                err = L.last_errno(fd)
                raise BpfError(f"attaching {self.name} ({what}): {L.errno_words(err)}", errno=err)
            return FdLink(fd, f"{self.name} -> {what}", owner=self)
        if not replace:
            flags |= XDP_FLAGS_UPDATE_IF_NOEXIST
        with enter(netns):
            L.check(L.bpf_xdp_attach(idx, self.fd, flags, None), f"attaching {self.name} ({what})")
        return XdpNetlinkLink(idx, flags & ~XDP_FLAGS_UPDATE_IF_NOEXIST, netns,
                              f"{self.name} -> {what}", owner=self)

    def attach_tc(self, ifname: str, direction: str, netns: str | None = None,
                  priority: int = 1, handle: int = 1) -> Link:
        """tc clsact filter in direct-action mode; the clsact qdisc is made if missing and
        removed on detach only if we made it."""
        from ..netns import enter, ifindex
        if direction not in TC_POINTS:
            raise ValueError(f"unknown tc direction {direction!r} (ingress, egress)")
        idx = ifindex(ifname, netns)
        hook = L.TcHook(sz=ctypes.sizeof(L.TcHook), ifindex=idx, attach_point=TC_POINTS[direction])
        opts = L.TcOpts(sz=ctypes.sizeof(L.TcOpts), prog_fd=self.fd, handle=handle, priority=priority)
        what = f"tc {direction} on {ifname}" + (f" in netns {netns}" if netns else "")
        with enter(netns):
            created = L.bpf_tc_hook_create(ctypes.byref(hook))
            if created < 0 and -created != 17:   # EEXIST: a clsact qdisc is already there
                L.check(created, f"creating clsact qdisc on {ifname}")
            ret = L.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
            if ret < 0:
                if created == 0:
                    _destroy_clsact(idx)
                L.check(ret, f"attaching {self.name} ({what})")
        return TcLink(hook, opts.handle, opts.priority, created == 0, netns,
                      f"{self.name} -> {what}", owner=self)

    def stats(self) -> dict[str, int]:
        """The kernel's accounting of this program: run_cnt, run_time_ns (counted only while
        run-time stats are on, see gridbpf.bpf.run_time_stats()), recursion_misses."""
        out = {}
        with open(f"/proc/self/fdinfo/{self.fd}") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("run_time_ns", "run_cnt", "recursion_misses"):
                    out[key] = int(value)
        return out

    # --- test run ------------------------------------------------------------------------------

    def test_run(self, data: bytes = b"", repeat: int = 1, ctx: bytes | None = None,
                 data_out_size: int | None = None) -> TestRunResult:
        """BPF_PROG_TEST_RUN. Note: with repeat > 1 the kernel does not restore the packet
        between runs, so a program that rewrites sees its own output from the second run on."""
        data_in = ctypes.create_string_buffer(bytes(data), len(data))
        out_size = data_out_size if data_out_size is not None else len(data) + 512
        data_out = ctypes.create_string_buffer(max(out_size, 1))
        opts = L.TestRunOpts(sz=ctypes.sizeof(L.TestRunOpts), repeat=repeat)
        if data:
            opts.data_in, opts.data_size_in = ctypes.cast(data_in, ctypes.c_void_p), len(data)
            opts.data_out, opts.data_size_out = ctypes.cast(data_out, ctypes.c_void_p), out_size
        if ctx is not None:
            ctx_buf = ctypes.create_string_buffer(bytes(ctx), len(ctx))
            opts.ctx_in, opts.ctx_size_in = ctypes.cast(ctx_buf, ctypes.c_void_p), len(ctx)
        L.check(L.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts)), f"test run of {self.name}")
        return TestRunResult(opts.retval, data_out.raw[:opts.data_size_out] if data else b"",
                             opts.duration, repeat)


class run_time_stats:
    """`with run_time_stats():` makes the kernel account BPF run time (BPF_ENABLE_STATS).
    Reference-counted by the kernel, unlike the global sysctl kernel.bpf_stats_enabled, so
    concurrent users do not switch it off under each other."""

    def __enter__(self):
        self.fd = L.check(L.bpf_enable_stats(0), "enabling BPF run-time stats")   # BPF_STATS_RUN_TIME
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _destroy_clsact(idx: int) -> None:
    hook = L.TcHook(sz=ctypes.sizeof(L.TcHook), ifindex=idx, attach_point=1 | 2)
    L.bpf_tc_hook_destroy(ctypes.byref(hook))


class XdpNetlinkLink(Link):
    def __init__(self, ifindex: int, flags: int, netns: str | None, what: str, owner=None):
        super().__init__(what, owner)
        self.ifindex, self.flags, self.netns = ifindex, flags, netns

    def _detach(self) -> None:
        from ..netns import enter
        with enter(self.netns):
            L.check(L.bpf_xdp_detach(self.ifindex, self.flags, None), f"detaching {self.what}")


class Globals:
    """Global variables of one data section (.rodata before load; .bss/.data any time), by name."""

    def __init__(self, obj: "BpfObject", section: str, map_ptr: int):
        self._obj, self._section, self._map = obj, section, map_ptr
        self._vars = obj.btf.datasec(section)

    def _addr(self) -> int:
        if self._obj.loaded and not self._section.endswith(".rodata"):
            return self._live_addr()
        size = ctypes.c_size_t()
        addr = L.bpf_map__initial_value(self._map, ctypes.byref(size))
        if not addr:
            raise BpfError(f"{self._section} of {self._obj.name} is not accessible")
        return addr

    def _live_addr(self) -> int:
        """The kernel's copy of .bss/.data, mapped from the map's fd. (libbpf 1.1 maps it over
        its initial image only for skeletons: without this, reads after load see the values
        from before load.)"""
        live = getattr(self._obj, "_live_sections", None)
        if live is None:
            live = self._obj._live_sections = {}
        if self._section not in live:
            import mmap
            fd = L.bpf_map__fd(self._map)
            size = L.bpf_map__value_size(self._map)
            if fd < 0:
                raise BpfError(f"{self._section} of {self._obj.name} is not loaded")
            length = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            live[self._section] = (m, ctypes.c_char.from_buffer(m))
        return ctypes.addressof(live[self._section][1])

    def _var(self, name: str):
        if name not in self._vars:
            raise KeyError(f"{self._obj.name} has no global {name!r} in {self._section} "
                           f"(known: {', '.join(sorted(self._vars))})")
        type_id, offset, _size = self._vars[name]
        return self._obj.btf.ctype(type_id), self._addr() + offset

    def __getitem__(self, name: str):
        ctype, addr = self._var(name)
        return to_python(ctype.from_address(addr)) if not hasattr(ctype, "value") else \
            ctype.from_address(addr).value

    def __setitem__(self, name: str, value) -> None:
        if self._section.endswith(".rodata") and self._obj.loaded:
            raise BpfError(f"{name} is read-only config: set it before load()")
        ctype, addr = self._var(name)
        val = from_python(ctype, value)
        ctypes.memmove(addr, ctypes.addressof(val), ctypes.sizeof(ctype))

    def names(self) -> list[str]:
        return sorted(self._vars)


class BpfObject:
    """An ELF BPF object: open, set config, load, then programs, maps and globals by name."""

    def __init__(self, ptr: int, path: Path):
        self._ptr, self.path = ptr, path
        try:
            self._describe()
        except Exception:
            self.close()
            raise

    def _describe(self) -> None:
        ptr, path = self._ptr, self.path
        self.name = L.bpf_object__name(ptr).decode()
        self.loaded = False
        raw_size = ctypes.c_uint32()
        btf_ptr = L.bpf_object__btf(ptr)
        if not btf_ptr:
            raise BpfError(f"{path} has no BTF (build with clang -g)")
        raw = L.btf__raw_data(btf_ptr, ctypes.byref(raw_size))
        self.btf = Btf(ctypes.string_at(raw, raw_size.value))
        self._programs = {}
        p = L.bpf_object__next_program(ptr, None)
        while p:
            prog = Program(self, p)
            self._programs[prog.name] = prog
            p = L.bpf_object__next_program(ptr, p)
        self._maps = {}
        m = L.bpf_object__next_map(ptr, None)
        while m:
            mp = Map(self, m)
            self._maps[mp.name] = mp
            m = L.bpf_object__next_map(ptr, m)

    @classmethod
    def open(cls, name_or_path: str | os.PathLike) -> "BpfObject":
        path = object_path(str(name_or_path))
        mark = L.mark_log()
        ptr = L.check_ptr(L.bpf_object__open_file(os.fsencode(path), None), f"opening {path}", mark)
        return cls(ptr, path)   # __init__ closes PTR itself if it fails

    def load(self) -> "BpfObject":
        from . import features
        if features.hidden():           # features a site asked to treat as absent
            missing = features.missing_for(self)
            if missing:
                raise missing
        mark = L.mark_log()
        ret = L.bpf_object__load(self._ptr)
        if ret < 0:
            # an older kernel lacking a helper, map type or tracepoint: say which, in one line
            missing = features.missing_for(self)
            if missing:
                raise missing
            err = L.last_errno(ret)
            log = L.messages_since(mark)
            cls = VerifierError if any("PROG LOAD LOG" in l for l in log) else BpfError
            e = cls(f"loading {self.path.name} failed: {L.errno_words(err)}", errno=err, log=log)
            if isinstance(e, VerifierError) and e.reason:
                e = VerifierError(f"loading {self.path.name} failed: {L.errno_words(err)}: "
                                  f"verifier: {e.reason}", errno=err, log=log)
            raise e
        self.loaded = True
        return self

    def program(self, name: str) -> Program:
        try:
            return self._programs[name]
        except KeyError:
            raise KeyError(f"{self.name} has no program {name!r} "
                           f"(has: {', '.join(self._programs)})") from None

    @property
    def programs(self) -> dict[str, Program]:
        return dict(self._programs)

    def map(self, name: str) -> Map:
        try:
            return self._maps[name]
        except KeyError:
            raise KeyError(f"{self.name} has no map {name!r} (has: {', '.join(self._maps)})") from None

    @property
    def maps(self) -> dict[str, Map]:
        return dict(self._maps)

    def _globals(self, suffix: str) -> Globals:
        for name, m in self._maps.items():
            if name.endswith(suffix):
                return Globals(self, suffix, m._ptr)
        raise KeyError(f"{self.name} has no {suffix} section")

    @property
    def rodata(self) -> Globals:
        return self._globals(".rodata")

    @property
    def bss(self) -> Globals:
        return self._globals(".bss")

    @property
    def data(self) -> Globals:
        return self._globals(".data")

    def close(self) -> None:
        live, self._live_sections = getattr(self, "_live_sections", {}), {}
        for key in list(live):
            m, view = live.pop(key)
            del view
            m.close()
        if self._ptr:
            L.bpf_object__close(self._ptr)
            self._ptr = None
            self.loaded = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
