"""`gridbpf trace http ...`: one line (or JSON object) per request of the selected processes."""
from __future__ import annotations

import json
import signal
import sys
import time

from ..cli import add_target_args, get_trace_subparsers, spec_from_args


def register(sub) -> None:
    verbs = get_trace_subparsers(sub)
    p = verbs.add_parser("http", help="one line per HTTP request of the target processes")
    add_target_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    p.add_argument("--count", type=int, default=0, help="stop after this many requests")
    p.add_argument("--max-rate", type=float, default=0, metavar="N",
                   help="print at most N requests a second, evenly chosen; the others are "
                        "counted in the output (default: all)")
    p.add_argument("--no-tls", action="store_true", help="do not hook libssl (SSL_read/SSL_write)")
    p.add_argument("--no-java-agent", action="store_true",
                   help="do not load the Java agent into target JVMs (their TLS stays unread)")
    p.add_argument("--idle-report", type=float, default=5.0, metavar="S",
                   help="report the last request of a keep-alive connection idle this long "
                        "(default 5; 0: only when the next request starts or it closes)")
    p.set_defaults(func=cmd_http)


def cmd_http(args) -> int:
    from ..targets import TargetError
    from .stream import MAX_RATE, JsonLines, LineWriter, RateLimit, TextLines
    from .tracer import DRAIN_MS, EV_REQUEST, HttpTracer

    if args.max_rate < 0:
        print(f"gridbpf: --max-rate must be positive (got {args.max_rate:g})", file=sys.stderr)
        return 2
    spec = spec_from_args(args)
    try:
        tracer = HttpTracer(spec, tls=not args.no_tls, idle_report_s=args.idle_report,
                            java_agent=not args.no_java_agent)
    except (TargetError, PermissionError) as exc:
        print(f"gridbpf: {exc}", file=sys.stderr)
        return 2
    # attached: say so (scripts and tests wait for this line before sending traffic)
    print(f"gridbpf: tracing {spec.describe()} (pids {' '.join(map(str, tracer.targets())) or 'none yet'})",
          file=sys.stderr, flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    deadline = time.monotonic() + args.duration if args.duration else None
    # a batch is encoded from its columns and written in one go by a thread (stream.py): the
    # cost per printed request is what a busy server pays for being watched
    encode = (JsonLines if args.json else TextLines)(tracer).encode
    out = LineWriter(sys.stdout.fileno(), json_lines=args.json)
    limit = RateLimit(args.max_rate) if args.max_rate > 0 else None
    sys.stdout.flush()
    shown, warned = 0, 0
    end_reason = None
    last_refresh = time.monotonic()

    def emit(arr) -> None:
        nonlocal shown
        if limit is not None and len(arr):
            if not (arr["kind"] == EV_REQUEST).all():
                arr = tracer.requests_only(arr)     # (a copy: only when other kinds came)
            keep = limit.take(len(arr))
            if keep is not None:        # the others are not even decoded
                out.drop(len(arr) - len(keep), MAX_RATE)
                arr = arr[keep]
        lines = encode(arr)
        if args.count:
            lines = lines[:args.count - shown]
        shown += len(lines)
        out.put(lines)

    def drain(timeout_ms: int) -> None:
        # copied out of the ring, not encoded where they lie (lend_chunks, as the agent does):
        # the ring would then hold the backlog of a reader starved while it encodes, and a
        # saturating burst lost a record in one run of five here
        emit(tracer.poll_array(timeout_ms))

    with tracer:
        try:
            while not stop and not out.broken:
                drain(DRAIN_MS)
                for w in tracer.warnings[warned:]:
                    print(f"gridbpf: {w}", file=sys.stderr)
                warned = len(tracer.warnings)
                if args.count and shown >= args.count:
                    break
                if deadline and time.monotonic() >= deadline:
                    break
                if time.monotonic() - last_refresh >= 1:
                    tracer.refresh()
                    last_refresh = time.monotonic()
                    # only pids were given and all of them are gone: nothing more can come
                    if spec.pids and not (spec.comms or spec.cgroups or spec.units) \
                            and not tracer.targets():
                        end_reason = f"target {spec.describe()} exited"
                        break
        except KeyboardInterrupt:
            pass
        try:
            # the last requests of closing connections are still in the ring
            if not (args.count and shown >= args.count) and not out.broken:
                drain(0)
        finally:
            out.close()          # what is queued is written, and the counts of what is not
        stats = tracer.stats()
    if end_reason:
        print(f"gridbpf: {end_reason}", file=sys.stderr)
    # requests: lines printed; not_printed: requests left out by --max-rate or because the
    # reader was behind (or went away); events_lost: records the kernel could not put in the ring
    summary = {"requests": out.printed, "not_printed": out.not_printed_total,
               "not_printed_max_rate": out.not_printed.get(MAX_RATE, 0), **stats}
    if args.json:
        print(json.dumps({"summary": summary}), file=sys.stderr)
    else:
        print("gridbpf: " + " ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    return 0
