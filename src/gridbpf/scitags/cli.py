"""`gridbpf scitags run|flows|flow|decode|encode|registry`."""
from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request

from .. import sdnotify
from . import label
from .config import Config, load, parse_listen
from .registry import Registry, install, UPDATED_PATH


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _api_base(args) -> str:
    if args.api:
        host, port = parse_listen(args.api, "--api")
    elif args.config:
        host, port = load(args.config).api_listen
    else:
        host, port = Config().api_listen
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _call(args, path: str, body: dict | None = None) -> dict:
    url = _api_base(args) + path
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            msg = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            msg = exc.reason
        raise RuntimeError(msg) from None
    except urllib.error.URLError as exc:
        raise RuntimeError(f"no scitags daemon at {url} ({exc.reason})") from None


# --- verbs --------------------------------------------------------------------------------------

def _run(args) -> int:
    from .autotag import AutoTagger
    from .daemon import Daemon
    cfg = load(args.config)
    handler = logging.StreamHandler(sys.stderr)
    if args.json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s scitags %(levelname)s %(message)s"))
    logger = logging.getLogger("gridbpf.scitags")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    daemon = Daemon(cfg)
    tagger = AutoTagger(daemon, cfg.auto_tag, daemon.registry) if cfg.auto_tag else None
    daemon.start()
    try:
        if tagger is not None:
            daemon.start_tracing(tagger)
        logger.info("running (registry: %s)", daemon.registry.source)
        sdnotify.ready("marking" if daemon.marker is not None else "fireflies only")
        daemon.run()
        sdnotify.stopping()
    finally:
        daemon.close()
        logger.info("stopped, everything detached")
    return 0


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        return json.dumps({"time": record.created, "level": record.levelname.lower(),
                           "message": record.getMessage()})


def _flows(args) -> int:
    data = _call(args, "/flows")
    if args.json:
        _print_json(data)
        return 0
    flows = data["flows"]
    if not flows:
        print("no active flows")
    for f in flows:
        mark = f["label_hex"] if f["markable"] else "not markable (IPv4)"
        print(f"{f['protocol']} [{f['src']}]:{f['src_port']} -> [{f['dst']}]:{f['dst_port']}  "
              f"{f['experiment']}/{f['activity']}  label {mark}  sent {f['sent_bytes']} B "
              f"({f['sent_packets']} pkts) received {f['received_bytes']} B  via {f['source']}")
    k = data.get("kernel")
    if k:
        print("kernel: " + ", ".join(f"{n} {v}" for n, v in k.items()))
    errs = sum(data["input_errors"].values())
    if errs or data["lost_flows"]:
        print(f"rejected inputs {data['input_errors']}, lost flows {data['lost_flows']}")
    return 0


def _flow(args) -> int:
    body = {"state": args.state, "protocol": args.protocol, "src": args.src, "src_port": args.src_port,
            "dst": args.dst, "dst_port": args.dst_port}
    if args.state == "start":
        body.update(experiment=args.experiment, activity=args.activity)
    f = _call(args, "/flows", body)
    if args.json:
        _print_json(f)
    else:
        print(f"{args.state} {f['protocol']} {f['src']} {f['src_port']} -> {f['dst']} {f['dst_port']}: "
              f"{f['experiment']}/{f['activity']} label {f['label_hex'] or 'none (IPv4)'}")
    return 0


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer (decimal or 0x hex)") from None


def decode_value(value: int, kind: str, reg: Registry) -> list[dict]:
    """Interpretations of VALUE as a flow label and/or a scitag integer, with registry names."""
    out = []
    kinds = [kind] if kind != "auto" else (["label"] if value >= 1 << 15 else ["scitag", "label"])
    for k in kinds:
        exp, act = label.decode(value) if k == "label" else label.split_scitag(value)
        exp_name, act_name = reg.names(exp, act)
        out.append({"as": k, "value": value, "experiment_id": exp, "activity_id": act,
                    "experiment": exp_name, "activity": act_name, "registered": act_name is not None,
                    **({"entropy": value & label.ENTROPY_MASK} if k == "label" else {})})
    return out


