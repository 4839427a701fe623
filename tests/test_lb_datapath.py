"""lb.bpf.c through BPF_PROG_TEST_RUN: every mode, IPv4/IPv6, TCP/UDP, checked field by field."""
import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import (ICMP, IP, TCP, UDP, Ether, ICMPv6PacketTooBig, IPOption_RR, IPv6,
                       IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, Raw, fragment)

from gridbpf.bpf import BpfObject
from gridbpf.lb import maglev
from gridbpf.lb.datapath import Datapath, addr_words, datapath_now_ns, htons

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
LB_MAC, CLIENT_MAC = "02:1b:00:00:00:01", "02:c1:00:00:00:01"
C4, C6 = "10.1.0.2", "fd00:1::2"
GUE_PORT = 6080

# name: (vip, port, protocol, mode, backends as (address, mac))
BE4 = [(f"10.2.0.{11 + i}", f"02:be:00:00:00:{11 + i:02x}") for i in range(3)]
BE6 = [(f"fd00:2::{11 + i:x}", f"02:be:00:00:06:{11 + i:02x}") for i in range(3)]
SERVICES = {
    "tcp4": ("10.99.0.1", 80, "tcp", "dsr-l2", BE4),
    "udp4": ("10.99.0.1", 53, "udp", "dsr-l2", BE4),
    "tcp6": ("fd00:99::1", 80, "tcp", "dsr-l2", BE6),
    "udp6": ("fd00:99::1", 53, "udp", "dsr-l2", BE6),
    "ipip4": ("10.99.0.2", 80, "tcp", "ipip", BE4),
    "gue4": ("10.99.0.3", 443, "tcp", "gue", BE4),
    "ipip6": ("fd00:99::2", 80, "tcp", "ipip", BE6),
    "gue6": ("fd00:99::3", 443, "udp", "gue", BE6),
    "ipip46": ("10.99.0.4", 80, "tcp", "ipip", BE6),     # IPv4 in IPv6
    "gue64": ("fd00:99::4", 80, "tcp", "gue", BE4),     # IPv6 in UDP over IPv4
}


@pytest.fixture(scope="module")
def dp():
    d = Datapath.create("lbtest")
    d.set_encap("172.16.0.0/16", "fd00:ffff::/96", GUE_PORT)
    for name, (vip, port, proto, mode, bes) in SERVICES.items():
        d.add_service(name, vip, port, proto, mode)
        for addr, mac in bes:
            d.add_backend(name, addr, mac)
    yield d
    d.close()


@pytest.fixture(scope="module")
def decap():
    obj = BpfObject.open("decap")
    obj.rodata["gue_port"] = htons(GUE_PORT)
    obj.load()
    yield obj
    obj.close()


def run(dp, pkt):
    raw = bytes(pkt)
    before = sum(dp.reasons().values())
    res = dp.obj.program("xdp_lb").test_run(raw)
    # every packet is counted under exactly one reason
    assert sum(dp.reasons().values()) == before + 1
    return res


def l3(vip, src=None):
    v6 = ":" in vip
    return IPv6(src=src or C6, dst=vip, hlim=57, tc=0x28) if v6 else \
        IP(src=src or C4, dst=vip, ttl=57, tos=0x28, id=777)


def packet(svc, sport=40000, payload=b"hello grid", src=None, flags="S"):
    vip, port, proto, _mode, _bes = SERVICES[svc]
    l4 = TCP(sport=sport, dport=port, flags=flags, seq=1000) if proto == "tcp" else UDP(sport=sport, dport=port)
    return Ether(src=CLIENT_MAC, dst=LB_MAC) / l3(vip, src) / l4 / Raw(payload)


def flow_hash(src, dst, sport, dport, proto, no_sport=False):
    return int(maglev.flow_hash(np.frombuffer(maglev.addr16(src), np.uint8)[None, :],
                                np.frombuffer(maglev.addr16(dst), np.uint8)[None, :],
                                [sport], [dport], [proto], no_sport)[0])


_tables = {}


def expected(dp, svc, src, sport, s=None):
    """The backend the Maglev table (computed here, independently of the ring) gives a flow."""
    vip, port, proto, _mode, bes = SERVICES[svc]
    s = s or dp.service(svc)
    weights = {a: b.weight if b.in_table else 0 for a, b in s.backends.items()}
    key = (svc, tuple(sorted(weights.items())))
    if key not in _tables:
        _tables[key] = maglev.build_table(weights)
    names, table = _tables[key]
    h = flow_hash(src, vip, sport, port, {"tcp": 6, "udp": 17}[proto], s.no_sport)
    addr = names[table[h % maglev.DEFAULT_SIZE]]
    return addr, s.backends[addr].mac, h


