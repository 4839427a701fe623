"""Which hook HTTP tracing uses, and what it costs the processes that are not traced.

The socket hook (sock_recv_length/sock_send_length) runs only on socket I/O; the syscall hook
(sys_exit) runs on every syscall of every task. Counted by the kernel's own run counters."""
import ctypes
import os
import re
from pathlib import Path

import pytest

from gridbpf.trace.http import tracer as tr
from gridbpf.trace.http.tracer import HttpTracer
from gridbpf.trace.targets import TargetSpec


def runs(progs) -> int:
    return sum(int(re.search(r"^run_cnt:\s+(\d+)", Path(f"/proc/self/fdinfo/{p.fd}").read_text(),
                             re.M).group(1)) for p in progs)


@pytest.fixture
def bpf_stats():
    fd = ctypes.CDLL("libbpf.so.1", use_errno=True).bpf_enable_stats(0)   # BPF_STATS_RUN_TIME
    assert fd >= 0
    yield
    os.close(fd)


def pipe_writes(n: int) -> None:
    r, w = os.pipe()
    try:
        for _ in range(n):
            os.write(w, b"x")
            os.read(r, 1)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("hook", ["sock", "syscall"])
def test_non_socket_syscalls_pay_only_with_the_syscall_hook(bpf_stats, hook):
    """20000 pipe reads and writes of an untraced process: the syscall hook runs for each (the
    negative control), the socket hook for none of them (only other tasks' socket I/O counts)."""
    n = 10000
    with HttpTracer(TargetSpec(pids=[os.getppid()]), tls=False, hook=hook) as t:
        assert t.hook == hook
        before = runs(t.hook_programs())
        pipe_writes(n)
        ran = runs(t.hook_programs()) - before
    if hook == "syscall":
        assert ran >= 2 * n
    else:
        assert ran < n // 10, ran


def test_hook_choice(monkeypatch):
    assert tr.sock_tracepoints(), "this host's kernel has the socket tracepoints (6.3+)"
    assert tr.choose_hook()[0] == "sock"
    monkeypatch.setenv(tr.HOOK_ENV, "syscall")
    hook, why = tr.choose_hook()
    assert hook == "syscall" and "forced" in why
    monkeypatch.delenv(tr.HOOK_ENV)
    # a kernel without the tracepoints (hidden): the fallback, and forcing sock is one clear error
    monkeypatch.setenv("GRIDBPF_HIDE_FEATURES", "sock_recv_length")
    hook, why = tr.choose_hook()
    assert hook == "syscall" and "lacks" in why and "6.3" in why
    with pytest.raises(ValueError, match="hook sock unavailable"):
        tr.choose_hook("sock")
    with pytest.raises(ValueError, match="unknown HTTP tracing hook"):
        tr.choose_hook("kprobe")
