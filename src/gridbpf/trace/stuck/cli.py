"""`gridbpf trace stuck|offcpu|io|tcp|mem`: why is a service stuck (verbs under `gridbpf trace`)."""
from __future__ import annotations

import json
import signal
import sys
import time

from ..cli import add_target_args, get_trace_subparsers, spec_from_args
from .offcpu import parse_duration


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        import argparse
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub) -> None:
    verbs = get_trace_subparsers(sub)

    p = verbs.add_parser("stuck", help="threads blocked longer than a threshold, live, with "
                         "syscall, stacks and waker")
    add_target_args(p)
    p.add_argument("--threshold", type=_duration, default=2.0, help="report blocks longer than "
                   "this (default 2s)")
    p.add_argument("--duration", type=_duration, default=0, help="stop after this long (default: "
                   "until interrupted)")
    p.add_argument("--no-user-stacks", action="store_true", help="kernel stacks only")
    p.add_argument("--json", action="store_true", help="one JSON object per report and line")
    p.set_defaults(func=cmd_stuck)

    p = verbs.add_parser("offcpu", help="off-CPU time by stack: folded stacks and pprof")
    add_target_args(p)
    p.add_argument("--duration", type=_duration, default=30.0, help="how long to trace (30s)")
    p.add_argument("--min-block", type=_duration, default=0.0, help="ignore shorter blocks")
    p.add_argument("--folded", metavar="FILE", help="write folded stacks here (default: stdout "
                   "unless --json)")
    p.add_argument("--pprof", metavar="FILE", help="write a gzipped pprof profile here")
    p.add_argument("--no-user-stacks", action="store_true", help="kernel stacks only")
    p.add_argument("--json", action="store_true", help="totals per stack as JSON")
    p.set_defaults(func=cmd_offcpu)

    p = verbs.add_parser("io", help="file I/O latency per file and operation, slowest operations")
    add_target_args(p)
    p.add_argument("--duration", type=_duration, default=0, help="stop after this long (default: "
                   "until interrupted)")
    p.add_argument("--interval", type=_duration, default=0, help="print the table this often")
    p.add_argument("--slow", type=_duration, default=0.010, help="operations at least this slow "
                   "are listed one by one (10ms)")
    p.add_argument("--top", type=int, default=10, help="how many slowest operations to keep")
    p.add_argument("--all-files", action="store_true", help="also pipes, sockets, devices")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_io)

    p = verbs.add_parser("tcp", help="per peer: bytes, RTT, retransmits, resets, state changes")
    add_target_args(p)
    p.add_argument("--duration", type=_duration, default=0, help="stop after this long (default: "
                   "until interrupted)")
    p.add_argument("--interval", type=_duration, default=0, help="print the table this often")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_tcp)

    p = verbs.add_parser("mem", help="RSS over time, page faults, mmap/brk growth, JVM GC pauses")
    add_target_args(p)
    p.add_argument("--duration", type=_duration, default=0, help="stop after this long (default: "
                   "until interrupted)")
    p.add_argument("--interval", type=_duration, default=1.0, help="sample this often (1s)")
    p.add_argument("--no-gc", action="store_true", help="do not hook the JVM's GC probes")
    p.add_argument("--json", action="store_true", help="one JSON object per sample and process")
    p.set_defaults(func=cmd_mem)


class _Stop:
    """SIGTERM/SIGINT end the loop cleanly (links detached on the way out)."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_):
        self.flag = True

    def __bool__(self):
        return self.flag


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_stuck(args) -> int:
    from .monitor import StuckMonitor, format_report, public
    stop = _Stop()
    with StuckMonitor(spec_from_args(args), threshold_s=args.threshold,
                      user_stacks=not args.no_user_stacks) as mon:
        if not args.json:
            print(f"tracing {len(mon.tracer.tgids)} process(es), threads blocked longer than "
                  f"{args.threshold:g}s (Ctrl-C to stop)", file=sys.stderr)
        end = time.monotonic() + args.duration if args.duration else None
        try:
            while not stop and (end is None or time.monotonic() < end):
                for r in mon.poll(200):
                    _out(json.dumps(public(r)) if args.json else format_report(r) + "\n")
        except KeyboardInterrupt:
            pass
        st = mon.stats()
        if any(st.values()):
            print(f"gridbpf: losses: {st}", file=sys.stderr)
    return 0


def cmd_offcpu(args) -> int:
    from .offcpu import folded, pprof, run_offcpu
    stop = _Stop()
    start = time.monotonic()
    try:
        totals, stats = run_offcpu(spec_from_args(args), args.duration, args.min_block,
                                   user_stacks=not args.no_user_stacks, stop=lambda: bool(stop))
    except KeyboardInterrupt:
        return 130
    took = time.monotonic() - start
    text = folded(totals)
    if args.folded:
        with open(args.folded, "w") as f:
            f.write(text)
    if args.pprof:
        with open(args.pprof, "wb") as f:
            f.write(pprof(totals, took))
    if args.json:
        _out(json.dumps({"duration_s": took, "stats": stats, "stacks": [
            {"thread": t.thread, "tid": t.tid, "offcpu_s": t.total_ns / 1e9, "count": t.count,
             "kernel_stack": [f.to_json() for f in t.kernel],
             "user_stack": [f.to_json() for f in t.user]} for t in totals]}))
    elif not args.folded:
        sys.stdout.write(text)
    if any(stats.values()):
        print(f"gridbpf: losses: {stats}", file=sys.stderr)
    return 0


def _run_loop(tracer, args, report) -> None:
    """Poll until --duration, SIGTERM or Ctrl-C; print REPORT() every --interval."""
    stop = _Stop()
    end = time.monotonic() + args.duration if args.duration else None
    next_print = time.monotonic() + args.interval if args.interval else None
    try:
        while not stop and (end is None or time.monotonic() < end):
            tracer.poll(200)
            if next_print and time.monotonic() >= next_print:
                report()
                next_print += args.interval
    except KeyboardInterrupt:
        pass
    tracer.poll(0)


def cmd_io(args) -> int:
    from .io import IoTracer, format_table
    with IoTracer(spec_from_args(args), slow_s=args.slow, regular_only=not args.all_files,
                  top=args.top) as tr:
        def report():
            files, slow = tr.files(), tr.slowest_ops()
            if args.json:
                _out(json.dumps({"files": files, "slowest": [s.to_json() for s in slow],
                                 "stats": tr.stats()}))
            else:
                _out(format_table(files, slow) + "\n")
        _run_loop(tr, args, report)
        report()
        st = tr.stats()
        if any(st.values()):
            print(f"gridbpf: losses: {st}", file=sys.stderr)
    return 0


def cmd_tcp(args) -> int:
    from .tcp import TcpTracer, format_table
    with TcpTracer(spec_from_args(args)) as tr:
        for note in tr.notes:
            print(f"gridbpf: note: {note}", file=sys.stderr)

        def report():
            peers = tr.peers()
            _out(json.dumps({"peers": peers, "stats": tr.stats()}) if args.json
                 else format_table(peers) + "\n")
        _run_loop(tr, args, report)
        report()
    return 0


def cmd_mem(args) -> int:
    from .mem import MemTracer, format_row
    if args.interval <= 0:
        raise ValueError("--interval must be positive")
    with MemTracer(spec_from_args(args), gc=not args.no_gc) as tr:
        def report():
            for row in tr.sample():
                _out(json.dumps(row) if args.json else format_row(row))
        report()
        _run_loop(tr, args, report)
        report()
    return 0
