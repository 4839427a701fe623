"""`make bench`: run every bench/bench_*.py (or those named), print each result and the ratios,
and write them all as JSON to bench/results/latest.json."""
from __future__ import annotations

import importlib
import json
import pathlib
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(p.stem for p in HERE.glob("bench_*.py"))
    results, failed = {}, []
    for name in names:
        name = name if name.startswith("bench_") else f"bench_{name}"
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            results[name] = importlib.import_module(f"bench.{name}").run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc().splitlines()[-1]}
        results[name]["wall_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps(results[name], indent=2, default=str), flush=True)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out / 'latest.json'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
