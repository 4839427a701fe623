"""Control plane: lb.toml validation, `gridbpf lb run` life cycle, runtime changes, /metrics."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from gridbpf.lab import Lab
from gridbpf.lb.config import ConfigError, parse

GOOD = """
[balancer]
interface = "eth0"
netns = "{ns}"
instance = "lbctl"
metrics = "127.0.0.1:{port}"
xdp_mode = "native"

[health]
check = "none"

[[service]]
name = "web"
vip = "10.99.0.1"
port = 80
protocol = "tcp"

  [[service.backend]]
  address = "10.2.0.11"
  mac = "02:00:00:00:00:0b"
  weight = 1

  [[service.backend]]
  address = "10.2.0.12"
  mac = "02:00:00:00:00:0c"
  weight = 3

[[service]]
name = "web6"
vip = "fd00:99::1"
port = 443
protocol = "udp"
mode = "gue"
hash = "no-sport"

  [[service.backend]]
  address = "10.2.0.11"
  mac = "02:00:00:00:00:0b"
"""

PIN = "/sys/fs/bpf/gridbpf/lb/lbctl"


def gridbpf(*args, check=False):
    return subprocess.run([sys.executable, "-m", "gridbpf", *args], capture_output=True, text=True,
                          timeout=60, check=check)


@pytest.fixture(scope="module")
def lab():
    with Lab("lbctl") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, ["10.2.0.2/24"], ["10.2.0.11/24"], "eth0", "eth0")
        yield lab


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write(lab, text, name="lb.toml"):
    path = os.path.join(lab.workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def xdp_prog_id(lab):
    out = lab.hosts["a"].ip("-d", "link", "show", "dev", "eth0").stdout
    m = re.search(r"prog/xdp id (\d+)", out)
    return int(m.group(1)) if m else None


@pytest.mark.parametrize("change, key, words", [
    (('port = 80', 'prot = 80'), "service[0].prot", "unknown key"),
    (('vip = "10.99.0.1"', 'vip = "10.99.0.300"'), "service.web.vip", "bad IP address"),
    (('address = "10.2.0.12"', 'address = "fd00:2::12"'), "service.web.backend[1].address", "not IPv4 like VIP"),
    (('mac = "02:00:00:00:00:0c"', 'mac = "02:00:00:00:0c"'), "service.web.backend[1].mac", "bad MAC"),
    (('xdp_mode = "native"', 'xdp_mode = "turbo"'), "balancer.xdp_mode", "not one of"),
    (('weight = 3', 'weight = -3'), "service.web.backend[1].weight", "out of"),
    (('[health]', '[health]\ninterval = "often"'), "health.interval", "must be"),
    (('xdp_mode = "native"', 'xdp_mode = "native"\ntable_size = 65536'), "balancer.table_size", "not a prime"),
    (('name = "web6"', 'name = "web"'), "service[1].name", "defined twice"),
])
def test_bad_config_is_one_line_naming_the_key(lab, change, key, words):
    text = GOOD.format(ns=lab.hosts["a"].netns, port=free_port()).replace(*change)
    with pytest.raises(ConfigError) as e:
        parse(text, "lb.toml")
    assert f"lb.toml: {key}: " in str(e.value) and words in str(e.value)
    # the same through the command: one line, exit 2, nothing attached or pinned
    r = gridbpf("lb", "run", "--config", write(lab, text))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr, r.stderr
    assert not os.path.exists(PIN) and xdp_prog_id(lab) is None


def test_unknown_interface_attaches_nothing(lab):
    text = GOOD.format(ns=lab.hosts["a"].netns, port=free_port()).replace('interface = "eth0"', 'interface = "eth9"')
    r = gridbpf("lb", "run", "--config", write(lab, text))
    assert r.returncode == 2 and "balancer.interface" in r.stderr and "eth9" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(PIN) and xdp_prog_id(lab) is None


def test_unknown_netns_attaches_nothing(lab):
    text = GOOD.format(ns="gb-lbctl-nope", port=free_port())
    r = gridbpf("lb", "run", "--config", write(lab, text))
    assert r.returncode == 2 and "balancer.netns" in r.stderr and "gb-lbctl-nope" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(PIN)


def test_check_verb(lab):
    r = gridbpf("lb", "check", "--json", "--config", write(lab, GOOD.format(ns=lab.hosts["a"].netns, port=1)))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [s["name"] for s in info["services"]] == ["web", "web6"]


def wait_pinned(p, timeout=20):
    deadline = time.monotonic() + timeout
    while not os.path.exists(f"{PIN}/lb_ring"):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() is not None else "timeout"
        time.sleep(0.05)


def test_daemon_life_cycle_runtime_changes_and_metrics(lab):
    port = free_port()
    cfg = write(lab, GOOD.format(ns=lab.hosts["a"].netns, port=port))
    p = subprocess.Popen([sys.executable, "-m", "gridbpf", "lb", "run", "--config", cfg],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_pinned(p)
        prog = xdp_prog_id(lab)
        assert prog is not None
        # a second instance on the same interface is refused, and leaves the first alone
        r = gridbpf("lb", "run", "--config", cfg)
        assert r.returncode == 2 and "already running" in r.stderr
        assert os.path.exists(f"{PIN}/lb_ring") and xdp_prog_id(lab) == prog
        # ... also under another instance name: the interface is taken
        other = write(lab, open(cfg).read().replace('instance = "lbctl"', 'instance = "lbctl2"')
                      .replace(f":{port}", f":{free_port()}"), "other.toml")
        r = gridbpf("lb", "run", "--config", other)
        assert r.returncode == 2 and "interface eth0 in gb-lbctl-a is already running" in r.stderr, r.stderr
        assert not os.path.exists("/sys/fs/bpf/gridbpf/lb/lbctl2") and xdp_prog_id(lab) == prog

        st = json.loads(gridbpf("lb", "status", "--json", "--instance", "lbctl", check=True).stdout)
        web = {s["name"]: s for s in st["services"]}["web"]
        assert [(b["address"], b["weight"], b["state"]) for b in web["backends"]] == \
            [("10.2.0.11", 1, "active"), ("10.2.0.12", 3, "active")]
        web6 = {s["name"]: s for s in st["services"]}["web6"]
        assert web6["mode"] == "gue" and web6["hash"] == "no-sport" and web6["protocol"] == "udp"

        # runtime changes: through the pinned maps, the program stays
        out = json.loads(gridbpf("lb", "backend", "weight", "web", "10.2.0.11", "5", "--json", "--instance", "lbctl", check=True).stdout)
        assert out["backend"]["weight"] == 5
        out = json.loads(gridbpf("lb", "backend", "drain", "web", "10.2.0.12", "--json", "--instance", "lbctl", check=True).stdout)
        assert out["backend"]["state"] == "draining" and not out["backend"]["in_table"]
        out = json.loads(gridbpf("lb", "backend", "add", "web", "10.2.0.13", "--mac", "02:00:00:00:00:0d",
                                 "--weight", "2", "--json", "--instance", "lbctl", check=True).stdout)
        assert out["backend"]["in_table"] and out["backend"]["weight"] == 2
        gridbpf("lb", "backend", "remove", "web", "10.2.0.13", "--instance", "lbctl", check=True)
        r = gridbpf("lb", "backend", "remove", "web", "10.2.0.99", "--instance", "lbctl")
        assert r.returncode == 2 and "no backend 10.2.0.99" in r.stderr
        r = gridbpf("lb", "backend", "add", "nope", "10.2.0.99", "--mac", "02:00:00:00:00:01", "--instance", "lbctl")
        assert r.returncode == 2 and "unknown service 'nope'" in r.stderr
        st = json.loads(gridbpf("lb", "status", "--json", "--instance", "lbctl", check=True).stdout)
        web = {s["name"]: s for s in st["services"]}["web"]
        assert [(b["address"], b["weight"], b["state"]) for b in web["backends"]] == \
            [("10.2.0.11", 5, "active"), ("10.2.0.12", 3, "draining")]
        assert xdp_prog_id(lab) == prog

        # SIGHUP re-applies lb.toml (the drain and the weight go back), same program
        p.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            st = json.loads(gridbpf("lb", "status", "--json", "--instance", "lbctl", check=True).stdout)
            web = {s["name"]: s for s in st["services"]}["web"]
            if [(b["weight"], b["state"]) for b in web["backends"]] == [(1, "active"), (3, "active")]:
                break
            assert time.monotonic() < deadline, web
            time.sleep(0.1)
        assert xdp_prog_id(lab) == prog

        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'gridbpf_lb_backend_weight{backend="10.2.0.12",service="web"} 3.0' in text
        assert 'gridbpf_lb_packets_total{reason="drop_no_backend"}' in text
        assert "gridbpf_lb_service_new_flows_total" in text
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0, p.stderr.read()
    # clean exit: detached and unpinned
    assert xdp_prog_id(lab) is None and not os.path.exists(PIN)
    r = gridbpf("lb", "status", "--instance", "lbctl")
    assert r.returncode == 2 and "no balancer instance 'lbctl'" in r.stderr


HTTPS_SERVER = r"""
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.path == "/ok" else 503
        self.send_response(code); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("10.2.0.11", int(sys.argv[1])), H)