def ct_key(src, dst, sport, dport, proto):
    fam = 6 if ":" in dst else 4
    return {"src": addr_words(src), "dst": addr_words(dst), "sport": htons(sport),
            "dport": htons(dport), "proto": proto, "family": fam}


@pytest.mark.parametrize("svc", ["tcp4", "udp4", "tcp6", "udp6"])
def test_dsr_rewrites_only_the_destination_mac(dp, svc):
    vip, port, proto, _, _ = SERVICES[svc]
    client = C6 if ":" in vip else C4
    pkt = packet(svc, sport=41000)
    raw = bytes(pkt)
    sid = dp.service(svc).id
    before = dp.maps["lb_service_stats"].sum(sid)
    ev = dp.conn_events()
    res = run(dp, pkt)
    assert res.retval == XDP_TX
    addr, mac, _ = expected(dp, svc, client, 41000)
    out = Ether(res.data)
    assert out.dst == mac
    assert out.src == LB_MAC                    # sent from the interface it came in on
    assert out.type == pkt.type
    assert res.data[12:] == raw[12:]            # IP header, TTL, checksums, payload untouched
    ip = out.payload
    if ":" in vip:
        assert ip.hlim == 57 and ip.src == client and ip.dst == vip
    else:
        assert ip.ttl == 57 and ip.src == client and ip.dst == vip
        assert ip.chksum == IP(bytes(IP(raw[14:]))).chksum
    # connection table and stats: a SYN is placed by the table and recorded nowhere (a SYN
    # flood must not fill the table); the flow is recorded at its first packet past the SYN
    key = ct_key(client, vip, 41000, port, 6 if proto == "tcp" else 17)
    if proto == "tcp":
        assert dp.maps["lb_conntrack"].get(key) is None
        assert dp.conn_events()["syn_untracked"] == ev["syn_untracked"] + 1
        mid = dp.maps["lb_service_stats"].sum(sid)
        assert mid["packets"] == before["packets"] + 1 and mid["new_flows"] == before["new_flows"]
        first = packet(svc, sport=41000, flags="A")
        assert Ether(run(dp, first).data).dst == mac
        raw_len = len(raw) + len(bytes(first))
    else:
        raw_len = len(raw)
    ct = dp.maps["lb_conntrack"].get(key)
    assert ct is not None and ct.backend == dp.service(svc).backends[addr].id
    assert dp.conn_events()["inserted"] == ev["inserted"] + 1
    after = dp.maps["lb_service_stats"].sum(sid)
    assert after["packets"] == before["packets"] + (2 if proto == "tcp" else 1)
    assert after["bytes"] == before["bytes"] + raw_len
    assert after["new_flows"] == before["new_flows"] + 1
    # the next packet of the flow: a hit, not a new flow
    ack = packet(svc, sport=41000, flags="A")
    res2 = run(dp, ack)
    assert res2.retval == XDP_TX and Ether(res2.data).dst == mac and res2.data[12:] == bytes(ack)[12:]
    assert dp.maps["lb_service_stats"].sum(sid)["new_flows"] == after["new_flows"]
    if proto == "tcp":
        # a SYN starts a new connection: the table places it, whatever an earlier
        # connection's entry says (one placed under an older table epoch, pointing
        # elsewhere); the packets after the SYN see it came later and rewrite the entry
        other = next(b for a, b in dp.service(svc).backends.items() if a != addr)
        earlier = {"backend": other.id, "gen": other.gen, "hash": ct.hash, "epoch": ct.epoch - 1}
        dp.maps["lb_conntrack"][key] = dict(earlier, seen_ns=datapath_now_ns() - 10**7)
        assert Ether(run(dp, ack).data).dst == other.mac               # established: the entry
        # a SYN within the entry's refresh lag (a second) of its last packet is that
        # connection's own retry (a client reset by a stale socket on its backend), not a new one
        assert Ether(run(dp, pkt).data).dst == mac
        assert Ether(run(dp, ack).data).dst == other.mac
        # the earlier connection's last packet 3 s ago: a SYN now is a new connection
        dp.maps["lb_conntrack"][key] = dict(earlier, seen_ns=datapath_now_ns() - 3 * 10**9)
        assert Ether(run(dp, pkt).data).dst == mac                     # new connection: the table
        assert Ether(run(dp, ack).data).dst == mac                     # ... and its ACK too
        assert dp.maps["lb_conntrack"][key].backend == dp.service(svc).backends[addr].id
        assert dp.conn_events()["reused"] == ev["reused"] + 1


