"""Streaming requests to stdout at a bounded cost: `gridbpf trace http` on a busy server.

On these 2-core machines every microsecond the CLI spends per printed request is taken from the
server it watches. So a drained batch becomes lines (JSON or text) straight from its numpy
columns (no Request objects, no dicts, no json.dumps per request): the strings of a request
line, a client address and a flag set are encoded once and cached. A text line is one %-format
of integers and cached fragments; a JSON line is joined from fragments made once per
connection and per response in the batch (records grouped with numpy) and cached 3-digit
strings (where most responses differ, from pieces of each: its numbers as 3-digit strings of
tables), so no integer is formatted per request. The lines of a batch leave in one write, from
a thread, so a slow reader never stalls the drain: what does not fit its queue is counted and
said in the stream.
"""
from __future__ import annotations

import json
import os
import threading
import time
from json.encoder import encode_basestring_ascii as _json_str   # = json.dumps(str), in C

import numpy as np

from .tracer import (EV_REQUEST, F_PIPELINED, F_TLS, FLAG_NAMES, HttpTracer, _client,
                     parse_request_line, response_body_sizes)

_CACHE_MAX = 50_000       # distinct request lines (or clients) kept encoded; then start over

# JSON: a line is joined from pieces: the fragments of its connection (with the second of its
# time), made once per batch, the fraction digits as 3-digit strings of _DIGITS3, and its
# response (request line, status, sizes, flags, the whole seconds of duration and ttfb): 3
# fragments made once per batch where responses repeat, else ~20 pieces of its own, the numbers
# as 3-digit strings of tables (_numbers). Formatting an int costs ~0.1 us here, a %-field
# ~40 ns, a piece of a join ~5 ns.
_JSON_CONN = '{"time":%d.\0,"pid":%d,"tid":%d,"client":%s,"port":%d,'
_JSON_RESP = ('%s,"status":%d,"request_bytes":%d,"response_bytes":%d,"duration":%d.\0%s'
              '\0,%s,"request_body_bytes":%s,"response_body_bytes":%s}')
# text: Request.line(); durations in milliseconds to the microsecond
_TEXT_TEMPLATES = ["%s.%03d pid=%d tid=%d %s:%d %s %s req=%d resp=%d dur=%d.%03dms ttfb="
                   + ("%d.%03dms" if code & 4 else "-%.0s%.0s") + "%s" for code in range(8)]
# [1000]: no ttfb; [1001 + i]: the last digits of duration, then the key of ttfb
_DIGITS3 = np.array(["%03d" % i for i in range(1000)] + [""]
                    + ['%03d,"ttfb":' % i for i in range(1000)], object)
# the numbers of a response (see _numbers): status, request and response bytes, the whole
# seconds of duration and ttfb, request and response body bytes: (the text that follows,
# null, how many 3-digit strings)
_NUMBERS = [(',"request_bytes":', None, 2), (',"response_bytes":', None, 3),
            (',"duration":', None, 3), (".", None, 1), (".", "null", 1),
            (',"response_body_bytes":', 'null,"response_body_bytes":', 3), ("}", "null}", 3)]
_LEAD = np.array([str(i) for i in range(1000)] + ["%03d" % i for i in range(1000)] + [""], object)
# [2002 k + i]: the last 3 digits of number k and the text that follows (+1000: 0-padded);
# [2002 k + 2000]: that text alone (after a number formatted whole), [2002 k + 2001]: null
_LAST = np.array([t for follow, null, _c in _NUMBERS for t in [f"{i}{follow}" for i in range(1000)]
                  + [f"{i:03d}{follow}" for i in range(1000)] + [follow, null]], object)
