"""The shared exporters: bulk histograms against a plain per-value computation, the cardinality
cap, Prometheus text parsed back with prometheus_client, OTLP data points."""
import urllib.error
import urllib.request

import numpy as np
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gridbpf.export.metrics import OVERFLOW, Registry, prometheus_name
from gridbpf.export.otlp import OtlpExporter
from gridbpf.export.prometheus import MetricsServer

BOUNDS = (0.1, 1.0, 10.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.sampled_from("ab")), min_size=1,
                max_size=200))
def test_bulk_histogram_equals_per_value(values):
    h = Registry().histogram("x.y", "d", "s", ("k",), BOUNDS)
    h.observe_many([v for v, _ in values], [(k,) for _, k in values])
    for key, s in h.snapshot():
        vs = [v for v, k in values if (k,) == key]
        want = [sum(1 for v in vs if (BOUNDS[i - 1] if i else -1) < v <= b)
                for i, b in enumerate(BOUNDS)] + [sum(1 for v in vs if v > BOUNDS[-1])]
        assert list(s.buckets) == want and s.count == len(vs)
        assert abs(s.total - sum(vs)) < 1e-6 and s.min == min(vs) and s.max == max(vs)


def test_cardinality_cap_folds_and_counts():
    h = Registry().histogram("a.b", "d", "s", ("route",), BOUNDS, max_series=3)
    h.observe_many(np.ones(10), [(f"/r{i}",) for i in range(10)])
    keys = {k for k, _ in h.snapshot()}
    assert len(keys) == 4 and (OVERFLOW,) in keys      # 3 series + the overflow one
    assert h.overflowed == 7
    assert sum(s.count for _, s in h.snapshot()) == 10


