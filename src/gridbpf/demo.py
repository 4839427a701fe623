"""`make demo`: what gridbpf sees on this machine, then a small lab where a client fetches from
HTTP servers through a router (ECMP over two servers), shown live."""
from __future__ import annotations

import collections
import sys

from rich.console import Console
from rich.table import Table

from . import doctor
from .lab import Lab, ecmp


def main() -> int:
    con = Console()
    con.rule("gridbpf doctor")
    doctor.run(type("Args", (), {"json": False})())
    con.rule("lab: client -> ECMP router -> two servers holding one VIP")
    with Lab("demo") as lab:
        t = ecmp(lab, servers=2)
        for i in (1, 2):
            t[f"srv{i}"].wait_port(f"10.2.0.{10 + i}", 80)
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
