"""Flow identities and the inputs that name them: flowd's named-pipe lines and API requests."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

PROTOCOLS = {"tcp": 6, "udp": 17}
STATES = ("start", "end")


class InputError(ValueError):
    """Malformed input: the message says what is wrong in one line."""


@dataclass(frozen=True)
class FiveTuple:
    """A flow in its data direction: packets go from src to dst."""
    protocol: str                   # "tcp" | "udp"
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    src_port: int
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst_port: int

    @property
    def afi(self) -> str:
        return f"ipv{self.src.version}"

    def reversed(self) -> "FiveTuple":
        return FiveTuple(self.protocol, self.dst, self.dst_port, self.src, self.src_port)

    def __str__(self) -> str:
        def ep(a, p):
            return f"[{a}]:{p}" if a.version == 6 else f"{a}:{p}"
        return f"{self.protocol} {ep(self.src, self.src_port)} -> {ep(self.dst, self.dst_port)}"

    def to_json(self) -> dict:
        return {"protocol": self.protocol, "src": str(self.src), "src_port": self.src_port,
                "dst": str(self.dst), "dst_port": self.dst_port}


def parse_address(text: str, what: str):
    """An IP address as Java, nginx or a person writes it: brackets, a zone (%eth0) and the
    IPv4-mapped form of dual-stack sockets (::ffff:192.0.2.1 is the IPv4 flow it is)."""
    s = str(text).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    s = s.split("%", 1)[0]
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        raise InputError(f"{what} {text!r} is not an IP address") from None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_port(text, what: str) -> int:
    try:
        port = int(str(text).strip(), 10)
    except ValueError:
        raise InputError(f"{what} {text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise InputError(f"{what} {port} is out of range 1-65535")
    return port


def make_tuple(protocol: str, src, src_port, dst, dst_port) -> FiveTuple:
    proto = str(protocol).strip().lower()
    if proto not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r} is not tcp or udp")
    s, d = parse_address(src, "source address"), parse_address(dst, "destination address")
    if s.version != d.version:
        raise InputError(f"source {s} and destination {d} are not of the same address family")
    return FiveTuple(proto, s, parse_port(src_port, "source port"), d,
                     parse_port(dst_port, "destination port"))


@dataclass(frozen=True)
class FlowEvent:
    """start/end of a flow, with experiment/activity as given (names or numbers)."""
    state: str
    flow: FiveTuple
    experiment: str | int
    activity: str | int


def parse_pipe_line(line: str) -> FlowEvent:
    """`start|end tcp SRC SPORT DST DPORT EXP ACT`, as StoRM WebDAV and flowd write it.
    Experiment and activity may be numbers or (single-word) names."""
    fields = line.split()
    if len(fields) != 8:
        raise InputError(f"expected 8 fields 'start|end tcp SRC SPORT DST DPORT EXP ACT', got {len(fields)}")
    state = fields[0].lower()
    if state not in STATES:
        raise InputError(f"state {fields[0]!r} is not start or end")
    flow = make_tuple(*fields[1:6])
    return FlowEvent(state, flow, fields[6], fields[7])


def parse_api_request(body: dict) -> FlowEvent:
    """The HTTP API's JSON body: {"state", "protocol", "src", "src_port", "dst", "dst_port",
    "experiment", "activity"} (state defaults to start, protocol to tcp, activity to default)."""
    if not isinstance(body, dict):
        raise InputError("request body is not a JSON object")
    known = {"state", "protocol", "src", "src_port", "dst", "dst_port", "experiment", "activity"}
    extra = sorted(set(body) - known)
    if extra:
        raise InputError(f"unknown field {extra[0]!r}")
    for key in ("src", "src_port", "dst", "dst_port"):
        if key not in body:
            raise InputError(f"missing field {key!r}")
    state = str(body.get("state", "start")).lower()
    if state not in STATES:
        raise InputError(f"state {body.get('state')!r} is not start or end")
    if state == "start" and "experiment" not in body:
        raise InputError("missing field 'experiment'")
    flow = make_tuple(body.get("protocol", "tcp"), body["src"], body["src_port"], body["dst"], body["dst_port"])
    return FlowEvent(state, flow, body.get("experiment", ""), body.get("activity", "default"))
