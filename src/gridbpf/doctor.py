"""`gridbpf doctor`: what this machine can do for gridbpf, probed rather than assumed."""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess

from .bpf import BpfError, BpfObject
from .bpf import features
from .bpf import libbpf as L
from .bpf.pins import BPFFS

# enum bpf_prog_type values probed with libbpf_probe_bpf_prog_type
PROG_TYPES = {"socket_filter": 1, "kprobe": 2, "sched_cls": 3, "tracepoint": 5, "xdp": 6,
              "perf_event": 7, "raw_tracepoint": 17, "tracing": 26}

# what each capability attaches to (probe names of bpf/probe.bpf.c, less the probe_ prefix)
NEEDS = {
    "lb": ["xdp", "tc"],
    "trace": ["tracepoint", "raw_tp", "tp_btf", "uprobe", "perf_event"],
    "checksum": ["tracepoint"],
    "scitags": ["tc"],
}


def _version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    p = subprocess.run(cmd, capture_output=True, text=True)
    return (p.stdout or p.stderr).strip().splitlines()[0] if p.returncode == 0 else None


def _perf_event_fd() -> int:
    """A software cpu-clock perf event on CPU 0 (perf_event_open through libc's syscall)."""
    class Attr(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("size", ctypes.c_uint32), ("config", ctypes.c_uint64),
                    ("sample_period", ctypes.c_uint64), ("rest", ctypes.c_uint8 * 96)]
    attr = Attr(type=1, size=ctypes.sizeof(Attr), config=0, sample_period=1000000)  # SOFTWARE, CPU_CLOCK
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(298, ctypes.byref(attr), -1, 0, -1, 0)   # __NR_perf_event_open on x86_64
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd


def probe_attach(kind: str, netns: str) -> tuple[bool, str]:
    """Load probe_KIND alone and attach it somewhere harmless; (works, detail)."""
    obj = BpfObject.open("probe")
    try:
        for name, prog in obj.programs.items():
            prog.autoload = name == f"probe_{kind}"
        try:
            obj.load()
        except BpfError as e:
            return False, f"load refused: {e.summary.split(': ', 1)[-1]}"
        prog = obj.program(f"probe_{kind}")
        try:
            if kind == "xdp":
                link = prog.attach_xdp("lo", mode="generic", netns=netns)
            elif kind == "tc":
                link = prog.attach_tc("lo", "ingress", netns=netns)
            elif kind == "uprobe":
                libc = ctypes.util.find_library("c")
                path = next((p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6",
                                         "/usr/lib/libc.so.6") if os.path.exists(p)), libc)
                link = prog.attach_uprobe(path, "getpid")
            elif kind == "perf_event":
                fd = _perf_event_fd()
                try:
                    link = prog.attach_perf_event(fd)
                finally:
                    os.close(fd)
            else:
                link = prog.attach()
        except (BpfError, OSError) as e:
            return False, f"attach refused: {str(e).splitlines()[0].split(': ', 1)[-1]}"
        link.detach()
        return True, "load and attach work"
    finally:
        obj.close()


def report() -> dict:
    import ctypes.util  # noqa: F401  (used by probe_attach)
    from .lab import Lab
    rel = platform.release()
    out = {
        "kernel": rel,
        "machine": platform.machine(),
        "root": os.geteuid() == 0,
        "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
        "mounts": {"bpffs": os.path.ismount(BPFFS), "tracefs": os.path.ismount("/sys/kernel/tracing"),
                   "debugfs": os.path.ismount("/sys/kernel/debug")},
        "tools": {"clang": _version(["clang", "--version"]), "bpftool": _version(["bpftool", "version"]),
                  "libbpf": f"{L.libbpf_version()} (libbpf.so.1)"},
        "program_types": {name: L.libbpf_probe_bpf_prog_type(t, None) == 1 for name, t in PROG_TYPES.items()},
        "attach": {},
    }
    with Lab("doctor") as lab:
        host = lab.host("probe")
        for kind in ["xdp", "tc", "tracepoint", "raw_tp", "tp_btf", "uprobe", "perf_event", "kprobe", "fentry"]:
            ok, detail = probe_attach(kind, host.netns)
            # kprobe and fentry are reported as found, but no capability uses them
            out["attach"][kind] = {"works": ok, "detail": detail,
                                   "needed": any(kind in kinds for kinds in NEEDS.values())}
    out["kernel_features"] = features.report()
    out["capabilities"] = {}
    for cap, kinds in NEEDS.items():
        mine = [f for f in out["kernel_features"] if any(n.split()[0] == cap for n in f["needed_by"])]
        out["capabilities"][cap] = {
            "ready": all(out["attach"][k]["works"] for k in kinds)
            and all(f["present"] for f in mine if not f["fallback"]),
            "needs": kinds,
            "missing": [f["feature"] for f in mine if not f["present"] and not f["fallback"]],
            "notes": [features.note(f["feature"]) for f in mine if not f["present"] and f["fallback"]]}
    return out


def run(args) -> int:
    from .cli import print_json
    if os.geteuid() != 0:
        raise PermissionError("gridbpf doctor must run as root (it loads BPF programs)")
    r = report()
    if args.json:
        print_json(r)
        return 0
    from rich.console import Console
    from rich.table import Table
    con = Console()
    con.print(f"kernel {r['kernel']} ({r['machine']}), BTF {'yes' if r['btf'] else 'NO'}, "
              f"root {'yes' if r['root'] else 'NO'}")
    con.print("mounts: " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in r["mounts"].items()))
    con.print("tools: " + ", ".join(f"{k}: {v or 'missing'}" for k, v in r["tools"].items()))
    t = Table("hook", "works", "detail")
    for k, v in r["attach"].items():
        t.add_row(k, "[green]yes[/]" if v["works"] else "[red]no[/]",
                  v["detail"] + ("" if v["needed"] else " (gridbpf does not need it)"))
    con.print(t)
    missing = [f for f in r["kernel_features"] if not f["present"]]
    con.print(f"kernel features: {len(r['kernel_features']) - len(missing)} of {len(r['kernel_features'])} "
              "present" + "".join(f"; missing {f['feature']} (Linux {f['since']})" for f in missing))
    t = Table("capability", "ready", "needs")
    for k, v in r["capabilities"].items():
        t.add_row(k, "[green]yes[/]" if v["ready"] else "[red]no[/]",
                  ", ".join(v["needs"] + [f"MISSING {m}" for m in v["missing"]]))
    con.print(t)
    for v in r["capabilities"].values():
        for n in v["notes"]:
            con.print(f"note: {n}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine supports (probed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
