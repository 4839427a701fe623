"""Pins under /sys/fs/bpf/gridbpf: what must outlive a process (daemon restarts, CLI changes)."""
from __future__ import annotations

import os
import shutil

BPFFS = "/sys/fs/bpf"
PIN_ROOT = os.path.join(BPFFS, "gridbpf")


def pin_path(name: str, create: bool = False) -> str:
    """Absolute path for a pin name like 'lb/conntrack' (absolute paths are kept); with CREATE,
    its directory is made (for pinning; lookups leave nothing behind)."""
    path = name if name.startswith("/") else os.path.join(PIN_ROOT, name)
    if not os.path.ismount(BPFFS):
        raise RuntimeError(f"{BPFFS} is not a mounted bpffs (run `make setup` or mount -t bpf bpf {BPFFS})")
    if create:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def list_pins(prefix: str = "") -> list[str]:
    root = os.path.join(PIN_ROOT, prefix)
    if not os.path.exists(root):
        return []
    if not os.path.isdir(root):
        return [root]
    out = []
    for d, _dirs, files in os.walk(root):
        out.extend(os.path.join(d, f) for f in files)
    return sorted(out)


def remove_pins(prefix: str) -> int:
    """Unpin everything under PIN_ROOT/prefix; returns how many pins went."""
    if not prefix or prefix.startswith("/") or ".." in prefix:
        raise ValueError(f"refusing to remove pins under {prefix!r}")
    pins = list_pins(prefix)
    root = os.path.join(PIN_ROOT, prefix)
    if os.path.isdir(root):
        shutil.rmtree(root)
    elif os.path.exists(root):
        os.unlink(root)
    return len(pins)
