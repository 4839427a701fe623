"""Streaming requests to stdout at a bounded cost: `gridbpf trace http` on a busy server.

On these 2-core machines every microsecond the CLI spends per printed request is taken from the
server it watches. So a drained batch becomes lines (JSON or text) straight from its numpy
columns (no Request objects, no dicts, no json.dumps per request): the strings of a request
line, a client address and a flag set are encoded once and cached, and each request is one
%-format of integers and cached fragments. The lines of a batch leave in one write, from a
thread, so a slow reader never stalls the drain: what does not fit its queue is counted and
said in the stream.
"""
from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from .memo import memo_map
from .tracer import (EV_REQUEST, F_PIPELINED, F_TLS, FLAG_NAMES, HttpTracer, _client,
                     parse_request_line, response_body_sizes)

_CACHE_MAX = 50_000       # distinct request lines (or clients) kept encoded; then start over

# JSON: one template per combination of the three fields that may be null: 4 ttfb, 2 request
# body, 1 response body. Keys and their order are those of Request.to_dict(). Numbers are
# written from integers (seconds and microseconds, nanoseconds): Python formats floats at half
# the speed.
_JSON_HEAD = ('{"time":%d.%06d,"pid":%d,"tid":%d,"client":%s,"port":%d,%s,"status":%d,'
              '"request_bytes":%d,"response_bytes":%d,"duration":%d.%09d,"ttfb":')


def _json_template(code: int) -> str:
    ttfb = "%d.%09d" if code & 4 else "null%.0s%.0s"
    qbody = "%d" if code & 2 else "null%.0s"
    rbody = "%d" if code & 1 else "null%.0s"
    return (_JSON_HEAD + ttfb + ',%s,"request_body_bytes":' + qbody
            + ',"response_body_bytes":' + rbody + "}")


_JSON_TEMPLATES = [_json_template(c) for c in range(8)]
# text: Request.line(); durations in milliseconds to the microsecond
_TEXT_TEMPLATES = ["%s.%03d pid=%d tid=%d %s:%d %s %s req=%d resp=%d dur=%d.%03dms ttfb="
                   + ("%d.%03dms" if code & 4 else "-%.0s%.0s") + "%s" for code in range(8)]


def _rows(col: np.ndarray) -> np.ndarray:
    """A fixed-size bytes column as an (n, width) uint8 array."""
    col = np.ascontiguousarray(col)
    return col.view(np.uint8).reshape(len(col), -1)


