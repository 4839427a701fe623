"""`gridbpf lab up|down|list`: named topologies by hand, and removal of leftovers."""
from __future__ import annotations

from .core import Lab, labs, remove_lab
from .topologies import TOPOLOGIES


def _up(args) -> int:
    from ..output import print_json
    if args.topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {args.topology!r} (known: {', '.join(TOPOLOGIES)})")
    lab = Lab(args.name or args.topology)
    try:
        t = TOPOLOGIES[args.topology](lab)
    except Exception:
        lab.close()
        raise
    info = {"lab": lab.name, "topology": args.topology,
            "hosts": {n: h.netns for n, h in t.hosts.items()}, "addresses": t.addrs}
    if args.json:
        print_json(info)
    else:
        print(f"lab {lab.name} up: " + ", ".join(f"{n} ({ns})" for n, ns in info["hosts"].items()))
        print(f"run commands with: ip netns exec gb-{lab.name}-HOST ...; remove with: gridbpf lab down {lab.name}")
    return 0


def _down(args) -> int:
    from ..output import print_json
    names = [args.name] if args.name else sorted(labs())
    removed = {n: remove_lab(n) for n in names}
    if args.json:
        print_json(removed)
    else:
        for n, nss in removed.items():
            print(f"lab {n}: removed {len(nss)} namespaces")
    return 0


def _list(args) -> int:
    from ..output import print_json
    found = labs()
    if args.json:
        print_json(found)
    else:
        for n, hosts in found.items():
            print(f"{n}: {' '.join(hosts)}")
        if not found:
            print("no labs")
    return 0


def register(sub) -> None:
    p = sub.add_parser("lab", help="network-namespace lab topologies")
    verbs = p.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help=f"build a topology ({', '.join(TOPOLOGIES)})")
    up.add_argument("topology")
    up.add_argument("--name", help="lab name (default: the topology's)")
    down = verbs.add_parser("down", help="remove a lab, or every gridbpf lab")
    down.add_argument("name", nargs="?")
    ls = verbs.add_parser("list", help="labs that exist now")
    for v, f in ((up, _up), (down, _down), (ls, _list)):
        v.add_argument("--json", action="store_true")
        v.set_defaults(func=f)
