"""`gridbpf trace <verb>`: what the tracing verbs share (the `trace` command, target options)."""
from __future__ import annotations

import argparse

_TRACE_PARSERS = "_gridbpf_trace_subparsers"


def get_trace_subparsers(sub) -> argparse._SubParsersAction:
    """The subparsers of `gridbpf trace`, creating `trace` once (other modules add verbs too)."""
    existing = getattr(sub, _TRACE_PARSERS, None)
    if existing is not None:
        return existing
    trace = sub.add_parser("trace", help="trace unmodified services (HTTP requests, ...)")
    verbs = trace.add_subparsers(dest="trace_verb", required=True)
    setattr(sub, _TRACE_PARSERS, verbs)
    return verbs


def add_target_args(p: argparse.ArgumentParser) -> None:
    """--pid/--comm/--cgroup/--unit, repeatable: shared by the tracing verbs."""
    p.add_argument("--pid", type=int, action="append", default=[], help="process id (and its children)")
    p.add_argument("--comm", action="append", default=[], help="command name (new processes too)")
    p.add_argument("--cgroup", action="append", default=[], help="cgroup v2 path (new processes too)")
    p.add_argument("--unit", action="append", default=[], help="systemd unit")


def spec_from_args(args):
    from .targets import TargetSpec
    return TargetSpec(pids=args.pid, comms=args.comm, cgroups=args.cgroup, units=args.unit)
