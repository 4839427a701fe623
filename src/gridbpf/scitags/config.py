"""scitags.toml: validated into a Config, every error naming its key.

    [marking]
    interfaces = ["eth0", {name = "veth1", netns = "lab-x"}]   # tc egress (and ingress) here
    count_ingress = true      # also count bytes received on the flows (firefly usage.received)
    mark_reverse = false      # also mark the flows' reverse direction (ACKs of uploads)

    [pipe]
    path = "/var/run/flowd"   # flowd's named pipe; "" disables it

    [api]
    listen = "127.0.0.1:8793" # HTTP API and /metrics

    [firefly]
    enabled = true
    to_destination = true     # to port 10514 of each flow's destination
    collectors = []           # "host", "host:port", "[v6]:port"
    interval = 0              # seconds between "ongoing" fireflies, 0 = start and end only
    application = "gridbpf"   # context.application
    hostname = ""             # syslog HOSTNAME, default the machine's

    [registry]
    path = ""                 # api.json to use instead of the bundled/updated one

    [[auto_tag]]              # traced requests whose path starts with PREFIX
    prefix = "/atlas/"
    experiment = "atlas"
    activity = "default"

    [trace]                   # the service whose requests auto_tag follows (gridbpf.trace)
    pids = []                 # any of pids / comms / cgroups (cgroup v2 paths)
    comms = ["nginx"]
    cgroups = []
    tls = true                # also read HTTPS through the libssl uprobes

    [daemon]
    lock = "/run/gridbpf/scitags.lock"
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

from .. import __version__
from .marker import Interface


class ConfigError(ValueError):
    pass


@dataclass
class AutoTagRule:
    prefix: str
    experiment: str | int
    activity: str | int


@dataclass
class Config:
    interfaces: list[Interface] = field(default_factory=list)
    count_ingress: bool = True
    mark_reverse: bool = False
    pipe_path: str = "/var/run/flowd"
    api_listen: tuple[str, int] = ("127.0.0.1", 8793)
    firefly_enabled: bool = True
    firefly_to_destination: bool = True
    firefly_collectors: list[str] = field(default_factory=list)
    firefly_interval: float = 0.0
    application: str = f"gridbpf {__version__}"
    hostname: str = ""
    registry_path: str = ""
    auto_tag: list[AutoTagRule] = field(default_factory=list)
    trace_pids: list[int] = field(default_factory=list)
    trace_comms: list[str] = field(default_factory=list)
    trace_cgroups: list[str] = field(default_factory=list)
    trace_tls: bool = True
    lock_path: str = "/run/gridbpf/scitags.lock"


SECTIONS = {
    "marking": {"interfaces", "count_ingress", "mark_reverse"},
    "pipe": {"path"},
    "api": {"listen"},
    "firefly": {"enabled", "to_destination", "collectors", "interval", "application", "hostname"},
    "registry": {"path"},
    "auto_tag": {"prefix", "experiment", "activity"},
    "trace": {"pids", "comms", "cgroups", "tls"},
    "daemon": {"lock"},
}


def _get(table: dict, section: str, key: str, types, default):
    if key not in table:
        return default
    v = table[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise ConfigError(f"{section}.{key}: expected {names}, got {type(v).__name__} {v!r}")
    return v


def parse_listen(text: str, key: str = "api.listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
    return host, int(port)


def parse(data: dict) -> Config:
    cfg = Config()
    for section, value in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(sorted(SECTIONS))})")
        tables = value if section == "auto_tag" else [value]
        if section == "auto_tag" and not isinstance(value, list):
            raise ConfigError("auto_tag: use [[auto_tag]] tables")
        for t in tables:
            if not isinstance(t, dict):
                raise ConfigError(f"[{section}] is not a table")
            unknown = sorted(set(t) - SECTIONS[section])
            if unknown:
                raise ConfigError(f"{section}.{unknown[0]}: unknown key")

    m = data.get("marking", {})
    for i, iface in enumerate(_get(m, "marking", "interfaces", list, [])):
        if isinstance(iface, str) and iface:
            cfg.interfaces.append(Interface(iface))
        elif isinstance(iface, dict) and isinstance(iface.get("name"), str) and set(iface) <= {"name", "netns"}:
            cfg.interfaces.append(Interface(iface["name"], iface.get("netns")))
        else:
            raise ConfigError(f"marking.interfaces[{i}]: expected a name or {{name, netns}}, got {iface!r}")
    cfg.count_ingress = _get(m, "marking", "count_ingress", bool, cfg.count_ingress)
    cfg.mark_reverse = _get(m, "marking", "mark_reverse", bool, cfg.mark_reverse)

    cfg.pipe_path = _get(data.get("pipe", {}), "pipe", "path", str, cfg.pipe_path)
    if "listen" in data.get("api", {}):
        cfg.api_listen = parse_listen(_get(data["api"], "api", "listen", str, ""))

    f = data.get("firefly", {})
    cfg.firefly_enabled = _get(f, "firefly", "enabled", bool, cfg.firefly_enabled)
    cfg.firefly_to_destination = _get(f, "firefly", "to_destination", bool, cfg.firefly_to_destination)
    cfg.firefly_collectors = _get(f, "firefly", "collectors", list, [])
    for i, c in enumerate(cfg.firefly_collectors):
        if not isinstance(c, str) or not c:
            raise ConfigError(f"firefly.collectors[{i}]: expected a host[:port] string, got {c!r}")
    interval = _get(f, "firefly", "interval", (int, float), 0)
    if interval < 0:
        raise ConfigError(f"firefly.interval: {interval} is negative")
    cfg.firefly_interval = float(interval)
    cfg.application = _get(f, "firefly", "application", str, cfg.application)
    cfg.hostname = _get(f, "firefly", "hostname", str, "")

    cfg.registry_path = _get(data.get("registry", {}), "registry", "path", str, "")
    for i, r in enumerate(data.get("auto_tag", [])):
        where = f"auto_tag[{i}]"
        prefix = _get(r, where, "prefix", str, "")
        if not prefix.startswith("/"):
            raise ConfigError(f"{where}.prefix: {prefix!r} must start with '/'")
        if "experiment" not in r:
            raise ConfigError(f"{where}.experiment: missing")
        cfg.auto_tag.append(AutoTagRule(prefix, _get(r, where, "experiment", (str, int), ""),
                                        _get(r, where, "activity", (str, int), "default")))
    t = data.get("trace", {})
    for key, kind in (("pids", int), ("comms", str), ("cgroups", str)):
        values = _get(t, "trace", key, list, [])
        for i, v in enumerate(values):
            if not isinstance(v, kind) or isinstance(v, bool) or v in ("", 0):
                raise ConfigError(f"trace.{key}[{i}]: expected a {kind.__name__}, got {v!r}")
        setattr(cfg, f"trace_{key}", values)
    cfg.trace_tls = _get(t, "trace", "tls", bool, True)
    cfg.lock_path = _get(data.get("daemon", {}), "daemon", "lock", str, cfg.lock_path)
    return cfg


def load(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: {exc}") from None
    return parse(data)