def test_python_hash_and_table_match_the_datapath(dp):
    """300 random flows: the backend the program picks is the one Python predicts."""
    rng = np.random.default_rng(7)
    svcs = dp.services()
    for i in range(300):
        svc = ["tcp4", "tcp6", "udp4"][i % 3]
        vip = SERVICES[svc][0]
        src = str(ipaddress.ip_address(int(rng.integers(1, 2**32)))) if ":" not in vip else \
            str(ipaddress.IPv6Address(int(rng.integers(1, 2**63)) << 64 | int(rng.integers(1, 2**63))))
        sport = int(rng.integers(1024, 65536))
        res = dp.obj.program("xdp_lb").test_run(bytes(packet(svc, sport, src=src)))
        assert res.retval == XDP_TX
        assert Ether(res.data).dst == expected(dp, svc, src, sport, svcs[svc])[1]


def _check_outer(dp, svc, res, pkt, client, sport):
    vip, port, proto, mode, bes = SERVICES[svc]
    addr, mac, h = expected(dp, svc, client, sport)
    inner = bytes(pkt)[14:]
    tos = pkt[IPv6].tc if IPv6 in pkt else pkt[IP].tos     # copied to the outer header
    out = Ether(res.data)
    assert out.dst == mac and out.src == LB_MAC
    outer6 = ":" in addr
    udp_len = 8 if mode == "gue" else 0
    if outer6:
        o = IPv6(res.data[14:])
        assert out.type == 0x86DD
        assert o.version == 6 and o.hlim == 64 and o.dst == addr
        assert o.tc == tos                                     # traffic class copied from the inner packet
        assert o.fl == h & 0xFFFFF                             # flow label carries the flow hash
        assert o.plen == len(inner) + udp_len
        assert o.src == str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("fd00:ffff::")) | (h & 0xFFFFFFFF)))
        nh = o.nh
        rest = res.data[14 + 40:]
    else:
        o = IP(res.data[14:])
        assert out.type == 0x0800
        assert o.version == 4 and o.ihl == 5 and o.ttl == 64 and o.dst == addr
        assert o.tos == tos and o.frag == 0 and o.flags == 0
        assert o.len == 20 + udp_len + len(inner)
        assert o.src == str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("172.16.0.0")) | (h & 0xFFFF)))
        # recompute independently: scapy fills the checksum when the field is deleted
        hdr = IP(res.data[14:34])
        del hdr.chksum
        assert IP(bytes(hdr)).chksum == o.chksum
        nh = o.proto
        rest = res.data[14 + 20:]
    inner_proto = 41 if ":" in vip else 4
    if mode == "gue":
        assert nh == 17
        u = UDP(rest[:8])
        assert u.dport == GUE_PORT and u.sport == 0xC000 | (h & 0x3FFF)
        assert u.len == 8 + len(inner) and u.chksum == 0
        rest = rest[8:]
    else:
        assert nh == inner_proto
    assert rest == inner                                      # the client's packet, unchanged
    return addr


@pytest.mark.parametrize("svc", ["ipip4", "gue4", "ipip6", "gue6", "ipip46", "gue64"])
def test_encapsulation_headers_and_decap_restores_the_packet(dp, decap, svc):
    vip = SERVICES[svc][0]
    client = C6 if ":" in vip else C4
    pkt = packet(svc, sport=42000)
    res = run(dp, pkt)
    assert res.retval == XDP_TX
    _check_outer(dp, svc, res, pkt, client, 42000)
    # tc decap on the backend gives back exactly the client's IP packet
    before = {i: decap.map("decap_reasons").sum(i) for i in range(5)}
    d = decap.program("tc_decap").test_run(res.data)
    assert d.retval == 0                                      # TC_ACT_OK
    assert d.data[14:] == bytes(pkt)[14:]
    assert struct.unpack("!H", d.data[12:14])[0] == (0x86DD if ":" in vip else 0x0800)
    kind = 1 if SERVICES[svc][3] == "gue" else 0
    assert decap.map("decap_reasons").sum(kind) == before[kind] + 1


