"""Demo part: trace the backends of the ECMP lab while a client talks to their shared VIP.

For `make demo` (gridbpf.demo adds `("tracing: requests seen on the backends", http_demo.run)`):
every request the client sends is shown as the backend that served it saw it, from the kernel,
without touching the servers."""
from __future__ import annotations

import collections
import subprocess
import time

from rich.console import Console
from rich.table import Table

from ...lab import Lab, ecmp
from .tracer import HttpTracer
from ..targets import TargetSpec


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=True)
    return [int(p) for p in out.stdout.split()]


def run(con: Console, requests: int = 20) -> bool:
    with Lab("htdemo") as lab:
        t = ecmp(lab, servers=2)
        backends = {name: h for name, h in t.hosts.items() if name.startswith("srv")}
        owner = {pid: name for name, h in backends.items() for pid in _netns_pids(h.netns)}
        with HttpTracer(TargetSpec(pids=sorted(owner))) as tracer:
            vip = t.addrs["vip"]
            sent = 0
            for i in range(requests):
                out = t["client"].run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                       "--max-time", "5", "--local-port", str(43000 + i),
                                       f"http://{vip}/whoami?n={i}"], check=False)
                sent += out.stdout == "200"
            reqs, deadline = [], time.monotonic() + 5
            while len(reqs) < sent and time.monotonic() < deadline:
                reqs += tracer.poll(100)
            stats = tracer.stats()
        table = Table("backend", "pid", "client", "request", "status", "bytes in/out", "duration")
        for r in reqs[:12]:
            table.add_row(owner.get(r.pid, "?"), str(r.pid), f"{r.client}:{r.port}",
                          f"{r.method} {r.path}", str(r.status),
                          f"{r.request_bytes}/{r.response_bytes}", f"{r.duration * 1e3:.2f} ms")
        con.print(table)
        per = collections.Counter(owner.get(r.pid, "?") for r in reqs)
        con.print(f"{sent} requests answered, {len(reqs)} traced on the backends "
                  f"({', '.join(f'{k}: {v}' for k, v in sorted(per.items()))}); "
                  f"events lost: {stats['events_lost']}")
    return sent == requests and len(reqs) == sent and stats["events_lost"] == 0
