"""The systemd units of packaging/systemd, installed by `make install-units`, start the real
daemons (under systemd where PID 1 is systemd, else under tests/unit_supervisor.py with the
same command lines, capability bounding set and readiness protocol); SIGTERM leaves no program
loaded and no pin. The negative control: SIGKILL leaves the balancer's
pinned maps, and the restart (Restart=on-failure) cleans them up."""
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

import pytest

from gridbpf.lab import Lab
from gridbpf.trace.http.lab import Nginx, free_port, wait_port
from test_lb_control import GOOD as LB_CONTROL_TOML
from unit_supervisor import Supervisor, live_programs, parse_unit, program_ids

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["gridbpf-agent.service", "gridbpf-lb.service", "gridbpf-scitags.service"]

# The units' command lines run under tests/unit_supervisor.py with their bounding sets, whether
# or not PID 1 is systemd (a run under a real systemd is not automated: this CI has none).


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`make install-units` into a temporary root, BINDIR pointing at a gridbpf that runs this
    checkout (what a venv's console script does)."""
    d = tmp_path_factory.mktemp("units")
    (d / "bin").mkdir()
    exe = d / "bin" / "gridbpf"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT}/src exec {sys.executable} -m gridbpf "$@"\n')
    exe.chmod(0o755)
    subprocess.run(["make", "-s", "-C", str(ROOT), "install-units", f"UNITDIR={d}/units",
                    f"BINDIR={d}/bin", f"CONFDIR={d}/etc"], check=True, capture_output=True)
    return d


@pytest.fixture(scope="module")
def lab():
    with Lab("pkunit") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, ["10.2.0.2/24", "fd00:2::2/64"], ["10.2.0.11/24", "fd00:2::11/64"], "eth0", "eth0")
        yield lab


def test_units_installed_and_verified(installed):
    for name in UNITS:
        path = installed / "units" / name
        unit = parse_unit(path)
        svc = unit["Service"]
        assert svc["Type"] == ["notify"] and svc["Restart"] == ["on-failure"], name
        assert svc["ExecStart"][0].startswith(f"{installed}/bin/gridbpf "), name
        assert f"--config {installed}/etc/" in svc["ExecStart"][0], name
        assert "CAP_BPF" in svc["CapabilityBoundingSet"][0] and svc["NoNewPrivileges"] == ["yes"]
        assert "CAP_SYS_ADMIN" not in svc["CapabilityBoundingSet"][0], name
        assert svc["StandardError"] == ["journal"]
        # systemd's own checker, offline: syntax, known keys, the command exists
        r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert r.returncode == 0 and name not in r.stderr, r.stderr


def xdp_attached(lab) -> bool:
    return bool(re.search(r"prog/xdp id \d+", lab.hosts["a"].ip("-d", "link", "show", "dev", "eth0").stdout))


# the balancer tests' lb.toml, under this test's instance name
LB_TOML = LB_CONTROL_TOML.replace('instance = "lbctl"', 'instance = "pkunit"')
LB_PIN = Path("/sys/fs/bpf/gridbpf/lb/pkunit")


def test_lb_unit_start_crash_restart_stop(installed, lab):
    port = free_port()
    (installed / "etc" / "lb.toml").write_text(LB_TOML.format(ns=lab.hosts["a"].netns, port=port))
    # the lab's interface lives in another network namespace: entering it (setns) needs
    # CAP_SYS_ADMIN, which the unit leaves out (production balancers attach in the host's)
    sup = Supervisor(installed / "units" / "gridbpf-lb.service", installed / "lb.log",
                     extra_caps=("sys_admin",))
    pid = sup.start()
    try:
        first = program_ids(pid)
        assert first and xdp_attached(lab) and LB_PIN.is_dir()
        # ready means ready: /metrics answers at once
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'gridbpf_lb_backend_up{backend="10.2.0.11",service="web"}' in text
        # negative control: a crash (SIGKILL) detaches XDP with the process (its link was an
        # fd) but leaves the pinned maps behind ...
        assert sup.kill() == -signal.SIGKILL
        assert not xdp_attached(lab) and (LB_PIN / "lb_conntrack").exists()
        # ... Restart=on-failure starts it again; the new daemon removes the stale pins
        assert sup.should_restart()
        pid = sup.start()
        second = program_ids(pid)
        assert second and xdp_attached(lab) and LB_PIN.is_dir()
    finally:
        rc = sup.stop()
    assert rc == 0, sup.log()[-2000:]
    assert not live_programs(first | second), "a program outlived SIGTERM"
    assert not xdp_attached(lab) and not LB_PIN.exists()
    assert "stopping" in sup.log()


