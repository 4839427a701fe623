"""The virtual site for `make demo`: client, ECMP router, two balancer nodes, three nginx WebDAV
backends; a burst of PUTs and GETs to the VIP with a live table of per-backend traffic (from
`gridbpf lb status`), then a summary. Call run(console) from gridbpf.demo."""
from __future__ import annotations

import json
import sys
import time

from rich.live import Live
from rich.table import Table

from ..lab import Lab
from .site import build_site

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


def run(con, workers: int = 4, files: int = 25, size: int = 256 * 1024) -> bool:
    with Lab("demolb") as lab:
        site = build_site(lab, backends=3, nodes=2, mode="dsr-l2")
        try:
            site.start()
            con.print(f"VIP {site.vip4}:80 on nodes {', '.join(n.name for n in site.nodes)} "
                      f"(native XDP, Maglev, DSR), backends {', '.join(b.name for b in site.backends)}")
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
            return result["bad"] == 0 and result["put"] == result["get"] == workers * files
        finally:
            site.close()
