"""Streaming requests to stdout at a bounded cost: `gridbpf trace http` on a busy server.

On these 2-core machines every microsecond the CLI spends per printed request is taken from the
server it watches. So a drained batch becomes JSON lines straight from its numpy columns (no
Request objects, no dicts, no json.dumps per request): the strings of a request line, a client
address and a flag set are encoded once and cached, and each request is one %-format of
numbers and cached fragments. The lines of a batch leave in one write, from a thread, so a slow
reader never stalls the drain: what does not fit its queue is counted and said in the stream.
"""
from __future__ import annotations

import json
import os
import threading

import numpy as np

from .tracer import (EV_REQUEST, F_PIPELINED, F_TLS, FLAG_NAMES, HttpTracer, _client, head_lengths,
                     parse_request_line, response_body_sizes)

_CACHE_MAX = 50_000       # distinct request lines (or clients) kept encoded; then start over

# one template per combination of the three fields that may be null: 4 ttfb, 2 request body,
# 1 response body. Keys and their order are those of Request.to_dict().
_HEAD = ('{"time":%.6f,"pid":%d,"tid":%d,"client":%s,"port":%d,%s,"status":%d,'
         '"request_bytes":%d,"response_bytes":%d,"duration":%.9f,"ttfb":')


def _template(code: int) -> str:
    ttfb = "%.9f" if code & 4 else "null%.0s"
    qbody = "%d" if code & 2 else "null%.0s"
    rbody = "%d" if code & 1 else "null%.0s"
    return (_HEAD + ttfb + ',"tls":%s,"flags":%s,"request_body_bytes":' + qbody
            + ',"response_body_bytes":' + rbody + "}")


_TEMPLATES = [_template(c) for c in range(8)]


class JsonLines:
    """Request records of drained batches -> JSON lines, identical in content to
    json.dumps(Request.to_dict()) (times to the microsecond, durations to the nanosecond)."""

    def __init__(self, tracer: HttpTracer):
        self.tracer = tracer
        self._lines: dict[bytes, str] = {}       # request line (with its CRLF) -> JSON fragment
        self._clients: dict[tuple, str] = {}     # (family, address bytes) -> JSON string
        self._flags: dict[int, tuple[str, str]] = {}  # flags -> ("true"/"false", JSON list)

    def encode(self, arr: np.ndarray) -> list[str]:
        """JSON lines of the requests in a drained batch (all record kinds), in ring order."""
        reqs = self.tracer.requests_only(arr) if len(arr) else arr
        n = len(reqs)
        if not n:
            return []
        start = reqs["start_ns"]
        wall = (start / 1e9 + self.tracer._wall_offset).tolist()
        dur = ((reqs["end_ns"] - start) / 1e9).tolist()
        ttfb_ns = reqs["ttfb_ns"]
        ttfb_a = np.where(ttfb_ns > 0, (ttfb_ns - start) / 1e9, -1.0)
        hlen_a = reqs["hdr_len"].astype(np.int64)
        head = head_lengths(reqs["hdr"], hlen_a)
        qb_a = reqs["req_bytes"].astype(np.int64)
        qbody_a = np.where(head >= 0, np.maximum(qb_a - head, 0), -1)
        rbody_a = response_body_sizes(reqs)
        flags_a = reqs["flags"]
        # pipelined captures (and a read holding more than one header block) are split by the
        # full decoder: rare, so it does not matter that it is slower
        slow = (reqs["pipe_idx"] > 0) | ((flags_a & F_PIPELINED) > 0) | \
            ((qb_a == hlen_a) & (head >= 0) & (head != hlen_a))
        code = ((ttfb_a >= 0) * 4 + (qbody_a >= 0) * 2 + (rbody_a >= 0)).tolist()
        hdrs, hlens = reqs["hdr"].tolist(), hlen_a.tolist()
        addrs = np.ascontiguousarray(reqs["caddr"]).view("S16").reshape(n).tolist()
        cols = zip(wall, reqs["pid"].tolist(), reqs["tid"].tolist(), reqs["family"].tolist(),
                   addrs, reqs["cport"].tolist(), hdrs, hlens, reqs["status"].tolist(),
                   qb_a.tolist(), reqs["resp_bytes"].tolist(), dur, ttfb_a.tolist(),
                   flags_a.tolist(), qbody_a.tolist(), rbody_a.tolist(), code)
        lines_c, clients_c, flags_c = self._lines, self._clients, self._flags
        tpl = _TEMPLATES
        out = []
        for (t, pid, tid, fam, addr, port, hdr, hl, status, qb, rb, d, tt, fl, qbody, rbody,
             c) in cols:
            line = hdr[:hl]
            cut = line.find(b"\r\n")
            key = line[:cut + 2] if cut >= 0 else line
            frag = lines_c.get(key)
            if frag is None:
                frag = self._line_fragment(key, line)
            client = clients_c.get((fam, addr))
            if client is None:
                client = self._client(fam, addr)
            f = flags_c.get(fl)
            if f is None:
                f = self._flag_fragments(fl)
            out.append(tpl[c] % (t, pid, tid, client, port, frag, status, qb, rb, d, tt, f[0],
                                 f[1], qbody, rbody))
        self.tracer.requests_seen += n
        if slow.any():
            idx = np.flatnonzero(slow)
            for i, r in zip(idx.tolist(), self.tracer.decode(reqs[idx])):
                out[i] = json.dumps(r.to_dict(), separators=(",", ":"))
            self.tracer.requests_seen -= len(idx)      # decode() counted them again
        return out

    def _line_fragment(self, key: bytes, line: bytes) -> str:
        method, path, version = parse_request_line(line)
        frag = (f'"method":{json.dumps(method)},"path":{json.dumps(path)},'
                f'"version":{json.dumps(version)}')
        # a line without its CRLF may be cut by the capture: its meaning depends on the
        # capture's length, so only complete lines are cached
        if key.endswith(b"\r\n"):
            if len(self._lines) >= _CACHE_MAX:
                self._lines.clear()
            self._lines[key] = frag
        return frag

    def _client(self, family: int, addr: bytes) -> str:
        raw = np.frombuffer(addr.ljust(16, b"\0"), np.uint8)
        text = json.dumps(_client(raw, family))
        if len(self._clients) >= _CACHE_MAX:
            self._clients.clear()
        self._clients[(family, addr)] = text
        return text

    def _flag_fragments(self, flags: int) -> tuple[str, str]:
        names = [n for b, n in FLAG_NAMES.items() if flags & b]
        f = self._flags[flags] = ("true" if flags & F_TLS else "false",
                                  json.dumps(names, separators=(",", ":")))
        return f