def _decode(args) -> int:
    value = _parse_int(args.value)
    reg = Registry.load(args.registry)
    results = decode_value(value, args.kind, reg)
    if args.kind == "auto" and len(results) > 1 and any(r["registered"] for r in results):
        results = [r for r in results if r["registered"]]     # show the meaningful reading
    if args.json:
        _print_json(results)
        return 0
    for r in results:
        names = f"{r['experiment']}/{r['activity']}" if r["registered"] else \
            f"not in the registry (experiment {r['experiment'] or '?'})"
        print(f"{r['as']} {args.value}: experiment {r['experiment_id']} activity {r['activity_id']}: {names}")
    return 0


def _encode(args) -> int:
    reg = Registry.load(args.registry)
    exp_id, act_id, exp_name, act_name = reg.resolve(args.experiment, args.activity)
    out = {"experiment": exp_name, "experiment_id": exp_id, "activity": act_name, "activity_id": act_id,
           "scitag": label.scitag(exp_id, act_id), "label_without_entropy": label.encode(exp_id, act_id)}
    if args.json:
        _print_json(out)
    else:
        print(f"{exp_name}/{act_name}: scitag {out['scitag']}, flow label "
              f"0x{out['label_without_entropy']:05x} (entropy bits zero)")
    return 0


def _registry(args) -> int:
    if args.update:
        reg = install(args.update, UPDATED_PATH)
        n = sum(1 for _ in reg.entries())
        if args.json:
            _print_json({"installed": str(UPDATED_PATH), "experiments": len(reg.experiments), "activities": n})
        else:
            print(f"installed {args.update} as {UPDATED_PATH}: {len(reg.experiments)} experiments, {n} activities "
                  "(restart the daemon to use it)")
        return 0
    reg = Registry.load(args.registry)
    if args.json:
        _print_json({"source": reg.source, "experiments": reg.to_json()})
        return 0
    print(f"registry: {reg.source}")
    for e in reg.to_json():
        print(f"{e['id']:4d} {e['experiment']}")
        for a in e["activities"]:
            print(f"       {a['id']:3d} {a['activity']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("scitags", help="SciTags flow-label marking and fireflies (flowd drop-in)")
    verbs = p.add_subparsers(dest="verb", required=True)

    def verb(name, func, help):
        v = verbs.add_parser(name, help=help)
        v.add_argument("--json", action="store_true", help="machine-readable output")
        v.set_defaults(func=func)
        return v

    def api_opts(v):
        v.add_argument("--api", help="HOST:PORT of the daemon's API (default from --config or 127.0.0.1:8793)")
        v.add_argument("--config", help="the daemon's scitags.toml (for its API address)")

    v = verb("run", _run, "run the daemon")
    v.add_argument("--config", required=True, help="scitags.toml")
    v.add_argument("-v", "--verbose", action="store_true")
    v = verb("flows", _flows, "list the active flows, their labels and byte counts")
    api_opts(v)
    v = verb("flow", _flow, "register (start) or unregister (end) a flow through the daemon's API")
    api_opts(v)
    v.add_argument("state", choices=["start", "end"])
    v.add_argument("protocol", choices=["tcp", "udp"])
    v.add_argument("src")
    v.add_argument("src_port")
    v.add_argument("dst")
    v.add_argument("dst_port")
    v.add_argument("experiment", nargs="?", default="")
    v.add_argument("activity", nargs="?", default="default")
    v = verb("decode", _decode, "a flow label or scitag integer -> experiment and activity")
    v.add_argument("value", help="decimal or 0x hex")
    v.add_argument("--as", dest="kind", choices=["auto", "label", "scitag"], default="auto")
    v.add_argument("--registry", help="api.json to use")
    v = verb("encode", _encode, "experiment and activity (names or ids) -> scitag and flow label")
    v.add_argument("experiment")
    v.add_argument("activity", nargs="?", default="default")
    v.add_argument("--registry", help="api.json to use")
    v = verb("registry", _registry, "show the registry, or install a new api.json with --update")
    v.add_argument("--update", metavar="FILE", help="validate FILE and install it for later runs")
    v.add_argument("--registry", help="api.json to show")
