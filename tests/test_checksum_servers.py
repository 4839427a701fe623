"""Real writers: nginx WebDAV PUT (temp file, then rename) and a Java FileChannel writer like StoRM."""
import http.client
import os
import random
import shutil
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from conftest import gridbpf_cli
from gridbpf.checksum import Watcher, adler, xattr
from gridbpf.checksum.demo import DavServer, uploads
from gridbpf.checksum.targets import select

MiB = 1 << 20


def wait_results(w: Watcher, paths: set[str], timeout: float) -> dict:
    got, deadline = {}, time.monotonic() + timeout
    while not paths <= set(got):
        assert time.monotonic() < deadline, f"missing {len(paths - set(got))} results, e.g. {sorted(paths - set(got))[:3]}"
        for r in w.poll(100):
            got[r.path] = r
    return got


@pytest.fixture
def nginx():
    base = Path(tempfile.mkdtemp(prefix="ck-nginx-", dir="/dev/shm"))
    assert xattr.supported(base), "tmpfs without user xattrs (kernel < 6.6)"
    server = DavServer(base)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


def test_nginx_webdav_put_1gb_and_1000_small(nginx):
    with Watcher([str(nginx.base)], select(pid=nginx.proc.pid)) as w:
        conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=120)

        # 1 GB in 1 MiB pieces, each piece different; the expected value is computed as we send.
        block = bytearray(os.urandom(MiB))
        expected = 1
        conn.putrequest("PUT", "/big/one-gigabyte.bin")
        conn.putheader("Content-Length", str(1024 * MiB))
        conn.endheaders()
        for i in range(1024):
            block[0:8] = i.to_bytes(8, "little")
            conn.send(block)
            expected = zlib.adler32(block, expected)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 201
        big = str(nginx.base / "root/big/one-gigabyte.bin")
        r = wait_results(w, {big}, 60)[big]
        assert r.status == "stored" and r.source == w.followed_source, r
        assert r.adler32 == adler.fmt(expected) == xattr.get(big)

        # 1,000 small files on one keep-alive connection (sizes 0 B to 64 KiB).
        rng = random.Random(6)
        want = {}
        for i in range(1000):
            body = rng.randbytes(rng.choice([0, 1, rng.randrange(1, 65536)]))
            conn.request("PUT", f"/small/{i % 10}/f{i}.dat", body=body)
            resp = conn.getresponse()
            resp.read()
            assert resp.status in (201, 204)
            want[str(nginx.base / f"root/small/{i % 10}/f{i}.dat")] = adler.fmt(zlib.adler32(body))
        got = wait_results(w, set(want), 60)
        assert {p: got[p].adler32 for p in want} == want
        assert all(xattr.get(p) == v for p, v in want.items())
        sources = {got[p].source for p in want}
        assert sources == {w.followed_source}, [got[p] for p in want if got[p].source != w.followed_source][:3]
        stats = w.stats()
        for k in ("state_full", "files_full", "pending_full", "close_lost", "range_lost", "ring_lost"):
            assert stats[k] == 0, stats

    verify = gridbpf_cli("checksum", "verify", big, *want, check=False, timeout=300)
    assert verify.returncode == 0, verify.stdout[-2000:]
    assert verify.stdout.count("ok ") == 1001


JAVA_WRITER = """
import java.nio.ByteBuffer;
import java.nio.channels.FileChannel;
import java.nio.file.*;
import java.util.Random;
import java.util.zip.Adler32;

public class CkWriter {
    // Like StoRM WebDAV: write through a FileChannel with 1 MiB buffers to a temporary name,
    // close, then move to the final name.
    public static void main(String[] a) throws Exception {
        Path tmp = Paths.get(a[0]), fin = Paths.get(a[1]);
        long total = Long.parseLong(a[2]);
        ByteBuffer buf = ByteBuffer.allocateDirect(1 << 20);
        byte[] chunk = new byte[1 << 20];
        Random rnd = new Random(42);
        Adler32 sum = new Adler32();
        try (FileChannel ch = FileChannel.open(tmp, StandardOpenOption.CREATE,
                StandardOpenOption.WRITE, StandardOpenOption.TRUNCATE_EXISTING)) {
            for (long done = 0; done < total; ) {
                int n = (int) Math.min(chunk.length, total - done);
                rnd.nextBytes(chunk);
                sum.update(chunk, 0, n);
                buf.clear();
                buf.put(chunk, 0, n);
                buf.flip();
                while (buf.hasRemaining()) ch.write(buf);
                done += n;
            }
        }
        Files.move(tmp, fin, StandardCopyOption.ATOMIC_MOVE);
        System.out.printf("%08x%n", sum.getValue());
    }
}
"""


def test_java_filechannel_writer(tmp_path):
    src = tmp_path / "CkWriter.java"
    src.write_text(JAVA_WRITER)
    subprocess.run(["javac", "-d", str(tmp_path), str(src)], check=True, capture_output=True)
    root = Path(tempfile.mkdtemp(prefix="ck-java-", dir="/dev/shm"))
    try:
        (root / "upload").mkdir()
        tmp, final = root / "upload/.part-1", root / "upload/file.dat"
        with Watcher([str(root)], select(comm="java")) as w:
            out = subprocess.run(["java", "-cp", str(tmp_path), "CkWriter", str(tmp), str(final),
                                  str(64 * MiB + 12345)], check=True, capture_output=True, text=True)
            jvm_value = out.stdout.strip()
            r = wait_results(w, {str(final)}, 30)[str(final)]
        assert r.status == "stored" and r.source == w.followed_source, r
        assert r.adler32 == jvm_value == xattr.get(final) == adler.fmt(adler.file_adler32(final)[0])
        assert r.size == 64 * MiB + 12345
    finally:
        shutil.rmtree(root)


def test_demo_uploads():
    """What `make demo` shows: every upload's attribute right, from the kernel."""
    import io
    from rich.console import Console
    out = io.StringIO()
    assert uploads(Console(file=out, width=120), sizes=(0, 4096, 3 * MiB)) == 0
    table = out.getvalue()
    assert table.count("page-cache") == 3 and " NO " not in table
