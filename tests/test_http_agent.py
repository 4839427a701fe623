"""`gridbpf agent run` end to end: nginx started after the agent (picked up by comm), /metrics
parsed with prometheus_client's parser, OTLP metrics and spans received by a real HTTP receiver
and decoded with opentelemetry-proto, clean stop, refusal to run twice, bad config."""
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gridbpf.lab.otlp import OtlpReceiver
from gridbpf.trace.http.lab import Nginx



def attrs(kvs):
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = v.string_value if v.HasField("string_value") else v.int_value
    return out


def start_agent(tmp_path, comm, otlp_port=None, extra="", trace=""):
    cfg = tmp_path / "agent.toml"
    text = (f'[targets]\ncomm = ["{comm}"]\n[trace]\ndrain_ms = 50\n{trace}'
            f'[metrics]\nlisten = "127.0.0.1:0"\nmax_series = 50\nroutes = ["/{{vo}}/{{path}}"]\n'
            f'[agent]\nlock = "{tmp_path}/agent.lock"\n' + extra)
    if otlp_port:
        text += (f'[otlp]\nendpoint = "http://127.0.0.1:{otlp_port}"\ninterval = 0.5\n'
                 f'service_name = "ht-storage"\n')
    cfg.write_text(text)
    p = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config", str(cfg),
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"agent did not start: {p.stderr.read()}")
    return p, json.loads(line), cfg


