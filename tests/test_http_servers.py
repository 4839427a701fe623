"""Request tracing of a JDK 17 com.sun.net.httpserver, a Python HTTPS server (libssl uprobes),
and a JVM serving TLS (reported as unreadable, never faked)."""
import socket
import ssl
import subprocess
import sys
import time

import pytest

from gridbpf.trace.http.tracer import HttpTracer
from gridbpf.trace.http.jvm_servers import JdkHttps
from gridbpf.trace.http.lab import JdkServer, PythonHttps
from gridbpf.trace.targets import TargetSpec

# method, path, body size
STEPS = [("GET", "/a", 0), ("PUT", "/vo/file.bin", 300_000), ("HEAD", "/h", 0),
         ("PROPFIND", "/vo/", 0), ("MKCOL", "/vo/new/", 0), ("DELETE", "/vo/file.bin", 0),
         ("GET", "/missing/x", 0)]


class RawClient:
    """HTTP/1.1 over one keep-alive connection, counting the exact bytes sent and received."""

    def __init__(self, port, tls=False):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if tls:
            s = ssl._create_unverified_context().wrap_socket(s)
        self.s, self.buf = s, b""

    def request(self, method, path, body_len):
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {body_len}\r\n"
                f"\r\n").encode()
        self.s.sendall(head + b"b" * body_len)
        # response: headers, then Content-Length bytes (none for HEAD)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        end = self.buf.index(b"\r\n\r\n") + 4
        headers = self.buf[:end].decode("latin-1")
        status = int(headers.split(" ", 2)[1])
        length = 0
        for line in headers.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.lower() == "content-length":
                length = int(v)
        if method == "HEAD":
            length = 0
        while len(self.buf) < end + length:
            self.buf += self._recv()
        self.buf = self.buf[end + length:]
        return {"method": method, "path": path, "status": status,
                "request_bytes": len(head) + body_len, "response_bytes": end + length,
                "request_body_bytes": body_len, "response_body_bytes": length}

    def _recv(self):
        d = self.s.recv(65536)
        if not d:
            raise ConnectionError("server closed")
        return d

    def close(self):
        self.s.close()


def drain(tracer, n, timeout=10.0):
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += tracer.poll(100)
    return out


def run_steps(port, tls):
    c = RawClient(port, tls)
    want = [c.request(m, p, n) for m, p, n in STEPS]
    c.close()
    return want


def check(reqs, want, pid, tls):
    got = [{"method": r.method, "path": r.path, "status": r.status,
            "request_bytes": r.request_bytes, "response_bytes": r.response_bytes,
            "request_body_bytes": r.request_body_bytes, "response_body_bytes": r.response_body_bytes}
           for r in reqs]
    assert got == want
    for r in reqs:
        assert r.pid == pid and r.tls == tls and r.version == "HTTP/1.1"
        assert r.ttfb is not None and 0 <= r.ttfb <= r.duration


@pytest.fixture(scope="module")
def jdk():
    with JdkServer() as s:
        yield s


# every WebDAV method and an arbitrary token method: no allow-list anywhere
JDK_STEPS = STEPS + [("PROPPATCH", "/vo/file.bin", 120), ("LOCK", "/vo/file.bin", 200),
                     ("UNLOCK", "/vo/file.bin", 0), ("COPY", "/vo/a", 0), ("MOVE", "/vo/b", 0),
                     ("OPTIONS", "/", 0), ("X-GRID-REPLICATE", "/vo/c", 10)]


def test_jdk17_httpserver(jdk):
    with HttpTracer(TargetSpec(pids=[jdk.pid])) as t:
        c = RawClient(jdk.port)
        want = [c.request(m, p, n) for m, p, n in JDK_STEPS]
        c.close()
        reqs = drain(t, len(want))
        stats = t.stats()
    check(reqs, want, jdk.pid, tls=False)
    assert [r.method for r in reqs] == [m for m, _, _ in JDK_STEPS]
    # the JDK server reads on one thread and answers on pool threads: tids are real threads
    assert all(r.tid != 0 for r in reqs)
    assert stats["events_lost"] == 0


def test_python_https_through_libssl():
    with PythonHttps() as srv, HttpTracer(TargetSpec(pids=[srv.pid])) as t:
        assert any("libssl" in lib for lib in t.ssl_libs), "libssl of the target hooked"
        want = run_steps(srv.port, tls=True)
        reqs = drain(t, len(want))
        stats = t.stats()
    check(reqs, want, srv.pid, tls=True)
    assert stats["tls_connections"] == 1 and stats["ssl_unlinked"] == 0
    assert not t.warnings


def test_jvm_tls_reported_unreadable():
    """The negative control of test_http_jvm_tls.py: without the Java agent a JVM's TLS is
    counted and reported unreadable, never parsed."""
    with JdkHttps() as srv, HttpTracer(TargetSpec(pids=[srv.pid]), java_agent=False) as t:
        for name in ("x", "y"):
            (srv.root / name).write_text("ok\n")
        out = subprocess.run(["curl", "-sk", f"{srv.url}/x", f"{srv.url}/y"], capture_output=True,
                             text=True, timeout=30)
        assert out.stdout == "ok\nok\n"
        reqs = []
        deadline = time.monotonic() + 5
        while not t.warnings and time.monotonic() < deadline:
            reqs += t.poll(100)
        reqs += t.poll(200)
        stats = t.stats()
    # the ciphertext is never parsed as requests, and the user is told why nothing shows
    assert reqs == []
    assert stats["tls_connections"] >= 1
    assert any("JVM serving TLS" in w and str(srv.pid) in w for w in t.warnings), t.warnings


NULL_ACCEPT_SERVER = r"""
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
ls = socket.socket(socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET)
ls.bind((sys.argv[3], int(sys.argv[1]))); ls.listen(8)
print("ready", flush=True)
while True:
    fd = libc.accept(ls.fileno(), None, None)      # no sockaddr: the tracer must find the peer
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = os.read(fd, 4096)
        if not d:
            break
        buf += d
    os.write(fd, b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    os.close(fd)
"""


@pytest.mark.parametrize("family,addr", [("4", "127.0.0.1"), ("6", "::1")])
def test_client_address_when_accept_has_no_sockaddr(tmp_path, family, addr):
    from gridbpf.trace.http.lab import free_port
    port = free_port()
    (tmp_path / "srv.py").write_text(NULL_ACCEPT_SERVER)
    srv = subprocess.Popen([sys.executable, str(tmp_path / "srv.py"), str(port), family, addr],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout.readline().strip() == "ready"
        with HttpTracer(TargetSpec(pids=[srv.pid])) as t:
            s = socket.create_connection((addr, port))
            s.sendall(b"DELETE /x HTTP/1.1\r\nHost: h\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 204")
            local = s.getsockname()
            s.close()
            reqs = drain(t, 1)
    finally:
        srv.kill()
        srv.wait()
    assert len(reqs) == 1
    r = reqs[0]
    assert (r.method, r.path, r.status) == ("DELETE", "/x", 204)
    assert (r.client, r.port) == (addr, local[1])
