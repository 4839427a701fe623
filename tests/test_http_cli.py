"""`gridbpf trace http`: lines and JSON from a real server, bad input in one line, a target that
exits mid-trace, processes started after the tracer (by comm), nothing left attached."""
import http.client
import json
import random
import subprocess
import sys
import time

from gridbpf.trace.http.lab import Nginx, PythonHttps

CLI = [sys.executable, "-m", "gridbpf.cli", "trace", "http"]


def http_links():
    """BPF links of our programs still in the kernel (none may stay after the CLI exits)."""
    out = subprocess.run(["bpftool", "link", "show", "--json"], capture_output=True, text=True)
    progs = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True)
    ours = {p["id"] for p in json.loads(progs.stdout or "[]")
            if p.get("name", "").startswith("http_")}
    return [l for l in json.loads(out.stdout or "[]") if l.get("prog_id") in ours]


def test_unknown_pid_one_line():
    r = subprocess.run(CLI + ["--pid", "999999999"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == "gridbpf: no process with pid 999999999"


def test_unknown_cgroup_and_no_target_one_line():
    r = subprocess.run(CLI + ["--cgroup", "/ht-no-such-cgroup"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no cgroup /ht-no-such-cgroup" in r.stderr
    r = subprocess.run(CLI, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no target given" in r.stderr


def test_no_permission_one_line():
    # root without CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN: a clear refusal, not a traceback
    r = subprocess.run(["setpriv", "--bounding-set=-bpf,-perfmon,-sys_admin", *CLI,
                        "--pid", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("gridbpf: tracing needs root")
    assert len(r.stderr.strip().splitlines()) == 1


def started(p):
    """Wait for the CLI's 'tracing ...' line: attached from then on."""
    line = p.stderr.readline()
    assert line.startswith("gridbpf: tracing "), line
    return line


def test_json_lines_and_target_exit_mid_trace():
    n = Nginx()
    try:
        p = subprocess.Popen(CLI + ["--pid", str(n.pid), "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert str(n.pid) in started(p)
        c = http.client.HTTPConnection("127.0.0.1", n.port)
        for path in ("/", "/nothing-here"):
            c.request("GET", path)
            c.getresponse().read()
        c.close()
        time.sleep(0.5)
    finally:
        n.close()           # the target exits while traced
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    lines = [json.loads(l) for l in out.splitlines()]
    assert [(l["method"], l["path"], l["status"]) for l in lines] == \
        [("GET", "/", 200), ("GET", "/nothing-here", 404)]
    assert all(l["pid"] != n.pid and l["client"] == "127.0.0.1" for l in lines)
    errs = err.strip().splitlines()
    assert errs[0] == f"gridbpf: target pid {n.pid} exited"     # (after the 'tracing' line)
    summary = json.loads(errs[-1])["summary"]
    assert summary["requests"] == 2 and summary["events_lost"] == 0
    # the kernel frees a dead process's links asynchronously: give it a moment
    deadline = time.monotonic() + 3
    while http_links() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert http_links() == []


def test_comm_picks_up_process_started_later():
    comm = f"htngx{random.randint(1000, 9999)}"
    p = subprocess.Popen(CLI + ["--comm", comm, "--count", "3"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert "none yet" in started(p)
        with Nginx(comm=comm) as n:
            (n.root / "x").write_text("x")
            c = http.client.HTTPConnection("127.0.0.1", n.port)
            for _ in range(3):
                c.request("HEAD", "/x")
                c.getresponse().read()
            c.close()
            out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    lines = out.splitlines()
    assert len(lines) == 3 and all(" HEAD /x HTTP/1.1 200 " in l for l in lines), out


def test_https_line_marked_tls():
    with PythonHttps() as srv:
        p = subprocess.Popen(CLI + ["--pid", str(srv.pid), "--count", "1"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        started(p)
        subprocess.run(["curl", "-sk", f"{srv.url}/secret/path"], check=True, capture_output=True)
        out, err = p.communicate(timeout=30)
    assert " GET /secret/path HTTP/1.1 200 " in out and out.rstrip().endswith(" tls"), (out, err)


def test_cgroup_picks_up_process_started_later():
    from gridbpf.trace.targets import CGROUP_ROOT
    name = f"ht-test-{random.randint(1000, 9999)}"
    cg = CGROUP_ROOT / name
    cg.mkdir()
    srv = None
    try:
        p = subprocess.Popen(CLI + ["--cgroup", f"/{name}", "--count", "2", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started(p)
        from gridbpf.trace.http.lab import free_port, wait_port
        port = free_port()
        # the server joins the cgroup, then execs: the exec hook makes it a target
        srv = subprocess.Popen(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && exec {sys.executable} "
                                f"-m http.server --bind 127.0.0.1 {port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        wait_port(port)
        for path in ("/", "/nope"):
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}{path}"],
                           check=True)
        out, err = p.communicate(timeout=30)
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        p.kill()
        time.sleep(0.1)
        cg.rmdir()
    lines = [json.loads(l) for l in out.splitlines()]
    assert [(l["path"], l["status"], l["pid"]) for l in lines] == [("/", 200, srv.pid),
                                                                   ("/nope", 404, srv.pid)]
