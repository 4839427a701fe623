"""ctypes declarations for the parts of Debian's libbpf.so.1 (1.1) that gridbpf uses.

Everything else in gridbpf.bpf goes through this module; nothing outside gridbpf.bpf imports it.
"""
from __future__ import annotations

import collections
import ctypes
import errno as _errno
import mmap
import os
import threading
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char_p, c_int, c_size_t, c_uint32,
                    c_uint64, c_void_p)

_lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libc = ctypes.CDLL(None, use_errno=True)

# --- options structs (layouts of libbpf 1.1's bpf.h / libbpf.h) -------------------------------


class TestRunOpts(Structure):
    _fields_ = [("sz", c_size_t), ("data_in", c_void_p), ("data_out", c_void_p),
                ("data_size_in", c_uint32), ("data_size_out", c_uint32),
                ("ctx_in", c_void_p), ("ctx_out", c_void_p),
                ("ctx_size_in", c_uint32), ("ctx_size_out", c_uint32),
                ("retval", c_uint32), ("repeat", c_int), ("duration", c_uint32),
                ("flags", c_uint32), ("cpu", c_uint32), ("batch_size", c_uint32)]


class LinkCreateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("iter_info", c_void_p),
                ("iter_info_len", c_uint32), ("target_btf_id", c_uint32),
                ("_union", c_uint64 * 5)]


class LinkUpdateOpts(Structure):
    _fields_ = [("sz", c_size_t), ("flags", c_uint32), ("old_prog_fd", c_uint32)]


class TcHook(Structure):
    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int), ("parent", c_uint32)]


class TcOpts(Structure):
    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32), ("prog_id", c_uint32),
                ("handle", c_uint32), ("priority", c_uint32)]


class MapBatchOpts(Structure):
    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


def _fn(name, restype, *argtypes):
    f = getattr(_lib, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


vp, i32, u32 = c_void_p, c_int, c_uint32
bpf_object__open_file = _fn("bpf_object__open_file", vp, c_char_p, vp)
bpf_object__load = _fn("bpf_object__load", i32, vp)
bpf_object__close = _fn("bpf_object__close", None, vp)
bpf_object__name = _fn("bpf_object__name", c_char_p, vp)
bpf_object__btf = _fn("bpf_object__btf", vp, vp)
bpf_object__next_program = _fn("bpf_object__next_program", vp, vp, vp)
bpf_object__next_map = _fn("bpf_object__next_map", vp, vp, vp)
bpf_program__name = _fn("bpf_program__name", c_char_p, vp)
bpf_program__section_name = _fn("bpf_program__section_name", c_char_p, vp)
bpf_program__fd = _fn("bpf_program__fd", i32, vp)
bpf_program__type = _fn("bpf_program__type", i32, vp)
bpf_program__set_autoload = _fn("bpf_program__set_autoload", i32, vp, c_bool)
bpf_program__autoload = _fn("bpf_program__autoload", c_bool, vp)
bpf_program__attach = _fn("bpf_program__attach", vp, vp)
bpf_program__attach_tracepoint = _fn("bpf_program__attach_tracepoint", vp, vp, c_char_p, c_char_p)
bpf_program__attach_raw_tracepoint = _fn("bpf_program__attach_raw_tracepoint", vp, vp, c_char_p)
bpf_program__attach_trace = _fn("bpf_program__attach_trace", vp, vp)
bpf_program__attach_uprobe = _fn("bpf_program__attach_uprobe", vp, vp, c_bool, i32, c_char_p, c_size_t)
bpf_program__attach_perf_event = _fn("bpf_program__attach_perf_event", vp, vp, i32)
bpf_link__destroy = _fn("bpf_link__destroy", i32, vp)
bpf_link__fd = _fn("bpf_link__fd", i32, vp)
bpf_link__pin = _fn("bpf_link__pin", i32, vp, c_char_p)
bpf_link__update_program = _fn("bpf_link__update_program", i32, vp, vp)
bpf_link_create = _fn("bpf_link_create", i32, i32, i32, i32, POINTER(LinkCreateOpts))
bpf_link_update = _fn("bpf_link_update", i32, i32, i32, POINTER(LinkUpdateOpts))
bpf_xdp_attach = _fn("bpf_xdp_attach", i32, i32, i32, u32, vp)
bpf_xdp_detach = _fn("bpf_xdp_detach", i32, i32, u32, vp)
bpf_tc_hook_create = _fn("bpf_tc_hook_create", i32, POINTER(TcHook))
bpf_tc_hook_destroy = _fn("bpf_tc_hook_destroy", i32, POINTER(TcHook))
bpf_tc_attach = _fn("bpf_tc_attach", i32, POINTER(TcHook), POINTER(TcOpts))
bpf_tc_detach = _fn("bpf_tc_detach", i32, POINTER(TcHook), POINTER(TcOpts))
bpf_map__name = _fn("bpf_map__name", c_char_p, vp)
bpf_map__fd = _fn("bpf_map__fd", i32, vp)
bpf_map__type = _fn("bpf_map__type", i32, vp)
bpf_map__key_size = _fn("bpf_map__key_size", u32, vp)
bpf_map__value_size = _fn("bpf_map__value_size", u32, vp)
bpf_map__max_entries = _fn("bpf_map__max_entries", u32, vp)
bpf_map__set_max_entries = _fn("bpf_map__set_max_entries", i32, vp, u32)
bpf_map__btf_key_type_id = _fn("bpf_map__btf_key_type_id", u32, vp)
bpf_map__btf_value_type_id = _fn("bpf_map__btf_value_type_id", u32, vp)
bpf_map__initial_value = _fn("bpf_map__initial_value", vp, vp, POINTER(c_size_t))
bpf_map__set_pin_path = _fn("bpf_map__set_pin_path", i32, vp, c_char_p)
bpf_map__pin = _fn("bpf_map__pin", i32, vp, c_char_p)
bpf_map__reuse_fd = _fn("bpf_map__reuse_fd", i32, vp, i32)
bpf_map_lookup_elem = _fn("bpf_map_lookup_elem", i32, i32, vp, vp)
bpf_map_update_elem = _fn("bpf_map_update_elem", i32, i32, vp, vp, c_uint64)
bpf_map_delete_elem = _fn("bpf_map_delete_elem", i32, i32, vp)
bpf_map_get_next_key = _fn("bpf_map_get_next_key", i32, i32, vp, vp)
bpf_map_lookup_batch = _fn("bpf_map_lookup_batch", i32, i32, vp, vp, vp, vp, POINTER(u32),
                           POINTER(MapBatchOpts))
bpf_map_update_batch = _fn("bpf_map_update_batch", i32, i32, vp, vp, POINTER(u32), POINTER(MapBatchOpts))
bpf_obj_pin = _fn("bpf_obj_pin", i32, i32, c_char_p)
bpf_obj_get = _fn("bpf_obj_get", i32, c_char_p)
bpf_prog_test_run_opts = _fn("bpf_prog_test_run_opts", i32, i32, POINTER(TestRunOpts))
bpf_enable_stats = _fn("bpf_enable_stats", i32, i32)
btf__raw_data = _fn("btf__raw_data", vp, vp, POINTER(u32))
libbpf_num_possible_cpus = _fn("libbpf_num_possible_cpus", i32)
libbpf_probe_bpf_prog_type = _fn("libbpf_probe_bpf_prog_type", i32, i32, vp)
libbpf_probe_bpf_map_type = _fn("libbpf_probe_bpf_map_type", i32, i32, vp)
libbpf_probe_bpf_helper = _fn("libbpf_probe_bpf_helper", i32, i32, i32, vp)
libbpf_strerror = _fn("libbpf_strerror", i32, i32, ctypes.c_char_p, c_size_t)

_vsnprintf = _libc.vsnprintf
_vsnprintf.restype = c_int
_vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]

