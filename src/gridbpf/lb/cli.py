"""`gridbpf lb run|status|backend|check`: the balancer daemon and runtime changes to it.

Runtime changes go straight into the running balancer's pinned maps (under
/sys/fs/bpf/gridbpf/lb/INSTANCE/), under the same lock as the daemon's health checks; the XDP
program is never reloaded or detached. A SIGHUP to the daemon re-applies lb.toml.
"""
from __future__ import annotations

import json
import sys


def _print(obj, as_json: bool, text: str) -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(text)


def _run(args) -> int:
    from .daemon import run
    return run(args.config)


def _check(args) -> int:
    from .config import load
    cfg = load(args.config)
    info = {"ok": True, "instance": cfg.instance, "interface": cfg.interface, "netns": cfg.netns,
            "services": [{"name": s.name, "vip": s.vip, "port": s.port, "protocol": s.protocol,
                          "mode": s.mode, "backends": len(s.backends)} for s in cfg.services],
            "bgp": None if cfg.bgp is None else {
                "local_as": cfg.bgp.local_as, "announce_delay": cfg.bgp.announce_delay,
                "min_healthy": cfg.bgp.min_healthy,
                "peers": [{"address": p.address, "remote_as": p.remote_as, "bfd": p.bfd,
                           "hold_time": p.hold_time, "port": p.port} for p in cfg.bgp.peers]}}
    peers = f", BGP to {len(cfg.bgp.peers)} peers" if cfg.bgp else ""
    _print(info, args.json, f"{args.config}: OK, {len(cfg.services)} services{peers}")
    return 0


def _status_text(st: dict) -> str:
    lines = [f"instance {st['instance']} (Maglev table {st['table_size']} slots)"]
    for s in st["services"]:
        lines.append(f"  {s['name']}: {s['vip']} port {s['port']}/{s['protocol']} {s['mode']} "
                     f"hash {s['hash']}: {s['packets']} packets, {s['bytes']} bytes, {s['new_flows']} flows")
        for b in s["backends"]:
            state = b["state"] + ("" if b["healthy"] else ", DOWN")
            lines.append(f"    {b['address']:<24} w={b['weight']:<4} {state:<16} {b['packets']} packets, "
                         f"{b['bytes']} bytes, {b['new_flows']} flows")
    lines.append("  " + ", ".join(f"{k}={v}" for k, v in st["reasons"].items() if v))
    ct = st.get("conntrack") or {}
    lines.append("  connection table: " + ", ".join(f"{k}={v}" for k, v in ct.items()))
    bgp = st.get("bgp")
    if bgp:
        lines.append(f"  bgp: announcing {', '.join(bgp['announced']) or 'nothing'}"
                     + ("" if bgp["bird_running"] else " (BIRD is not running)"))
        for vip, v in bgp["vips"].items():
            if not v["announced"]:
                lines.append(f"    {vip}: not announced ({v['why_not'] or 'eligible, within announce_delay'})")
        for s in bgp["sessions"]:
            why = f" ({s['detail']})" if s.get("detail") else ""
            lines.append(f"    peer {s['peer']} AS{s['remote_as']}: {s['state']}{why}, BFD {s['bfd']}"
                         + (f" since {s['since']}" if s["since"] else ""))
    return "\n".join(lines)


def _status(args) -> int:
    from .datapath import Datapath
    from .bgp import status as bgp_status
    dp = Datapath.open_pinned(args.instance)
    try:
        st = dp.status()
    finally:
        dp.close()
    st["bgp"] = bgp_status(st["instance"])
    _print(st, args.json, _status_text(st))
    return 0


def _backend(args) -> int:
    from .datapath import Datapath, LbError
    dp = Datapath.open_pinned(args.instance)
    try:
        with dp.locked():
            if args.verb == "add":
                if not args.mac:
                    raise LbError("backend add needs --mac (the backend's MAC, or the next hop's for ipip/gue)")
                dp.add_backend(args.service, args.address, args.mac, args.weight,
                               "draining" if args.drain else "active")
            elif args.verb == "remove":
                dp.remove_backend(args.service, args.address)
            elif args.verb == "drain":
                dp.set_state(args.service, args.address, "draining")
            elif args.verb == "activate":
                dp.set_state(args.service, args.address, "active")
            elif args.verb == "weight":
                dp.set_weight(args.service, args.address, args.weight)
            svc = dp.service(args.service)
            b = svc.backends.get(args.address)
            info = {"service": svc.name, "address": args.address, "action": args.verb,
                    "backend": None if b is None else {"id": b.id, "mac": b.mac, "weight": b.weight,
                                                       "state": b.state, "healthy": not b.down,
                                                       "in_table": b.in_table}}
    finally:
        dp.close()
    _print(info, args.json, f"service {args.service}: backend {args.address}: {args.verb} done")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("lb", help="XDP load balancer (Maglev, DSR, IP-in-IP/GUE)")
    sub = p.add_subparsers(dest="lb_command", required=True)

    r = sub.add_parser("run", help="load, attach and run the balancer until SIGTERM (SIGHUP reloads)")
    r.add_argument("--config", required=True, help="lb.toml")
    r.add_argument("--json", action="store_true", help="(accepted for uniformity; logs are text)")
    r.set_defaults(func=_run)

    c = sub.add_parser("check", help="validate lb.toml without loading anything")
    c.add_argument("--config", required=True)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=_check)

    s = sub.add_parser("status", help="services, backends, counters of a running balancer")
    s.add_argument("--instance", help="which balancer (default: the only one running)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_status)

    b = sub.add_parser("backend", help="change backends of a running balancer")
    bsub = b.add_subparsers(dest="verb", required=True)
    for verb, what in (("add", "add a backend to a service"), ("remove", "remove a backend"),
                       ("drain", "no new flows; established flows stay"),
                       ("activate", "undo drain"), ("weight", "set the weight")):
        v = bsub.add_parser(verb, help=what)
        v.add_argument("service")
        v.add_argument("address")
        if verb == "weight":
            v.add_argument("weight", type=int)
        if verb == "add":
            v.add_argument("--mac", help="backend MAC (dsr-l2) or next-hop MAC (ipip/gue)")
            v.add_argument("--weight", type=int, default=1)
            v.add_argument("--drain", action="store_true", help="add it draining")
        v.add_argument("--instance")
        v.add_argument("--json", action="store_true")
        v.set_defaults(func=_backend)
