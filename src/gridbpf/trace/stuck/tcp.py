"""`gridbpf trace tcp`: per peer of a process, bytes each way, RTT, retransmits, resets and state
changes (bpf/tcp.bpf.c; tcp:tcp_retransmit_skb, tcp:tcp_send_reset/tcp_receive_reset,
sock:inet_sock_set_state, sock:sock_send_length/sock_recv_length). Everything is counted in the
kernel; this reads the `peers` map."""
from __future__ import annotations

import socket

from ...bpf import BpfObject
from ...bpf.features import drop_missing_tracepoints
from .offcpu import target_pids
from ..session import BpfSession

STATES = ["", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
          "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"]
STAT_NAMES = ["socks_full", "peers_full"]


def peer_name(family: int, raddr: bytes, port: int) -> str:
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, bytes(raddr[:4]))}:{port}"
    return f"[{socket.inet_ntop(socket.AF_INET6, bytes(raddr))}]:{port}"


class TcpTracer(BpfSession):
    def __init__(self, targets):
        self.tgids = target_pids(targets)
        self.obj = BpfObject.open("tcp")
        self.links = []
        # before Linux 6.3 (sock_send_length/sock_recv_length): no byte counts, one-line note
        self.notes = drop_missing_tracepoints(self.obj)
        try:
            self.obj.load()
            for t in self.tgids:
                self.obj.map("targets")[t] = 1
            for prog in self.obj.programs.values():
                if prog.autoload:
                    self.links.append(prog.attach())
        except BaseException:
            self.close()
            raise

    def poll(self, timeout_ms: int = 200) -> int:
        """Nothing to drain (all in maps); sleeps so the CLI loop can share code with io."""
        import time
        time.sleep(timeout_ms / 1000)
        return 0

    def peers(self) -> list[dict]:
        out = []
        for k, v in self.obj.map("peers").lookup_batch():
            n = int(v.srtt_samples)
            out.append({
                "pid": int(k.tgid), "peer": peer_name(int(k.family), bytes(k.raddr), int(k.rport)),
                "bytes_sent": int(v.bytes_sent), "bytes_received": int(v.bytes_received),
                "retransmits": int(v.retransmits), "resets_sent": int(v.resets_sent),
                "resets_received": int(v.resets_received), "opened": int(v.opened),
                "closed": int(v.closed),
                "srtt_ms": int(v.srtt_us) / 1e3, "srtt_mean_ms": int(v.srtt_sum_us) / 1e3 / n if n else 0.0,
                "state_changes": {STATES[i] if i < len(STATES) else str(i): int(x)
                                  for i, x in enumerate(v.to_state) if x},
            })
        out.sort(key=lambda r: (-r["retransmits"], -(r["bytes_sent"] + r["bytes_received"])))
        return out

    def stats(self) -> dict:
        m = self.obj.map("tcp_stats")
        return {name: int(m.sum(i) or 0) for i, name in enumerate(STAT_NAMES)}


def format_table(peers: list[dict]) -> str:
    lines = [f"{'pid':>7} {'peer':<28} {'sent':>12} {'received':>12} {'retrans':>7} {'rst out':>7} "
             f"{'rst in':>6} {'srtt':>9}  states"]
    for r in peers:
        states = " ".join(f"{k}:{v}" for k, v in r["state_changes"].items())
        lines.append(f"{r['pid']:>7} {r['peer']:<28} {r['bytes_sent']:>12} {r['bytes_received']:>12} "
                     f"{r['retransmits']:>7} {r['resets_sent']:>7} {r['resets_received']:>6} "
                     f"{r['srtt_ms']:>7.3f}ms  {states}")
    return "\n".join(lines)
