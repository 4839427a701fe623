"""ADLER32 arithmetic in userspace: combining ranges summed in the kernel, and reading files."""
from __future__ import annotations

import os
import zlib

try:            # zlib-ng's adler32 is SIMD (AVX2/AVX-512/NEON): 10-30x Debian zlib's
    from zlib_ng.zlib_ng import adler32 as fast_adler32
except ImportError:             # pragma: no cover - zlib-ng is a dependency
    fast_adler32 = zlib.adler32

BASE = 65521
READ_SIZE = 4 << 20


def combine(adler1: int, adler2: int, len2: int) -> int:
    """ADLER32 of A followed by B, from adler32(A), adler32(B) and len(B) (zlib's adler32_combine).

    With a = 1 + sum of bytes and b = sum of the running a's: appending B adds sum(B) to a and,
    for b, the b of B plus len(B) times everything A contributed to a (a1 - 1).
    """
    a1, b1 = adler1 & 0xFFFF, adler1 >> 16
    a2, b2 = adler2 & 0xFFFF, adler2 >> 16
    a = (a1 + a2 - 1) % BASE
    b = (b1 + b2 + len2 * (a1 - 1)) % BASE
    return b << 16 | a


class NotTiled(ValueError):
    """The ranges do not cover [0, size) exactly once."""


def combine_ranges(ranges: list[tuple[int, int, int]], size: int) -> int:
    """ADLER32 of a file of SIZE bytes from (start, length, adler32) ranges that must tile it."""
    value, pos = 1, 0
    for start, length, adler in sorted(r for r in ranges if r[1] > 0):
        if start != pos:
            raise NotTiled(f"{'gap' if start > pos else 'overlap'} at byte {min(start, pos)}")
        value = combine(value, adler, length)
        pos += length
    if pos != size:
        raise NotTiled(f"ranges end at byte {pos}, file has {size}")
    return value


def file_adler32(path: str | os.PathLike, adler32=fast_adler32) -> tuple[int, int]:
    """(ADLER32, size) of the file's content, read in 4 MiB blocks (ADLER32: zlib-ng's SIMD one;
    benchmarks pass zlib.adler32, the speed of java.util.zip.Adler32's kind)."""
    value, size = 1, 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while n := f.readinto(buf):
            value = adler32(view[:n], value)
            size += n
    return value, size


def fmt(value: int) -> str:
    """StoRM's form: 8 lowercase hexadecimal digits, zero-padded."""
    return f"{value & 0xFFFFFFFF:08x}"
