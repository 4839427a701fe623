"""OTLP/HTTP (protobuf) export of a gridbpf Registry's metrics and of request spans.

The messages are the official OpenTelemetry protobuf definitions (the opentelemetry-proto
package) filled straight from our own aggregation and sent with http.client: no OpenTelemetry
SDK, no `requests`. The SDK's objects cost the agent 13 MB of RSS and about 100 us of CPU per
span (a span object, a processor queue, then a conversion to these same messages); here a span
is encoded when its request is recorded and kept serialized (a third of the memory of a message)
until the next export, which frames the queued spans itself (`trace_request`: a tag and a length
per span; checked byte for byte against the library's own encoding). Metrics are cumulative;
spans are sent every half second, at most `max_spans_per_second`, the rest counted as dropped.
"""
from __future__ import annotations

import http.client
import random
import threading
import time
from urllib.parse import urlsplit

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_CUMULATIVE
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .metrics import Registry

SCOPE = "gridbpf"
SPAN_FLUSH_S = 0.5          # how often queued spans are sent (1000 spans: 1.4 MB in memory)
KIND_SERVER, KIND_CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT


def _set_value(any_value, value) -> None:
    if isinstance(value, bool):
        any_value.bool_value = value
    elif isinstance(value, int):
        any_value.int_value = value
    elif isinstance(value, float):
        any_value.double_value = value
    else:
        any_value.string_value = str(value)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): a message inside a message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fill_attributes(repeated, attributes: dict) -> None:
    for k, v in attributes.items():
        kv = repeated.add()
        kv.key = k
        _set_value(kv.value, v)