# --- libbpf's messages (verifier logs included) are kept, per thread, for error reports -------

_PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
_log = threading.local()
LOG_LINES = 200_000


def _messages() -> collections.deque:
    if not hasattr(_log, "lines"):
        _log.lines = collections.deque(maxlen=LOG_LINES)
    return _log.lines


# libbpf prints a whole verifier log (up to 16 MiB) in one call, and a va_list can be formatted
# only once: format into one large buffer of untouched anonymous memory (costs nothing until
# written), so the log's tail, where the verdict is, is never cut off.
_PRINT_BUF_SIZE = 17 << 20
_print_mem = mmap.mmap(-1, _PRINT_BUF_SIZE)
_print_buf = (ctypes.c_char * _PRINT_BUF_SIZE).from_buffer(_print_mem)


@_PRINT_FN
def _print(level, fmt, args):
    n = _vsnprintf(_print_buf, _PRINT_BUF_SIZE, fmt, args)
    text = ctypes.string_at(_print_buf, max(0, min(n, _PRINT_BUF_SIZE - 1))).decode(errors="replace")
    _messages().extend(line for line in text.splitlines() if line.strip())
    if os.environ.get("GRIDBPF_LIBBPF_DEBUG"):
        os.write(2, text.encode())
    return 0


_fn("libbpf_set_print", c_void_p, _PRINT_FN)(_print)


def mark_log() -> int:
    """A position in this thread's libbpf messages; messages_since(mark) returns what came after."""
    lines = _messages()
    _log.serial = getattr(_log, "serial", 0) + 1
    lines.append(f"\x00mark{_log.serial}")
    return _log.serial


def messages_since(mark: int) -> list[str]:
    lines = list(_messages())
    token = f"\x00mark{mark}"
    if token in lines:
        lines = lines[lines.index(token) + 1:]
    return [line for line in lines if not line.startswith("\x00mark")]


# --- errors ------------------------------------------------------------------------------------

def errno_words(err: int) -> str:
    err = abs(err)
    name = _errno.errorcode.get(err)
    if name:
        return f"{os.strerror(err)} ({name})"
    buf = ctypes.create_string_buffer(256)
    libbpf_strerror(err, buf, len(buf))
    return buf.value.decode() or f"error {err}"


def last_errno(ret: int | None = None) -> int:
    """libbpf 1.x returns -errno or NULL with errno set."""
    if ret is not None and ret < 0:
        return -ret
    return ctypes.get_errno() or _errno.EINVAL


def check(ret: int, what: str) -> int:
    from .errors import BpfError
    if ret < 0:
        err = last_errno(ret)
        raise BpfError(f"{what}: {errno_words(err)}", errno=err)
    return ret


def check_ptr(ptr, what: str, log_mark: int | None = None):
    from .errors import BpfError
    if not ptr:
        err = last_errno()
        log = messages_since(log_mark) if log_mark else []
        raise BpfError(f"{what}: {errno_words(err)}", errno=err, log=log)
    return ptr


def libbpf_version() -> str:
    return f"{_fn('libbpf_major_version', u32)()}.{_fn('libbpf_minor_version', u32)()}"


def possible_cpus() -> int:
    return check(libbpf_num_possible_cpus(), "counting possible CPUs")
