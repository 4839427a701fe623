"""`gridbpf doctor`: what this machine can do for gridbpf, probed rather than assumed."""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess

from pathlib import Path

BPFFS = "/sys/fs/bpf"
PACKAGE_DIR = Path(__file__).resolve().parent

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
# the compiled objects each capability loads (shipped in the wheel, or built by `make bpf`)
OBJECTS = {
    "lb": ["lb", "decap"],
    "trace": ["http", "offcpu", "io", "tcp", "mem"],
    "checksum": ["checksum"],
    "scitags": ["scitags"],
}


def _version(cmd: list[str]) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    p = subprocess.run(cmd, capture_output=True, text=True)
    return (p.stdout or p.stderr).strip().splitlines()[0] if p.returncode == 0 else None


def _cgroup2_mounted() -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[2:3] == ["cgroup2"] for line in f)


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
    from .bpf import BpfError, BpfObject
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


def _libbpf():
    """The binding's libbpf module, or None when libbpf.so.1 cannot be loaded."""
    try:
        from .bpf import libbpf
    except OSError:
        return None
    return libbpf


def report() -> dict:
    import ctypes.util  # noqa: F401  (used by probe_attach)
    from .lab import Lab
    rel = platform.release()
    L = _libbpf()
    objects = PACKAGE_DIR / "_objects"
    out = {
        "kernel": rel,
        "machine": platform.machine(),
        "root": os.geteuid() == 0,
        "btf": os.path.exists("/sys/kernel/btf/vmlinux"),
        "mounts": {"bpffs": os.path.ismount(BPFFS), "tracefs": os.path.ismount("/sys/kernel/tracing"),
                   "debugfs": os.path.ismount("/sys/kernel/debug"), "cgroup2": _cgroup2_mounted()},
        "tools": {"clang": _version(["clang", "--version"]), "bpftool": _version(["bpftool", "version"]),
                  "libbpf": f"{L.libbpf_version()} (libbpf.so.1)" if L else None},
        "package": {"path": str(PACKAGE_DIR),
                    "objects": sorted(p.name.removesuffix(".bpf.o") for p in objects.glob("*.bpf.o")),
                    "java_agent": sorted(p.name for p in (PACKAGE_DIR / "_java").glob("*.jar"))},
        "program_types": {name: L.libbpf_probe_bpf_prog_type(t, None) == 1 for name, t in PROG_TYPES.items()}
        if L else {},
        "attach": {},
    }
    if L is None or "probe" not in out["package"]["objects"] or not out["root"]:
        why = ("libbpf.so.1 missing" if L is None else "not root" if not out["root"]
               else "probe object missing")
        out["attach"] = {k: {"works": False, "detail": f"not probed: {why}"} for k in HOOKS}
        return _conclude(out)
    with Lab("doctor") as lab:
        host = lab.host("probe")
        for kind in HOOKS:
            ok, detail = probe_attach(kind, host.netns)
            out["attach"][kind] = {"works": ok, "detail": detail}
    from .bpf import features
    out["kernel_features"] = features.report()
    return _conclude(out)


HOOKS = ["xdp", "tc", "tracepoint", "raw_tp", "tp_btf", "uprobe", "perf_event", "kprobe", "fentry"]


def _conclude(out: dict) -> dict:
    """Capabilities ready or not, and what is missing on this node with how to fix it."""
    have = set(out["package"]["objects"])
    for kind, v in out["attach"].items():
        # kprobe and fentry are reported as found, but no capability uses them
        v["needed"] = any(kind in kinds for kinds in NEEDS.values())
    feats = out.setdefault("kernel_features", [])
    out["capabilities"] = {}
    for cap, kinds in NEEDS.items():
        mine = [f for f in feats if any(n.split()[0] == cap for n in f["needed_by"])]
        lacking = [f["feature"] for f in mine if not f["present"] and not f["fallback"]]
        out["capabilities"][cap] = {
            "ready": all(out["attach"][k]["works"] for k in kinds) and set(OBJECTS[cap]) <= have
            and not lacking,
            "needs": kinds, "objects_missing": sorted(set(OBJECTS[cap]) - have),
            "missing": lacking,
            "notes": [_note(f["feature"]) for f in mine if not f["present"] and f["fallback"]]}
    out["http_hook"] = http_hook()
    out["missing"] = missing(out)
    return out


def http_hook() -> dict:
    """Which hook request tracing (trace http, the agent) uses here, and why."""
    from .trace.http.tracer import choose_hook, sock_tracepoints
    try:
        hook, why = choose_hook()
    except ValueError as e:          # GRIDBPF_HTTP_HOOK names something unusable here
        return {"hook": None, "reason": str(e), "jvm_transport": None}
    jar = PACKAGE_DIR / "_java" / "gridbpf-jvm-agent.jar"
    return {"hook": hook, "reason": why,
            "jvm_transport": "recv" if sock_tracepoints() else "write",
            # for JVM options (-javaagent:JAR): JDK 21+ warns about agents loaded into a running JVM
            "java_agent_jar": str(jar) if jar.exists() else None}


