"""Symbols of ELF files for uprobes (pyelftools): name -> file offset, shared libraries too."""
from __future__ import annotations

import functools
import os

from elftools.elf.elffile import ELFFile


@functools.lru_cache(maxsize=64)
def _symbols(path: str, mtime: float) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        segments = [(s["p_vaddr"], s["p_memsz"], s["p_offset"]) for s in elf.iter_segments()
                    if s["p_type"] == "PT_LOAD"]
        syms: dict[str, int] = {}
        for secname in (".dynsym", ".symtab"):
            sec = elf.get_section_by_name(secname)
            if sec is None:
                continue
            for sym in sec.iter_symbols():
                if sym["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and sym["st_value"]:
                    name = sym.name.split("@")[0]
                    syms.setdefault(name, sym["st_value"])
    return syms, segments


def symbol_file_offset(path: str, symbol: str) -> int:
    """File offset of a function symbol, what the kernel's uprobe wants."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such binary {path!r}")
    syms, segments = _symbols(path, os.stat(path).st_mtime)
    if symbol not in syms:
        raise LookupError(f"symbol {symbol!r} not found in {path}")
    vaddr = syms[symbol]
    for seg_vaddr, memsz, offset in segments:
        if seg_vaddr <= vaddr < seg_vaddr + memsz:
            return vaddr - seg_vaddr + offset
    raise LookupError(f"symbol {symbol!r} in {path} is in no loadable segment")


def library_of(pid: int, name_part: str) -> str | None:
    """Path of the first mapped file of process PID whose name contains NAME_PART (e.g. 'libssl')."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and name_part in os.path.basename(parts[5].strip()):
                    return parts[5].strip()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    return None
