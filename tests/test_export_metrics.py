"""The shared exporters: bulk histograms against a plain per-value computation, the cardinality
cap, Prometheus text parsed back with prometheus_client, OTLP data points."""
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
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics").read().decode()
    finally:
        srv.close()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    buckets = {s.labels["le"]: s.value for s in fams["http_server_request_duration_seconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 1, "1.0": 2, "10.0": 3, "+Inf": 4}
    assert all(s.labels.get("http_route") == "/a" for s in fams["http_server_request_duration_seconds"].samples)
    assert fams["gridbpf_test_lost"].samples[0].value == 3
    ex = OtlpExporter("http://127.0.0.1:9", "svc", spans=False)
    data = ex.metrics_data(reg)
    metrics = {m.name: m for m in data.resource_metrics[0].scope_metrics[0].metrics}
    p = metrics["http.server.request.duration"].data.data_points[0]
    assert list(p.bucket_counts) == [1, 1, 1, 1] and p.count == 4 and p.attributes == {"http.route": "/a"}
    assert metrics["gridbpf.test.lost"].data.data_points[0].value == 3