class LineWriter:
    """Writes batches of lines to a file descriptor from a thread, one write per batch.

    The drain loop hands a batch over and goes on; when the reader is slower than the server,
    batches beyond MAX_PENDING bytes are not printed but counted, and the count is written into
    the stream as its own line ({"not_printed": N} with --json) as soon as the reader catches
    up, and in the summary. A reader that goes away (EPIPE: `| head`) stops the writer."""

    def __init__(self, fd: int = 1, json_lines: bool = True, max_pending: int = 8 << 20):
        self.fd, self.json, self.max_pending = fd, json_lines, max_pending
        self.printed = 0            # lines written
        self.not_printed = 0        # lines dropped because the reader was behind
        self.broken = False         # the reader closed the pipe
        self._queue: list[tuple[bytes, int]] = []
        self._pending = 0
        self._unsaid = 0            # dropped lines not yet reported in the stream
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="trace-http-writer", daemon=True)
        self._thread.start()

    def put(self, lines: list[str]) -> None:
        if not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        with self._cv:
            if self.broken or self._pending + len(data) > self.max_pending and self._queue:
                self.not_printed += len(lines)
                self._unsaid += len(lines)
                return
            self._queue.append((data, len(lines)))
            self._pending += len(data)
            self._cv.notify()

    def _notice(self, n: int) -> bytes:
        if self.json:
            return (json.dumps({"not_printed": n, "reason": "output behind"}) + "\n").encode()
        return f"gridbpf: {n} requests not printed (output behind)\n".encode()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                unsaid, self._unsaid = self._unsaid, 0
            data = b"".join(d for d, _n in batch)
            if unsaid:
                # the gap comes before the batches queued after it
                data = self._notice(unsaid) + data
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view):]
            except BrokenPipeError:
                with self._cv:
                    self.broken = True
                    self.not_printed += sum(n for _d, n in batch) + sum(n for _d, n in self._queue)
                    self._queue, self._pending = [], 0
                return
            with self._cv:
                self.printed += sum(n for _d, n in batch)
                self._pending -= sum(len(d) for d, _n in batch)

    def close(self) -> None:
        """Write what is queued (and a last count of what was not printed), then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        if self._unsaid and not self.broken:
            try:
                os.write(self.fd, self._notice(self._unsaid))
            except BrokenPipeError:
                self.broken = True
            self._unsaid = 0
