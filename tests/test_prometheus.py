"""A real Prometheus (Debian's `prometheus`) scrapes the node agent and the balancer while lab
traffic runs; PromQL through its HTTP API returns what the traffic produced, the shipped rules
record and alert on live data, and every query of the shipped Grafana dashboards returns data.
The rules' own unit tests run with `promtool test rules`."""
import http.client
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from gridbpf.lab import Lab
from gridbpf.lb.site import build_site, stop_nginx
from gridbpf.trace.http.lab import Nginx, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "packaging" / "prometheus" / "gridbpf-rules.yml"
RULE_TESTS = ROOT / "packaging" / "prometheus" / "gridbpf-rules.test.yml"
DASHBOARDS = sorted((ROOT / "packaging" / "grafana").glob("*.json"))


def test_promtool_checks_and_tests_the_rules(tmp_path):
    r = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 12 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # negative control: the same tests against rules with a weaker stuck-thread alert fail
    (tmp_path / "gridbpf-rules.yml").write_text(RULES.read_text().replace(
        "(gridbpf_stuck_threads_blocked) > 0\n        for: 1m", "(gridbpf_stuck_threads_blocked) > 0\n        for: 5m"))
    shutil.copy(RULE_TESTS, tmp_path)
    r = subprocess.run(["promtool", "test", "rules", str(tmp_path / RULE_TESTS.name)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "GridbpfThreadStuck" in r.stdout + r.stderr
    r = subprocess.run(["promtool", "check", "config", "--syntax-only",
                        str(ROOT / "packaging" / "prometheus" / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    d = json.loads(path.read_text())
    assert d["uid"] and len(d["uid"]) <= 40 and d["title"].startswith("gridbpf: ")
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query" and variables["instance"]["allValue"] == ".+"
    ids, cells = set(), set()
    for p in d["panels"]:
        assert p["id"] not in ids and p["title"]
        ids.add(p["id"])
        assert p["type"] in ("timeseries", "stat", "table", "state-timeline", "bargauge")
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh") and g["x"] + g["w"] <= 24 and g["h"] > 0
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["fieldConfig"]["defaults"]["unit"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["expr"] and t["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in t["expr"], t["expr"]


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str], rules: Path):
        self.port = free_port()
        cfg = workdir / "prometheus.yml"
        jobs = "".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
                       for job, addr in targets.items())
        cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       f"rule_files:\n  - {rules}\nscrape_configs:\n{jobs}")
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={workdir}/tsdb",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
             f"--web.console.templates={workdir}", f"--web.console.libraries={workdir}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=30, proc=self.proc)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.url + "/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prometheus not ready"
                time.sleep(0.2)

    def api(self, path: str, **params):
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{params}: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """Instant vector as {sorted label items (without __name__): value}."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
                for r in data["result"]}

    def wait(self, expr: str, check, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            got = self.query(expr)
            if check(got):
                return got
            assert time.monotonic() < deadline, f"{expr}: {got}"
            time.sleep(0.5)

    def close(self):
        self.proc.terminate()
        self.proc.wait(20)
        self.log.close()


def one(result: dict, **labels) -> float:
    hits = [v for k, v in result.items() if all((n, x) in k for n, x in labels.items())]
    assert len(hits) == 1, (labels, result)
    return hits[0]


def test_prometheus_scrapes_agent_and_balancer(tmp_path):
    tag = random.randint(1000, 9999)
    comm, stuck_comm = f"pkngx{tag}", f"pkstk{tag}"
    # a process of the storage node that blocks in read() until we let it go
    os.symlink(sys.executable, tmp_path / stuck_comm)
    stuck = subprocess.Popen([str(tmp_path / stuck_comm), "-c", "import os; os.read(0, 1)"],
                             stdin=subprocess.PIPE)
    agent = prom = None
    with Nginx(comm=comm) as n, Lab("pkprom") as lab:
        site = build_site(lab, backends=2, nodes=1)
        try:
            site.start()
            (n.root / "atlas").mkdir()
            (n.root / "atlas" / "f.bin").write_bytes(b"d" * 20000)
            agent_port = free_port()
            cfg = tmp_path / "agent.toml"
            cfg.write_text(f'[targets]\ncomm = ["{comm}", "{stuck_comm}"]\n'
                           f'[metrics]\nlisten = "127.0.0.1:{agent_port}"\nroutes = ["/{{vo}}/{{path}}"]\n'
                           f'[agent]\nlock = "{tmp_path}/agent.lock"\ncollectors = ["stuck"]\n'
                           f'[checksum]\npaths = ["{n.root}", "{n.dir}/tmp"]\ncomm = "{comm}"\n')
            agent = subprocess.Popen([sys.executable, "-m", "gridbpf", "agent", "run", "--config", str(cfg),
                                      "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert agent.stdout.readline(), agent.stderr.read()
            lb_port = site.metrics_ports["lb1"]
            prom = Prometheus(tmp_path, {"gridbpf-agent": f"127.0.0.1:{agent_port}",
                                         "gridbpf-lb": f"127.0.0.1:{lb_port}"}, RULES)
            prom.wait('up{job=~"gridbpf-.+"}', lambda r: len(r) == 2 and all(v == 1 for v in r.values()))
            # negative control: no request yet, no request series
            assert prom.query("http_server_request_duration_seconds_count") == {}

            # traffic: the storage node on loopback, the balancer in the lab. A series is born
            # with its first request; rate() sees only increases after its first scrape, so one
            # request of each kind goes first, then the rest once Prometheus has the series
            c = http.client.HTTPConnection("127.0.0.1", n.port)

            def traffic(gets, missing, puts, first=0):
                for i in range(gets):
                    c.request("GET", f"/atlas/f.bin?i={i}")
                    c.getresponse().read()
                for i in range(missing):
                    c.request("GET", f"/atlas/missing{i}")
                    c.getresponse().read()
                for i in range(first, first + puts):
                    c.request("PUT", f"/atlas/up{i}.bin", body=os.urandom(65536))
                    c.getresponse().read()

            traffic(1, 1, 1)
            prom.wait("http_server_request_duration_seconds_count", lambda r: len(r) == 3)
            traffic(29, 4, 3, first=1)
            c.close()
            site.client.run(["sh", "-c", f"for i in $(seq 24); do curl -s -o /dev/null --max-time 5 "
                                         f"http://{site.vip4}/whoami; done"])
            lb_truth = {(s["name"], b["address"]): b["packets"]
                        for s in site.status(site.nodes[0])["services"] for b in s["backends"]}

            # what the traffic produced, through PromQL
            by_status = prom.wait(
                'sum by (http_request_method, http_response_status_code) '
                '(http_server_request_duration_seconds_count{job="gridbpf-agent"})',
                lambda r: sum(r.values()) >= 39)
            assert {(dict(k)["http_request_method"], dict(k)["http_response_status_code"]): v
                    for k, v in by_status.items()} == {("GET", "200"): 30, ("GET", "404"): 5, ("PUT", "201"): 4}
            rates = prom.wait("gridbpf:http_requests:rate1m",
                              lambda r: len(r) == 3 and all(v > 0 for v in r.values()))
            p50 = one(prom.query('histogram_quantile(0.5, sum by (le) (rate('
                                 'http_server_request_duration_seconds_bucket{job="gridbpf-agent"}[1m])))'))
            assert 0 < p50 <= 0.25, p50       # loopback requests: well under the 250 ms bucket
            lb = prom.wait('gridbpf_lb_backend_packets_total{job="gridbpf-lb"}',
                           lambda r: {(dict(k)["service"], dict(k)["backend"]): v for k, v in r.items()} == lb_truth)
            per_backend = {dict(k)["backend"]: v for k, v in lb.items() if dict(k)["service"] == "webdav4"}
            assert len(per_backend) == 2 and all(v > 0 for v in per_backend.values()), per_backend
            files = prom.wait('gridbpf_checksum_files_total{job="gridbpf-agent"}',
                              lambda r: sum(r.values()) >= 4)
            assert one(files, source="page-cache", status="stored") == 4   # the default sum mode
            assert subprocess.run([sys.executable, "-m", "gridbpf", "checksum", "verify",
                                   *[str(n.root / "atlas" / f"up{i}.bin") for i in range(4)]],
                                  capture_output=True).returncode == 0
            blocked = prom.wait(f'gridbpf_stuck_threads_blocked{{pid="{stuck.pid}"}}', lambda r: len(r) == 1)
            assert one(blocked, syscall="read") == 1

            # scraped for many intervals (1 s each), both targets up all along
            scrapes = prom.query('count_over_time(up{job=~"gridbpf-.+"}[5m])')
            assert len(scrapes) == 2 and all(v >= 2 for v in scrapes.values()), scrapes
            assert prom.query('min_over_time(up{job=~"gridbpf-.+"}[5m]) < 1') == {}

            # every query of the dashboards returns data now
            for d in DASHBOARDS:
                for title, expr in panel_queries(json.loads(d.read_text())):
                    q = expr.replace("$instance", ".+").replace("$__rate_interval", "1m")
                    res = prom.query(q)
                    assert res and any(not math.isnan(v) for v in res.values()), f"{d.name}: {title}: {q}"

            # alerts on live data: the stuck thread is pending (for: 1m); no backend is down ...
            alerts = prom.wait("ALERTS", lambda r: any(dict(k)["alertname"] == "GridbpfThreadStuck" for k in r))
            assert any(dict(k).get("pid") == str(stuck.pid) for k in alerts)
            assert not any(dict(k)["alertname"] == "GridbpfLbBackendDown" for k in alerts)
            # ... until one is: its nginx stops, the health checks take it out, the alert follows
            stop_nginx(site.backends[1])
            down = prom.wait('ALERTS{alertname="GridbpfLbBackendDown"}', lambda r: len(r) >= 1)
            assert {dict(k)["backend"] for k in down} <= {"10.2.0.12", "fd00:2::c"}
        finally:
            stuck.kill()
            if prom:
                prom.close()
            if agent:
                agent.terminate()
                agent.wait(30)
            site.close()
    assert agent.returncode == 0, agent.stderr.read()
