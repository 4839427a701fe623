"""The extended attribute StoRM keeps its checksum in: get, store, verify."""
from __future__ import annotations

import errno
import os
import re

from . import adler

XATTR = "user.storm.checksum.adler32"
_FORMAT = re.compile(r"^[0-9a-f]{8}$")


def get(path: str | os.PathLike) -> str | None:
    """The stored value, or None when the file has no attribute. OSError for a missing file."""
    try:
        raw = os.getxattr(path, XATTR)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise
    return raw.decode("ascii", "replace")


def store(path: str | os.PathLike, value: int) -> None:
    os.setxattr(path, XATTR, adler.fmt(value).encode())


def verify(path: str | os.PathLike) -> dict:
    """Recompute the file's ADLER32 and compare it with the attribute."""
    stored = get(path)
    actual, size = adler.file_adler32(path)
    result = {"path": os.fspath(path), "size": size, "stored": stored, "actual": adler.fmt(actual)}
    if stored is None:
        result["status"] = "missing"
    elif not _FORMAT.match(stored):
        result["status"] = "malformed"
    else:
        result["status"] = "ok" if stored == adler.fmt(actual) else "mismatch"
    return result


def supported(directory: str | os.PathLike) -> bool:
    """True if files under DIRECTORY accept user extended attributes (tmpfs only since 6.6)."""
    import tempfile
    try:
        probe = tempfile.NamedTemporaryFile(dir=directory, prefix=".gridbpf-xattr-probe-")
    except OSError as e:
        raise OSError(f"{directory}: cannot create a file to probe extended attributes "
                      f"({e.strerror})") from None
    with probe as f:
        try:
            os.setxattr(f.name, "user.gridbpf.probe", b"1")
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                return False
            raise
    return True
