"""Which processes to trace: by PID (with its descendants), command name, cgroup or systemd unit.

Generic, shared by the tracing capabilities. A BPF object that wants live selection declares
these maps (names are the contract; see bpf/http.bpf.c for the reference):
  targets         HASH  __u32 tgid   -> __u8   processes traced now
  target_comms    HASH  char[16]     -> __u8   new processes with this comm become targets at exec
  target_cgroups  HASH  __u64 cgid   -> __u8   new processes in this cgroup become targets at exec
and adds children of targets at fork and removes exited processes (sched_process_* hooks).
`TargetSpec.install(obj)` fills whichever of those maps the object has.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

def _cgroup2_root() -> Path:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on pure v2 systems,
    /sys/fs/cgroup/unified on hybrid ones. bpf_get_current_cgroup_id() speaks of this one."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return Path(parts[1])
    except OSError:
        pass
    return Path("/sys/fs/cgroup")


CGROUP_ROOT = _cgroup2_root()
COMM_LEN = 15   # TASK_COMM_LEN - 1: the kernel truncates longer names


class TargetError(ValueError):
    """A target that cannot be selected; the message is one line naming it."""


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def comm_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def ppid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the comm field may hold spaces and parentheses: split after the last ')'
    return int(stat[stat.rindex(")") + 2:].split()[1])


def cgroup_of(pid: int) -> str | None:
    """cgroup v2 path of a process relative to the hierarchy root ('/system.slice/x.service')."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def cgroup_id(path: str | os.PathLike) -> int:
    """cgroup v2 id (the inode number of its directory) of '/a/b' or '/sys/fs/cgroup/a/b'."""
    p = Path(path)
    if not str(p).startswith(str(CGROUP_ROOT)):
        p = CGROUP_ROOT / str(path).lstrip("/")
    try:
        return os.stat(p).st_ino
    except FileNotFoundError:
        raise TargetError(f"no cgroup {path} (looked for {p})") from None


@dataclass
class TargetSpec:
    pids: list[int] = field(default_factory=list)
    comms: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)   # cgroup v2 paths, '/a/b' or absolute
    units: list[str] = field(default_factory=list)     # systemd units, e.g. 'nginx.service'
    # the parent of each process the last resolve() listed: a process's parent does not change
    # while it lives (an orphan's does, but a target's fork already made it a target), so a
    # refresh reads only new processes (every process's stat each second cost ~23 us a process
    # here: 2% of a core on a host with 1,000). A pid freed and reused between two refreshes
    # would keep the parent of the process before it: that takes the whole pid space cycling
    # within a second (pid_max forks), which the cost saved is judged worth
    _ppids: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.comms = [c[:COMM_LEN] for c in self.comms]

    @property
    def empty(self) -> bool:
        return not (self.pids or self.comms or self.cgroups or self.units)

    def describe(self) -> str:
        parts = [f"pid {p}" for p in self.pids] + [f"comm {c}" for c in self.comms] + \
            [f"cgroup {c}" for c in self.cgroups] + [f"unit {u}" for u in self.units]
        return ", ".join(parts) or "nothing"

    def cgroup_paths(self) -> list[str]:
        """Relative cgroup paths of --cgroup and --unit (a unit is its cgroup under some slice)."""
        out = []
        for c in self.cgroups:
            s = str(c)
            rel = s[len(str(CGROUP_ROOT)):] if s.startswith(str(CGROUP_ROOT)) else s
            out.append("/" + rel.strip("/"))
        for unit in self.units:
            name = unit if "." in unit else f"{unit}.service"
            found = [d for d in CGROUP_ROOT.rglob(name) if d.is_dir()]
            if not found:
                raise TargetError(f"no cgroup for systemd unit {unit} under {CGROUP_ROOT}")
            out.extend("/" + str(d.relative_to(CGROUP_ROOT)) for d in found)
        return out

    def validate(self) -> None:
        """Raise TargetError (one line) for a pid that does not exist or a cgroup that doesn't."""
        if self.empty:
            raise TargetError("no target given (use --pid, --comm or --cgroup)")
        for pid in self.pids:
            if pid <= 0 or not alive(pid):
                raise TargetError(f"no process with pid {pid}")
        for path in self.cgroup_paths():
            cgroup_id(path)

    def resolve(self) -> set[int]:
        """tgids of running processes selected now (a given pid brings its descendants)."""
        cgroups = self.cgroup_paths()
        cg_set = set(cgroups)
        found: set[int] = set()
        parents: dict[int, int] = {}
        for pid in _pids():
            if pid in self.pids:
                found.add(pid)
            elif self.comms and comm_of(pid) in self.comms:
                found.add(pid)
            elif cgroups and _under(cgroup_of(pid), cg_set):
                found.add(pid)
            if self.pids:
                pp = self._ppids.get(pid) or ppid_of(pid)
                if pp is not None:
                    parents[pid] = pp
        self._ppids = parents
        # descendants of the given pids (e.g. nginx's workers under its master)
        changed = bool(self.pids)
        while changed:
            changed = False
            for pid, pp in parents.items():
                if pp in found and pid not in found:
                    found.add(pid)
                    changed = True
        return {p for p in found if alive(p)}

    def install(self, obj) -> set[int]:
        """Fill the object's selection maps; returns the tgids selected now."""
        tgids = self.resolve()
        maps = obj.maps
        if "targets" in maps:
            for t in tgids:
                add_target(obj, t)
        if "target_comms" in maps:
            for c in self.comms:
                maps["target_comms"][c.encode().ljust(16, b"\0")] = 1
        if "target_cgroups" in maps:
            for path in self.cgroup_paths():
                for cg in _with_descendants(path):
                    maps["target_cgroups"][cg] = 1
        return tgids

    def refresh(self, obj, tgids: set[int] | None = None) -> set[int]:
        """Add processes that match now (e.g. started before install by a fork we did not see);
        TGIDS: those already resolved by the caller."""
        if tgids is None:
            tgids = self.resolve()
        if "targets" in obj.maps:
            m = obj.maps["targets"]
            for t in tgids:
                if t not in m:
                    add_target(obj, t)
        return tgids


# A target slot userspace sets (bpf/http.bpf.c's target_slots): "ask the targets map". Only
# the kernel side may claim a slot for one tgid, by compare-and-swap.
TARGET_SLOT_SHARED = (1 << 64) - 1


def add_target(obj, tgid: int) -> None:
    """TGID into the object's `targets`, and its slot in `target_slots` (where the object has
    that first filter) marked shared: the slot is never left saying "no target here"."""
    if "target_slots" in obj.maps:
        slots = obj.maps["target_slots"]
        slots[tgid % slots.max_entries] = TARGET_SLOT_SHARED
    obj.maps["targets"][tgid] = 1


def _under(path: str | None, roots: set[str]) -> bool:
    if path is None:
        return False
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _with_descendants(path: str) -> list[int]:
    root = CGROUP_ROOT / path.lstrip("/")
    ids = [cgroup_id(path)]
    for d in root.rglob("*"):
        if d.is_dir():
            ids.append(os.stat(d).st_ino)
    return ids


def live_targets(obj) -> list[int]:
    """tgids currently in the object's `targets` map."""
    return [int(k) for k in obj.map("targets").keys()]
