"""Userspace halves of request tracing: request-line and pipelining splits of kernel captures,
body sizes, route templates, target selection, the record layout from BTF, the trace CLI's
shared `trace` parser."""
import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from gridbpf.agent.routes import RouteError, Routes, compile_template
from gridbpf.bpf import BpfObject
from gridbpf.trace.cli import get_trace_subparsers
from gridbpf.trace.http.tracer import _body, _pipelined_bytes, F_PIPELINED, parse_request_line
from gridbpf.trace.targets import TargetError, TargetSpec, comm_of

token = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-_!#", min_size=1, max_size=12)
segment = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-~%", min_size=1, max_size=12)
path = st.lists(segment, min_size=0, max_size=5).map(lambda p: "/" + "/".join(p))


def request(method, p, headers=b"Host: x\r\n", body=b""):
    return f"{method} {p} HTTP/1.1\r\n".encode() + headers + b"\r\n" + body


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(token, path), min_size=1, max_size=4))
def test_pipelined_captures_split_per_request(reqs):
    """Whatever the methods and paths, the i-th pipelined request of one captured read gets its
    own method, path and size -- exactly the bytes of its header block."""
    blocks = [request(m, p) for m, p in reqs]
    cap = b"".join(blocks)
    assume(len(cap) <= 256)
    for i, (m, p) in enumerate(reqs):
        assert parse_request_line(cap, i) == (m, p, "HTTP/1.1")
        if i == 0:      # the kernel gave the first request every byte of the read
            assert _pipelined_bytes(cap, 0, len(cap), 0) == len(blocks[0])
        else:           # and the later ones none
            assert _pipelined_bytes(cap, i, 0, F_PIPELINED) == len(blocks[i])


@given(token, path, st.binary(max_size=300))
def test_body_size_after_header_block(method, p, body):
    head = request(method, p, body=body)
    cap = head[:256]
    expect = len(body) if len(request(method, p)) <= 256 else None
    assert _body(cap, len(head)) == expect


def test_agent_groups_a_batch_by_label_and_finds_head_ends():
    """The agent's batch grouping: one label per (request line, status), in the order of the
    label ids; the head end of each capture, its first CRLF CRLF (before the valid-length
    check, which record_array applies)."""
    from gridbpf.agent.daemon import HttpAgent
    agent = HttpAgent.__new__(HttpAgent)
    agent.routes = Routes(["/{vo}/{path}"])
    agent._reset_label_caches()
    caps = [b"GET /atlas/a HTTP/1.1\r\nHost: x\r\n\r\n", b"PUT /cms/b HTTP/1.1\r\nA: b\r\n\r\nbody",
            b"GET /atlas/c HTTP/1.1\r\nHost: x\r\n\r\n", b"FOO /x HTTP/1.1\r\nHost: x",
            b"GET /atlas/a HTTP/1.1\r\nHost: x\r\n\r\n"]
    statuses = [200, 201, 200, 0, 404]
    for _ in range(2):          # the second time from the caches
        keys, inv, ends = agent._group(caps, statuses)
        assert [keys[i] for i in inv] == [("GET", "200", "/{vo}/{path}"), ("PUT", "201", "/{vo}/{path}"),
                                          ("GET", "200", "/{vo}/{path}"), ("_OTHER", "", ""),
                                          ("GET", "404", "/{vo}/{path}")]
        assert ends.tolist() == [c.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in c else -1 for c in caps]
    # bounded: past LABEL_CACHE_MAX request lines the caches start again (before a batch)
    agent.LABEL_CACHE_MAX = 2
    full = agent._line_cache
    keys, inv, _ends = agent._group(caps, statuses)
    assert agent._line_cache is not full and len(agent._line_cache) <= 2 + len(caps)
    assert keys[inv[1]] == ("PUT", "201", "/{vo}/{path}") and keys[inv[3]] == ("_OTHER", "", "")


def test_request_line_longer_than_capture():
    cap = (b"PROPFIND /" + b"a" * 300 + b" HTTP/1.1\r\n")[:256]
    m, p, v = parse_request_line(cap)
    assert m == "PROPFIND" and p.endswith("...") and v == "?"


def test_routes():
    r = Routes(["/{vo}/{path}", "/static/{file}"])
    assert r.route("/atlas/rucio/data/f.root?x=1") == "/{vo}/{path}"
    assert r.route("/static/a.css") == "/{vo}/{path}"      # the first matching template wins
    assert Routes(["/static/{file}", "/{vo}/{path}"]).route("/static/a.css") == "/static/{file}"
    assert r.route("/atlas") == ""           # no raw path ever becomes a label
    assert compile_template("/a/{x}/b").match("/a/1/b") and not compile_template("/a/{x}/b").match("/a/1/2/b")
    with pytest.raises(RouteError):
        compile_template("atlas/{x}")
    with pytest.raises(RouteError):
        compile_template("/{x")


def test_targets_pid_children_comm_and_errors():
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess,sys,time; subprocess.Popen(['sleep','30']); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 5
        kids = []
        while not kids and time.monotonic() < deadline:
            kids = [int(p) for p in subprocess.run(["pgrep", "-P", str(parent.pid)],
                                                   capture_output=True, text=True).stdout.split()]
        assert kids
        assert set(kids) | {parent.pid} <= TargetSpec(pids=[parent.pid]).resolve()
        assert kids[0] in TargetSpec(comms=["sleep"]).resolve()
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)])
        parent.kill()
        parent.wait()
    # a later resolve reads only the processes it did not list before: a child born since is
    # found, one that exited is gone, a process born outside is not taken
    sh = subprocess.Popen(["sh", "-c", "sleep 30 & read x; sleep 31 & wait"], stdin=subprocess.PIPE)
    outside = None
    try:
        spec = TargetSpec(pids=[sh.pid])
        deadline = time.monotonic() + 5
        while len(first := spec.resolve()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        (early,) = first - {sh.pid}
        sh.stdin.write(b"go\n")
        sh.stdin.flush()
        outside = subprocess.Popen(["sleep", "32"])
        os.kill(early, signal.SIGKILL)
        while (len(now := spec.resolve()) != 2 or early in now) and time.monotonic() < deadline:
            time.sleep(0.05)
        (late,) = now - {sh.pid}
        assert late != early and comm_of(late) == "sleep" and outside.pid not in now
    finally:
        subprocess.run(["pkill", "-P", str(sh.pid)])
        for p in (sh, outside):
            if p:
                p.kill()
                p.wait()
    with pytest.raises(TargetError, match="no process with pid"):
        TargetSpec(pids=[2 ** 30]).validate()
    with pytest.raises(TargetError, match="no cgroup"):
        TargetSpec(cgroups=["/ht-none"]).validate()
    assert TargetSpec(comms=["a-very-long-command-name"]).comms == ["a-very-long-com"]


def test_event_layout_comes_from_btf():
    obj = BpfObject.open("http")
    dt = obj.btf.dtype("struct http_event")
    lay = obj.btf.layout(obj.btf.find("struct http_event").id)
    assert dt.itemsize == obj.btf.find("struct http_event").size
    for name, (off, size) in lay.items():
        if not name.startswith("_"):
            assert dt.fields[name][1] == off and dt.fields[name][0].itemsize == size
    obj.close()


def test_trace_subparsers_shared():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    a = get_trace_subparsers(sub)
    b = get_trace_subparsers(sub)
    assert a is b
    a.add_parser("http")
    b.add_parser("stuck")
    assert parser.parse_args(["trace", "stuck"]).trace_verb == "stuck"
