"""A scratch ext4 filesystem in a loop file, for tests, benchmarks and trials of the watcher.

    with Ext4Scratch(size_mib=2048) as fs:   # mkfs.ext4 on a sparse file in a temp dir, mount it
        fs.mountpoint                         # a real ext4 (user xattrs, page cache, fsync)
    # unmounted, loop device released, temp dir removed

A filesystem of its own keeps "anywhere on the watched filesystem" to files we write.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile


class Ext4Scratch:
    def __init__(self, size_mib: int = 2048, parent: str = "/var/tmp", prefix: str = "gridbpf-ext4-"):
        self.size_mib = size_mib
        self.parent = parent
        self.prefix = prefix
        self.base: str | None = None
        self.mountpoint: str | None = None

    def __enter__(self) -> "Ext4Scratch":
        self.base = tempfile.mkdtemp(prefix=self.prefix, dir=self.parent)
        try:
            image = os.path.join(self.base, "fs.img")
            with open(image, "wb") as f:
                f.truncate(self.size_mib << 20)             # sparse: costs what is written
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                            image], check=True, capture_output=True)
            self.mountpoint = os.path.join(self.base, "mnt")
            os.mkdir(self.mountpoint)
            subprocess.run(["mount", "-o", "loop", image, self.mountpoint], check=True,
                           capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.mountpoint and os.path.ismount(self.mountpoint):
            subprocess.run(["umount", self.mountpoint], capture_output=True)   # frees the loop device
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
        self.base = self.mountpoint = None

    def settle(self) -> None:
        """Write everything back and drop the image file's pages from the page cache (a loop
        device caches its data twice: in the filesystem and in the backing file): the next
        writer then finds memory as the previous one did, with no reclaim to do in its place."""
        os.sync()
        fd = os.open(os.path.join(self.base, "fs.img"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class TmpfsScratch:
    """A tmpfs of its own (user xattrs need Linux 6.6+): files written elsewhere in /dev/shm by
    other processes are then not on the watched filesystem."""

    def __init__(self, size_mib: int = 2048, parent: str = "/var/tmp", prefix: str = "gridbpf-tmpfs-"):
        self.size_mib, self.parent, self.prefix = size_mib, parent, prefix
        self.mountpoint: str | None = None

    def __enter__(self) -> "TmpfsScratch":
        self.mountpoint = tempfile.mkdtemp(prefix=self.prefix, dir=self.parent)
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mib}m", "tmpfs",
                            self.mountpoint], check=True, capture_output=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.mountpoint and os.path.ismount(self.mountpoint):
            subprocess.run(["umount", self.mountpoint], capture_output=True)
        if self.mountpoint:
            shutil.rmtree(self.mountpoint, ignore_errors=True)
        self.mountpoint = None