@pytest.mark.parametrize("control", [False, True], ids=["unit", "control"])
def test_lb_unit_with_bgp_announces_and_withdraws(installed, control):
    """With [bgp] the unit's daemon runs BIRD as its child, under the unit's bounding set: BIRD
    listens on port 179 (CAP_NET_BIND_SERVICE), the session comes up and the router's FIB gets
    the VIPs; SIGTERM (KillMode=mixed: the daemon only) withdraws them and takes BIRD down.
    The control drops CAP_NET_BIND_SERVICE from the bounding set: BIRD has no listening socket,
    no session comes up and the router learns nothing."""
    from gridbpf.lb import config as lbconfig
    from gridbpf.lb.bgp import _bird_running, run_dir, status
    from gridbpf.lb.site import build_site
    conf = installed / "etc" / "lb.toml"
    with Lab("pkbgp") as lab:
        site = build_site(lab, backends=1, nodes=1)
        node = site.nodes[0]
        conf.write_text(site.config_text(node, free_port()))
        sup = Supervisor(installed / "units" / "gridbpf-lb.service", installed / "lb-bgp.log",
                         extra_caps=("sys_admin",),       # setns into the lab node (see above)
                         drop_caps=("net_bind_service",) if control else ())
        bird = run_dir(site.instance(node))
        try:
            sup.start()
            if control:
                with pytest.raises(TimeoutError):
                    site.wait_routes([node], timeout=8)
            else:
                site.wait_routes([node], timeout=30)
            listening = node.run(["ss", "-Htln", "sport = :179"]).stdout.strip()
            sessions = status(site.instance(node), lbconfig.load(str(conf)))["sessions"]
        finally:
            rc = sup.stop()
        try:
            if not control:
                # the router's FIB has no VIP left once the unit stopped
                site.bird.wait_next_hops(site.vip4, [], timeout=10)
                site.bird.wait_next_hops(site.vip6, [], timeout=5)
        finally:
            site.close()
    log = sup.log()
    assert rc == 0, log[-2000:]
    assert not _bird_running(bird), "BIRD outlived its daemon"
    if control:
        assert not listening and not any(x["established"] for x in sessions), (listening, sessions)
        assert {(x["state"], x["detail"]) for x in sessions} == {("Error", "No listening socket")}
    else:
        assert listening and all(x["established"] for x in sessions), (listening, sessions)
        assert "bgp: withdrawn" in log, log[-2000:]


def test_scitags_unit_start_stop(installed, lab):
    api = free_port()
    pipe = installed / "flowd"
    (installed / "etc" / "scitags.toml").write_text(
        f'[marking]\ninterfaces = [{{name = "eth0", netns = "{lab.hosts["b"].netns}"}}]\n'
        f'[pipe]\npath = "{pipe}"\n[api]\nlisten = "127.0.0.1:{api}"\n'
        f'[firefly]\nenabled = false\n[daemon]\nlock = "{installed}/scitags.lock"\n')
    sup = Supervisor(installed / "units" / "gridbpf-scitags.service", installed / "scitags.log",
                     extra_caps=("sys_admin",))     # setns into the lab, as for the balancer
    pid = sup.start()
    try:
        ids = program_ids(pid)
        assert ids and pipe.is_fifo() and sup.status == "marking"
        # a StoRM-style line on the pipe becomes a flow at once
        with open(pipe, "w") as f:
            f.write("start tcp fd00:2::11 443 fd00:2::2 50000 atlas default\n")
        for _ in range(50):
            flows = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{api}/flows", timeout=5).read())
            if flows["flows"]:
                break
            time.sleep(0.1)
        assert flows["flows"][0]["experiment"] == "atlas"
        tc = lab.hosts["b"].run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
        assert "bpf" in tc
    finally:
        rc = sup.stop()
    assert rc == 0, sup.log()[-2000:]
    assert not live_programs(ids)
    assert "bpf" not in lab.hosts["b"].run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert not pipe.exists()        # it made the pipe, it removes it


