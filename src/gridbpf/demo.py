"""`make demo`: what gridbpf sees on this machine, then each capability on the lab, in turn.

Each part is a function taking the rich console and returning True when everything it showed
went as it should; the demo exits non-zero if any part did not."""
from __future__ import annotations

import collections
import sys
import traceback

from rich.console import Console
from rich.table import Table

from . import doctor
from .lab import Lab, ecmp


def show_doctor(con: Console) -> bool:
    return doctor.run(type("Args", (), {"json": False})()) == 0


def show_ecmp_lab(con: Console) -> bool:
    """client -> ECMP router -> two servers holding one VIP, IPv4 and IPv6."""
    with Lab("demo") as lab:
        t = ecmp(lab, servers=2)
        served = collections.Counter()
        for family, vip, ports in (("IPv4", t.addrs["vip"], range(41000, 41020)),
                                   ("IPv6", f"[{t.addrs['vip6']}]", range(42000, 42020))):
            for sport in ports:
                out = t["client"].run(["curl", "-s", "--max-time", "5", "--local-port", str(sport),
                                       f"http://{vip}/whoami"], check=False)
                served[(family, out.stdout or f"failed ({out.returncode})")] += 1
        table = Table("family", "answered by", "requests")
        for (family, who), n in sorted(served.items()):
            table.add_row(family, who, str(n))
        con.print(table)
        failed = sum(n for (_f, who), n in served.items() if who.startswith("failed"))
    con.print(f"{sum(served.values())} requests, {failed} failed; lab removed")
    return failed == 0


def show_scitags(con: Console) -> bool:
    from .scitags import demo
    return demo.run(con)


def show_checksums(con: Console) -> bool:
    from .checksum.demo import uploads
    return uploads(con) == 0


def show_http_tracing(con: Console) -> bool:
    from .trace import http_demo
    return http_demo.run(con)


def show_stuck(con: Console) -> bool:
    from .trace import stuck_demo
    return stuck_demo.run(con)


PARTS = [
    ("gridbpf doctor: what this machine supports", show_doctor),
    ("lab: client -> ECMP router -> two servers holding one VIP", show_ecmp_lab),
    ("HTTP tracing: requests of an unmodified nginx, from the kernel", show_http_tracing),
    ("why is it stuck: a backend blocked on a lock, reported live", show_stuck),
    ("checksums: ADLER32 of WebDAV uploads computed in the kernel, stored as StoRM does", show_checksums),
    ("SciTags: a transfer marked in the IPv6 flow label, with fireflies", show_scitags),
]


def main() -> int:
    con = Console()
    results = {}
    for title, part in PARTS:
        con.rule(title)
        try:
            results[title] = bool(part(con))
        except Exception:
            con.print(traceback.format_exc())
            results[title] = False
    con.rule("summary")
    for title, ok in results.items():
        con.print(f"{'[green]ok[/]' if ok else '[red]FAILED[/]'}  {title}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