if sys.argv[2] == "tls":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


def test_health_check_kinds(lab):
    from gridbpf.lb.config import Health
    from gridbpf.lb.health import check_once
    b, ns = lab.hosts["b"], lab.hosts["a"].netns
    cert, key = os.path.join(lab.workdir, "c.pem"), os.path.join(lab.workdir, "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=backend"], check=True, capture_output=True)
    script = os.path.join(lab.workdir, "srv.py")
    with open(script, "w") as f:
        f.write(HTTPS_SERVER)
    b.popen([sys.executable, script, "8080", "plain"], name="http")
    b.popen([sys.executable, script, "8443", "tls", cert, key], name="https")
    a = lab.hosts["a"]
    a.wait_port("10.2.0.11", 8080)
    a.wait_port("10.2.0.11", 8443)
    # checks run from the balancer's namespace (a): the backend's address is reachable only there
    assert check_once("10.2.0.11", 8080, Health(check="tcp"), ns)[0]
    assert check_once("10.2.0.11", 8080, Health(check="http", path="/ok"), ns) == (True, "status 200")
    assert check_once("10.2.0.11", 8080, Health(check="http", path="/bad"), ns) == (False, "status 503")
    assert check_once("10.2.0.11", 8443, Health(check="https", path="/ok"), ns) == (True, "status 200")
    assert check_once("10.2.0.11", 8443, Health(check="https", path="/bad"), ns)[0] is False
    ok, why = check_once("10.2.0.11", 8081, Health(check="tcp"), ns)
    assert not ok and "refused" in why.lower()
    ok, why = check_once("10.2.0.99", 80, Health(check="tcp", timeout=0.3), ns)
    assert not ok