def scrape(url):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, family, name, **labels):
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_agent_prometheus_and_otlp(tmp_path):
    comm = f"htngx{random.randint(1000, 9999)}"
    rx = OtlpReceiver()
    agent, status, cfg = start_agent(tmp_path, comm, rx.port)
    try:
        assert status["targets"] == []          # nginx is not running yet
        # a second agent with the same lock refuses to start, in one line
        second = subprocess.run([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config",
                                 str(cfg)], capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert "already running" in second.stderr and len(second.stderr.strip().splitlines()) == 1
        with Nginx(comm=comm) as n:
            (n.root / "atlas").mkdir()
            (n.root / "atlas" / "f.bin").write_bytes(b"d" * 1500)
            c = http.client.HTTPConnection("127.0.0.1", n.port)
            for i in range(20):
                c.request("GET", "/atlas/f.bin?try=%d" % i)
                c.getresponse().read()
            c.request("PUT", "/atlas/new.bin", body=b"u" * 4000)
            c.getresponse().read()
            for i in range(3):
                c.request("PROPFIND", "/", headers={"Depth": "0"})
                c.getresponse().read()
            c.request("BREW", "/pot")     # a token method nginx does not know
            c.getresponse().read()
            c.close()
            # nginx logs a request after its response went out: the last line may lag the read
            deadline = time.monotonic() + 5
            while len(n.access_lines()) < 25 and time.monotonic() < deadline:
                time.sleep(0.05)
            served = len(n.access_lines())
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                fams = scrape(status["metrics"])
                total = sum(s.value for s in fams["http_server_request_duration_seconds"].samples
                            if s.name.endswith("_count"))
                if total >= served:
                    break
                time.sleep(0.2)
        dur = "http_server_request_duration_seconds"
        assert fams[dur].type == "histogram"
        assert sample(fams, dur, dur + "_count", http_request_method="GET",
                      http_response_status_code="200", http_route="/{vo}/{path}") == 20
        assert sample(fams, dur, dur + "_count", http_request_method="PUT",
                      http_response_status_code="201", http_route="/{vo}/{path}") == 1
        assert sample(fams, dur, dur + "_count", http_request_method="PROPFIND",
                      http_response_status_code="207", http_route="") == 3
        assert sample(fams, dur, dur + "_count", http_request_method="_OTHER") == 1
        assert total == served == 25
        # +Inf bucket equals count; the body histograms saw the exact body sizes
        assert sample(fams, dur, dur + "_bucket", http_request_method="GET", le="+Inf") == 20
        rb = "http_server_response_body_size_bytes"
        assert sample(fams, rb, rb + "_sum", http_request_method="GET") == 20 * 1500
        qb = "http_server_request_body_size_bytes"
        assert sample(fams, qb, qb + "_sum", http_request_method="PUT") == 4000
        assert sample(fams, "gridbpf_http_kernel", "gridbpf_http_kernel_total",
                      counter="events_lost") == 0
        # no raw path became a label
        assert not any("try=" in str(s.labels) for f in fams.values() for s in f.samples)
    finally:
        agent.terminate()
        out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    # after SIGTERM the last metrics and all spans were flushed to the receiver
    rx.close()
    spans = rx.spans()
    assert len(spans) == 25
    gets = [s for s in spans if attrs(s.attributes).get("http.request.method") == "GET"]
    assert len(gets) == 20 and gets[0].name == "GET /{vo}/{path}"
    a = attrs(gets[0].attributes)
    assert a["http.response.status_code"] == 200 and a["http.route"] == "/{vo}/{path}"
    assert a["url.path"] == "/atlas/f.bin" and a["client.address"] == "127.0.0.1"
    assert gets[0].kind == 2     # SPAN_KIND_SERVER
    assert gets[0].end_time_unix_nano >= gets[0].start_time_unix_nano > 0
    last = rx.metrics[-1]
    res = attrs(last.resource_metrics[0].resource.attributes)
    assert res["service.name"] == "ht-storage"
    metrics = {m.name: m for m in last.resource_metrics[0].scope_metrics[0].metrics}
    h = metrics["http.server.request.duration"]
    assert h.unit == "s"
    points = {attrs(p.attributes)["http.request.method"]: p for p in h.histogram.data_points}
    assert points["GET"].count == 20 and sum(points["GET"].bucket_counts) == 20
    assert h.histogram.aggregation_temporality == 2     # cumulative
    assert attrs(points["GET"].attributes)["http.response.status_code"] == 200   # an int
    assert "http.route" not in attrs(points["PROPFIND"].attributes)      # unknown: left out
    # the agent's pins/links are gone: nothing of ours stays attached
    assert not os.path.exists(f"{tmp_path}/agent.lock") or open(f"{tmp_path}/agent.lock").read() == ""


@pytest.mark.parametrize("body,needle", [
    ('[targets]\n', "targets: give at least one"),
    ('[targets]\ncomm = ["x"]\n[metrics]\nlisten = "nope"\n', "metrics.listen"),
    ('[targets]\ncomm = ["x"]\n[metrics]\nroutes = ["atlas/{x"]\n', "metrics.routes"),
    ('[targets]\ncomm = ["x"]\n[otlp]\ninterval = 3\n', "otlp.endpoint"),
    ('[targets]\npid = ["12"]\n', "targets.pid"),
    ('[targets]\ncomm = ["x"]\n[trace]\ncolour = 1\n', "trace.colour: unknown key"),
    ('[targets\n', "not valid TOML"),
])
def test_agent_bad_config_one_line(tmp_path, body, needle):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(body)
    r = subprocess.run([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_agent_hosts_other_collectors(tmp_path):
    """[agent] collectors: the tcp collector of the "why is it stuck" tracers served on the
    same /metrics as the request metrics."""
    with Nginx() as n:
        (n.root / "x").write_text("x")
        cfg = tmp_path / "agent.toml"
        cfg.write_text(f'[targets]\npid = [{n.pid}]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                       f'[agent]\nlock = "{tmp_path}/agent.lock"\ncollectors = ["tcp"]\n')
        p = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config",
                              str(cfg), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            line = p.stdout.readline()
            assert line, p.stderr.read()
            status = json.loads(line)
            c = http.client.HTTPConnection("127.0.0.1", n.port)
            for _ in range(5):
                c.request("GET", "/x")
                c.getresponse().read()
            c.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                fams = scrape(status["metrics"])
                got = sample(fams, "http_server_request_duration_seconds",
                             "http_server_request_duration_seconds_count", http_request_method="GET")
                if got == 5 and "gridbpf_tcp_connections_closed" in fams:
                    break
                time.sleep(0.2)
            assert got == 5
            assert any(s.value >= 1 for s in fams["gridbpf_tcp_connections_closed"].samples)
        finally:
            p.terminate()
            out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err


def test_agent_collectors_unknown_name_one_line(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[targets]\ncomm = ["x"]\n[agent]\ncollectors = ["gpu"]\n')
    r = subprocess.run([sys.executable, "-m", "gridbpf.cli", "agent", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "agent.collectors: unknown collector 'gpu'" in r.stderr


def _histograms(fams):
    """{(family, labels without le): {"count", "sum", "buckets"}} of the three HTTP histograms."""
    out = {}
    for fam in ("http_server_request_duration_seconds", "http_server_request_body_size_bytes",
                "http_server_response_body_size_bytes"):
        for s in fams[fam].samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            one = out.setdefault((fam, labels), {"buckets": {}})
            if s.name.endswith("_bucket"):
                one["buckets"][s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                one["count"] = s.value
            elif s.name.endswith("_sum"):
                one["sum"] = s.value
    return out


def test_agent_kernel_aggregation_equals_records(tmp_path):
    """Two agents on the same nginx: one aggregates the simple requests in the kernel, the
    other (aggregate = false: the negative control) decodes every request from its record.
    Their histograms agree label by label and bucket by bucket, both count what the access
    log lists (idle reports, pipelining, a head split over two reads, uploads included), and
    only the first one has requests that never came as records."""
    comm = f"htagg{random.randint(1000, 9999)}"
    (tmp_path / "k").mkdir()
    (tmp_path / "r").mkdir()
    kern, kstatus, _ = start_agent(tmp_path / "k", comm, trace="idle_report_s = 1\n")
    recs, rstatus, _ = start_agent(tmp_path / "r", comm, trace="idle_report_s = 1\naggregate = false\n")
    try:
        assert kstatus["aggregation"] == "kernel"
        assert rstatus["aggregation"].startswith("off")
        with Nginx(comm=comm) as n:
            (n.root / "atlas").mkdir()
            (n.root / "atlas" / "f.bin").write_bytes(b"d" * 1500)
            time.sleep(2.5)                      # both agents take nginx as a target
            c = http.client.HTTPConnection("127.0.0.1", n.port)
            for i in range(30):
                c.request("GET", "/atlas/f.bin?try=%d" % i)
                c.getresponse().read()
            for _ in range(5):
                c.request("HEAD", "/atlas/f.bin")
                c.getresponse().read()
                c.request("GET", "/nothere")
                c.getresponse().read()
            c.request("PUT", "/atlas/new.bin", body=b"u" * 4000)
            c.getresponse().read()
            c.request("PROPFIND", "/", headers={"Depth": "0"})
            c.getresponse().read()
            c.request("GET", "/atlas/f.bin")     # the last one: reported idle, then closed
            c.getresponse().read()
            time.sleep(2.5)
            c.close()
            import socket
            with socket.create_connection(("127.0.0.1", n.port)) as s:
                # two pipelined GETs in one write, then a head split over two writes
                s.sendall(b"GET /atlas/f.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /atlas/f.bin?p=2 HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(0.3)
                # a GET with a body that itself ends like a header block, in the same read
                s.sendall(b"GET /atlas/f.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab\r\n\r\n")
                time.sleep(0.3)
                s.sendall(b"GET /atlas/f.bin HTTP/1.1\r\nHo")
                time.sleep(0.2)
                s.sendall(b"st: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
            deadline = time.monotonic() + 5
            while len(n.access_lines()) < 47 and time.monotonic() < deadline:
                time.sleep(0.05)
            served = len(n.access_lines())
            assert served == 47
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                got = [_histograms(scrape(st["metrics"])) for st in (kstatus, rstatus)]
                totals = [sum(v["count"] for (f, _), v in h.items()
                              if f == "http_server_request_duration_seconds") for h in got]
                if totals == [served, served]:
                    break
                time.sleep(0.2)
        assert totals == [served, served]
        hk, hr = got
        assert hk.keys() == hr.keys()
        for key, k in hk.items():
            r = hr[key]
            assert k["count"] == r["count"], key
            if key[0] == "http_server_request_duration_seconds":
                # two tracers, two clock readings per request: microseconds apart
                assert k["sum"] == pytest.approx(r["sum"], rel=0.05, abs=2e-3), key
                assert k["buckets"]["+Inf"] == r["buckets"]["+Inf"], key
            else:
                assert k["sum"] == r["sum"] and k["buckets"] == r["buckets"], key
        fk, fr = scrape(kstatus["metrics"]), scrape(rstatus["metrics"])
        aggregated = sample(fk, "gridbpf_http_kernel", "gridbpf_http_kernel_total",
                            counter="aggregated_in_kernel")
        # the 30 + 5 + 5 simple requests of the first connection, but not its last (reported
        # idle from the table first), the PUT, the PROPFIND, the pipelined pair, the GET with a
        # body or the split one
        assert aggregated == 40
        assert sample(fr, "gridbpf_http_kernel", "gridbpf_http_kernel_total",
                      counter="aggregated_in_kernel") == 0
        assert sample(fk, "gridbpf_http_kernel", "gridbpf_http_kernel_total", counter="idle_reported") >= 1
        get200 = (("http_request_method", "GET"), ("http_response_status_code", "200"),
                  ("http_route", "/{vo}/{path}"))
        assert hk[("http_server_response_body_size_bytes", get200)]["sum"] == 35 * 1500
    finally:
        for a in (kern, recs):
            a.terminate()
        for a in (kern, recs):
            a.communicate(timeout=30)
