"""BTF, read from a loaded-or-opened object: the one source of truth for map and record layouts.

Types are turned into ctypes types (for map keys/values and globals) and numpy dtypes (for bulk
ring-buffer decoding), with sizes and offsets taken from BTF, never from hand-written copies.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass, field

(INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO,
 VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64) = range(1, 20)
PAD = "__gb_pad_"   # our own padding fields, never a name in C
_MODIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}


@dataclass
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int = 0


@dataclass
class BtfType:
    id: int
    kind: int
    name: str
    size: int = 0          # INT, STRUCT, UNION, ENUM, DATASEC, FLOAT
    type_id: int = 0       # PTR, TYPEDEF, modifiers, VAR, FUNC
    members: list = field(default_factory=list)   # STRUCT/UNION: Member; DATASEC: (type_id, offset, size)
    int_signed: bool = False
    int_char: bool = False
    int_bool: bool = False
    int_bits: int = 0
    array: tuple = ()      # (elem_type_id, nelems)
    enum_signed: bool = False


class Btf:
    def __init__(self, raw: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", raw, 0)
        if magic != 0xEB9F:
            raise ValueError("not BTF data")
        self._strings = raw[hdr_len + str_off: hdr_len + str_off + str_len]
        self.types: list[BtfType | None] = [None]   # id 0 is void
        self._parse(raw[hdr_len + type_off: hdr_len + type_off + type_len])
        self._by_name: dict[tuple[int, str], int] = {}
        for t in self.types[1:]:
            self._by_name.setdefault((t.kind, t.name), t.id)
        self._ctypes: dict[int, type] = {}

    def _str(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            name_off, info, size_or_type = struct.unpack_from("<III", data, pos)
            pos += 12
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            t = BtfType(len(self.types), kind, self._str(name_off))
            if kind in (INT, STRUCT, UNION, ENUM, ENUM64, DATASEC, FLOAT):
                t.size = size_or_type
            else:
                t.type_id = size_or_type
            if kind == INT:
                (enc,) = struct.unpack_from("<I", data, pos)
                pos += 4
                t.int_signed, t.int_char, t.int_bool = bool(enc >> 24 & 1), bool(enc >> 24 & 2), bool(enc >> 24 & 4)
                t.int_bits = enc & 0xFF
            elif kind == ARRAY:
                elem, _index, n = struct.unpack_from("<III", data, pos)
                pos += 12
                t.array = (elem, n)
            elif kind in (STRUCT, UNION):
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", data, pos)
                    pos += 12
                    bits, off = (m_off >> 24, m_off & 0xFFFFFF) if kflag else (0, m_off)
                    t.members.append(Member(self._str(m_name), m_type, off, bits))
            elif kind == ENUM:
                t.enum_signed = bool(kflag)
                for _ in range(vlen):
                    m_name, val = struct.unpack_from("<Ii", data, pos)
                    pos += 8
                    t.members.append((self._str(m_name), val))
            elif kind == ENUM64:
                for _ in range(vlen):
                    m_name, lo, hi = struct.unpack_from("<III", data, pos)
                    pos += 12
                    t.members.append((self._str(m_name), hi << 32 | lo))
            elif kind == FUNC_PROTO:
                pos += 8 * vlen
            elif kind == VAR:
                pos += 4
            elif kind == DATASEC:
                for _ in range(vlen):
                    t.members.append(struct.unpack_from("<III", data, pos))
                    pos += 12
            elif kind == DECL_TAG:
                pos += 4
            self.types.append(t)

    # --- lookups -------------------------------------------------------------------------------

    def find(self, name: str) -> BtfType:
        """'struct foo', 'union foo', 'enum foo' or a typedef/var/datasec name."""
        kinds = {"struct": (STRUCT,), "union": (UNION,), "enum": (ENUM, ENUM64)}
        word, _, rest = name.partition(" ")
        candidates = [(k, rest) for k in kinds[word]] if word in kinds and rest else \
            [(k, name) for k in (TYPEDEF, STRUCT, UNION, VAR, DATASEC, INT)]
        for key in candidates:
            if key in self._by_name:
                return self.types[self._by_name[key]]
        raise KeyError(f"no BTF type named {name!r}")

    def resolve(self, type_id: int) -> BtfType | None:
        t = self.types[type_id]
        while t is not None and t.kind in _MODIFIERS:
            t = self.types[t.type_id]
        return t

    def size_of(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t is None:
            return 0
        if t.kind == ARRAY:
            return self.size_of(t.array[0]) * t.array[1]
        if t.kind == PTR:
            return 8
        return t.size

    def datasec(self, name: str) -> dict[str, tuple[int, int, int]]:
        """Variables of a data section (.rodata, .bss, .data): name -> (type_id, offset, size)."""
        sec = self.types[self._by_name[(DATASEC, name)]]
        out = {}
        for var_id, offset, size in sec.members:
            var = self.types[var_id]
            out[var.name] = (var.type_id, offset, size)
        return out

    # --- ctypes and numpy views ----------------------------------------------------------------

    def ctype(self, type_id: int) -> type:
        """A ctypes type with exactly the BTF size and member offsets."""
        if type_id in self._ctypes:
            return self._ctypes[type_id]
        t = self.resolve(type_id)
        ct = self._make_ctype(t)
        self._ctypes[type_id] = ct
        return ct

    def _make_ctype(self, t: BtfType | None) -> type:
        if t is None:
            raise TypeError("void has no layout")
        if t.kind == INT:
            if t.int_bool:
                return ctypes.c_bool
            if (t.int_char or t.name == "char") and t.size == 1:
                return ctypes.c_char
            return _INTS[(t.size, t.int_signed)]
        if t.kind in (ENUM, ENUM64):
            return _INTS[(t.size, t.enum_signed)]
        if t.kind == PTR:
            return ctypes.c_uint64
        if t.kind == FLOAT:
            return {4: ctypes.c_float, 8: ctypes.c_double}[t.size]
        if t.kind == ARRAY:
            elem, n = t.array
            return self.ctype(elem) * n
        if t.kind in (STRUCT, UNION):
            return self._make_record(t)
        raise TypeError(f"BTF kind {t.kind} of {t.name!r} has no ctypes form")

    def _make_record(self, t: BtfType) -> type:
        base = ctypes.Structure if t.kind == STRUCT else ctypes.Union
        fields, anonymous, pos = [], [], 0
        for i, m in enumerate(t.members):
            name = m.name or f"_anon{i}"
            if not m.name:
                anonymous.append(name)
            mtype = self.ctype(m.type_id)
            if m.bitfield_size or m.bit_offset % 8:
                # Bitfields: expose the storage unit holding them; gridbpf structs avoid them.
                continue
            off = m.bit_offset // 8
            if t.kind == STRUCT and off > pos:
                fields.append((f"{PAD}{i}", ctypes.c_uint8 * (off - pos)))
            if t.kind == STRUCT and off < pos:
                continue   # overlapping member of a bitfield unit already covered
            fields.append((name, mtype))
            pos = off + ctypes.sizeof(mtype)
        if t.kind == STRUCT and t.size > pos:
            fields.append((f"{PAD}end", ctypes.c_uint8 * (t.size - pos)))
        attrs = {"_pack_": 1, "_fields_": fields, "__repr__": _record_repr}
        if anonymous:
            attrs["_anonymous_"] = anonymous
        if t.kind == UNION:
            attrs["_fields_"] = fields + ([(f"{PAD}size", ctypes.c_uint8 * t.size)] if t.size else [])
        cls = type(t.name or f"anon_{t.id}", (base,), attrs)
        if ctypes.sizeof(cls) != t.size:
            raise TypeError(f"layout of {t.name}: ctypes size {ctypes.sizeof(cls)} != BTF {t.size}")
        return cls

    def struct(self, name: str) -> type:
        """ctypes type of 'struct name' (or a typedef)."""
        return self.ctype(self.find(name if " " in name else f"struct {name}").id)

    def dtype(self, name: str):
        """numpy structured dtype of a struct, same offsets and size as BTF."""
        return ctype_to_dtype(self.struct(name) if isinstance(name, str) else name)

    def layout(self, type_id: int) -> dict[str, tuple[int, int]]:
        """member name -> (byte offset, size) straight from BTF (what tests compare against)."""
        t = self.resolve(type_id)
        return {m.name: (m.bit_offset // 8, self.size_of(m.type_id)) for m in t.members if m.name}

    def structs(self) -> list[BtfType]:
        return [t for t in self.types[1:] if t.kind == STRUCT and t.name]


_INTS = {(1, False): ctypes.c_uint8, (1, True): ctypes.c_int8, (2, False): ctypes.c_uint16,
         (2, True): ctypes.c_int16, (4, False): ctypes.c_uint32, (4, True): ctypes.c_int32,
         (8, False): ctypes.c_uint64, (8, True): ctypes.c_int64,
         (16, False): ctypes.c_uint8 * 16, (16, True): ctypes.c_uint8 * 16}


def _record_repr(self) -> str:
    return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in to_python(self).items())})"


def to_python(value):
    """ctypes value -> plain Python (dicts, lists, ints, bytes) for JSON and comparisons."""
    if isinstance(value, (ctypes.Structure, ctypes.Union)):
        return {name: to_python(getattr(value, name)) for name, *_ in value._fields_
                if not name.startswith(PAD)}
    if isinstance(value, ctypes.Array):
        if value._type_ is ctypes.c_char:
            return bytes(value)
        return [to_python(v) for v in value]
    return value


def from_python(ctype: type, value):
    """Build a ctypes value from an int, bytes, dict, list or ctypes instance of the right size."""
    if isinstance(value, ctype):
        return value
    if isinstance(value, str) and issubclass(ctype, ctypes.Array) and ctype._type_ is ctypes.c_char:
        value = value.encode()
    if isinstance(value, (bytes, bytearray)) and issubclass(ctype, ctypes.Array) \
            and ctype._type_ is ctypes.c_char:
        if len(value) > ctype._length_:   # C strings: shorter ones are NUL-padded
            raise ValueError(f"{bytes(value)!r} is longer than char[{ctype._length_}]")
        return ctype.from_buffer_copy(bytes(value).ljust(ctype._length_, b"\0"))
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) != ctypes.sizeof(ctype):
            raise ValueError(f"{ctype.__name__} needs {ctypes.sizeof(ctype)} bytes, got {len(value)}")
        return ctype.from_buffer_copy(value)
    if isinstance(value, dict):
        obj = ctype()
        for k, v in value.items():
            ftype = dict((f[0], f[1]) for f in ctype._fields_).get(k)
            if ftype is None:
                raise KeyError(f"{ctype.__name__} has no field {k!r}")
            if isinstance(v, int) and not issubclass(ftype, (ctypes.Structure, ctypes.Union, ctypes.Array)):
                setattr(obj, k, v)
            else:   # copy the bytes: ctypes will not assign a char[] object to a char[] field
                conv = from_python(ftype, v)
                ctypes.memmove(ctypes.addressof(obj) + getattr(ctype, k).offset,
                               ctypes.addressof(conv), ctypes.sizeof(ftype))
        return obj
    if isinstance(value, (list, tuple)) and issubclass(ctype, ctypes.Array):
        return ctype(*[from_python(ctype._type_, v) if not isinstance(v, (int, float)) else v
                       for v in value])
    if isinstance(value, (int, float, bool)):
        if issubclass(ctype, (ctypes.Structure, ctypes.Union, ctypes.Array)):
            raise TypeError(f"{ctype.__name__} cannot be built from {value!r}")
        return ctype(value)
    raise TypeError(f"cannot convert {type(value).__name__} to {ctype.__name__}")


def ctype_to_dtype(ct: type):
    import numpy as np
    if issubclass(ct, ctypes.Structure) or issubclass(ct, ctypes.Union):
        names, formats, offsets = [], [], []
        for name, ftype, *_ in ct._fields_:
            if name.startswith(PAD):
                continue
            names.append(name)
            formats.append(ctype_to_dtype(ftype))
            offsets.append(getattr(ct, name).offset)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": ctypes.sizeof(ct)})
    if issubclass(ct, ctypes.Array):
        if ct._type_ is ctypes.c_char:
            return np.dtype(f"S{ct._length_}")
        return np.dtype((ctype_to_dtype(ct._type_), (ct._length_,)))
    return np.dtype(ct)
