"""Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights, and the datapath's flow hash.

The table must be byte-identical on every balancer node for the same backends and weights, so
nothing here depends on the order backends were given, on Python's hash() or on the process:
backends are sorted by name, and each one's permutation comes from BLAKE2b of its name.
"""
from __future__ import annotations

import hashlib
import struct

import numpy as np

DEFAULT_SIZE = 65537


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _permutation(name: str, size: int) -> tuple[int, int]:
    """(offset, skip) of NAME's preference list: slot j is (offset + j * skip) % size."""
    d = hashlib.blake2b(name.encode(), digest_size=16, person=b"gridbpf-maglev").digest()
    h1, h2 = struct.unpack("<QQ", d)
    return h1 % size, h2 % (size - 1) + 1


def build_table(backends: dict[str, int], size: int = DEFAULT_SIZE) -> tuple[list[str], np.ndarray]:
    """Fill a Maglev table of SIZE slots (SIZE prime) from {name: weight}.

    Returns (names in table order, int32 array of SIZE indexes into names; -1 everywhere when no
    backend has a positive weight). Backends take turns as in Maglev; a backend of weight w takes
    a turn in w out of every w_max rounds (integer credits, so the result is exact and portable),
    which makes its share of slots proportional to its weight.
    """
    if not is_prime(size):
        raise ValueError(f"Maglev table size {size} is not prime")
    names = sorted(n for n, w in backends.items() if w > 0)
    table = np.full(size, -1, dtype=np.int32)
    if not names:
        return names, table
    weights = [int(backends[n]) for n in names]
    wmax = max(weights)
    perms = [_permutation(n, size) for n in names]
    cur = [p[0] for p in perms]
    skip = [p[1] for p in perms]
    credit = [0] * len(names)
    slots = [-1] * size              # a list: element access is much faster than numpy's here
    filled = 0
    order = range(len(names))
    while True:
        for i in order:
            credit[i] += weights[i]
            if credit[i] < wmax:
                continue
            credit[i] -= wmax
            c, s = cur[i], skip[i]
            while slots[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            slots[c] = i
            c += s
            cur[i] = c - size if c >= size else c
            filled += 1
            if filled == size:
                table[:] = slots
                return names, table


# --- the flow hash of lb.bpf.c (MurmurHash3 x86_32 over 10 words), vectorised -------------------

SEED = 0x67726964          # LB_HASH_SEED in lb.h
_M32 = np.uint64(0xFFFFFFFF)


def _rotl(x, r):
    return ((x << np.uint64(r)) | (x >> np.uint64(32 - r))) & _M32


def _mix(h, k):
    k = (k * np.uint64(0xCC9E2D51)) & _M32
    k = _rotl(k, 15)
    k = (k * np.uint64(0x1B873593)) & _M32
    h = h ^ k
    h = _rotl(h, 13)
    return (h * np.uint64(5) + np.uint64(0xE6546B64)) & _M32


def _final(h, length):
    h = h ^ np.uint64(length)
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & _M32
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & _M32
    h ^= h >> np.uint64(16)
    return h


def flow_hash(src: np.ndarray, dst: np.ndarray, sport: np.ndarray, dport: np.ndarray,
              proto: np.ndarray, no_sport: bool = False) -> np.ndarray:
    """Hashes of many flows at once, exactly as the datapath computes them.

    src, dst: (n, 16) uint8 arrays of addresses as on the wire (IPv4 in the first 4 bytes, the
    rest zero); sport, dport: ports as numbers; proto: IP protocol numbers.
    """
    words_src = np.ascontiguousarray(src, dtype=np.uint8).view("<u4").astype(np.uint64)
    words_dst = np.ascontiguousarray(dst, dtype=np.uint8).view("<u4").astype(np.uint64)
    n = words_src.shape[0]
    # ports are loaded from the packet as big-endian u16 read on a little-endian CPU
    sp = _bswap16(np.asarray(sport, dtype=np.uint64))
    dp = _bswap16(np.asarray(dport, dtype=np.uint64))
    ports = (dp << np.uint64(16)) | (np.zeros_like(sp) if no_sport else sp)
    h = np.full(n, SEED, dtype=np.uint64)
    for i in range(4):
        h = _mix(h, words_src[:, i])
    for i in range(4):
        h = _mix(h, words_dst[:, i])
    h = _mix(h, ports)
    h = _mix(h, np.asarray(proto, dtype=np.uint64))
    return _final(h, 40).astype(np.uint32)


def _bswap16(x):
    return ((x & np.uint64(0xFF)) << np.uint64(8)) | (x >> np.uint64(8))


def addr16(addr: str) -> bytes:
    """An address as the datapath keys it: 16 bytes, IPv4 in the first 4."""
    import ipaddress
    a = ipaddress.ip_address(addr)
    return a.packed if a.version == 6 else a.packed + bytes(12)