_LIMITS = np.array([[1000 ** c] for _f, _n, c in _NUMBERS], np.int64)
_OFFSETS = np.arange(0, 2002 * len(_NUMBERS), 2002)[:, None]
_MIX = np.arange(1, 80, 2, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # a row's hash
_MASKS = np.array([(1 << 8 * k) - 1 for k in range(9)], np.uint64)  # the first k bytes of a u64


def _rows(col: np.ndarray) -> np.ndarray:
    """A fixed-size bytes column as an (n, width) uint8 array."""
    col = np.ascontiguousarray(col)
    return col.view(np.uint8).reshape(len(col), -1)


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first record of each group, group of each record) of the equal rows of KEYS ((n, m)
    uint64): rows sorted by a hash, a group ends where a row differs from the previous one.
    Exact whatever the hash: rows that collide only split a group (a fragment made twice)."""
    order = np.einsum("ij,j->i", keys, _MIX[:keys.shape[1]]).argsort(kind="stable")  # (wraps)
    rows = keys.take(order, axis=0)
    new = np.ones(len(keys), bool)
    new[1:] = rows[1:, 0] != rows[:-1, 0]
    for j in range(1, keys.shape[1]):           # (faster than a compare of (n, m) arrays)
        new[1:] |= rows[1:, j] != rows[:-1, j]
    group = np.empty(len(keys), np.intp)
    group[order] = np.cumsum(new) - 1
    return order[new], group


def _numbers(x: np.ndarray, null: np.ndarray, cols: list) -> list[list[str]]:
    """The pieces of the numbers X ((len(_NUMBERS), m) int64, from the columns COLS) of m
    responses: number k as _NUMBERS[k][2] lists of 3-digit strings (the leading ones empty
    where it is shorter), the last followed by its text, all looked up in tables: no int is
    formatted (~0.1 us each). A number too long for its strings, or negative (or of 2**63 or
    more, from a uint64 column), is formatted whole (rare); NULL: where it is null."""
    hi, last = np.divmod(x, 1000)
    top, mid = np.divmod(hi, 1000)
    big = ((x < 0) | (x >= _LIMITS)) & ~null
    last += (x >= 1000) * 1000 + _OFFSETS
    last[big] = _OFFSETS.repeat(x.shape[1], 1)[big] + 2000
    last[null] = _OFFSETS.repeat(x.shape[1], 1)[null] + 2001
    lead = np.empty((2,) + x.shape, np.intp)
    lead[0] = np.where(x >= 1_000_000, top, 2000)
    lead[1] = np.where(x >= 1_000_000, mid + 1000, np.where(x >= 1000, mid, 2000))
    lead[:, big | null] = 2000
    last = _LAST.take(last).tolist()
    for k, i in np.argwhere(big).tolist():
        last[k][i] = f"{cols[k][i]}{_NUMBERS[k][0]}"
    return [[*(_LEAD.take(lead[j, k]).tolist() for j in range(3 - c, 2)), last[k]]
            for k, (_f, _n, c) in enumerate(_NUMBERS)]


def _split(fragments) -> np.ndarray:
    """(groups, pieces) object array of NUL-separated FRAGMENTS (JSON has no raw NUL)."""
    fragments = list(fragments)
    return np.array("\0".join(fragments).split("\0"), object).reshape(len(fragments), -1)


class _Lines:
    """Request records of drained batches -> lines, straight from the columns.

    A request line, client address or flag set is encoded once (and cached). Records are
    grouped with numpy by their capture (one dict lookup per distinct capture: measured cheaper
    than one per record, which hashed each 256-byte capture), and for JSON by connection and by
    response, whose fragments are made once per batch: no Request objects, no per-request
    parsing or float formatting. Records the fast path does not cover go through the full
    decoder."""

    def __init__(self, tracer: HttpTracer):
        self.tracer = tracer
        self._lines: dict[bytes, str] = {}       # request-line key -> its fragment
        self._clients: dict[bytes, str] = {}     # address bytes + family -> its fragment
        self._flags: dict[int, str] = {}         # flags -> their fragment

    @staticmethod
    def _line_key(hdr: bytes, hl: int) -> bytes:
        """The request-line key of one capture read as decode() reads it (the column's bytes,
        trailing NULs stripped, then its valid length): through its first CRLF, else whole."""
        line = hdr[:hl]
        cut = line.find(b"\r\n")
        return line[:cut + 2] if cut >= 0 else line

    def _capture_groups(self, reqs: np.ndarray) -> tuple[np.ndarray, list[str], np.ndarray]:
        """(capture group of each record, request-line fragment of each group, end of the
        header block of each record or -1). Records are grouped by their valid capture bytes
        (zero-padded 8-byte words, with numpy), and only one capture per group is sliced and
        looked up in Python. A capture is read as its bytes with trailing NULs stripped (as
        decode() does): one whose valid bytes end in NUL is a group of its own."""
        n = len(reqs)
        reqs = np.ascontiguousarray(reqs)
        width = reqs.dtype["hdr"].itemsize
        hl = np.minimum(reqs["hdr_len"], width).astype(np.intp)
        off = reqs.dtype.fields["hdr"][1]
        raw = reqs.view(np.uint8).reshape(n, -1)[:, off:off + width]
        words = (int(hl.max()) + 7) // 8
        keys = np.zeros((n, words + 2), np.uint64)
        # the first hl bytes of each capture: a mask of each 8-byte word by length
        masks = _MASKS[np.clip(np.arange(width + 1)[:, None] - np.arange(0, 8 * words, 8), 0, 8)]
        np.bitwise_and(raw[:, :8 * words].view(np.uint64), masks.take(hl, axis=0),
                       out=keys[:, :words])
        keys[:, words] = hl
        nul = (hl > 0) & (raw[np.arange(n), hl - 1] == 0)
        keys[nul, words + 1] = np.flatnonzero(nul) + 1
        first, group = _groups(keys)
        # (no cache across batches: repeated captures are one group already, and a storage
        # node's captures seldom repeat: a cache of them missed on every record there)
        lines, head = self._line_keys(keys[first, :words].view(np.uint8), hl[first])
        get, make = self._lines.get, self._line_fragment
        frags = [get(k) or make(k) for k in lines]
        # a capture whose valid bytes end in NUL: its key as decode() reads it (its header end
        # is the same: CR LF is never NUL)
        for g in np.flatnonzero(nul[first]).tolist():
            i = first[g]
            k = self._line_key(reqs["hdr"][i], int(hl[i]))
            frags[g] = get(k) or make(k)
        return group, frags, head[group]

    @staticmethod
    def _line_keys(caps: np.ndarray, hl: np.ndarray) -> tuple[list[bytes], np.ndarray]:
        """(request-line key, end of the header block or -1) of each capture of CAPS ((g, w)
        uint8, zero past its length HL), with numpy: the line through its first CRLF (else the
        whole capture), the block through the first CRLF CRLF after it. A key loses the
        capture's trailing NULs (bytes of a fixed-size column): callers key those captures
        with _line_key."""
        g, w = caps.shape
        if not w:                   # (no capture has a byte: no S0 view)
            return [b""] * g, np.full(g, -1, np.int64)
        col = np.arange(w)
        crlf = (caps[:, :-1] == 13) & (caps[:, 1:] == 10) & (col[1:] < hl[:, None])
        cut = np.where(crlf.any(axis=1), crlf.argmax(axis=1), -1)
        end = crlf[:, :-2] & crlf[:, 2:]
        head = np.where(end.any(axis=1) & (cut >= 0), end.argmax(axis=1) + 4, -1)
        keys = caps.copy()
        keys[col >= np.where(cut >= 0, cut + 2, w)[:, None]] = 0
        return keys.view(f"S{w}").ravel().tolist(), head

    def encode(self, arr: np.ndarray) -> list[str]:
        """The lines of the requests in a drained batch (all record kinds), in ring order."""
        if len(arr) and not (arr["kind"] == EV_REQUEST).all():
            arr = self.tracer.requests_only(arr)        # (a copy: only when other kinds came)
        reqs = arr
        n = len(reqs)
        if not n:
            return []
        cap, cap_lines, head = self._capture_groups(reqs)
        start = reqs["start_ns"].astype(np.int64)
        ttfb_ns = reqs["ttfb_ns"].astype(np.int64)
        dur = reqs["end_ns"].astype(np.int64) - start
        ttfb = ttfb_ns - start
        hlen = reqs["hdr_len"].astype(np.int64)
        qb = reqs["req_bytes"].astype(np.int64)
        qbody = np.where(head >= 0, np.maximum(qb - head, 0), -1)
        rbody = response_body_sizes(reqs)
        flags = reqs["flags"]
        # pipelined captures (and a read holding more than one header block) are split by the
        # full decoder, as are records with times out of order: rare, so its speed is no matter
        slow = (reqs["pipe_idx"] > 0) | ((flags & F_PIPELINED) > 0) | \
            ((qb == hlen) & (head >= 0) & (head != hlen)) | (dur < 0) | \
            ((ttfb_ns > 0) & (ttfb < 0))
        # rounded to the nearest microsecond, as the Request's float time is (truncating the
        # nanoseconds and rounding the offset apart could be 1.7 us off)
        wall_us = (start + round(self.tracer._wall_offset * 1e9) + 500) // 1000
        out = self._format(reqs, cap, cap_lines, wall_us, dur, ttfb_ns > 0, ttfb, qb, qbody,
                           rbody)
        self.tracer.requests_seen += n
        if slow.any():
            idx = np.flatnonzero(slow)
            for i, r in zip(idx.tolist(), self.tracer.decode(reqs[idx])):
                out[i] = self._slow(r)
            self.tracer.requests_seen -= len(idx)      # decode() counted them again
        return out

    def _client_fragments(self, reqs: np.ndarray) -> list[str]:
        """The client address of each record as a fragment. Distinct (address, family) pairs
        are found by a 64-bit hash with numpy, checked exactly against the first record of each
        hash (a collision, should one ever happen, sends the batch through a dict per record)."""
        a = _rows(reqs["caddr"]).view(np.uint64)          # (n, 2)
        fam = reqs["family"].astype(np.uint64)
        with np.errstate(over="ignore"):
            h = a[:, 0] * np.uint64(0x9E3779B97F4A7C15) ^ a[:, 1] * np.uint64(0xC2B2AE3D27D4EB4F) \
                ^ fam
        _uniq, first, inv = np.unique(h, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        rep = first[inv]
        cache = self._clients
        if (a[rep] == a).all() and (fam[rep] == fam).all():
            keys = [bytes(a[i]) + bytes(fam[i:i + 1]) for i in first.tolist()]
            frags = [cache.get(k) or self._client(k) for k in keys]
            return np.array(frags, object)[inv].tolist()
        return [cache.get(k) or self._client(k) for k in
                (bytes(a[i]) + bytes(fam[i:i + 1]) for i in range(len(reqs)))]

    def _flag_fragments(self, flags: np.ndarray) -> list[str]:
        uflags, finv = np.unique(flags, return_inverse=True)
        fr = [self._flag(f) for f in uflags.tolist()]
        return np.array(fr, object)[finv.reshape(-1)].tolist()

    def _line_fragment(self, key: bytes) -> str:
        frag = self._line_text(*parse_request_line(key))
        if len(self._lines) >= _CACHE_MAX:
            self._lines.clear()
        self._lines[key] = frag
        return frag

    def _client(self, key: bytes) -> str:
        """KEY: the 16 address bytes and the family as a little-endian u64."""
        family = int.from_bytes(key[16:], "little")
        text = self._client_text(_client(np.frombuffer(key[:16], np.uint8), family))
        if len(self._clients) >= _CACHE_MAX:
            self._clients.clear()
        self._clients[key] = text
        return text

    def _flag(self, flags: int) -> str:
        """The fragment of a flags value (made once: few values ever occur)."""
        f = self._flags.get(flags)
        if f is None:
            f = self._flags[flags] = self._flags_text(flags, [n for b, n in FLAG_NAMES.items()
                                                              if flags & b])
        return f


class JsonLines(_Lines):
    """JSON lines, identical in content to json.dumps(Request.to_dict()) (times to the
    microsecond, durations to the nanosecond)."""

    @staticmethod
    def _line_text(method, path, version) -> str:
        # made for every new path (a storage node's usual request): json.dumps' own call
        # costs three times its escaping
        return f'"method":{_json_str(method)},"path":{_json_str(path)},"version":{_json_str(version)}'


    _client_text = staticmethod(json.dumps)

    @staticmethod
    def _flags_text(flags: int, names: list[str]) -> str:
        return (f'"tls":{"true" if flags & F_TLS else "false"},'
                f'"flags":{json.dumps(names, separators=(",", ":"))}')

    @staticmethod
    def _slow(r) -> str:
        return json.dumps(r.to_dict(), separators=(",", ":"))

    def _format(self, reqs, cap, cap_lines, wall_us, dur, has_ttfb, ttfb, qb, qbody,
                rbody) -> list[str]:
        n = len(reqs)
        u64 = np.uint64
        sec, usec = np.divmod(wall_us, 1_000_000)
        dsec, dns = np.divmod(dur, 1_000_000_000)
        tsec, tns = np.divmod(ttfb, 1_000_000_000)
        # the connection (and second) of each record: '{"time":S.' and ',"pid":..,"port":P,'
        caddr = _rows(reqs["caddr"]).view(u64)
        key = np.empty((n, 5), u64)
        key[:, 0] = reqs["tid"].astype(u64) | reqs["pid"].astype(u64) << u64(32)
        key[:, 1] = reqs["cport"].astype(u64) | reqs["family"].astype(u64) << u64(16)
        key[:, 2:4] = caddr
        key[:, 4] = sec
        cfirst, conn = _groups(key)
        ckey = np.empty((len(cfirst), 3), u64)          # _client's key: address bytes, family
        ckey[:, :2] = caddr[cfirst]
        ckey[:, 2] = reqs["family"][cfirst]
        clients = [self._clients.get(k) or self._client(k)
                   for k in ckey.view("V24").ravel().tolist()]
        # the response of each record: request line, status, sizes, flags, whole seconds
        no_t = np.iinfo(np.int64).min                   # (tsec is never that)
        key = np.empty((n, 6), u64)
        key[:, 0] = cap.astype(u64) | reqs["status"].astype(u64) << u64(32) | \
            reqs["flags"].astype(u64) << u64(48)
        key[:, 1] = qb
        key[:, 2] = reqs["resp_bytes"]
        key[:, 3] = rbody
        key[:, 4] = dsec
        key[:, 5] = np.where(has_ttfb, tsec, no_t)
        rfirst, resp = _groups(key)
        # (the pieces of all groups split at once: a split and a list per group cost more)
        conns = _split(_JSON_CONN % row for row in zip(
            sec[cfirst].tolist(), reqs["pid"][cfirst].tolist(), reqs["tid"][cfirst].tolist(),
            clients, reqs["cport"][cfirst].tolist()))
        if 2 * len(rfirst) <= n:
            # responses repeat: their fragments made once each (and split at once, as conns)
            resps = _split(_JSON_RESP % (
                cap_lines[c], st, q, r, d, "null" if t == no_t else "%d." % t,
                self._flag(f), "null" if qy < 0 else qy,
                "null" if ry < 0 else ry)
                for c, st, f, q, r, d, t, qy, ry in zip(
                    cap[rfirst].tolist(), reqs["status"][rfirst].tolist(),
                    reqs["flags"][rfirst].tolist(), qb[rfirst].tolist(),
                    reqs["resp_bytes"][rfirst].tolist(), dsec[rfirst].tolist(),
                    key[rfirst, 5].view(np.int64).tolist(), qbody[rfirst].tolist(),
                    rbody[rfirst].tolist()))
            p1, p2, p3 = ([r] for r in resps.take(resp, axis=0).T.tolist())
        else:
            # most records have a response of their own: its pieces are made per record (the
            # numbers from tables) and joined straight into the lines
            p1, p2, p3 = self._response_pieces(reqs, cap, cap_lines, dsec, has_ttfb, tsec, qb,
                                               qbody, rbody)
        # the fraction digits: microseconds of the time, nanoseconds of duration and ttfb
        digits = np.empty((8, n), np.intp)
        digits[0], digits[1] = np.divmod(usec, 1000)
        digits[2], rest = np.divmod(dns, 1_000_000)
        digits[3], digits[4] = np.divmod(rest, 1000)
        digits[4] += 1001
        digits[5], rest = np.divmod(tns, 1_000_000)
        digits[6], digits[7] = np.divmod(rest, 1000)
        digits[5:, ~has_ttfb] = 1000
        t0, c = conns.take(conn, axis=0).T.tolist()
        u1, u2, d1, d2, d3, t1, t2, t3 = _DIGITS3.take(digits).tolist()
        return list(map("".join, zip(t0, u1, u2, c, *p1, d1, d2, d3, *p2, t1, t2, t3, *p3)))

    def _response_pieces(self, reqs, cap, cap_lines, dsec, has_ttfb, tsec, qb, qbody,
                         rbody) -> tuple[list, list, list]:
        """The pieces of the response part of each record's line: (request line and status
        to the whole seconds of duration; whole seconds of ttfb; flags to the end)."""
        heads = np.array([line + ',"status":' for line in cap_lines], object)
        uflags, finv = np.unique(reqs["flags"], return_inverse=True)
        flags = np.array([',%s,"request_body_bytes":' % self._flag(f) for f in uflags.tolist()],
                         object)
        cols = [reqs["status"], qb, reqs["resp_bytes"], dsec, tsec, qbody, rbody]
        x = np.empty((len(cols), len(reqs)), np.int64)
        for k, col in enumerate(cols):
            x[k] = col                      # (a uint64 of 2**63 or more: negative here)
        null = np.zeros(x.shape, bool)
        null[4], null[5], null[6] = ~has_ttfb, x[5] < 0, x[6] < 0
        status, q, r, d, t, qy, ry = _numbers(x, null, cols)
        return ([heads[cap].tolist(), *status, *q, *r, *d], t,
                [flags[finv.reshape(-1)].tolist(), *qy, *ry])


class TextLines(_Lines):
    """The text lines of Request.line() (durations rounded to the microsecond)."""

    def __init__(self, tracer: HttpTracer):
        super().__init__(tracer)
        self._clock: dict[int, str] = {}         # epoch second -> local "HH:MM:SS"

    @staticmethod
    def _line_text(method, path, version) -> str:
        return f"{method} {path} {version}"

    @staticmethod
    def _client_text(client: str) -> str:
        return f"[{client}]" if ":" in client else client

    @staticmethod
    def _flags_text(flags: int, names: list[str]) -> str:
        extra = [n for n in names if n != "tls"]
        return (" tls" if flags & F_TLS else "") + \
            (f" [{','.join(extra)}]" if set(names) - {"tls", "closed"} else "")

    @staticmethod
    def _slow(r) -> str:
        return r.line()

    def _format(self, reqs, cap, cap_lines, wall_us, dur, has_ttfb, ttfb, qb, qbody,
                rbody) -> list[str]:
        code = (has_ttfb * 4 + (qbody >= 0) * 2 + (rbody >= 0)).tolist()
        sec, usec = np.divmod(wall_us, 1_000_000)
        usec //= 1000
        secs, sinv = np.unique(sec, return_inverse=True)
        clock = self._clock
        if len(clock) > 4096:
            clock.clear()
        hms = [clock.get(s) or clock.setdefault(s, time.strftime("%H:%M:%S", time.localtime(s)))
               for s in secs.tolist()]
        hms = np.array(hms, object)[sinv.reshape(-1)].tolist()
        status = [s or "-" for s in reqs["status"].tolist()]
        dms, dus = np.divmod((dur + 500) // 1000, 1000)
        tms, tus = np.divmod((ttfb + 500) // 1000, 1000)
        cols = zip(hms, usec.tolist(), reqs["pid"].tolist(), reqs["tid"].tolist(),
                   self._client_fragments(reqs), reqs["cport"].tolist(),
                   np.array(cap_lines, object)[cap].tolist(), status, qb.tolist(),
                   reqs["resp_bytes"].tolist(), dms.tolist(), dus.tolist(), tms.tolist(),
                   tus.tolist(), self._flag_fragments(reqs["flags"]))
        tpl = _TEXT_TEMPLATES
        return [tpl[c] % row for c, row in zip(code, cols)]


BEHIND, MAX_RATE = "output behind", "max rate"      # why lines were not printed
NOTICE_S = 1.0           # not-printed counts are written into the stream at most this often


class LineWriter:
    """Writes batches of lines to a file descriptor from a thread, one write per batch.

    The drain loop hands a batch over and goes on; when the reader is slower than the server,
    batches beyond MAX_PENDING bytes are not printed but counted. Lines left out on purpose
    (--max-rate) are counted too. Counts are written into the stream as their own lines
    ({"not_printed": N, "reason": ...} with --json) at most once a second, before the lines
    that follow the gap, and at the end; and in the summary. A reader that goes away (EPIPE:
    `| head`) stops the writer."""

    def __init__(self, fd: int = 1, json_lines: bool = True, max_pending: int = 8 << 20):
        self.fd, self.json, self.max_pending = fd, json_lines, max_pending
        self.printed = 0            # lines written
        self.not_printed: dict[str, int] = {}     # reason -> lines not printed
        self.broken = False         # the reader closed the pipe
        self._queue: list[tuple[bytes, int]] = []
        self._pending = 0
        self._unsaid: dict[str, int] = {}         # counts not yet written into the stream
        self._last_notice = 0.0
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="trace-http-writer", daemon=True)
        self._thread.start()

    @property
    def not_printed_total(self) -> int:
        return sum(self.not_printed.values())

    def drop(self, n: int, reason: str) -> None:
        """Count N lines that will not be printed (for REASON)."""
        if n:
            with self._cv:
                self._count(n, reason)

    def _count(self, n: int, reason: str) -> None:
        self.not_printed[reason] = self.not_printed.get(reason, 0) + n
        self._unsaid[reason] = self._unsaid.get(reason, 0) + n

    def put(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        with self._cv:
            if self.broken or self._pending + len(data) > self.max_pending and self._queue:
                self._count(len(lines), BEHIND)
                return
            self._queue.append((data, len(lines)))
            self._pending += len(data)
            self._cv.notify()

    def _notices(self, force: bool) -> bytes:
        """The counts not yet said (caller holds the lock), if it is time to say them."""
        now = time.monotonic()
        if not self._unsaid or not force and now - self._last_notice < NOTICE_S:
            return b""
        self._last_notice = now
        unsaid, self._unsaid = self._unsaid, {}
        if self.json:
            return "".join(json.dumps({"not_printed": n, "reason": why}) + "\n"
                           for why, n in unsaid.items()).encode()
        return "".join(f"gridbpf: {n} requests not printed ({why})\n"
                       for why, n in unsaid.items()).encode()

    def _write(self, data: bytes) -> bool:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            return True
        except BrokenPipeError:
            return False

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                # a gap is said before the batches queued after it
                data = self._notices(False) + b"".join(d for d, _n in batch)
            if not self._write(data):
                with self._cv:
                    self.broken = True
                    self._count(sum(n for _d, n in batch) + sum(n for _d, n in self._queue),
                                BEHIND)
                    self._queue, self._pending = [], 0
                return
            with self._cv:
                self.printed += sum(n for _d, n in batch)
                self._pending -= sum(len(d) for d, _n in batch)

    def close(self) -> None:
        """Write what is queued (and the last counts of what was not printed), then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        if not self.broken:
            with self._cv:
                notice = self._notices(True)
            if notice and not self._write(notice):
                self.broken = True


class RateLimit:
    """At most RATE lines a second, chosen evenly through each batch (a token bucket holding at
    most one second): what a user watching a busy server can read, at a bounded cost."""

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()

    def take(self, n: int) -> np.ndarray | None:
        """Indices of the N records to print (None: all of them)."""
        now = time.monotonic()
        self.tokens = min(self.tokens + (now - self.last) * self.rate, self.rate)
        self.last = now
        keep = min(n, int(self.tokens))
        self.tokens -= keep
        if keep == n:
            return None
        return np.arange(keep) * n // keep if keep else np.empty(0, np.int64)
