"""OTLP/HTTP (protobuf) export of a gridbpf Registry's metrics and of spans, with the
OpenTelemetry SDK's exporters. Metrics are sent cumulative from our own numpy aggregation (no
per-event SDK instrument calls); spans go through the SDK's batching processor, at most
`max_spans_per_second`, the rest counted as dropped."""
from __future__ import annotations

import threading
import time

from .metrics import Registry


class OtlpExporter:
    def __init__(self, endpoint: str, service_name: str, resource: dict | None = None,
                 interval: float = 10.0, spans: bool = True, max_spans_per_second: int = 1000,
                 timeout: float = 5.0):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp endpoint {endpoint!r} must start with http:// or https://")
        base = endpoint.rstrip("/")
        self.resource = Resource.create({"service.name": service_name, **(resource or {})})
        self.metric_exporter = OTLPMetricExporter(endpoint=f"{base}/v1/metrics", timeout=timeout)
        self.interval = interval
        self.max_spans_per_second = max_spans_per_second
        self.spans_sent = 0
        self.spans_dropped = 0
        self.metric_exports = 0
        self.metric_failures = 0
        self._window, self._in_window = 0, 0
        self.provider = None
        if spans:
            self.provider = TracerProvider(resource=self.resource)
            self.provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=f"{base}/v1/traces", timeout=timeout),
                max_queue_size=max(2048, 2 * max_spans_per_second), schedule_delay_millis=1000))
            self.tracer = self.provider.get_tracer("gridbpf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry: Registry | None = None

    # --- spans ---------------------------------------------------------------------------------

    def span_budget(self) -> int:
        """How many more spans this second allows (the caller counts what it skips)."""
        if self.provider is None:
            return 0
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._in_window = now, 0
        return max(self.max_spans_per_second - self._in_window, 0)

    def span(self, name: str, start_ns: int, end_ns: int, attributes: dict, server: bool = True) -> bool:
        """One finished span (epoch nanoseconds). False if the rate cap dropped it."""
        if self.provider is None:
            return False
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._in_window = now, 0
        if self._in_window >= self.max_spans_per_second:
            self.spans_dropped += 1
            return False
        self._in_window += 1
        from opentelemetry.trace import SpanKind
        span = self.tracer.start_span(name, kind=SpanKind.SERVER if server else SpanKind.CLIENT,
                                      attributes=attributes, start_time=start_ns)
        span.end(end_time=end_ns)
        self.spans_sent += 1
        return True

    # --- metrics -------------------------------------------------------------------------------

    def metrics_data(self, registry: Registry):
        from opentelemetry.sdk.metrics.export import (AggregationTemporality, Histogram,
                                                      HistogramDataPoint, Metric, MetricsData,
                                                      NumberDataPoint, ResourceMetrics,
                                                      ScopeMetrics, Sum)
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        now = time.time_ns()
        cumulative = AggregationTemporality.CUMULATIVE
        metrics = []
        for h in registry.histograms:
            points = [HistogramDataPoint(
                attributes=h.attributes(labels), start_time_unix_nano=h.start_ns,
                time_unix_nano=now, count=s.count, sum=s.total,
                bucket_counts=[int(x) for x in s.buckets], explicit_bounds=list(h.bounds),
                min=s.min, max=s.max) for labels, s in h.snapshot()]
            metrics.append(Metric(name=h.name, description=h.description, unit=h.unit,
                                  data=Histogram(data_points=points, aggregation_temporality=cumulative)))
        for c in registry.counters:
            points = [NumberDataPoint(attributes=dict(zip(c.labelnames, labels)),
                                      start_time_unix_nano=c.start_ns, time_unix_nano=now, value=v)
                      for labels, v in c.read().items()]
            metrics.append(Metric(name=c.name, description=c.description, unit=c.unit,
                                  data=Sum(data_points=points, aggregation_temporality=cumulative,
                                           is_monotonic=True)))
        scope = ScopeMetrics(scope=InstrumentationScope("gridbpf"), metrics=metrics, schema_url="")
        return MetricsData([ResourceMetrics(resource=self.resource, scope_metrics=[scope],
                                            schema_url="")])

    def export_metrics(self, registry: Registry) -> bool:
        from opentelemetry.sdk.metrics.export import MetricExportResult
        ok = self.metric_exporter.export(self.metrics_data(registry)) == MetricExportResult.SUCCESS
        self.metric_exports += 1
        self.metric_failures += not ok
        return ok

    def start(self, registry: Registry) -> None:
        """Export REGISTRY every `interval` seconds in a thread."""
        self._registry = registry

        def loop():
            while not self._stop.wait(self.interval):
                self.export_metrics(registry)
        self._thread = threading.Thread(target=loop, name="otlp-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 10)
        if self._registry is not None:
            self.export_metrics(self._registry)      # the last values
        if self.provider is not None:
            self.provider.shutdown()                 # flushes queued spans
        self.metric_exporter.shutdown()