def _note(feature: str) -> str | None:
    from .bpf import features
    return features.note(feature)


def missing(r: dict) -> list[dict]:
    """What keeps a capability from working here: {what, needed_by, fix}, most basic first."""
    out = []

    def add(what, needed_by, fix):
        out.append({"what": what, "needed_by": needed_by, "fix": fix})

    if r["tools"]["libbpf"] is None:
        add("libbpf.so.1", "everything", "apt install libbpf1")
    if not r["root"]:
        add("root", "everything", "run as root (the units bound it to CAP_BPF, CAP_PERFMON, ...)")
    if not r["btf"]:
        add("kernel BTF (/sys/kernel/btf/vmlinux)", "everything (CO-RE objects)",
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if not r["mounts"]["bpffs"]:
        add("bpffs on /sys/fs/bpf", "lb (pins)", "mount -t bpf bpf /sys/fs/bpf")
    if not r["mounts"]["tracefs"]:
        add("tracefs on /sys/kernel/tracing", "trace, checksum (tracepoints)",
            "mount -t tracefs tracefs /sys/kernel/tracing")
    if not r["mounts"]["cgroup2"]:
        add("a cgroup v2 hierarchy", "targets by unit or cgroup (agent, checksum)",
            "mount -t cgroup2 none /sys/fs/cgroup (or select targets by pid or comm)")
    objs = sorted({o for c in r["capabilities"].values() for o in c["objects_missing"]} |
                  ({"probe"} - set(r["package"]["objects"])))
    if objs:
        add(f"compiled BPF objects {', '.join(objs)} in {r['package']['path']}/_objects",
            ", ".join(c for c, v in r["capabilities"].items() if v["objects_missing"]) or "doctor",
            "install the gridbpf wheel (it carries them), or `make bpf` in the source tree")
    for kind, v in r["attach"].items():
        users = [c for c, kinds in NEEDS.items() if kind in kinds]
        if users and not v["works"] and not v["detail"].startswith("not probed"):
            add(f"{kind} programs ({v['detail']})", ", ".join(users),
                "a kernel with this hook enabled (see docs/core.md)")
    for f in r.get("kernel_features", []):
        if not f["present"] and not f["fallback"]:
            add(f"kernel feature {f['feature']} (Linux {f['since']})", ", ".join(f["needed_by"]),
                "a newer kernel (see the kernel table in docs/core.md)")
    if not r["package"]["java_agent"]:
        add("the JVM agent (gridbpf/_java/*.jar)", "HTTPS of Java servers (StoRM WebDAV's JSSE)",
            "a wheel built with the jar, or `make java` in the source tree; plain HTTP and "
            "libssl servers need nothing")
    return out


def run(args) -> int:
    from .output import print_json
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
    # clang and bpftool build the objects; a node running a wheel does not need them
    con.print("tools: " + ", ".join(f"{k}: {v or 'not installed'}" for k, v in r["tools"].items()))
    con.print(f"package {r['package']['path']}: {len(r['package']['objects'])} BPF objects")
    t = Table("hook", "works", "detail")
    for k, v in r["attach"].items():
        t.add_row(k, "[green]yes[/]" if v["works"] else "[red]no[/]",
                  v["detail"] + ("" if v["needed"] else " (gridbpf does not need it)"))
    con.print(t)
    feats = r["kernel_features"]
    lacking = [f for f in feats if not f["present"]]
    if feats:
        con.print(f"kernel features: {len(feats) - len(lacking)} of {len(feats)} present"
                  + "".join(f"; missing {f['feature']} (Linux {f['since']})" for f in lacking))
    t = Table("capability", "ready", "needs")
    for k, v in r["capabilities"].items():
        t.add_row(k, "[green]yes[/]" if v["ready"] else "[red]no[/]",
                  ", ".join(v["needs"] + [f"MISSING {m}" for m in v["missing"]]))
    con.print(t)
    h = r["http_hook"]
    con.print(f"http tracing hook: {h['hook'] or 'NONE'} ({h['reason']}); JVM agent records by "
              f"{h['jvm_transport'] or '?'}", highlight=False)
    if h.get("java_agent_jar"):
        con.print(f"JVM agent at start (JDK 21+, no dynamic-load warning): -javaagent:{h['java_agent_jar']}",
                  highlight=False)
    for v in r["capabilities"].values():
        for n in v["notes"]:
            if n:
                con.print(f"note: {n}", highlight=False)
    if not r["missing"]:
        con.print("missing: nothing")
    for m in r["missing"]:
        con.print(f"[red]missing[/] {m['what']} (for {m['needed_by']}): {m['fix']}", highlight=False)
    return 0


def register(sub) -> None:
    p = sub.add_parser("doctor", help="what this machine supports (probed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
