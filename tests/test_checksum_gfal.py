"""The grid's own client (issue 13): gfal-copy uploads to nginx WebDAV with its temp path in a
separate directory on the same filesystem (a stock nginx buffers bodies in /var/lib/nginx/body),
followed by the real `gridbpf checksum watch` CLI. Every attribute must equal
`gfal-sum file://SOURCE ADLER32` and be there when gfal-copy returns.

The watcher runs with --realtime, as recommended where FTS asks for the checksum right after the
upload: at normal priority on this loaded 2-core VM it waited for a CPU for up to ~100 ms now and
then, longer than gfal-copy takes to exit after the 201.

The 1 GB upload is part of every run (about a minute here with the 1 GB source made and
summed; GRIDBPF_FAST=1 leaves it out while developing); bench/bench_checksum.py measures timings.
"""
import functools
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from gridbpf.checksum import xattr
from gridbpf.checksum.demo import DavServer
from gridbpf.checksum.scratchfs import Ext4Scratch

MiB = 1 << 20
SIZES = [0, 1, 4095, 64 * 1024 + 1, MiB, 8 * MiB + 3, 64 * MiB - 1]
SLOW = os.environ.get("GRIDBPF_FAST") != "1"       # with the 1 GB upload
SRC = os.path.join(os.path.dirname(__file__), "..", "src")
DAV = "PUT DELETE MKCOL COPY MOVE"



@pytest.fixture(scope="module")
def fs():
    with Ext4Scratch(4096 if SLOW else 1024, prefix="gridbpf-ck-gfal-") as fs:
        yield fs


@pytest.fixture(scope="module")
def sources():
    d = tempfile.mkdtemp(prefix="ck-gfal-src-", dir="/dev/shm")
    files = {}
    for size in SIZES + ([1000 * MiB] if SLOW else []):
        p = os.path.join(d, f"src-{size}")
        with open(p, "wb") as f:
            for off in range(0, size, 64 * MiB):
                f.write(os.urandom(min(64 * MiB, size - off)))
        files[size] = p
    yield files
    shutil.rmtree(d, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def gfal_sum(path: str) -> str:
    out = subprocess.run(["gfal-sum", f"file://{path}", "ADLER32"], check=True, capture_output=True,
                         text=True, timeout=300).stdout.split()
    return out[-1].lower().zfill(8)


class Watch:
    """`gridbpf checksum watch --json` as a subprocess; its lines, read as they come."""

    def __init__(self, *args):
        env = dict(os.environ, PYTHONPATH=SRC)
        self.proc = subprocess.Popen([sys.executable, "-m", "gridbpf", "checksum", "watch", "--json",
                                      "--realtime", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        first = self.proc.stdout.readline()
        assert first, self.proc.stderr.read()
        self.header = json.loads(first)
        self.rows = []

    def read(self, seconds=0.0):
        deadline = time.monotonic() + seconds
        while True:
            wait = max(0.0, deadline - time.monotonic())
            if not select.select([self.proc.stdout], [], [], wait)[0]:
                return self.rows
            line = self.proc.stdout.readline()
            if not line:
                return self.rows
            self.rows.append(json.loads(line))

    def row(self, path, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for r in self.read(0.1):
                if r.get("path") == path:
                    return r
        raise AssertionError(f"no row for {path}: {self.rows[-3:]}")

    def stop(self):
        self.proc.terminate()
        out, err = self.proc.communicate(timeout=30)
        self.rows += [json.loads(l) for l in out.splitlines() if l.strip()]
        return self.rows[-1].get("stats", {})


@pytest.fixture
def site(fs):
    """nginx with root DATA/root and body temp files in TEMP (beside it, same filesystem)."""
    base = tempfile.mkdtemp(prefix="site-", dir=fs.mountpoint)
    temp = os.path.join(base, "body")
    os.mkdir(temp)
    with DavServer(base, temp_dir=temp, methods=DAV) as dav:
        yield dav, temp
    shutil.rmtree(base, ignore_errors=True)


def upload(dav, src, name, source_url=None):
    dest = f"http://127.0.0.1:{dav.port}/data/{name}"
    r = subprocess.run(["gfal-copy", "-f", source_url or f"file://{src}", dest],
                       capture_output=True, text=True, timeout=600)
    # Read the attribute at once: FTS asks for it right after the upload (HEAD Want-Digest).
    path = str(dav.root / "data" / name)
    got = xattr.get(path) if r.returncode == 0 else None
    assert r.returncode == 0, r.stderr[-1000:]
    return path, got


@pytest.mark.parametrize("layout,sum_in", [("temp-beside", "page-cache"), ("temp-beside", "kernel"),
                                           ("temp-watched-too", "page-cache")])
def test_gfal_copy_uploads(site, sources, layout, sum_in):
    dav, temp = site
    watched = [str(dav.root)] + ([temp] if layout == "temp-watched-too" else [])
    w = Watch(*(a for d in watched for a in ("--path", d)), "--pid", str(dav.proc.pid),
              "--sum-in", sum_in)
    try:
        for size, src in sources.items():
            want = gfal_sum(src)
            path, at_return = upload(dav, src, f"f-{size}")
            assert at_return == want, (size, at_return, want)
            row = w.row(path)
            assert row["source"] == sum_in and row["reasons"] == [] and row["adler32"] == want, row
    finally:
        stats = w.stop()
    assert stats["waiting_for_rename"] == 0 and stats["ring_lost"] == 0, stats


def test_gfal_copy_between_two_nginx(site, sources, fs):
    """gfal-copy http -> http: gfal2 tries HTTP third-party copy (pull, then push); nginx does
    neither (COPY to another server: 400 and 500), so gfal2 falls back to streaming: GET from the
    source nginx, PUT into ours. The attribute is right when gfal-copy returns."""
    dav, _temp = site
    other = tempfile.mkdtemp(prefix="ck-gfal-other-", dir="/dev/shm")
    with DavServer(other, methods=DAV) as src_dav:
        w = Watch("--path", str(dav.root), "--pid", str(dav.proc.pid))
        try:
            for size in (0, 4095, 8 * MiB + 3):
                shutil.copy(sources[size], os.path.join(other, "root", f"s-{size}"))
                url = f"http://127.0.0.1:{src_dav.port}/s-{size}"
                path, at_return = upload(dav, None, f"tpc-{size}", source_url=url)
                assert at_return == gfal_sum(sources[size])
        finally:
            w.stop()
    shutil.rmtree(other, ignore_errors=True)


def test_gfal_copy_negative_control(site, sources):
    """--no-follow-renames: nginx's temp file beside the tree is not followed: no attribute
    (the rest of the suite shows it is the following that makes it right)."""
    dav, _temp = site
    w = Watch("--path", str(dav.root), "--pid", str(dav.proc.pid), "--no-follow-renames")
    try:
        path, at_return = upload(dav, sources[MiB], "nf")
        rows = w.read(1.0)
        assert at_return is None and xattr.get(path) is None
        assert [r for r in rows if r.get("path") == path] == []
    finally:
        w.stop()
