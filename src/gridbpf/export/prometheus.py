"""Prometheus text exposition of a gridbpf Registry, served on a localhost port.

Written here, on a plain socket, rather than with prometheus_client's server: importing that
package (http.server, wsgiref, urllib, ssl, email) costs the agent about 9 MB of RSS, a sixth of
its budget (docs/tracing.md, "Agent memory"). The text is what prometheus_client writes for the
same families (tests parse it back with prometheus_client's parser). Collectors written for
prometheus_client (the "why is it stuck" ones) still plug in: `server.prom.register(c)` imports
it on first use and their families are appended to the page.
"""
from __future__ import annotations

import math
import socket
import threading

import numpy as np

from .metrics import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def go_float(v) -> str:
    """A number as Prometheus (and Go's strconv) writes it: 1.0, 0.005, +Inf, 1e+06."""
    f = float(v)
    if f == math.inf:
        return "+Inf"
    if f == -math.inf:
        return "-Inf"
    if f != f:
        return "NaN"
    s = repr(f)
    mantissa, e, exp = s.partition("e")
    if e:        # Go: at least two exponent digits and an explicit sign
        sign = "-" if exp.startswith("-") else "+"
        return f"{mantissa}e{sign}{exp.lstrip('+-').rjust(2, '0')}"
    whole, _dot, frac = s.partition(".")
    if f > 0 and len(whole) > 6:       # Go switches to an exponent from 1e+06 (Python: 1e16)
        digits = (whole + frac).rstrip("0")
        return f"{digits[0]}.{digits[1:]}e+{len(whole) - 1:02d}" if len(digits) > 1 \
            else f"{digits}e+{len(whole) - 1:02d}"
    return s


def _escape_label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n")


def _labels(names) -> list[str]:
    """OpenTelemetry attribute names ('http.route') as Prometheus label names ('http_route')."""
    return [n.replace(".", "_") for n in names]


def _labelstr(pairs) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in sorted(pairs)) + "}"


def exposition(registry: Registry) -> str:
    """The registry's histograms and counters in the Prometheus text format (0.0.4)."""
    out: list[str] = []
    for h in registry.histograms:
        name = h.prometheus_name
        out.append(f"# HELP {name} {_escape_help(h.description)}\n# TYPE {name} histogram\n")
        names = _labels(h.labelnames)
        bounds = [*(go_float(b) for b in h.bounds), "+Inf"]
        for labels, s in h.snapshot():
            pairs = list(zip(names, labels))
            cum = np.cumsum(s.buckets).tolist()
            for le, c in zip(bounds, cum):
                out.append(f"{name}_bucket{_labelstr(pairs + [('le', le)])} {go_float(c)}\n")
            ls = _labelstr(pairs)
            out.append(f"{name}_count{ls} {go_float(cum[-1])}\n{name}_sum{ls} {go_float(s.total)}\n")
        over = f"{name}_series_overflow_total"
        out.append(f"# HELP {over} observations of {h.name} folded into the overflow series "
                   f"(cardinality cap {h.max_series})\n# TYPE {over} counter\n"
                   f"{over} {go_float(h.overflowed)}\n")
    for c in registry.counters:
        name = c.prometheus_name + "_total"
        out.append(f"# HELP {name} {_escape_help(c.description)}\n# TYPE {name} counter\n")
        names = _labels(c.labelnames)
        for labels, value in c.read().items():
            out.append(f"{name}{_labelstr(list(zip(names, labels)))} {go_float(value)}\n")
    return "".join(out)


class MetricsServer:
    """/metrics over HTTP on ADDR:PORT (localhost by default); port 0 picks a free one.

    One thread answers scrapes one at a time (a scrape every few seconds is the load)."""

    def __init__(self, registry: Registry, port: int, addr: str = "127.0.0.1"):
        self.registry = registry
        self._prom = None
        try:
            family = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0][0]
            self._sock = socket.socket(family, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((addr, port))
            self._sock.listen(16)
        except OSError as exc:
            if getattr(self, "_sock", None) is not None:
                self._sock.close()
            raise OSError(f"cannot serve /metrics on {addr}:{port}: "
                          f"{exc.strerror or exc}") from None
        self.addr, self.port = addr, self._sock.getsockname()[1]
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def prom(self):
        """A prometheus_client CollectorRegistry whose families are appended to /metrics, for
        collectors written against prometheus_client (imported only when asked for)."""
        if self._prom is None:
            from prometheus_client import CollectorRegistry
            self._prom = CollectorRegistry(auto_describe=False)
        return self._prom

    def text(self) -> str:
        text = exposition(self.registry)
        if self._prom is not None:
            from prometheus_client import generate_latest
            text += generate_latest(self._prom).decode()
        return text

    def _serve(self) -> None:
        while not self._closing:
            try:
                conn, _peer = self._sock.accept()
            except OSError:
                return              # closed
            try:
                conn.settimeout(5)
                self._answer(conn)
            except OSError:
                pass
            finally:
                conn.close()

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
            if len(data) > 16384:
                return self._send(conn, 431, "Request Header Fields Too Large\n")
        parts = data.split(b"\r\n", 1)[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            return self._send(conn, 405, "Method Not Allowed\n")
        if path not in (b"/metrics", b"/"):
            return self._send(conn, 404, "Not Found\n")
        try:
            body = self.text()
        except Exception as exc:           # a collector failed: say so, keep serving
            return self._send(conn, 500, f"error collecting metrics: {exc}\n")
        self._send(conn, 200, body, head_only=method == b"HEAD")

    @staticmethod
    def _send(conn: socket.socket, status: int, body: str, head_only: bool = False) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large",
                  500: "Internal Server Error"}[status]
        payload = body.encode()
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode()
        conn.sendall(head if head_only else head + payload)

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)    # wakes the accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