def test_decap_leaves_plain_traffic_alone(decap):
    for p in (Ether() / IP(dst="10.2.0.11") / TCP(dport=80), Ether() / IPv6(dst="fd00::1") / UDP(dport=53),
              Ether() / IP(dst="10.2.0.11") / UDP(dport=GUE_PORT + 1) / Raw(b"x" * 30)):
        d = decap.program("tc_decap").test_run(bytes(p))
        assert d.retval == 0 and d.data == bytes(p)
    # announced as IP-in-IP but the payload is not IPv4: dropped, counted
    bad = Ether() / IP(dst="10.2.0.11", proto=4) / Raw(b"\x60" + bytes(39))
    n = decap.map("decap_reasons").sum(3)
    assert decap.program("tc_decap").test_run(bytes(bad)).retval == 2   # TC_ACT_SHOT
    assert decap.map("decap_reasons").sum(3) == n + 1


@pytest.mark.parametrize("svc", ["tcp4", "tcp6", "ipip4", "ipip6", "gue64", "ipip46"])
def test_icmp_errors_follow_their_flow(dp, svc):
    vip, port, _proto, mode = SERVICES[svc][:4]
    v6 = ":" in vip
    client = C6 if v6 else C4
    sport = 43000
    # the packet that was too big: the backend's reply VIP:port -> client:43000
    if v6:
        quoted = IPv6(src=vip, dst=client) / TCP(sport=port, dport=sport, flags="A") / Raw(b"x" * 100)
        err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src="fd00:1::1", dst=vip) / ICMPv6PacketTooBig(mtu=1280) / quoted
    else:
        quoted = IP(src=vip, dst=client) / TCP(sport=port, dport=sport, flags="A") / Raw(b"x" * 100)
        err = Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.1.0.1", dst=vip) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted
    n_ct = len(list(dp.maps["lb_conntrack"].keys()))
    fwd_icmp = dp.reasons()["fwd_icmp"]
    res = run(dp, err)
    assert res.retval == XDP_TX
    assert dp.reasons()["fwd_icmp"] == fwd_icmp + 1
    assert len(list(dp.maps["lb_conntrack"].keys())) == n_ct             # errors create no flows
    if mode == "dsr-l2":
        assert Ether(res.data).dst == expected(dp, svc, client, sport)[1]     # the flow's hash choice
        assert res.data[12:] == bytes(err)[12:]
    else:   # encapsulated toward the flow's backend, the error itself unchanged inside
        _check_outer(dp, svc, res, err, client, sport)
    # the flow is pinned elsewhere in the connection table: the error follows the table
    want, _, _ = expected(dp, svc, client, sport)
    other = next(b for a, b in dp.service(svc).backends.items() if a != want)
    dp.maps["lb_conntrack"][ct_key(client, vip, sport, port, 6)] = {"backend": other.id, "gen": other.gen,
                                                                     "seen_ns": datapath_now_ns()}
    res = run(dp, err)
    assert res.retval == XDP_TX and Ether(res.data).dst == other.mac


def _reason_delta(dp, pkt, reason):
    before = dp.reasons()[reason]
    res = run(dp, pkt)
    assert dp.reasons()[reason] == before + 1, dp.reasons()
    assert res.data == bytes(pkt)     # never rewritten
    return res.retval


