"""The agent collectors: all five registered in one Registry and served as Prometheus text."""
import subprocess
import sys
import time

from gridbpf.export.metrics import Registry
from gridbpf.export.prometheus import MetricsServer
from gridbpf.trace.stuck.collectors import (IoCollector, MemCollector, OffcpuCollector,
                                            StuckCollector, TcpCollector)

CULPRIT = r"""
import os, socket, sys, threading, time
sys.stdin.readline()
time.sleep(0.8)                                   # stuck: a long nanosleep
with open(sys.argv[1], "wb") as f:                # io: write and fsync
    f.write(b"z" * (8 << 20)); f.flush(); os.fsync(f.fileno())
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)   # tcp over loopback
c = socket.create_connection(ls.getsockname()); s, _ = ls.accept()
c.sendall(b"q" * 100000); got = 0
while got < 100000: got += len(s.recv(65536))
junk = bytearray(32 << 20)                        # mem: 32 MiB touched
time.sleep(1.0)
print("done", flush=True)
"""


def test_collectors_prometheus(tmp_path):
    (tmp_path / "culprit.py").write_text(CULPRIT)
    out = tmp_path / "data.bin"
    p = subprocess.Popen([sys.executable, str(tmp_path / "culprit.py"), str(out)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reg = Registry()
    cols = []
    try:
        cols = [StuckCollector(reg, [p.pid], threshold_s=0.5), OffcpuCollector(reg, [p.pid]),
                IoCollector(reg, [p.pid]), TcpCollector(reg, [p.pid]), MemCollector(reg, [p.pid])]
        server = MetricsServer(reg, 0)
        for c in cols:
            server.prom.register(c.prometheus_collector())
        p.stdin.write("go\n")
        p.stdin.flush()
        mid = ""
        end = time.monotonic() + 20
        while p.poll() is None and time.monotonic() < end:
            for c in cols:
                c.poll(20)
            if not mid and "gridbpf_mem_rss_bytes" in (t := server.text()) and \
                    'gridbpf_stuck_threads_blocked{' in t:
                mid = t
        for c in cols:
            c.poll(0)
        text = server.text()
        server.close()
    finally:
        for c in cols:
            c.close()
        p.kill()
    assert p.returncode == 0

    def value(name, *label_parts, text=text):
        """The sum over the series of NAME whose line has all LABEL_PARTS."""
        hits = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name) and all(x in line for x in label_parts)]
        if hits:
            return sum(hits)
        raise AssertionError(f"no {name} {label_parts} in:\n" + "\n".join(
            l for l in text.splitlines() if l.startswith(name.split("{")[0])))

    pid = f'pid="{p.pid}"'
    assert value("gridbpf_stuck_blocks_total", pid, 'syscall="clock_nanosleep"') >= 1
    assert value("gridbpf_stuck_block_duration_seconds_count", 'syscall="clock_nanosleep"') >= 1
    assert 'syscall="clock_nanosleep"' in mid      # the gauge while it was blocked
    assert value("gridbpf_offcpu_time_seconds_total", pid) >= 0.8
    assert value("gridbpf_io_operations_total", pid, 'op="fsync"', str(out)) == 1
    assert value("gridbpf_io_bytes_total", pid, 'op="write"', str(out)) == 8 << 20
    assert value("gridbpf_tcp_bytes_sent_bytes_total", pid, 'peer="127.0.0.1:') >= 100000
    assert value("gridbpf_mem_rss_bytes", pid, 'kind="anon"', text=mid) > 0   # (while it ran)
    assert value("gridbpf_mem_page_faults_total", pid, 'kind="user"') >= (32 << 20) // 4096 // 2
    for kernel in ("stuck", "offcpu", "io", "tcp"):
        assert f"gridbpf_{kernel}_kernel_total" in text
