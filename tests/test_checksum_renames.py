"""Files written elsewhere on a watched filesystem and moved into a watched tree (issue 13).

On a scratch ext4 (a loop file): two watched trees A and B, and an unwatched directory U beside
them, as nginx's stock client_body_temp_path (/var/lib/nginx/body) lies beside its root.
"""
import os
import subprocess
import time
import zlib

import pytest

from gridbpf.checksum import Watcher, adler, xattr
from gridbpf.checksum.scratchfs import Ext4Scratch
from gridbpf.checksum.watcher import MOVED_IN_REASON

MiB = 1 << 20


@pytest.fixture(scope="module")
def fs():
    with Ext4Scratch(1024) as fs:
        for d in ("A", "B", "U"):
            os.mkdir(os.path.join(fs.mountpoint, d))
        yield fs


@pytest.fixture(scope="module", params=["ranges", "kernel"], ids=["page-cache-sum", "kernel-sum"])
def w(fs, request):
    m = fs.mountpoint
    with Watcher([f"{m}/A", f"{m}/B"], sum_mode=request.param) as w:
        yield w


_seen = {}


def wait_for(w, path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path in _seen:
            return _seen.pop(path)
        for r in w.poll(50):
            _seen[r.path] = r
    raise AssertionError(f"no result for {path}; stats {w.stats()}")


def written(path, size, seed=0):
    data = os.urandom(size)
    f = open(path, "wb")
    for i in range(0, size, MiB):
        f.write(data[i:i + MiB])
    return f, adler.fmt(zlib.adler32(data))


def check(w, r, path, want):
    assert r.status == "stored" and r.source == w.followed_source and not r.reasons, r
    assert r.adler32 == want == xattr.get(path)


def test_renamed_before_close_across_watched_trees(w, fs):
    """The issue's case: opened under A, renamed into B before close (used to wait forever)."""
    src, dst = f"{fs.mountpoint}/A/part", f"{fs.mountpoint}/B/final-1"
    f, want = written(src, 3 * MiB + 7)
    os.rename(src, dst)
    f.close()
    check(w, wait_for(w, dst), dst, want)
    assert w.stats()["waiting_for_rename"] == 0


def test_renamed_before_close_from_unwatched_dir(w, fs):
    """nginx: body buffered in a temp file beside the tree, renamed in, then closed."""
    src, dst = f"{fs.mountpoint}/U/0000000001", f"{fs.mountpoint}/A/final-2"
    f, want = written(src, 9 * MiB + 3)
    os.rename(src, dst)
    f.close()
    check(w, wait_for(w, dst), dst, want)


def test_renamed_after_close_from_unwatched_dir(w, fs):
    """Written and closed outside the trees, moved in afterwards (StoRM-like temp then move)."""
    src, dst = f"{fs.mountpoint}/U/upload.tmp", f"{fs.mountpoint}/B/final-3"
    f, want = written(src, 65537)
    f.close()
    time.sleep(0.2)
    assert w.poll(50) == []          # outside the trees: nothing to store yet
    os.rename(src, dst)
    check(w, wait_for(w, dst), dst, want)


def test_directory_moved_in(w, fs):
    """A directory of finished files moved into a tree: each file gets its attribute."""
    d = f"{fs.mountpoint}/U/dataset-{w.sum_mode}"
    os.makedirs(f"{d}/sub")
    want = {}
    for name, size in (("a", 0), ("sub/b", 70_000)):
        f, want[name] = written(f"{d}/{name}", size)
        f.close()
    dst = f"{fs.mountpoint}/B/dataset-{w.sum_mode}"
    os.rename(d, dst)
    for name, value in want.items():
        check(w, wait_for(w, f"{dst}/{name}"), f"{dst}/{name}", value)


def test_renamed_after_close_across_watched_trees(w, fs):
    src, dst = f"{fs.mountpoint}/A/t.part", f"{fs.mountpoint}/B/final-4"
    f, want = written(src, 4095)
    f.close()
    r = wait_for(w, src)                      # stored under its first name ...
    assert r.adler32 == want
    os.rename(src, dst)                       # ... the attribute moves with the inode
    assert xattr.get(dst) == want
    time.sleep(MOVED_IN_DELAY_WAIT)
    w.poll(50)
    assert dst not in _seen                   # nothing to redo


MOVED_IN_DELAY_WAIT = 0.5


def test_unlinked_temp_outside_is_dropped_quietly(w, fs):
    p = f"{fs.mountpoint}/U/discarded"
    f, _ = written(p, 1000)
    os.unlink(p)
    f.close()
    before = w.stats()["outside_unlinked"]
    deadline = time.monotonic() + 5
    while w.stats()["outside_unlinked"] == before:
        assert w.poll(50) == [] and time.monotonic() < deadline


def test_file_written_before_watch_moved_in(fs):
    """Not followed (written before we started): read here on its move in, and marked so."""
    src, dst = f"{fs.mountpoint}/U/old", f"{fs.mountpoint}/A/old-moved-in"
    f, want = written(src, 100_000)
    f.close()
    with Watcher([f"{fs.mountpoint}/A"]) as w:
        subprocess.run(["mv", src, dst], check=True)
        r = wait_for(w, dst)
    assert r.source == "userspace" and r.reasons == [MOVED_IN_REASON] and r.status == "stored", r
    assert r.adler32 == want == xattr.get(dst)


def test_negative_control_without_following(fs):
    """--no-follow-renames: the temp file beside the tree is not followed; no attribute."""
    src, dst = f"{fs.mountpoint}/U/nf", f"{fs.mountpoint}/A/not-followed"
    with Watcher([f"{fs.mountpoint}/A"], follow_renames=False) as w:
        f, _ = written(src, 2 * MiB)
        os.rename(src, dst)
        f.close()
        deadline, got = time.monotonic() + 2, []
        while time.monotonic() < deadline:
            got += w.poll(50)
    assert [r for r in got if r.path == dst] == []
    assert xattr.get(dst) is None
