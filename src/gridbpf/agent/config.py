"""agent.toml: validated with errors that name the key.

    [targets]                      # at least one selector
    comm = ["nginx"]               # also: pid = [..], cgroup = ["/system.slice/x.service"], unit = [..]

    [trace]
    tls = true                     # hook libssl's SSL_read/SSL_write in the targets
    java_agent = true              # load the Java agent into target JVMs (JSSE TLS)
    drain_ms = 50                  # how often the ring buffer is drained
    idle_report_s = 5              # report the last request of an idle keep-alive connection
    aggregate = true               # simple requests (GET/HEAD, no body) into histograms in the
                                   # kernel; false: every request through the ring buffer

    [metrics]
    listen = "127.0.0.1:9464"      # Prometheus /metrics
    max_series = 1000              # cardinality cap per metric
    routes = ["/{vo}/{path}"]      # route templates for the http.route label

    [otlp]                         # optional
    endpoint = "http://127.0.0.1:4318"
    interval = 10                  # seconds between metric exports
    spans = true                   # one span per request
    max_spans_per_second = 1000
    service_name = "storage"

    [agent]
    lock = "/run/gridbpf/agent.lock"   # a second agent with the same lock refuses to start
    collectors = ["tcp", "io"]         # also: stuck, offcpu, mem (on the pids traced at start)

    [checksum]                     # optional: in-kernel ADLER32 of files the service writes
    paths = ["/storage/atlas"]     # the storage areas (directories followed at any depth)
    store = true                   # set user.storm.checksum.adler32 at close
    # whose writes: by default the one selector of [targets]; else one of
    # pid = 1234, comm = "java", cgroup = "/system.slice/x.service", unit = "x.service"
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..trace.targets import TargetSpec
from .routes import RouteError, compile_template


class ConfigError(ValueError):
    pass


@dataclass
class OtlpConfig:
    endpoint: str
    interval: float = 10.0
    spans: bool = True
    max_spans_per_second: int = 1000
    service_name: str = "gridbpf"


@dataclass
class ChecksumConfig:
    paths: list[str]
    store: bool = True
    # exactly one writer selector (checksum.targets takes one)
    pid: int | None = None
    comm: str | None = None
    cgroup: str | None = None
    unit: str | None = None


@dataclass
class AgentConfig:
    targets: TargetSpec
    tls: bool = True
    java_agent: bool = True
    drain_ms: int = 50
    idle_report_s: float = 5.0
    aggregate: bool = True
    listen_addr: str = "127.0.0.1"
    listen_port: int = 9464
    max_series: int = 1000
    routes: list[str] = field(default_factory=list)
    otlp: OtlpConfig | None = None
    lock: str = "/run/gridbpf/agent.lock"
    collectors: list[str] = field(default_factory=list)
    checksum: ChecksumConfig | None = None


_SCHEMA = {
    "targets": {"pid": list, "comm": list, "cgroup": list, "unit": list},
    "trace": {"tls": bool, "java_agent": bool, "drain_ms": int, "idle_report_s": (int, float),
              "aggregate": bool},
    "metrics": {"listen": str, "max_series": int, "routes": list},
    "otlp": {"endpoint": str, "interval": (int, float), "spans": bool,
             "max_spans_per_second": int, "service_name": str},
    "agent": {"lock": str, "collectors": list},
    "checksum": {"paths": list, "store": bool, "pid": int, "comm": str, "cgroup": str, "unit": str},
}

# [agent] collectors: the "why is it stuck" tracers (gridbpf.trace.stuck.collectors), run on the
# pids the agent traces when it starts
COLLECTORS = ("stuck", "offcpu", "io", "tcp", "mem")


def load(path: str | Path) -> AgentConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(doc, str(path))


def parse(doc: dict, where: str = "agent.toml") -> AgentConfig:
    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {msg}")

    for section, body in doc.items():
        if section not in _SCHEMA:
            raise err(section, f"unknown section (known: {', '.join(_SCHEMA)})")
        if not isinstance(body, dict):
            raise err(section, "must be a table")
        for key, value in body.items():
            want = _SCHEMA[section].get(key)
            if want is None:
                raise err(f"{section}.{key}", f"unknown key (known: {', '.join(_SCHEMA[section])})")
            if isinstance(value, bool) and want in (int, (int, float)) or not isinstance(value, want):
                name = want.__name__ if isinstance(want, type) else "number"
                raise err(f"{section}.{key}", f"expected {name}, got {value!r}")
    t = doc.get("targets", {})
    for key, typ in (("pid", int), ("comm", str), ("cgroup", str), ("unit", str)):
        for v in t.get(key, []):
            if not isinstance(v, typ) or isinstance(v, bool):
                raise err(f"targets.{key}", f"expected a list of {typ.__name__}, got {v!r}")
    spec = TargetSpec(pids=t.get("pid", []), comms=t.get("comm", []), cgroups=t.get("cgroup", []),
                      units=t.get("unit", []))
    if spec.empty:
        raise err("targets", "give at least one of pid, comm, cgroup, unit")
    tr, m, a = doc.get("trace", {}), doc.get("metrics", {}), doc.get("agent", {})
    cfg = AgentConfig(targets=spec, tls=tr.get("tls", True), java_agent=tr.get("java_agent", True),
                      drain_ms=tr.get("drain_ms", 50),
                      idle_report_s=float(tr.get("idle_report_s", 5.0)),
                      aggregate=tr.get("aggregate", True),
                      max_series=m.get("max_series", 1000), routes=m.get("routes", []),
                      lock=a.get("lock", "/run/gridbpf/agent.lock"))
    cfg.collectors = a.get("collectors", [])
    for c in cfg.collectors:
        if c not in COLLECTORS:
            raise err("agent.collectors", f"unknown collector {c!r} (known: {', '.join(COLLECTORS)})")
    if not 10 <= cfg.drain_ms <= 10000:
        raise err("trace.drain_ms", f"must be between 10 and 10000, got {cfg.drain_ms}")
    if cfg.idle_report_s < 0:
        raise err("trace.idle_report_s", f"must be 0 (off) or positive, got {cfg.idle_report_s}")
    if cfg.max_series < 1:
        raise err("metrics.max_series", f"must be at least 1, got {cfg.max_series}")
    listen = m.get("listen", "127.0.0.1:9464")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise err("metrics.listen", f"expected 'host:port', got {listen!r}")
    cfg.listen_addr, cfg.listen_port = host.strip("[]"), int(port)
    for r in cfg.routes:
        if not isinstance(r, str):
            raise err("metrics.routes", f"expected strings, got {r!r}")
        try:
            compile_template(r)
        except RouteError as exc:
            raise err("metrics.routes", str(exc)) from None
    if "checksum" in doc:
        cfg.checksum = _checksum(doc["checksum"], spec, err)
    if "otlp" in doc:
        o = doc["otlp"]
        if "endpoint" not in o:
            raise err("otlp.endpoint", "required when [otlp] is present")
        if not o["endpoint"].startswith(("http://", "https://")):
            raise err("otlp.endpoint", f"must be an http:// or https:// URL, got {o['endpoint']!r}")
        cfg.otlp = OtlpConfig(endpoint=o["endpoint"], interval=float(o.get("interval", 10)),
                              spans=o.get("spans", True),
                              max_spans_per_second=o.get("max_spans_per_second", 1000),
                              service_name=o.get("service_name", "gridbpf"))
        if cfg.otlp.interval <= 0:
            raise err("otlp.interval", "must be positive")
    return cfg


def _checksum(c: dict, spec: TargetSpec, err) -> ChecksumConfig:
    paths = c.get("paths", [])
    if not paths:
        raise err("checksum.paths", "give at least one directory (the storage areas)")
    for p in paths:
        if not isinstance(p, str) or not p.startswith("/"):
            raise err("checksum.paths", f"expected absolute directory paths, got {p!r}")
    own = {k: c[k] for k in ("pid", "comm", "cgroup", "unit") if k in c}
    if len(own) > 1:
        raise err("checksum", f"give one writer selector, not {', '.join(own)}")
    if not own:
        # the one selector of [targets]; several cannot be expressed in the checksum program
        given = [(k, v) for k, vs in (("pid", spec.pids), ("comm", spec.comms), ("cgroup", spec.cgroups),
                                      ("unit", spec.units)) for v in vs]
        if len(given) != 1:
            raise err("checksum", f"[targets] selects {len(given)} ({spec.describe()}): give one of "
                      "checksum.pid, comm, cgroup, unit (the processes writing the storage area)")
        own = dict(given)
    return ChecksumConfig(paths=list(paths), store=c.get("store", True), **own)
