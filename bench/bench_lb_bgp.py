"""How fast a failed balancer node leaves the router, and what the flows feel, on the lab site
(two nodes announcing the VIPs by BGP through BIRD, the router running BIRD with ECMP hashing
packet headers). Per failure kind (kill -9 + link down, a blackholed port, SIGTERM), ROUNDS
rounds of 24 paced 6 s uploads with lb2 failing 1.5 s in: the time from the failure to the
router's FIB change (IPv4 and IPv6, polled every 10 ms with `ip route`), the longest stall of
any upload (TCP_INFO bytes_acked not moving while data is outstanding), failed uploads.
Medians of the rounds. Baseline, side by side: the same failures with BFD off (BGP's hold
timer, 9 s, is then what detects a silent node); SIGTERM does not depend on BFD.
"""
from __future__ import annotations

import statistics

ROUNDS = 3
HEALTH = {"check": "http", "path": "/whoami", "interval": 0.5, "timeout": 1.5, "fall": 3, "rise": 2}


def _rounds(site, kind: str, bfd: bool, rounds: int) -> dict:
    from gridbpf.lb.site import fail_during_uploads
    fib, stall, failed, bad = [], [], 0, 0
    for _ in range(rounds):
        site.write_configs(health=HEALTH, bfd=bfd)
        for n in site.nodes:
            site.start_balancer(n)
        site.wait_routes(site.nodes)
        try:
            r = fail_during_uploads(site, kind, seconds=6.0)
        finally:
            for n in site.nodes:
                site.stop_balancer(n)
        fib.append(max(r["fib_s"]))
        stall.append(r["stall"])
        failed += len(r["failed"])
        bad += len(r["bad_files"])
    return {"fib_change_s": round(statistics.median(fib), 3), "fib_change_s_all": [round(x, 3) for x in fib],
            "longest_stall_s": round(statistics.median(stall), 2),
            "longest_stall_s_all": [round(x, 2) for x in stall],
            "failed_uploads": failed, "files_not_whole": bad, "rounds": rounds}


def run(rounds: int = ROUNDS) -> dict:
    from gridbpf.lab import Lab
    from gridbpf.lb.site import FAILURES, build_site
    out: dict = {}
    with Lab("lbbgpb") as lab:
        site = build_site(lab)
        try:
            for kind in FAILURES:
                out[kind] = {"bfd": _rounds(site, kind, True, rounds)}
                if kind != "sigterm":
                    out[kind]["hold_timer_only"] = _rounds(site, kind, False, rounds)
                    out[kind]["fib_change_ratio_hold_vs_bfd"] = round(
                        out[kind]["hold_timer_only"]["fib_change_s"] / out[kind]["bfd"]["fib_change_s"], 1)
        finally:
            site.close()
    return out


if __name__ == "__main__":
    import json
    import sys
    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS), indent=2))
