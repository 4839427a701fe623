"""Firefly packets: an RFC 5424 syslog header, then a JSON message per schema v1.0.0.

    <134>1 2026-11-25T12:00:00.000000+00:00 HOST flowd - firefly-json - {"version": 1, ...}

sent over UDP to port 10514 of the flow's destination and/or configured collectors.
"""
from __future__ import annotations

import json
import logging
import socket
from datetime import datetime, timezone
from importlib import resources

from .flows import FiveTuple

PORT = 10514
PRIORITY = 16 << 3 | 6          # facility local0, severity informational = 134
log = logging.getLogger("gridbpf.scitags")


def utc_iso(ts: float) -> str:
    """RFC 3339 UTC time with microseconds, as flowd writes it."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


def message(state: str, flow: FiveTuple, experiment: int, activity: int, *, start: float,
            end: float | None = None, now: float, application: str,
            usage: dict | None = None) -> dict:
    """The JSON body. USAGE is {"received": bytes, "sent": bytes} from the flow's point of view
    (sent: source -> destination)."""
    lifecycle = {"state": state, "start-time": utc_iso(start), "current-time": utc_iso(now)}
    if end is not None:
        lifecycle["end-time"] = utc_iso(end)
    msg = {
        "version": 1,
        "flow-lifecycle": lifecycle,
        "flow-id": {"afi": flow.afi, "src-ip": str(flow.src), "dst-ip": str(flow.dst),
                    "protocol": flow.protocol, "src-port": flow.src_port, "dst-port": flow.dst_port},
        "context": {"experiment-id": experiment, "activity-id": activity, "application": application},
    }
    if usage is not None:
        msg["usage"] = {"received": int(usage["received"]), "sent": int(usage["sent"])}
    return msg


def packet(msg: dict, now: float, hostname: str | None = None) -> bytes:
    host = hostname or socket.gethostname() or "-"
    header = f"<{PRIORITY}>1 {utc_iso(now)} {host} flowd - firefly-json - "
    return (header + json.dumps(msg, separators=(",", ":"))).encode()


def parse_packet(data: bytes) -> tuple[dict, dict]:
    """(syslog header fields, JSON message) of a received firefly; ValueError if malformed."""
    text = data.decode()
    parts = text.split(" ", 7)
    if len(parts) != 8 or not parts[0].startswith("<") or ">" not in parts[0]:
        raise ValueError("not an RFC 5424 syslog message")
    pri, version = parts[0][1:].split(">", 1)
    header = {"priority": int(pri), "version": int(version), "timestamp": parts[1], "hostname": parts[2],
              "app_name": parts[3], "procid": parts[4], "msgid": parts[5], "structured_data": parts[6]}
    return header, json.loads(parts[7])


# --- the schema ---------------------------------------------------------------------------------

def _strip_trailing_commas(text: str) -> str:
    """scitags.org's firefly.schema.json has trailing commas (`, }`), which JSON forbids;
    drop those (outside strings) so the file can be used exactly as published."""
    out, in_str, esc = [], False, False
    for i, ch in enumerate(text):
        if in_str:
            out.append(ch)
            esc = ch == "\\" and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == ",":
            rest = text[i + 1:].lstrip()
            if rest[:1] in ("}", "]"):
                continue
        out.append(ch)
    return "".join(out)


def schema() -> dict:
    ref = resources.files("gridbpf").joinpath("data/firefly.schema.json")
    return json.loads(_strip_trailing_commas(ref.read_text(encoding="utf-8")))


_validator = None


def validator():
    """A jsonschema validator for schema v1.0.0 that also checks formats (date-time, ipv4/6);
    None if jsonschema is not installed (it is a test dependency)."""
    global _validator
    if _validator is None:
        try:
            import jsonschema
        except ImportError:
            return None
        s = schema()
        cls = jsonschema.validators.validator_for(s)
        _validator = cls(s, format_checker=cls.FORMAT_CHECKER)
    return _validator


def validate(msg: dict) -> None:
    """Raise ValueError naming the first schema violation (no-op without jsonschema)."""
    v = validator()
    if v is None:
        return
    errors = sorted(v.iter_errors(msg), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise ValueError(f"firefly violates schema v1.0.0 at {where}: {e.message}")


# --- sending ------------------------------------------------------------------------------------

def parse_target(text: str) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or a bare IPv6 address -> (host, port)."""
    s = text.strip()
    if s.startswith("["):
        host, _, rest = s[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else PORT
    if s.count(":") == 1:
        host, port = s.split(":")
        return host, int(port)
    return s, PORT


class Sender:
    """One UDP socket per family; send errors are counted and logged, never raised."""

    def __init__(self):
        self._socks: dict[int, socket.socket] = {}
        self.sent = 0
        self.errors = 0

    def socket(self, family: int) -> socket.socket:
        if family not in self._socks:
            self._socks[family] = socket.socket(family, socket.SOCK_DGRAM)
        return self._socks[family]

    def send(self, data: bytes, host: str, port: int = PORT) -> bool:
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
            self.socket(info[0]).sendto(data, info[4])
            self.sent += 1
            return True
        except OSError as exc:
            self.errors += 1
            log.error("firefly to %s port %d not sent: %s", host, port, exc.strerror or exc)
            return False

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