class _Lines:
    """Request records of drained batches -> lines, straight from the columns.

    A request line, client address or flag set is encoded once (and cached); each request is
    then a dict lookup for its request line and one %-format of integers and cached fragments:
    no Request objects, no per-request parsing or float formatting. (Finding the request lines
    with numpy passes over the 256-byte captures was measured slower than slicing each in
    Python.) Records the fast path does not cover go through the full decoder."""

    def __init__(self, tracer: HttpTracer):
        self.tracer = tracer
        self._lines: dict[bytes, str] = {}       # request-line key -> its fragment
        self._clients: dict[bytes, str] = {}     # address bytes + family -> its fragment
        self._flags: dict[int, str] = {}         # flags -> their fragment
        self._captures: dict[tuple, tuple] = {}  # (capture, length) -> (fragment, head end)

    def _capture_parts(self, capture: tuple[bytes, int]) -> tuple[str, int]:
        """(request-line fragment, end of the header block or -1) of one (capture, length)."""
        hdr, hl = capture
        line = hdr[:hl]
        cut = line.find(b"\r\n")
        key = line[:cut + 2] if cut >= 0 else line
        f = self._lines.get(key)
        e = line.find(b"\r\n\r\n", cut)
        return (f if f is not None else self._line_fragment(key), e + 4 if e >= 0 and cut >= 0 else -1)

    def encode(self, arr: np.ndarray) -> list[str]:
        """The lines of the requests in a drained batch (all record kinds), in ring order."""
        if len(arr) and not (arr["kind"] == EV_REQUEST).all():
            arr = self.tracer.requests_only(arr)        # (a copy: only when other kinds came)
        reqs = arr
        n = len(reqs)
        if not n:
            return []
        # the request line (a cached fragment) and the end of the header block of each capture
        # (fragment, head end) cached per whole capture (memo_map: one dict lookup per request)
        keys = list(zip(reqs["hdr"].tolist(), reqs["hdr_len"].tolist()))
        found = memo_map(self._captures, keys, self._capture_parts)
        line_frags = [got[0] for got in found]
        head = np.array([got[1] for got in found], np.int64)
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
        code = ((ttfb_ns > 0) * 4 + (qbody >= 0) * 2 + (rbody >= 0)).tolist()
        uflags, finv = np.unique(flags, return_inverse=True)
        fr = [self._flags.get(f) or self._flag_fragment(f) for f in uflags.tolist()]
        flag_frags = np.array(fr, object)[finv.reshape(-1)].tolist()
        # rounded to the nearest microsecond, as the Request's float time is (truncating the
        # nanoseconds and rounding the offset apart could be 1.7 us off)
        wall_us = (start + round(self.tracer._wall_offset * 1e9) + 500) // 1000
        out = self._format(reqs, code, line_frags, self._client_fragments(reqs), flag_frags,
                           wall_us, dur, ttfb, qb, qbody, rbody)
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

    def _flag_fragment(self, flags: int) -> str:
        f = self._flags[flags] = self._flags_text(flags, [n for b, n in FLAG_NAMES.items()
                                                          if flags & b])
        return f


class JsonLines(_Lines):
    """JSON lines, identical in content to json.dumps(Request.to_dict()) (times to the
    microsecond, durations to the nanosecond)."""

    @staticmethod
    def _line_text(method, path, version) -> str:
        return (f'"method":{json.dumps(method)},"path":{json.dumps(path)},'
                f'"version":{json.dumps(version)}')

    _client_text = staticmethod(json.dumps)

    @staticmethod
    def _flags_text(flags: int, names: list[str]) -> str:
        return (f'"tls":{"true" if flags & F_TLS else "false"},'
                f'"flags":{json.dumps(names, separators=(",", ":"))}')

    @staticmethod
    def _slow(r) -> str:
        return json.dumps(r.to_dict(), separators=(",", ":"))

    @staticmethod
    def _format(reqs, code, line_frags, client_frags, flag_frags, wall_us, dur, ttfb, qb,
                qbody, rbody) -> list[str]:
        sec, usec = np.divmod(wall_us, 1_000_000)
        dsec, dns = np.divmod(dur, 1_000_000_000)
        tsec, tns = np.divmod(ttfb, 1_000_000_000)
        cols = zip(sec.tolist(), usec.tolist(), reqs["pid"].tolist(), reqs["tid"].tolist(),
                   client_frags, reqs["cport"].tolist(), line_frags, reqs["status"].tolist(),
                   qb.tolist(), reqs["resp_bytes"].tolist(), dsec.tolist(), dns.tolist(),
                   tsec.tolist(), tns.tolist(), flag_frags, qbody.tolist(), rbody.tolist())
        tpl = _JSON_TEMPLATES
        return [tpl[c] % row for c, row in zip(code, cols)]


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

    def _format(self, reqs, code, line_frags, client_frags, flag_frags, wall_us, dur, ttfb, qb,
                qbody, rbody) -> list[str]:
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
        cols = zip(hms, usec.tolist(), reqs["pid"].tolist(), reqs["tid"].tolist(), client_frags,
                   reqs["cport"].tolist(), line_frags, status, qb.tolist(),
                   reqs["resp_bytes"].tolist(), dms.tolist(), dus.tolist(), tms.tolist(),
                   tus.tolist(), flag_frags)
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
