"""The virtual site for `make demo`: client, ECMP router running BIRD, two balancer nodes that
announce the VIPs by BGP, three nginx WebDAV backends; a burst of PUTs and GETs to the VIP with
a live table of per-backend traffic (from `gridbpf lb status`), then a summary; then the nodes'
BGP sessions, and one node killed (kill -9, link down) during long uploads while the router
converges. Call run(console) from gridbpf.demo."""
from __future__ import annotations

import json
import sys
import time

from rich.live import Live
from rich.table import Table

from ..lab import Lab
from .site import build_site, fail_during_uploads

# Runs in the client's namespace: WORKERS threads each PUT then GET back FILES files of SIZE
# bytes through the VIP, one keep-alive connection per file (the backends do not share storage,
# the flow keeps its backend), a new connection per file so flows spread; every body checked.
CLIENT = r"""
import hashlib, http.client, json, sys, threading
vip, workers, files, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
res = {"put": 0, "get": 0, "bad": 0, "errors": []}
lock = threading.Lock()
def work(w):
    for i in range(files):
        body = hashlib.sha256(b"%d-%d" % (w, i)).digest() * (size // 32)
        path = "/demo-%d-%d.dat" % (w, i)
        c = http.client.HTTPConnection(vip, 80, timeout=10)   # one flow per file: PUT, then GET
        try:
            c.request("PUT", path, body=body)
            r = c.getresponse(); r.read()
            ok_put = r.status in (201, 204)
            c.request("GET", path)
            r = c.getresponse()
            ok_get = r.status == 200 and r.read() == body
        except Exception as e:
            ok_put = ok_get = False
            with lock: res["errors"].append(str(e)[:80])
        finally:
            c.close()
        with lock:
            res["put"] += ok_put; res["get"] += ok_get; res["bad"] += (not ok_put) + (not ok_get)
ts = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(res))
"""


def _table(site, totals: dict, title: str) -> Table:
    t = Table("backend", "packets", "MB", "new flows", title=title)
    for name, v in totals.items():
        t.add_row(name, str(v["packets"]), f"{v['bytes'] / 1e6:.1f}", str(v["new_flows"]))
    return t


def _sessions(site) -> Table:
    t = Table("node", "peer", "BGP", "BFD", "announces", title="BGP sessions, from lb status")
    for node in site.nodes:
        bgp = site.status(node)["bgp"] or {}
        for s in bgp.get("sessions", []):
            t.add_row(node.name, f"{s['peer']} AS{s['remote_as']}", s["state"], s["bfd"],
                      ", ".join(v for v in bgp["announced"] if (":" in v) == (":" in s["peer"])))
    return t


def _router_route(site) -> str:
    hops = {f"{site.vip4}/32": site.bird.next_hops(site.vip4), f"{site.vip6}/128": site.bird.next_hops(site.vip6)}
    return "; ".join(f"{p} via {', '.join(h) or 'nothing'}" for p, h in hops.items())


def node_failure(con, site) -> bool:
    """Long uploads through both nodes; lb2's daemon killed with its link going down."""
    con.print(f"router FIB (learned by BGP): {_router_route(site)}")
    con.print("12 uploads of 3.3 MB over 5 s each; 1.5 s in: kill -9 of lb2's `gridbpf lb run` "
              "and lb2's link down ...")
    r = fail_during_uploads(site, "kill", uploads=12, seconds=5.0)
    con.print(f"router FIB dropped lb2 after {r['fib_s'][0] * 1000:.0f} ms (IPv4) and "
              f"{r['fib_s'][1] * 1000:.0f} ms (IPv6): BFD; lb2's BIRD died {r['bird_gone_s'] * 1000:.0f} ms "
              f"after its daemon")
    con.print(f"router FIB now: {_router_route(site)}")
    ok = 12 - len(r["failed"])
    con.print(f"{r['via_lb2']} uploads were going through lb2; {ok} of 12 completed, "
              f"{12 - len(r['bad_files']) - len(r['failed'])} arrived whole; longest stall of a flow "
              f"{r['stall']:.2f} s")
    return not r["failed"] and not r["bad_files"] and max(r["fib_s"]) < 1.0


def run(con, workers: int = 4, files: int = 25, size: int = 256 * 1024) -> bool:
    with Lab("demolb") as lab:
        site = build_site(lab, backends=3, nodes=2, mode="dsr-l2")
        try:
            site.start()
            con.print(f"VIP {site.vip4}:80 on nodes {', '.join(n.name for n in site.nodes)} "
                      f"(native XDP, Maglev, DSR), backends {', '.join(b.name for b in site.backends)}; "
                      "the router learns the VIPs from the nodes by BGP")
            con.print(_sessions(site))
            burst = site.client.popen([sys.executable, "-c", CLIENT, site.vip4, str(workers), str(files),
                                       str(size)], name="burst")
            with Live(_table(site, site.backend_totals(), "live, from lb status"), console=con,
                      refresh_per_second=4, transient=True) as live:
                while burst.alive():
                    time.sleep(0.5)
                    live.update(_table(site, site.backend_totals(), "live, from lb status"))
            out = burst.output().strip().splitlines()
            result = json.loads(out[-1]) if out else {"put": 0, "get": 0, "bad": -1, "errors": ["no output"]}
            totals = site.backend_totals()
            con.print(_table(site, totals, "summary"))
            flows = sum(v["new_flows"] for v in totals.values())
            con.print(f"{result['put']} PUTs and {result['get']} GETs answered and checked, "
                      f"{result['bad']} failed; {flows} flows placed by the balancers")
            for e in result["errors"][:3]:
                con.print(f"  error: {e}")
            burst_ok = result["bad"] == 0 and result["put"] == result["get"] == workers * files
            return node_failure(con, site) and burst_ok
        finally:
            site.close()