class _Poster:
    """POSTs protobuf bodies to one OTLP/HTTP path, on a kept-alive connection."""

    def __init__(self, url: str, timeout: float):
        u = urlsplit(url)
        self.host, self.port, self.path = u.hostname, u.port, u.path
        self.https = u.scheme == "https"
        self.timeout = timeout
        self.conn = None

    def post(self, body: bytes) -> bool:
        for attempt in (0, 1):       # a kept-alive connection the receiver closed: once more
            try:
                if self.conn is None:
                    cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
                    self.conn = cls(self.host, self.port, timeout=self.timeout)
                self.conn.request("POST", self.path, body,
                                  {"Content-Type": "application/x-protobuf"})
                resp = self.conn.getresponse()
                resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return 200 <= resp.status < 300
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    return False
        return False

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class OtlpExporter:
    def __init__(self, endpoint: str, service_name: str, resource: dict | None = None,
                 interval: float = 10.0, spans: bool = True, max_spans_per_second: int = 1000,
                 timeout: float = 5.0):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"otlp endpoint {endpoint!r} must start with http:// or https://")
        base = endpoint.rstrip("/")
        self.resource = {"service.name": service_name, "telemetry.sdk.name": SCOPE,
                         "telemetry.sdk.language": "python", **(resource or {})}
        self.interval = interval
        self.spans = spans
        self.max_spans_per_second = max_spans_per_second
        self.max_queue = max(2048, 2 * max_spans_per_second)
        self.spans_sent = 0
        self.spans_dropped = 0       # over the rate cap, or the queue full (receiver too slow)
        self.spans_failed = 0        # in an export the receiver did not accept
        self.metric_exports = 0
        self.metric_failures = 0
        self._window, self._in_window = 0, 0
        self._metrics_post = _Poster(f"{base}/v1/metrics", timeout)
        self._traces_post = _Poster(f"{base}/v1/traces", timeout)
        self._rand = random.Random()         # seeded from os.urandom: span and trace ids
        self._lock = threading.Lock()
        self._queued: list[bytes] = []      # serialized Span messages waiting for the next flush
        # what frames the spans of an export: resource_spans { resource, scope_spans { scope } }
        res = Resource()
        _fill_attributes(res.attributes, self.resource)
        self._resource_field = _field(1, res.SerializeToString())
        self._scope_field = _field(1, InstrumentationScope(name=SCOPE).SerializeToString())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registry: Registry | None = None

    # --- spans ---------------------------------------------------------------------------------

    @property
    def provider(self):
        """Truthy when spans are exported (kept for callers that asked the SDK's provider)."""
        return self if self.spans else None

    def span_budget(self) -> int:
        """How many more spans this second allows (the caller counts what it skips)."""
        if not self.spans:
            return 0
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._in_window = now, 0
        return max(self.max_spans_per_second - self._in_window, 0)

    def span(self, name: str, start_ns: int, end_ns: int, attributes: dict, server: bool = True) -> bool:
        """One finished span (epoch nanoseconds), each its own trace (the requests we see have
        no trace context). False if the rate cap or a full queue dropped it."""
        if not self.spans:
            return False
        now = int(time.monotonic())
        if now != self._window:
            self._window, self._in_window = now, 0
        if self._in_window >= self.max_spans_per_second:
            self.spans_dropped += 1
            return False
        self._in_window += 1
        bits = self._rand.getrandbits(192)
        s = Span()      # a new one each time: Clear() keeps the message's arena (it only grows)
        s.trace_id = (bits >> 64 | 1).to_bytes(16, "little")
        s.span_id = (bits & 0xFFFFFFFFFFFFFFFF | 1).to_bytes(8, "little")
        s.name = name
        s.kind = KIND_SERVER if server else KIND_CLIENT
        s.start_time_unix_nano = start_ns
        s.end_time_unix_nano = end_ns
        _fill_attributes(s.attributes, attributes)
        # kept serialized: a third of the memory of a message in the pending export
        data = s.SerializeToString()
        with self._lock:
            if len(self._queued) >= self.max_queue:
                self.spans_dropped += 1
                return False
            self._queued.append(data)
        return True

    def trace_request(self, spans: list[bytes]) -> bytes:
        """An ExportTraceServiceRequest holding SPANS (serialized Span messages), framed as the
        protobuf encoding of its repeated fields: each element is its field's tag and length
        followed by the element, so serialized spans are put in without decoding them again."""
        scope_spans = self._scope_field + b"".join([_field(2, sp) for sp in spans])
        return _field(1, self._resource_field + _field(2, scope_spans))

    def flush_spans(self) -> bool:
        """Send the queued spans now (one request)."""
        with self._lock:
            spans, self._queued = self._queued, []
        if not spans:
            return True
        ok = self._traces_post.post(self.trace_request(spans))
        if ok:
            self.spans_sent += len(spans)
        else:
            self.spans_failed += len(spans)
        return ok

    # --- metrics -------------------------------------------------------------------------------

    def metrics_request(self, registry: Registry) -> ExportMetricsServiceRequest:
        """The registry's current values as one OTLP export request (cumulative)."""
        now = time.time_ns()
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        _fill_attributes(rm.resource.attributes, self.resource)
        sm = rm.scope_metrics.add()
        sm.scope.name = SCOPE
        for h in registry.histograms:
            m = sm.metrics.add()
            m.name, m.description, m.unit = h.name, h.description, h.unit
            m.histogram.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
            bounds = [float(b) for b in h.bounds]
            for labels, s in h.snapshot():
                p = m.histogram.data_points.add()
                _fill_attributes(p.attributes, h.attributes(labels))
                p.start_time_unix_nano, p.time_unix_nano = h.start_ns, now
                p.count, p.sum = s.count, s.total
                p.bucket_counts.extend(int(x) for x in s.buckets)
                p.explicit_bounds.extend(bounds)
                if s.count:
                    p.min, p.max = s.min, s.max
        for c in registry.counters:
            m = sm.metrics.add()
            m.name, m.description, m.unit = c.name, c.description, c.unit
            m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_CUMULATIVE
            m.sum.is_monotonic = True
            for labels, v in c.read().items():
                p = m.sum.data_points.add()
                _fill_attributes(p.attributes, dict(zip(c.labelnames, labels)))
                p.start_time_unix_nano, p.time_unix_nano = c.start_ns, now
                if isinstance(v, float) and not v.is_integer():
                    p.as_double = v
                else:
                    p.as_int = int(v)
        return req

    def export_metrics(self, registry: Registry) -> bool:
        ok = self._metrics_post.post(self.metrics_request(registry).SerializeToString())
        self.metric_exports += 1
        self.metric_failures += not ok
        return ok

    def start(self, registry: Registry) -> None:
        """Export REGISTRY every `interval` seconds and queued spans every second, in a thread."""
        self._registry = registry

        def loop():
            next_metrics = time.monotonic() + self.interval
            while not self._stop.wait(min(SPAN_FLUSH_S, max(next_metrics - time.monotonic(), 0))):
                self.flush_spans()
                if time.monotonic() >= next_metrics:
                    self.export_metrics(registry)
                    next_metrics += self.interval
        self._thread = threading.Thread(target=loop, name="otlp-export", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 10)
        if self._registry is not None:
            self.export_metrics(self._registry)      # the last values
        self.flush_spans()
        self._metrics_post.close()
        self._traces_post.close()
