"""Prometheus text exposition of a gridbpf Registry, served on a localhost port."""
from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.utils import floatToGoString
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from .metrics import Registry


class _Collector:
    def __init__(self, registry: Registry):
        self.registry = registry

    def collect(self):
        for h in self.registry.histograms:
            fam = HistogramMetricFamily(h.prometheus_name, h.description, labels=_labels(h.labelnames),
                                        unit="")
            bounds = [*(_fmt(b) for b in h.bounds), "+Inf"]
            for labels, s in h.snapshot():
                cum = np.cumsum(s.buckets)
                fam.add_metric(list(labels), list(zip(bounds, (int(c) for c in cum))), s.total)
            yield fam
            over = CounterMetricFamily(f"{h.prometheus_name}_series_overflow",
                                       f"observations of {h.name} folded into the overflow series "
                                       f"(cardinality cap {h.max_series})")
            over.add_metric([], h.overflowed)
            yield over
        for c in self.registry.counters:
            fam = CounterMetricFamily(c.prometheus_name, c.description, labels=_labels(c.labelnames))
            for labels, value in c.read().items():
                fam.add_metric(list(labels), value)
            yield fam


def _labels(names) -> list[str]:
    """OpenTelemetry attribute names ('http.route') as Prometheus label names ('http_route')."""
    return [n.replace(".", "_") for n in names]


def _fmt(b: float) -> str:
    return floatToGoString(float(b))     # what prometheus_client itself writes for `le`


class MetricsServer:
    """/metrics over HTTP on ADDR:PORT (localhost by default); port 0 picks a free one."""

    def __init__(self, registry: Registry, port: int, addr: str = "127.0.0.1"):
        self.prom = CollectorRegistry(auto_describe=False)
        self.prom.register(_Collector(registry))
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.prom)
        except OSError as exc:
            raise OSError(f"cannot serve /metrics on {addr}:{port}: {exc.strerror}") from None
        self.addr, self.port = addr, self._server.server_port

    def text(self) -> str:
        from prometheus_client import generate_latest
        return generate_latest(self.prom).decode()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
