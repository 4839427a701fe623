"""One source of truth for layouts: the C structs, as the objects' BTF records them.

Python never declares a shared struct by hand: it builds ctypes types and numpy dtypes from BTF.
Here every struct of every object we build is checked three ways: our BTF reader against
bpftool's (an independent parser), and the ctypes and numpy views against BTF sizes and offsets.
"""
import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from conftest import TESTS
from gridbpf.bpf import BpfObject
from gridbpf.bpf.btf import STRUCT
from gridbpf.bpf.object import OBJECT_DIR

OBJECTS = sorted(OBJECT_DIR.glob("*.bpf.o")) + sorted((TESTS / "bpf").glob("*.bpf.o"))


def bpftool_structs(path: Path) -> dict[str, dict]:
    raw = json.loads(subprocess.run(["bpftool", "btf", "dump", "file", str(path), "format", "raw", "-j"],
                                    capture_output=True, text=True, check=True).stdout)
    return {t["name"]: t for t in raw["types"] if t["kind"] == "STRUCT" and t["name"] != "(anon)"}


def test_objects_were_built():
    names = {p.name for p in OBJECTS}
    assert {"probe.bpf.o", "selftest.bpf.o", "reject.bpf.o"} <= names


@pytest.mark.parametrize("path", OBJECTS, ids=lambda p: p.name)
def test_struct_layouts_match_btf(path):
    obj = BpfObject.open(path)
    try:
        theirs = bpftool_structs(path)
        ours = {t.name: t for t in obj.btf.types[1:] if t.kind == STRUCT and t.name}
        assert set(ours) == set(theirs)
        for name, t in ours.items():
            ref = theirs[name]
            assert t.size == ref["size"], name
            assert [(m.name, m.bit_offset) for m in t.members] == \
                [(m["name"] if m["name"] != "(anon)" else "", m["bits_offset"]) for m in ref["members"]], name
            if any(m.bitfield_size for m in t.members):
                continue     # bitfields are not exposed through ctypes; our own structs have none
            ct = obj.btf.ctype(t.id)
            assert ctypes.sizeof(ct) == t.size, name
            for member, (offset, size) in obj.btf.layout(t.id).items():
                field = getattr(ct, member)
                assert (field.offset, field.size) == (offset, size), f"{name}.{member}"
            dt = obj.btf.dtype(ct)
            assert dt.itemsize == t.size
            for member, (offset, _size) in obj.btf.layout(t.id).items():
                assert dt.fields[member][1] == offset, f"{name}.{member} in numpy"
        # every map's key and value type is one of these BTF types, with the map's sizes
        for m in obj.maps.values():
            if m.key_type is not None:
                assert ctypes.sizeof(m.key_type) == m.key_size, m.name
            if m.value_type is not None:
                assert ctypes.sizeof(m.value_type) == m.value_size, m.name
    finally:
        obj.close()


def test_selftest_structs_have_their_c_layout():
    """A spot check against the C source itself (tests/bpf/selftest.bpf.c)."""
    obj = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o")
    flow_key = obj.btf.struct("flow_key")
    assert ctypes.sizeof(flow_key) == 16
    assert [(f, getattr(flow_key, f).offset) for f in ("saddr", "daddr", "sport", "dport", "proto")] == \
        [("saddr", 0), ("daddr", 4), ("sport", 8), ("dport", 10), ("proto", 12)]
    event = obj.btf.struct("event")
    assert ctypes.sizeof(event) == 48 and event.comm.offset == 24 and event.kind.offset == 40
    obj.close()


def test_values_built_from_python():
    from gridbpf.bpf import from_python, to_python
    obj = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o")
    event_t = obj.btf.struct("event")
    e = from_python(event_t, {"tgid": 7, "comm": "nginx", "pad": [1, 2, 3, 4, 5, 6, 7]})
    assert bytes(e)[24:40] == b"nginx".ljust(16, b"\0")
    assert to_python(e)["tgid"] == 7 and to_python(e)["comm"] == b"nginx"   # a C string
    with pytest.raises(ValueError, match="longer than char"):
        from_python(event_t, {"comm": "x" * 17})
    assert bytes(from_python(event_t, bytes(e))) == bytes(e)
    obj.close()
