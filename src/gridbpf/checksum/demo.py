"""Checksums of WebDAV uploads, for `make demo`: nginx on loopback takes PUTs (temporary file,
then rename, like StoRM), the kernel sums what nginx writes, the attribute appears on close.

    from gridbpf.checksum.demo import uploads
    uploads(console)                   # own nginx on 127.0.0.1, a few files, a table
"""
from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

from . import adler, xattr
from .targets import select
from .watcher import Watcher

DAV_MODULE = "/usr/lib/nginx/modules/ngx_http_dav_ext_module.so"


class DavServer:
    """nginx with WebDAV PUT into BASE/root; request bodies are buffered in BASE/tmp, so both the
    temporary file and the final name lie under BASE (the directory to watch). With TEMP_DIR,
    they are buffered there instead, as in a stock nginx (/var/lib/nginx/body)."""

    def __init__(self, base: str | os.PathLike, addr: str = "127.0.0.1",
                 temp_dir: str | os.PathLike | None = None, methods: str = "PUT DELETE MKCOL"):
        self.base = Path(base)
        self.root = self.base / "root"
        with socket.socket() as s:
            s.bind((addr, 0))
            self.port = s.getsockname()[1]
        (self.base / "root").mkdir(exist_ok=True)
        (self.base / "tmp").mkdir(exist_ok=True)
        conf = self.base / "nginx.conf"
        temp = temp_dir or self.base / "tmp"
        temp_paths = "".join(f"{k}_temp_path {temp}; "
                             for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(textwrap.dedent(f"""\
            load_module {DAV_MODULE};
            daemon off;
            user root;
            worker_processes 1;
            pid {self.base}/nginx.pid;
            error_log {self.base}/error.log warn;
            events {{ worker_connections 256; }}
            http {{
                access_log off;
                {temp_paths}
                keepalive_requests 100000;
                server {{
                    listen {addr}:{self.port};
                    root {self.base}/root;
                    client_max_body_size 0;
                    location / {{
                        dav_methods {methods};
                        create_full_put_path on;
                    }}
                }}
            }}
            """))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(self.base)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((addr, self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode()[-500:]}")
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("nginx did not start listening")
                time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def uploads(console, sizes=(0, 1, 4096, 1 << 20, 64 << 20)) -> int:
    """PUT one file of each size, show what the kernel computed; returns the number of mismatches."""
    from rich.table import Table
    base = tempfile.mkdtemp(prefix="gridbpf-demo-ck-", dir="/dev/shm")
    bad = 0
    try:
        with DavServer(base) as dav, Watcher([base], select(pid=dav.proc.pid)) as w:
            conn = http.client.HTTPConnection("127.0.0.1", dav.port, timeout=60)
            want, got = {}, {}
            for i, size in enumerate(sizes):
                body = os.urandom(size)
                conn.request("PUT", f"/uploads/file-{i}.dat", body=body)
                conn.getresponse().read()
                path = os.path.join(base, "root", "uploads", f"file-{i}.dat")
                want[path] = adler.fmt(zlib.adler32(body))
                deadline = time.monotonic() + 30
                while path not in got and time.monotonic() < deadline:
                    for r in w.poll(20):
                        got[r.path] = r
            table = Table("uploaded file", "bytes", "adler32 (xattr)", "source", "close->stored", "right")
            for path, value in want.items():
                r = got.get(path)
                stored = xattr.get(path)
                ok = r is not None and stored == value
                bad += not ok
                table.add_row(os.path.basename(path), str(os.path.getsize(path)), stored or "-",
                              r.source if r else "-",
                              f"{r.close_to_stored_ms:.2f} ms" if r and r.close_to_stored_ms else "-",
                              "yes" if ok else "NO")
            console.print(table)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return bad


if __name__ == "__main__":
    from rich.console import Console
    raise SystemExit(1 if uploads(Console()) else 0)