def test_prometheus_text_and_otlp_points():
    reg = Registry()
    h = reg.histogram("http.server.request.duration", "d", "s", ("http.route",), BOUNDS)
    h.observe_many([0.05, 0.5, 5, 50], [("/a",)] * 4)
    reg.counter("gridbpf.test.lost", "d", "1", lambda: {(): 3})
    assert h.prometheus_name == "http_server_request_duration_seconds"
    assert prometheus_name("http.server.request.body.size", "By") == "http_server_request_body_size_bytes"
    srv = MetricsServer(reg, 0)
    try:
        resp = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics")
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
        # anything but /metrics is refused (and the server keeps serving after it)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/other")
            raise AssertionError("no 404")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        assert urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics").read().decode() == text
    finally:
        srv.close()
    # closed: the port no longer answers
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=2)
        raise AssertionError("still serving")
    except urllib.error.URLError:
        pass
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = {s.labels["le"]: s.value for s in fams["http_server_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1, "1.0": 2, "10.0": 3, "+Inf": 4}
    assert all(s.labels.get("http_route") == "/a" for s in fams["http_server_request_duration_seconds"].samples)
    assert fams["gridbpf_test_lost"].samples[0].value == 3


def _attrs(kvs):
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


def test_otlp_round_trip_to_a_receiver():
    """Metrics and spans POSTed to a real OTLP/HTTP receiver and decoded there; the span rate
    cap counts what it drops; a receiver that is down is counted as failed exports."""
    from gridbpf.lab.otlp import OtlpReceiver
    reg = Registry()
    h = reg.histogram("http.server.request.duration", "d", "s", ("http.route", "code"), BOUNDS,
                      attribute_types={"code": int})
    h.observe_many([0.05, 0.5, 5, 50], [("/a", "200")] * 4)
    reg.counter("gridbpf.test.lost", "d", "1", lambda: {(): 3})
    rx = OtlpReceiver()
    ex = OtlpExporter(f"http://127.0.0.1:{rx.port}", "svc", resource={"host.name": "n1"},
                      max_spans_per_second=3)
    try:
        assert ex.export_metrics(reg)
        sent = [ex.span("GET /a", 10, 20, {"http.request.method": "GET", "client.port": 5})
                for _ in range(5)]
        assert sent == [True] * 3 + [False] * 2 and ex.spans_dropped == 2
        assert ex.flush_spans() and ex.spans_sent == 3
    finally:
        rx.close()
    res = _attrs(rx.metrics[0].resource_metrics[0].resource.attributes)
    assert res["service.name"] == "svc" and res["host.name"] == "n1"
    metrics = {m.name: m for m in rx.metrics[0].resource_metrics[0].scope_metrics[0].metrics}
    d = metrics["http.server.request.duration"]
    assert d.unit == "s" and d.histogram.aggregation_temporality == 2       # cumulative
    p = d.histogram.data_points[0]
    assert list(p.bucket_counts) == [1, 1, 1, 1] and p.count == 4 and p.sum == 55.55
    assert list(p.explicit_bounds) == list(BOUNDS) and (p.min, p.max) == (0.05, 50)
    assert _attrs(p.attributes) == {"http.route": "/a", "code": 200}
    lost = metrics["gridbpf.test.lost"].sum
    assert lost.is_monotonic and lost.data_points[0].as_int == 3
    spans = rx.spans()
    assert len(spans) == 3 and len({s.trace_id for s in spans}) == 3
    assert spans[0].kind == 2 and spans[0].name == "GET /a"
    assert (spans[0].start_time_unix_nano, spans[0].end_time_unix_nano) == (10, 20)
    assert _attrs(spans[0].attributes) == {"http.request.method": "GET", "client.port": 5}
    assert len(spans[0].span_id) == 8 and len(spans[0].trace_id) == 16
    rs = rx.traces[0].resource_spans[0]
    assert _attrs(rs.resource.attributes)["service.name"] == "svc"
    assert rs.scope_spans[0].scope.name == "gridbpf"
    # the spans' framing is the library's own encoding of the same request
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    lib = ExportTraceServiceRequest()
    lib.resource_spans.add().CopyFrom(rs)
    assert ex.trace_request([s.SerializeToString() for s in spans]) == lib.SerializeToString()
    # negative control: nobody listens any more
    assert not ex.export_metrics(reg) and ex.metric_failures == 1
    ex = OtlpExporter(f"http://127.0.0.1:{rx.port}", "svc")
    assert ex.span("GET /b", 1, 2, {})
    assert not ex.flush_spans() and (ex.spans_failed, ex.spans_sent) == (1, 0)


def test_exposition_matches_prometheus_client():
    """Our /metrics text is what prometheus_client writes for the same families, escapes and
    large numbers included (it used to be written by prometheus_client)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    from gridbpf.export.prometheus import exposition
    reg = Registry()
    h = reg.histogram("http.server.request.duration", 'with "quotes"\nand \\', "s",
                      ("http.route", "http.request.method"), BOUNDS + (2e6,), max_series=2)
    h.observe_many([0.05, 0.5, 5, 50, 3e6] * 300_000,
                   [('/a"b\\c\nd', "GET"), ("/x", "PUT"), ("/y", "GET")] * 500_000)
    reg.counter("gridbpf.test.lost", "d", "1", lambda: {("a",): 3, ("b\n",): 12345678},
                ("counter",))

    class Old:           # the families as the prometheus_client-based collector built them
        def collect(self):
            for h in reg.histograms:
                fam = HistogramMetricFamily(h.prometheus_name, h.description,
                                            labels=[n.replace(".", "_") for n in h.labelnames])
                bounds = [*(floatToGoString(b) for b in h.bounds), "+Inf"]
                for labels, s in h.snapshot():
                    fam.add_metric(list(labels), list(zip(bounds, np.cumsum(s.buckets).tolist())),
                                   s.total)
                yield fam
                over = CounterMetricFamily(f"{h.prometheus_name}_series_overflow",
                                           f"observations of {h.name} folded into the overflow "
                                           f"series (cardinality cap {h.max_series})")
                over.add_metric([], h.overflowed)
                yield over
            for c in reg.counters:
                fam = CounterMetricFamily(c.prometheus_name, c.description,
                                          labels=list(c.labelnames))
                for labels, value in c.read().items():
                    fam.add_metric(list(labels), value)
                yield fam
    prom = CollectorRegistry(auto_describe=False)
    prom.register(Old())
    assert exposition(reg) == generate_latest(prom).decode()
