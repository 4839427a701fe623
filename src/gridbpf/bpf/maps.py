"""Typed access to BPF maps: keys and values are ctypes types built from the object's BTF."""
from __future__ import annotations

import ctypes
import errno
import os

from . import libbpf as L
from .btf import from_python, to_python
from .errors import BpfError
from .pins import pin_path

# enum bpf_map_type values whose values are per CPU
PERCPU_TYPES = {5, 6, 10, 21}   # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, PERCPU_CGROUP_STORAGE
TYPE_NAMES = {1: "hash", 2: "array", 5: "percpu_hash", 6: "percpu_array", 7: "stack_trace",
              9: "lru_hash", 10: "lru_percpu_hash", 12: "array_of_maps", 13: "hash_of_maps",
              17: "devmap", 27: "ringbuf", 4: "perf_event_array", 3: "prog_array"}
BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


class Map:
    def __init__(self, obj, ptr: int):
        self._obj, self._ptr = obj, ptr
        self.name = L.bpf_map__name(ptr).decode()
        self.type = L.bpf_map__type(ptr)
        self.type_name = TYPE_NAMES.get(self.type, str(self.type))
        self.percpu = self.type in PERCPU_TYPES
        self.key_size = L.bpf_map__key_size(ptr)
        self.value_size = L.bpf_map__value_size(ptr)
        btf = obj.btf
        kid, vid = L.bpf_map__btf_key_type_id(ptr), L.bpf_map__btf_value_type_id(ptr)
        self.key_type = self._type(btf, kid, self.key_size)
        self.value_type = self._type(btf, vid, self.value_size)
        self._ncpu = L.possible_cpus() if self.percpu else 1
        self._stride = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size

    @staticmethod
    def _type(btf, type_id: int, size: int):
        """The BTF type, or raw bytes where BTF has none (ring buffers) or it is a data section."""
        t = btf.resolve(type_id) if type_id else None
        if t is not None and t.kind != 15:   # 15: DATASEC (.rodata/.bss): accessed via Globals
            return btf.ctype(type_id)
        return ctypes.c_uint8 * size if size else None

    @property
    def max_entries(self) -> int:
        return L.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        L.check(L.bpf_map__set_max_entries(self._ptr, n), f"resizing map {self.name}")

    @property
    def fd(self) -> int:
        if getattr(self, "_pinned_fd", None) is not None:
            return self._pinned_fd
        fd = L.bpf_map__fd(self._ptr)
        if fd < 0:
            raise BpfError(f"map {self.name} is not loaded")
        return fd

    # --- conversions ---------------------------------------------------------------------------

    def _key(self, key):
        return from_python(self.key_type, key)

    def _value_buf(self):
        return ctypes.create_string_buffer(self._stride * self._ncpu)

    def _decode_value(self, raw: bytes):
        if not self.percpu:
            return self._simple(self.value_type.from_buffer_copy(raw[:self.value_size]))
        return [self._simple(self.value_type.from_buffer_copy(raw[i * self._stride:i * self._stride + self.value_size]))
                for i in range(self._ncpu)]

    @staticmethod
    def _simple(v):
        return v.value if hasattr(v, "value") and not isinstance(v, ctypes.Array) else v

    def _encode_value(self, value):
        if self.percpu:
            values = value if isinstance(value, list) else [value] * self._ncpu
            if len(values) != self._ncpu:
                raise ValueError(f"{self.name} is per-CPU: give one value or {self._ncpu}")
            buf = self._value_buf()
            for i, v in enumerate(values):
                c = from_python(self.value_type, v)
                ctypes.memmove(ctypes.addressof(buf) + i * self._stride, ctypes.addressof(c), self.value_size)
            return buf
        return from_python(self.value_type, value)

    # --- element operations --------------------------------------------------------------------

    def get(self, key, default=None):
        k = self._key(key)
        buf = self._value_buf()
        ret = L.bpf_map_lookup_elem(self.fd, ctypes.byref(k), buf)
        if ret < 0:
            err = L.last_errno(ret)
            if err == errno.ENOENT:
                return default
            raise BpfError(f"lookup in {self.name}: {L.errno_words(err)}", errno=err)
        return self._decode_value(buf.raw)

    def __getitem__(self, key):
        sentinel = object()
        v = self.get(key, sentinel)
        if v is sentinel:
            raise KeyError(key)
        return v

    def __contains__(self, key) -> bool:
        return self.get(key) is not None

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        k, v = self._key(key), self._encode_value(value)
        L.check(L.bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), flags),
                f"update of {self.name}")

    __setitem__ = update

    def __delitem__(self, key) -> None:
        k = self._key(key)
        ret = L.bpf_map_delete_elem(self.fd, ctypes.byref(k))
        if ret < 0:
            err = L.last_errno(ret)
            if err == errno.ENOENT:
                raise KeyError(key)
            raise BpfError(f"delete from {self.name}: {L.errno_words(err)}", errno=err)

    def keys(self):
        """Iterate keys (bpf_map_get_next_key); safe against deletion of the current key."""
        cur = None
        nxt = self.key_type()
        while True:
            ret = L.bpf_map_get_next_key(self.fd, ctypes.byref(cur) if cur is not None else None,
                                         ctypes.byref(nxt))
            if ret < 0:
                err = L.last_errno(ret)
                if err == errno.ENOENT:
                    return
                raise BpfError(f"iterating {self.name}: {L.errno_words(err)}", errno=err)
            yield self._simple(self.key_type.from_buffer_copy(nxt))
            cur = self.key_type.from_buffer_copy(nxt)

    __iter__ = keys

    def items(self):
        for k in self.keys():
            v = self.get(k)
            if v is not None:
                yield k, v

    def values(self):
        for _k, v in self.items():
            yield v

    def clear(self) -> None:
        for k in list(self.keys()):
            try:
                del self[k]
            except KeyError:
                pass

    def sum(self, key):
        """Per-CPU counters added up: ints, or structs of ints summed field by field."""
        v = self.get(key)
        if v is None:
            return None
        values = v if self.percpu else [v]
        if isinstance(values[0], int):
            return sum(values)
        total = {}
        for one in values:
            for name, x in to_python(one).items():
                total[name] = total.get(name, 0) + x
        return total

    def lookup_batch(self, chunk: int = 4096) -> list[tuple]:
        """All entries with BPF_MAP_LOOKUP_BATCH (one syscall per CHUNK entries)."""
        out = []
        ksz = ctypes.sizeof(self.key_type)
        keys = ctypes.create_string_buffer(ksz * chunk)
        vals = ctypes.create_string_buffer(self._stride * self._ncpu * chunk)
        in_batch, out_batch = ctypes.create_string_buffer(max(ksz, 8)), ctypes.create_string_buffer(max(ksz, 8))
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = L.bpf_map_lookup_batch(self.fd, None if first else in_batch, out_batch, keys, vals,
                                         ctypes.byref(count), ctypes.byref(opts))
            err = L.last_errno(ret) if ret < 0 else 0
            if err and err != errno.ENOENT:
                raise BpfError(f"batch lookup in {self.name}: {L.errno_words(err)}", errno=err)
            vsz = self._stride * self._ncpu
            for i in range(count.value):
                k = self._simple(self.key_type.from_buffer_copy(keys.raw[i * ksz:(i + 1) * ksz]))
                out.append((k, self._decode_value(vals.raw[i * vsz:(i + 1) * vsz])))
            if err == errno.ENOENT:
                return out
            ctypes.memmove(in_batch, out_batch, len(in_batch))
            first = False

    def update_batch(self, items: list[tuple]) -> None:
        if not items:
            return
        ksz = ctypes.sizeof(self.key_type)
        vsz = self._stride * self._ncpu
        keys = ctypes.create_string_buffer(ksz * len(items))
        vals = ctypes.create_string_buffer(vsz * len(items))
        for i, (k, v) in enumerate(items):
            kc, vc = self._key(k), self._encode_value(v)
            ctypes.memmove(ctypes.addressof(keys) + i * ksz, ctypes.addressof(kc), ksz)
            ctypes.memmove(ctypes.addressof(vals) + i * vsz, ctypes.addressof(vc), vsz)
        count = ctypes.c_uint32(len(items))
        opts = L.MapBatchOpts(sz=ctypes.sizeof(L.MapBatchOpts))
        L.check(L.bpf_map_update_batch(self.fd, keys, vals, ctypes.byref(count), ctypes.byref(opts)),
                f"batch update of {self.name}")

    # --- pinning -------------------------------------------------------------------------------

    def pin(self, name: str) -> str:
        path = pin_path(name, create=True)
        L.check(L.bpf_map__pin(self._ptr, path.encode()), f"pinning map {self.name} at {path}")
        return path

    def reuse_pinned(self, name: str) -> bool:
        """Before load: use the map pinned at NAME if there is one (state kept across restarts)."""
        path = pin_path(name)
        if not os.path.exists(path):
            return False
        fd = L.check(L.bpf_obj_get(path.encode()), f"opening pinned map {path}")
        try:
            L.check(L.bpf_map__reuse_fd(self._ptr, fd), f"reusing pinned map {path} for {self.name}")
        finally:
            os.close(fd)
        return True

    def open_pinned(self, name: str) -> "Map":
        """Without loading the object: operate on the map pinned at NAME (typed by this BTF)."""
        path = pin_path(name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no pinned map at {path} (is the daemon running?)")
        self._pinned_fd = L.check(L.bpf_obj_get(path.encode()), f"opening pinned map {path}")
        return self

    def __repr__(self):
        return f"<Map {self.name} {self.type_name} key={self.key_size}B value={self.value_size}B>"
