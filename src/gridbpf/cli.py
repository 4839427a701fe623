"""`gridbpf <capability> <verb>`: wires the capabilities' command lines together."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers); its verbs set args.func(args) -> int.
COMMAND_MODULES = [
    "gridbpf.agent.cli",
    "gridbpf.trace.http.cli",
    "gridbpf.trace.stuck.cli",
    "gridbpf.doctor",
    "gridbpf.lab.cli",
    "gridbpf.scitags.cli",
    "gridbpf.checksum.cli",
    "gridbpf.lb.cli",
]


class CliError(Exception):
    """A problem to report in one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridbpf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # e.g. `gridbpf doctor --json | head`
        sys.stderr.close()
        return 0
    except Exception as exc:  # one line, naming the problem; tracebacks only with GRIDBPF_DEBUG
        import os
        if os.environ.get("GRIDBPF_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"gridbpf: error: {first}", file=sys.stderr)
        rest = str(exc).splitlines()[1:]
        for line in rest[-12:]:
            print(f"  {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
