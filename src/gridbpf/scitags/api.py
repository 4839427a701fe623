"""The daemon's local HTTP API and Prometheus /metrics.

    GET  /flows      {"flows": [...], "kernel": {...}, "input_errors": {...}, ...}
    POST /flows      {"state": "start"|"end", "protocol": "tcp", "src": ..., "src_port": ...,
                      "dst": ..., "dst_port": ..., "experiment": name|id, "activity": name|id}
    GET  /registry   the experiments and activities in use
    GET  /metrics    Prometheus text
Errors are {"error": "one line"} with status 400 (bad input) or 404.
"""
from __future__ import annotations

import json
import logging
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .flows import InputError, parse_api_request
from .registry import RegistryError

log = logging.getLogger("gridbpf.scitags")
MAX_BODY = 65536


class Collector:
    """Computed at scrape time from the daemon's flows and the kernel's counters."""

    def __init__(self, daemon):
        self.d = daemon

    def collect(self):
        d = self.d
        d.refresh()
        labels = ["experiment", "activity"]
        started = CounterMetricFamily("gridbpf_scitags_flows_started", "Flows registered", labels=labels)
        active = GaugeMetricFamily("gridbpf_scitags_flows_active", "Flows registered now", labels=labels)
        nbytes = CounterMetricFamily("gridbpf_scitags_bytes", "IP bytes of registered flows seen at tc "
                                     "(sent: source to destination)", labels=labels + ["direction"])
        pkts = CounterMetricFamily("gridbpf_scitags_packets", "Packets of registered flows",
                                   labels=labels + ["direction"])
        with d.lock:
            totals = {k: dict(v) for k, v in d.ended_totals.items()}
            counts: dict = {}
            for f in d.active.values():
                key = (f.experiment, f.activity)
                counts[key] = counts.get(key, 0) + 1
                t = totals.setdefault(key, {"sent": 0, "received": 0, "sent_packets": 0, "received_packets": 0})
                for k in t:
                    t[k] += f.counters.get(k, 0)
            for key, n in d.started.items():
                started.add_metric(list(key), n)
                active.add_metric(list(key), counts.get(key, 0))
        for key, t in totals.items():
            for direction in ("sent", "received"):
                nbytes.add_metric([*key, direction], t[direction])
                pkts.add_metric([*key, direction], t[f"{direction}_packets"])
        yield from (started, active, nbytes, pkts)
        if d.marker is not None:
            k = CounterMetricFamily("gridbpf_scitags_kernel_packets", "Datapath events (skbs) by kind: "
                                    "matched, marked, v4_unmarkable, store_failed, unparsed", labels=["event"])
            for name, v in d.marker.stats().items():
                k.add_metric([name], v)
            yield k
        e = CounterMetricFamily("gridbpf_scitags_input_errors", "Rejected inputs", labels=["source"])
        for src, n in d.input_errors.items():
            e.add_metric([src], n)
        yield e
        yield CounterMetricFamily("gridbpf_scitags_flows_lost", "Flows the kernel table lost (evicted)",
                                  value=d.lost_flows)
        yield CounterMetricFamily("gridbpf_scitags_fireflies_sent", "Firefly packets sent", value=d.sender.sent)
        yield CounterMetricFamily("gridbpf_scitags_firefly_errors", "Fireflies not sent (socket errors, "
                                  "schema violations)", value=d.sender.errors + d.invalid_fireflies)


def make_server(daemon, host: str, port: int) -> ThreadingHTTPServer:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(daemon))

    class Handler(BaseHTTPRequestHandler):
        server_version = "gridbpf-scitags"

        def log_message(self, fmt, *args):     # no access log on stderr
            log.debug("api: " + fmt, *args)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj, indent=1).encode() + b"\n")

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            if path == "/flows":
                self._json(200, daemon.flows_json())
            elif path == "/registry":
                self._json(200, {"source": daemon.registry.source, "experiments": daemon.registry.to_json()})
            elif path == "/metrics":
                self._send(200, generate_latest(registry), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": f"no such resource {path}"})

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            if path != "/flows":
                self._json(404, {"error": f"no such resource {path}"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise InputError(f"body of {length} bytes is too large")
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except (ValueError, UnicodeDecodeError) as exc:
                    raise InputError(f"body is not JSON: {exc}") from None
                flow = daemon.handle_event(parse_api_request(body), "api")
            except (InputError, RegistryError, ValueError) as exc:
                daemon.input_errors["api"] = daemon.input_errors.get("api", 0) + 1
                log.error("api: rejected request: %s", exc)
                self._json(400, {"error": str(exc)})
                return
            except Exception as exc:        # not the caller's fault: say so, keep serving
                log.error("api: request failed: %s: %s", type(exc).__name__, exc)
                self._json(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            self._json(200, flow.to_json())

    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True
        allow_reuse_address = True

    return Server((host, port), Handler)
