"""Which processes' writes are followed: all, a PID (and its children), a command name, a cgroup.

A small local helper (the tracing package has its own); it only validates and turns the choice
into the program's configuration.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

ALL, PID, COMM, CGROUP = 0, 1, 2, 3


class TargetError(ValueError):
    pass


@dataclass
class Target:
    mode: int = ALL
    pids: list[int] = field(default_factory=list)
    comm: str = ""
    cgroup_id: int = 0
    cgroup_level: int = 0
    description: str = "all processes"


def cgroup2_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2] == "cgroup2":
                return parts[1]
    raise TargetError("no cgroup v2 hierarchy is mounted (needed for --cgroup)")


def descendants(pid: int) -> list[int]:
    """Processes below PID now (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def select(pid: int | None = None, comm: str | None = None, cgroup: str | None = None) -> Target:
    chosen = [n for n, v in (("--pid", pid), ("--comm", comm), ("--cgroup", cgroup)) if v is not None]
    if len(chosen) > 1:
        raise TargetError(f"choose one of {', '.join(chosen)}")
    if pid is not None:
        if pid <= 0 or not os.path.exists(f"/proc/{pid}"):
            raise TargetError(f"--pid {pid}: no such process")
        with open(f"/proc/{pid}/status") as f:
            tgid = next(int(l.split()[1]) for l in f if l.startswith("Tgid:"))
        # Children forked later are added by the program; those alive now are added here.
        return Target(PID, pids=[tgid, *descendants(tgid)], description=f"pid {tgid} and its children")
    if comm is not None:
        if not comm or len(comm.encode()) > 15:
            raise TargetError(f"--comm {comm!r}: a command name has 1 to 15 bytes")
        return Target(COMM, comm=comm, description=f"processes named {comm}")
    if cgroup is not None:
        root = cgroup2_mount()
        path = cgroup if os.path.isabs(cgroup) and cgroup.startswith(root) else \
            os.path.join(root, cgroup.lstrip("/"))
        path = os.path.realpath(path)
        if not os.path.isdir(path) or os.path.commonpath([root, path]) != root:
            raise TargetError(f"--cgroup {cgroup}: not a cgroup under {root}")
        rel = os.path.relpath(path, root)
        level = 0 if rel == "." else len(rel.split(os.sep))
        return Target(CGROUP, cgroup_id=os.stat(path).st_ino, cgroup_level=level,
                      description=f"cgroup {path}")
    return Target()
