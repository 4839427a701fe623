"""`gridbpf agent run --config agent.toml`: the long-running tracer and exporter."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    agent = sub.add_parser("agent", help="long-running request tracing with Prometheus/OTLP export")
    verbs = agent.add_subparsers(dest="agent_verb", required=True)
    p = verbs.add_parser("run", help="run until SIGTERM/SIGINT")
    p.add_argument("--config", required=True, help="agent.toml")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    p.add_argument("--json", action="store_true", help="status and summary as JSON lines")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from ..trace.targets import TargetError
    from .config import ConfigError, load
    from .daemon import AlreadyRunning, run

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"gridbpf: {exc}", file=sys.stderr)
        return 2

    def ready(agent):
        status = {"metrics": f"http://{agent.server.addr}:{agent.server.port}/metrics",
                  "targets": agent.tracer.targets(), "ssl_libs": sorted(agent.tracer.ssl_libs),
                  "otlp": cfg.otlp.endpoint if cfg.otlp else None,
                  "aggregation": agent.aggregation}
        if args.json:
            print(json.dumps({"status": "running", **status}), flush=True)
        else:
            print(f"gridbpf agent: serving {status['metrics']}, tracing pids "
                  f"{' '.join(map(str, status['targets'])) or '(none yet)'}, in-kernel "
                  f"aggregation {agent.aggregation}", flush=True)

    try:
        return run(cfg, args.duration, ready=ready)
    except (AlreadyRunning, TargetError, PermissionError, OSError, ValueError) as exc:
        print(f"gridbpf: {exc}", file=sys.stderr)
        return 2