def write_as_nobody(area: Path, comm: str, name: str) -> bytes:
    """A file written by uid 65534 through a dd named COMM (the writer the checksums follow)."""
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(area / comm),
                    "if=/dev/urandom", f"of={area / name}", "bs=64k", "count=4", "status=none"], check=True)
    assert (area / name).stat().st_uid == 65534
    return (area / name).read_bytes()


def metric_value(port: int, line_start: str, timeout: float = 10) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        time.sleep(0.1)
    return None


def not_stored(port: int, timeout: float = 10) -> float | None:
    """Files whose value could not be stored, whatever its source (kernel, page cache, reread)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = sum(float(l.rsplit(" ", 1)[1]) for l in sup_metrics(port).splitlines()
                if l.startswith("gridbpf_checksum_files_total{") and 'status="not-stored"' in l)
        if n:
            return n
        time.sleep(0.1)
    return None


def sup_metrics(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_agent_unit_start_stop_checksums_and_bad_config(installed):
    tag = random.randint(1000, 9999)
    comm, writer = f"pkngx{tag}", f"pkwr{tag}"
    port = free_port()
    # a storage area another user writes to: the agent sets attributes on files it does not own
    area = Path(tempfile.mkdtemp(prefix="gb-pkarea-", dir="/tmp"))
    area.chmod(0o777)
    (area / writer).symlink_to(shutil.which("dd"))
    config = (f'[targets]\ncomm = ["{comm}"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
              f'[agent]\nlock = "{installed}/agent.lock"\ncollectors = ["stuck"]\n'
              f'[checksum]\npaths = ["{area}"]\ncomm = "{writer}"\n')
    stored = 'gridbpf_checksum_files_total{source="page-cache",status="stored"}'
    try:
        with Nginx(comm=comm) as n:
            (installed / "etc" / "agent.toml").write_text(config)
            sup = Supervisor(installed / "units" / "gridbpf-agent.service", installed / "agent.log")
            pid = sup.start()       # no extra capability: the unit's bounding set as shipped
            try:
                ids = program_ids(pid)
                assert ids
                c = http.client.HTTPConnection("127.0.0.1", n.port)
                c.request("GET", "/")
                c.getresponse().read()
                c.close()
                assert metric_value(port, 'http_server_request_duration_seconds_count{http_request_method="GET"') == 1
                data = write_as_nobody(area, writer, "f1.bin")
                assert metric_value(port, stored) == 1
                assert os.getxattr(area / "f1.bin", "user.storm.checksum.adler32").decode() == \
                    f"{zlib.adler32(data):08x}"
            finally:
                rc = sup.stop()
            assert rc == 0, sup.log()[-2000:]
            assert not live_programs(ids)
            # negative control: without CAP_DAC_OVERRIDE and CAP_FOWNER the attribute cannot be set
            weak = Supervisor(installed / "units" / "gridbpf-agent.service", installed / "agent-weak.log",
                              drop_caps=("dac_override", "fowner"))
            weak.start()
            try:
                write_as_nobody(area, writer, "f2.bin")
                notstored = not_stored(port)
                assert notstored == 1, (notstored, sup_metrics(port))
                assert metric_value(port, stored, timeout=0.5) is None
            finally:
                assert weak.stop() == 0
            assert "user.storm.checksum.adler32" not in os.listxattr(area / "f2.bin")
    finally:
        shutil.rmtree(area, ignore_errors=True)
    # a bad config fails the start with exit status 2, which the unit does not restart
    (installed / "etc" / "agent.toml").write_text('[targets]\ncomm = ["x"]\n[trace]\ncolour = 1\n')
    with pytest.raises(RuntimeError, match="exited with 2 before READY"):
        sup.start()
    assert not sup.should_restart()
    assert "trace.colour: unknown key" in sup.log()


class JvmAsNobody:
    """The JDK's HttpsServer (JSSE TLS, as StoRM WebDAV uses) run by uid 65534: the agent must
    load its Java agent into another user's JVM under the unit's capabilities."""

    def __init__(self):
        from gridbpf.trace.http.jvm_servers import JDK_HTTPS_SERVER, keystore
        self.dir = Path(tempfile.mkdtemp(prefix="gb-pkjvm-", dir="/tmp"))
        self.dir.chmod(0o755)
        (self.dir / "GbJdkHttps.java").write_text(JDK_HTTPS_SERVER)
        subprocess.run(["javac", "--release", "17", "-d", str(self.dir / "classes"),
                        str(self.dir / "GbJdkHttps.java")], check=True, capture_output=True)
        keystore(self.dir / "ks.p12").chmod(0o644)
        (self.dir / "root").mkdir()
        (self.dir / "root" / "f.txt").write_text("x" * 100)
        (self.dir / "logs").mkdir()
        os.chown(self.dir / "logs", 65534, 65534)
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "java", "-Xmx128m", "-cp",
             str(self.dir / "classes"), "GbJdkHttps", str(self.port), str(self.dir / "ks.p12"),
             str(self.dir / "root"), str(self.dir / "logs" / "access.log")],
            cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
        wait_port(self.port, timeout=60, proc=self.proc)

    def get(self) -> int:
        import ssl
        c = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=10,
                                        context=ssl._create_unverified_context())
        c.request("GET", "/f.txt")
        status = c.getresponse().status
        c.close()
        return status

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def agent_with_jvm(installed, jvm, port, drop_caps=()):
    (installed / "etc" / "agent.toml").write_text(
        f'[targets]\npid = [{jvm.proc.pid}]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
        f'[agent]\nlock = "{installed}/agent.lock"\n')
    return Supervisor(installed / "units" / "gridbpf-agent.service", installed / "agent-jvm.log",
                      drop_caps=drop_caps)


def test_agent_unit_reads_tls_of_another_users_jvm(installed):
    counted = 'http_server_request_duration_seconds_count{http_request_method="GET",http_response_status_code="200"'
    jvm = JvmAsNobody()
    try:
        port = free_port()
        sup = agent_with_jvm(installed, jvm, port)
        sup.start()
        try:
            n = 0
            deadline = time.monotonic() + 20
            while (metric_value(port, counted, timeout=0.2) or 0) < 1 and time.monotonic() < deadline:
                assert jvm.get() == 200      # the first requests may come before the agent is in
                n += 1
            assert (metric_value(port, counted, timeout=2) or 0) >= 1, sup.log()[-1500:]
            assert metric_value(port, "gridbpf_http_tls_unreadable_total") == 0
        finally:
            assert sup.stop() == 0
    finally:
        jvm.close()
    # negative control: a fresh JVM, the agent without the capabilities to act as its user
    # (chown of the agent's directory in the JVM's /tmp first): the agent runs, skips that JVM
    # with the reason in its log, and its TLS requests are counted as unreadable, never as 200s
    jvm = JvmAsNobody()
    try:
        port = free_port()
        sup = agent_with_jvm(installed, jvm, port, drop_caps=("chown", "setuid", "setgid", "kill"))
        try:
            sup.start()
            for _ in range(5):
                assert jvm.get() == 200
            deadline = time.monotonic() + 10
            while not metric_value(port, "gridbpf_http_tls_unreadable_total", timeout=0.2) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            assert metric_value(port, "gridbpf_http_tls_unreadable_total") >= 1, sup.log()[-1500:]
            assert not metric_value(port, counted, timeout=0.5)
            assert "cannot load the Java agent" in sup.log(), sup.log()[-1500:]
        finally:
            assert sup.stop() == 0
    finally:
        jvm.close()
