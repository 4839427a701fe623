"""scitags.bpf.o run by the kernel on crafted packets (BPF_PROG_TEST_RUN): what is marked,
what is only counted, what is left alone."""
import ctypes

import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting

from gridbpf.bpf import to_python
from gridbpf.scitags import label
from gridbpf.scitags.flows import make_tuple
from gridbpf.scitags.marker import Marker, ST_F_IPV4, ST_F_MARK, ST_F_REVERSE

TAGGED6 = make_tuple("tcp", "fd00:57::2", 443, "fd00:57::1", 40001)
UDP6 = make_tuple("udp", "fd00:57::2", 2811, "fd00:57::1", 40002)
TAGGED4 = make_tuple("tcp", "10.57.0.2", 443, "10.57.0.1", 40003)


class Datapath(Marker):
    """The daemon's Marker, loaded but attached nowhere: packets come from test runs."""

    def __init__(self):
        super().__init__([])
        self.egress, self.ingress = self.obj.program("st_egress"), self.obj.program("st_ingress")

    def run(self, prog, pkt):
        res = prog.test_run(bytes(pkt.build()))
        assert res.retval == 0          # TC_ACT_OK: marking never drops
        return Ether(res.data)

    def stat(self):
        return self.stats()

    def entry(self, ft):
        return to_python(self.flows[self.key(ft)])


@pytest.fixture
def dp():
    d = Datapath()
    yield d
    d.close()


def pkt6(ft, fl=0, tc=0, ext=None, payload=b"x" * 200):
    ip = IPv6(src=str(ft.src), dst=str(ft.dst), fl=fl, tc=tc)
    l4 = (TCP if ft.protocol == "tcp" else UDP)(sport=ft.src_port, dport=ft.dst_port)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / (ip / ext if ext is not None else ip) / l4 / payload


def test_layout_read_from_btf_matches_the_c_header(dp):
    k, v = dp.flows.key_type, dp.flows.value_type
    assert ctypes.sizeof(k) == 40 and ctypes.sizeof(v) == 40
    assert [f[0] for f in v._fields_ if not f[0].startswith("_")][:6] == [
        "label", "flags", "packets", "bytes", "first_ns", "last_ns"]
    assert k.sport.offset == 32 and k.dport.offset == 34 and k.proto.offset == 36
    assert dp.flows.type_name == "lru_hash" and dp.stats_map.percpu


def test_registered_ipv6_tcp_and_udp_are_marked_and_counted(dp):
    lab = label.encode(2, 15, label.spread_entropy(0b10101))
    dp.add(TAGGED6, lab)
    dp.add(UDP6, label.encode(3, 1))
    for i in range(5):
        out = dp.run(dp.egress, pkt6(TAGGED6, fl=0xABCDE, tc=0xB8))
        assert out[IPv6].fl == lab and out[IPv6].tc == 0xB8          # traffic class untouched
        assert bytes(out[TCP].payload) == b"x" * 200
    out = dp.run(dp.egress, pkt6(UDP6, fl=0x1))
    assert out[IPv6].fl == label.encode(3, 1)
    e = dp.entry(TAGGED6)
    assert (e["packets"], e["bytes"], e["flags"]) == (5, 5 * (40 + 20 + 200), ST_F_MARK)
    assert e["first_ns"] and e["last_ns"] >= e["first_ns"]
    assert dp.stat() == {"matched": 6, "marked": 6, "v4_unmarkable": 0, "store_failed": 0, "unparsed": 0}


def test_extension_headers_are_walked(dp):
    lab = label.encode(5, 3, label.random_entropy())
    dp.add(TAGGED6, lab)
    for ext in (IPv6ExtHdrHopByHop(), IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()):
        assert dp.run(dp.egress, pkt6(TAGGED6, ext=ext))[IPv6].fl == lab
    # a fragment has no reachable ports: left alone, but counted as unparsed, never silent
    out = dp.run(dp.egress, pkt6(TAGGED6, fl=0x77, ext=IPv6ExtHdrFragment(offset=10)))
    assert out[IPv6].fl == 0x77
    assert dp.stat()["unparsed"] == 1 and dp.stat()["marked"] == 2


def test_unregistered_and_reverse_packets_are_untouched(dp):
    lab = label.encode(2, 15, label.random_entropy())
    dp.add(TAGGED6, lab)
    other = make_tuple("tcp", "fd00:57::2", 443, "fd00:57::1", 40999)      # one port off
    assert dp.run(dp.egress, pkt6(other, fl=0x12345))[IPv6].fl == 0x12345
    # the reverse direction (ACKs) is counted, not marked, unless mark_reverse
    rev = dp.run(dp.egress, pkt6(TAGGED6.reversed(), fl=0x54321, payload=b""))
    assert rev[IPv6].fl == 0x54321
    r = dp.entry(TAGGED6.reversed())
    assert (r["packets"], r["flags"]) == (1, ST_F_REVERSE)
    dp.add(TAGGED6, lab, mark_reverse=True)
    assert dp.run(dp.egress, pkt6(TAGGED6.reversed(), fl=0x54321, payload=b""))[IPv6].fl == lab


def test_ingress_program_counts_but_never_marks(dp):
    lab = label.encode(2, 15)
    dp.add(TAGGED6, lab)
    out = dp.run(dp.ingress, pkt6(TAGGED6.reversed(), fl=0x3, payload=b"ack"))
    assert out[IPv6].fl == 0x3
    out = dp.run(dp.ingress, pkt6(TAGGED6, fl=0x3))
    assert out[IPv6].fl == 0x3
    assert dp.entry(TAGGED6.reversed())["packets"] == 1 and dp.entry(TAGGED6)["packets"] == 1
    assert dp.stat()["marked"] == 0


def test_ipv4_flows_are_counted_and_reported_not_markable(dp):
    dp.add(TAGGED4, label.encode(2, 15))
    p = Ether() / IP(src=str(TAGGED4.src), dst=str(TAGGED4.dst), tos=0x20) / TCP(sport=443, dport=40003) / (b"y" * 100)
    out = dp.run(dp.egress, p)
    assert bytes(out) == bytes(p.build())          # not one bit changed
    e = dp.entry(TAGGED4)
    assert (e["packets"], e["bytes"], e["flags"]) == (1, 140, ST_F_MARK | ST_F_IPV4)
    assert dp.stat()["v4_unmarkable"] == 1 and dp.stat()["marked"] == 0
    # a later IPv4 fragment has no ports: unparsed, counted
    frag = Ether() / IP(src=str(TAGGED4.src), dst=str(TAGGED4.dst), frag=100, proto=6) / (b"z" * 40)
    dp.run(dp.egress, frag)
    assert dp.stat()["unparsed"] == 1


def test_remove_returns_final_counters(dp):
    dp.add(TAGGED6, 5)
    dp.run(dp.egress, pkt6(TAGGED6))
    dp.run(dp.ingress, pkt6(TAGGED6.reversed(), payload=b""))
    c = dp.counters(TAGGED6)
    assert (c["sent"], c["received"], c["sent_packets"], c["received_packets"]) == (260, 60, 1, 1)
    assert dp.remove(TAGGED6)["sent"] == 260
    assert dp.counters(TAGGED6) is None and len(list(dp.flows.keys())) == 0