def test_fragments_options_truncated_and_strangers(dp):
    e = Ether(src=CLIENT_MAC, dst=LB_MAC)
    big = e / IP(src=C4, dst="10.99.0.1") / UDP(sport=1, dport=53) / Raw(b"y" * 3000)
    frags = fragment(big[IP], fragsize=1000)
    assert len(frags) >= 3
    for f in frags:                                   # first, middle and last fragments
        assert _reason_delta(dp, e / f, "drop_fragment") == XDP_DROP
    # a fragment to an address that is no VIP is none of our business
    f = fragment((IP(src=C4, dst="10.50.0.1") / UDP(dport=53) / Raw(b"y" * 3000)), 1000)[1]
    assert _reason_delta(dp, e / f, "pass_no_service") == XDP_PASS
    f6 = e / IPv6(src=C6, dst="fd00:99::1") / IPv6ExtHdrFragment(offset=0, m=1, id=5) / UDP(dport=53) / Raw(b"z" * 64)
    assert _reason_delta(dp, f6, "drop_fragment") == XDP_DROP
    opt = e / IP(src=C4, dst="10.99.0.1", options=[IPOption_RR()]) / TCP(dport=80)
    assert _reason_delta(dp, opt, "drop_ip_options") == XDP_DROP
    ext = e / IPv6(src=C6, dst="fd00:99::1") / IPv6ExtHdrDestOpt() / TCP(dport=80)
    assert _reason_delta(dp, ext, "drop_ipv6_ext") == XDP_DROP
    # length field says more than the frame has; L4 header cut short
    full = bytes(e / IP(src=C4, dst="10.99.0.1") / TCP(dport=80) / Raw(b"p" * 40))
    assert _reason_delta(dp, Raw(full[:-10]), "drop_truncated") == XDP_DROP
    cut = bytes(e / IP(src=C4, dst="10.99.0.1", proto=6, len=30) / Raw(b"\x00" * 10))
    assert _reason_delta(dp, Raw(cut), "drop_truncated") == XDP_DROP
    full6 = bytes(e / IPv6(src=C6, dst="fd00:99::1") / UDP(dport=53) / Raw(b"p" * 20))
    assert _reason_delta(dp, Raw(full6[:-5]), "drop_truncated") == XDP_DROP
    # not for a service: other port, other address, ICMP echo, ARP, garbage
    assert _reason_delta(dp, e / IP(src=C4, dst="10.99.0.1") / TCP(dport=22), "pass_no_service") == XDP_PASS
    assert _reason_delta(dp, e / IPv6(src=C6, dst="fd00:99::9") / TCP(dport=80), "pass_no_service") == XDP_PASS
    assert _reason_delta(dp, e / IP(src=C4, dst="10.99.0.1") / ICMP(), "pass_no_service") == XDP_PASS
    assert _reason_delta(dp, Ether(type=0x0806) / Raw(bytes(28)), "pass_not_ip") == XDP_PASS
    assert _reason_delta(dp, Raw(bytes(Ether(src=CLIENT_MAC, dst=LB_MAC, type=0x0800)) + b"\x45\x00"), "pass_malformed") == XDP_PASS


def test_established_flows_keep_their_backend_when_the_table_changes(dp):
    svc, vip, port = "tcp4", "10.99.0.1", 80
    sports = list(range(50000, 50300))
    first = {}
    for sp in sports:
        first[sp] = Ether(run(dp, packet(svc, sp)).data).dst
        run(dp, packet(svc, sp, flags="A"))              # past the handshake: recorded
    macs = {b.mac: a for a, b in dp.service(svc).backends.items()}
    drained = macs[first[sports[0]]]
    try:
        dp.set_state(svc, drained, "draining")
        dp.set_weight(svc, next(a for a in macs.values() if a != drained), 5)
        dp.add_backend(svc, "10.2.0.20", "02:be:00:00:00:20")
        for sp in sports:                                  # established: unchanged
            assert Ether(run(dp, packet(svc, sp, flags="A")).data).dst == first[sp]
        drained_mac = dp.service(svc).backends[drained].mac
        for sp in range(51000, 51300):                     # new flows: never the drained one
            assert Ether(run(dp, packet(svc, sp)).data).dst != drained_mac
        # a backend that fails its health checks: even established flows move away
        dp.set_down(svc, drained, True)
        for sp in sports:
            if first[sp] == drained_mac:
                assert Ether(run(dp, packet(svc, sp, flags="A")).data).dst != drained_mac
        # a removed backend: its flows are placed again (generation changed)
        dp.remove_backend(svc, "10.2.0.20")
        assert "02:be:00:00:00:20" not in {Ether(run(dp, packet(svc, sp)).data).dst for sp in range(51000, 51300)}
    finally:
        dp.set_down(svc, drained, False)
        dp.set_state(svc, drained, "active")
        for a in dp.service(svc).backends:
            dp.set_weight(svc, a, 1)
        if "10.2.0.20" in dp.service(svc).backends:
            dp.remove_backend(svc, "10.2.0.20")


def test_no_backend_drops_and_counts(dp):
    dp.add_service("empty", "10.99.0.9", 80, "tcp", "dsr-l2")
    try:
        p = Ether() / IP(src=C4, dst="10.99.0.9") / TCP(dport=80)
        assert _reason_delta(dp, p, "drop_no_backend") == XDP_DROP
    finally:
        dp.remove_service("empty")
    assert _reason_delta(dp, p, "pass_no_service") == XDP_PASS


