"""`make demo`: what gridbpf sees on this machine, then each capability on the lab, in turn.

Each part is a function taking the rich console and returning True when everything it showed
went as it should; the demo exits non-zero if any part did not."""
from __future__ import annotations

import sys
import traceback

from rich.console import Console

from . import doctor


def show_doctor(con: Console) -> bool:
    return doctor.run(type("Args", (), {"json": False})()) == 0


def show_checksums(con: Console) -> bool:
    from .checksum.demo import uploads
    return uploads(con) == 0


def show_lb_site(con: Console) -> bool:
    from .lb import demo
    return demo.run(con)


def show_scitags(con: Console) -> bool:
    from .scitags import demo
    return demo.run(con)


def show_http_tracing(con: Console) -> bool:
    from .trace.http import demo as http_demo
    return http_demo.run(con)


def show_stuck(con: Console) -> bool:
    from .trace.stuck import demo as stuck_demo
    return stuck_demo.run(con)


PARTS = [
    ("gridbpf doctor: what this machine supports", show_doctor),
    ("load balancer: two XDP nodes announcing the VIP by BGP behind ECMP, three WebDAV backends", show_lb_site),
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
