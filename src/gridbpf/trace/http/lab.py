"""Real HTTP servers on loopback for tests, benchmarks and the demo of request tracing.

nginx (Debian, WebDAV with dav-ext) with an access log we can compare against, the JDK's
com.sun.net.httpserver, and Python's http.server over TLS (libssl). Each runs in its own
temporary directory and is stopped by close().
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

DAV_MODULE = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"
# one line per request: what the tests compare the tracer against
ACCESS_FORMAT = "$request_method $request_uri $status $request_length $bytes_sent $connection"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _self_signed(cert: Path, key: Path) -> None:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)


class Server:
    def __init__(self, name: str):
        self.dir = Path(tempfile.mkdtemp(prefix=f"ht-{name}-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Nginx(Server):
    """nginx with WebDAV (PUT DELETE MKCOL COPY MOVE + PROPFIND OPTIONS) under ./root."""

    def __init__(self, workers: int = 1, access_log: bool = True, sendfile: bool = True,
                 comm: str | None = None, tls: bool = False, max_body: str = "0"):
        super().__init__("nginx")
        self.tls = tls
        ssl_conf = ""
        if tls:
            cert, key = self.dir / "cert.pem", self.dir / "key.pem"
            _self_signed(cert, key)
            ssl_conf = f"ssl_certificate {cert}; ssl_certificate_key {key};"
        binary = "nginx"
        if comm:
            # a copy under another name: selecting by comm then matches only this server
            binary = str(self.dir / comm)
            shutil.copy(shutil.which("nginx"), binary)
        self.root = self.dir / "root"
        self.root.mkdir()
        (self.dir / "tmp").mkdir()
        self.log = self.dir / "access.log"
        conf = self.dir / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""\
            load_module {DAV_MODULE};
            daemon off;
            user root;
            worker_processes {workers};
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/error.log warn;
            events {{ worker_connections 4096; }}
            http {{
                log_format gb '{ACCESS_FORMAT}';
                access_log {f"{self.log} gb" if access_log else "off"};
                sendfile {"on" if sendfile else "off"};
                keepalive_requests 1000000;
                client_body_temp_path {self.dir}/tmp;
                proxy_temp_path {self.dir}/tmp;
                fastcgi_temp_path {self.dir}/tmp;
                uwsgi_temp_path {self.dir}/tmp;
                scgi_temp_path {self.dir}/tmp;
                server {{
                    listen 127.0.0.1:{self.port}{" ssl" if tls else ""};
                    {ssl_conf}
                    root {self.root};
                    client_max_body_size {max_body};
                    location / {{
                        dav_methods PUT DELETE MKCOL COPY MOVE;
                        dav_ext_methods PROPFIND OPTIONS;
                        create_full_put_path on;
                        autoindex on;
                    }}
                }}
            }}
            """))
        self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, proc=self.proc)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(x) for x in out.stdout.split()]

    def access_lines(self) -> list[dict]:
        """The access log as dicts (nginx writes a line when the request is finished)."""
        out = []
        if not self.log.exists():
            return out
        for line in self.log.read_text().splitlines():
            method, uri, status, req_len, sent, conn = line.split(" ")
            out.append({"method": method, "path": uri, "status": int(status),
                        "request_bytes": int(req_len), "response_bytes": int(sent),
                        "connection": int(conn)})
        return out


JDK_SERVER = """\
import com.sun.net.httpserver.*;
import java.io.*;
import java.net.InetSocketAddress;
import java.util.concurrent.Executors;

public class GbHttp {
    public static void main(String[] a) throws Exception {
        HttpServer s = HttpServer.create(new InetSocketAddress("127.0.0.1", Integer.parseInt(a[0])), 128);
        s.createContext("/", ex -> {
            InputStream in = ex.getRequestBody();
            byte[] buf = new byte[65536];
            long got = 0;
            for (int n; (n = in.read(buf)) > 0; ) got += n;
            String m = ex.getRequestMethod();
            byte[] body = ("method=" + m + " path=" + ex.getRequestURI() + " got=" + got + "\\n").getBytes();
            int status = ex.getRequestURI().getPath().startsWith("/missing") ? 404 : 200;
            if (m.equals("HEAD")) { ex.sendResponseHeaders(status, -1); }
            else { ex.sendResponseHeaders(status, body.length); ex.getResponseBody().write(body); }
            ex.close();
        });
        s.setExecutor(Executors.newFixedThreadPool(4));
        s.start();
        System.out.println("listening");
    }
}
"""


class JdkServer(Server):
    """A JDK 17 com.sun.net.httpserver echoing the method, path and body size."""

    def __init__(self):
        super().__init__("jdk")
        src = self.dir / "GbHttp.java"
        src.write_text(JDK_SERVER)
        # java's single-file source launcher: no separate javac step
        self.proc = subprocess.Popen(["java", "-Xmx128m", str(src), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.dir)
        wait_port(self.port, timeout=60, proc=self.proc)


PY_HTTPS = """\
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _reply(self, body=b""):
        n = int(self.headers.get("Content-Length") or 0)
        got = self.rfile.read(n) if n else b""
        body = body or (f"{self.command} {self.path} got={len(got)}\\n").encode()
        self.send_response(404 if self.path.startswith("/missing") else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PROPFIND = do_MKCOL = _reply
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"""


class PythonHttps(Server):
    """Python's http.server over TLS (the ssl module links libssl) with a self-signed cert."""

    def __init__(self):
        super().__init__("pyhttps")
        self.cert, self.key = self.dir / "cert.pem", self.dir / "key.pem"
        _self_signed(self.cert, self.key)
        (self.dir / "srv.py").write_text(PY_HTTPS)
        self.proc = subprocess.Popen(["python3", str(self.dir / "srv.py"), str(self.port),
                                      str(self.cert), str(self.key)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(self.port, proc=self.proc)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"