# --- random and mutated packets ----------------------------------------------------------------------

VALID = [bytes(packet(s, 45000 + i)) for i, s in enumerate(SERVICES)] + [
    bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src="10.1.0.1", dst="10.99.0.2") / ICMP(type=3, code=4) /
          IP(src="10.99.0.2", dst=C4) / TCP(sport=80, dport=45001)),
    bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src="fd00:1::1", dst="fd00:99::1") / ICMPv6PacketTooBig() /
          IPv6(src="fd00:99::1", dst=C6) / TCP(sport=80, dport=45002)),
    bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IPv6(src=C6, dst="fd00:99::1") / IPv6ExtHdrDestOpt() / TCP(dport=80)),
    bytes(Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=C4, dst="10.99.0.1", flags="MF") / UDP(dport=53) / Raw(b"f" * 40)),
]


def _vip_services():
    out = {}
    for name, (vip, port, proto, mode, bes) in SERVICES.items():
        out[(ipaddress.ip_address(vip).packed, port, proto)] = (mode, {m for _a, m in bes})
    return out


@st.composite
def frames(draw):
    if draw(st.booleans()):
        return draw(st.binary(min_size=0, max_size=200))
    base = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(base) - 1))
        base[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(base)))
    return bytes(base[:cut]) if draw(st.booleans()) else bytes(base)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames())
def test_random_and_mutated_packets(dp, raw):
    prog = dp.obj.program("xdp_lb")
    before = sum(dp.reasons().values())
    try:
        res = prog.test_run(raw)
    except Exception as e:                     # too short for BPF_PROG_TEST_RUN itself (EINVAL)
        assert len(raw) < 14, e
        return
    assert sum(dp.reasons().values()) == before + 1
    assert res.retval in (XDP_DROP, XDP_PASS, XDP_TX)
    if res.retval != XDP_TX:
        assert res.data == raw
        return
    # forwarded: it must really be for a service, and go to one of that service's backends
    pkt = Ether(raw)
    ip = pkt.payload
    quoted = ip.payload.payload if isinstance(ip.payload, (ICMP, ICMPv6PacketTooBig)) else None
    if quoted is not None:
        # the quoted reply VIP:port -> client; its ports are the 8 bytes after its IP header
        # (read from the bytes: scapy gives up on quoted packets cut short by the length fields)
        off = 14 + (40 if isinstance(ip, IPv6) else 20) + 8 + (40 if isinstance(ip, IPv6) else 20)
        vip, port = quoted.src, struct.unpack("!H", raw[off:off + 2])[0]
        proto = {6: "tcp", 17: "udp"}[quoted.nh if isinstance(ip, IPv6) else quoted.proto]
    else:
        vip, l4 = ip.dst, ip.payload
        port = l4.dport
        proto = "tcp" if isinstance(l4, TCP) else "udp"
    mode, macs = _vip_services()[(ipaddress.ip_address(vip).packed, port, proto)]
    out = Ether(res.data)
    assert out.dst in macs and out.src == pkt.dst
    if mode == "dsr-l2":
        assert res.data[12:] == raw[12:]
    else:
        # Ethernet + outer header(s) put in front of the client's IP packet, which is unchanged
        assert res.data.endswith(raw[14:]) and len(res.data) - len(raw) in (20, 28, 40, 48)


def test_no_sport_hash_keeps_a_client_on_one_backend(dp):
    dp.add_service("sticky", "10.99.0.8", 443, "tcp", "dsr-l2", no_sport=True)
    try:
        for addr, mac in BE4:
            dp.add_backend("sticky", addr, mac)
        names, table = maglev.build_table({a: 1 for a, _ in BE4})
        macs = dict(BE4)
        seen = set()
        for i, client in enumerate(["10.1.0.2", "10.1.7.9", "10.3.2.1", "10.8.8.8"]):
            got = {Ether(run(dp, Ether(src=CLIENT_MAC, dst=LB_MAC) / IP(src=client, dst="10.99.0.8") /
                             TCP(sport=sp, dport=443)).data).dst for sp in range(1000 + i * 50, 1050 + i * 50)}
            h = flow_hash(client, "10.99.0.8", 0, 443, 6, no_sport=True)
            assert got == {macs[names[table[h % maglev.DEFAULT_SIZE]]]}   # one backend per client
            seen |= got
        assert len(seen) > 1                                              # clients still spread
    finally:
        dp.remove_service("sticky")
