"""Health checks of the backends: TCP connect, or an HTTP(S) request expecting a status.

Checks run from the balancer's network namespace (sockets are created there), every backend of
every service each interval, concurrently. `fall` failures in a row take a backend out of its
Maglev table and move its flows; `rise` successes bring it back. The state lives in the maps
(LB_BE_DOWN), so `gridbpf lb status` shows it and a daemon restart keeps it.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .. import netns as _netns
from .config import Health


def _socket(addr: str, ns: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with _netns.enter(ns):
        return socket.socket(family, socket.SOCK_STREAM)


def check_once(addr: str, port: int, h: Health, ns: str | None) -> tuple[bool, str]:
    """One check; returns (healthy, why)."""
    s = _socket(addr, ns)
    s.settimeout(h.timeout)
    try:
        s.connect((addr, port))
        if h.check == "tcp":
            return True, "connected"
        if h.check == "https":
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE   # a liveness probe
            s = ctx.wrap_socket(s, server_hostname=addr)
        host = f"[{addr}]" if ":" in addr else addr
        s.sendall(f"GET {h.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gridbpf-lb-health\r\n"
                  "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n" not in head and len(head) < 1024:
            chunk = s.recv(1024)
            if not chunk:
                break
            head += chunk
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or not parts[1].isdigit():
            return False, f"no HTTP status line ({head[:40]!r})"
        status = int(parts[1])
        return status == h.expect, f"status {status}"
    except (OSError, ssl.SSLError) as e:
        return False, e.strerror or str(e) or type(e).__name__
    finally:
        s.close()


class HealthChecker(threading.Thread):
    """Runs the checks until stop(); on_change(service, address, healthy, why) is called under no
    lock of ours; it applies the transition to the maps."""

    def __init__(self, dp, health_of, ns: str | None, on_change, log=print):
        super().__init__(name="lb-health", daemon=True)
        self.dp, self.health_of, self.ns, self.on_change, self.log = dp, health_of, ns, on_change, log
        self._halt = threading.Event()
        self._streak: dict[tuple[str, str], int] = {}   # >0 successes in a row, <0 failures
        self._next: dict[tuple[str, str], float] = {}
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="lb-check")
        self.checks = 0
        self._passed: set[tuple[str, str]] = set()   # backends that passed a check since start

    def has_passed(self, service: str, address: str) -> bool:
        return (service, address) in self._passed

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.round()
            except Exception as e:   # the checker must outlive a bad round (e.g. a race with a command)
                self.log(f"lb health: {type(e).__name__}: {e}")
            # sleep until the next check is due (at most 1 s: backends added by commands)
            now = time.monotonic()
            self._halt.wait(min(1.0, max(0.02, min(self._next.values(), default=now + 1.0) - now)))

    def round(self) -> None:
        now = time.monotonic()
        due = []
        for svc in self.dp.services().values():
            h = self.health_of(svc.name)
            if h.check == "none":
                continue
            for b in svc.backends.values():
                key = (svc.name, b.address)
                if self._next.get(key, 0) <= now:
                    self._next[key] = now + h.interval
                    due.append((svc, b, h))
        futures = [(svc, b, h, self.pool.submit(check_once, b.address, h.port or svc.port, h, self.ns))
                   for svc, b, h in due]
        for svc, b, h, f in futures:
            ok, why = f.result()
            self.checks += 1
            key = (svc.name, b.address)
            s = self._streak.get(key, 0)
            s = (s + 1 if s > 0 else 1) if ok else (s - 1 if s < 0 else -1)
            self._streak[key] = s
            if ok:
                self._passed.add(key)
            if b.down and ok and s >= h.rise:
                self.on_change(svc.name, b.address, True, why)
            elif not b.down and not ok and -s >= h.fall:
                self.on_change(svc.name, b.address, False, why)
