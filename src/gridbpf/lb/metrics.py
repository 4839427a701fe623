"""Prometheus /metrics of the balancer, read from the per-CPU maps at each scrape."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class _Collector:
    def __init__(self, dp, bgp=None):
        self.dp, self.bgp = dp, bgp

    def collect(self):
        st = self.dp.status()
        reasons = CounterMetricFamily("gridbpf_lb_packets", "packets by datapath outcome "
                                      "(fwd*, pass_*, drop_*)", labels=["reason"])
        for r, n in st["reasons"].items():
            reasons.add_metric([r], n)
        yield reasons
        events = CounterMetricFamily("gridbpf_lb_conntrack_events", "connection-table events (inserted, "
                                     "syn_untracked, over_limit, expired, no_syn, reused)", labels=["event"])
        for e, n in st["conntrack"].items():
            events.add_metric([e], n)
        yield events
        fams = {}
        for what in ("packets", "bytes", "new_flows"):
            fams[("svc", what)] = CounterMetricFamily(f"gridbpf_lb_service_{what}", f"{what} forwarded per service",
                                                      labels=["service", "vip", "port", "protocol"])
            fams[("be", what)] = CounterMetricFamily(f"gridbpf_lb_backend_{what}", f"{what} forwarded per backend",
                                                     labels=["service", "backend"])
        up = GaugeMetricFamily("gridbpf_lb_backend_up", "1 if the backend passes its health checks",
                               labels=["service", "backend"])
        in_table = GaugeMetricFamily("gridbpf_lb_backend_in_table", "1 if new flows may go to the backend",
                                     labels=["service", "backend"])
        weight = GaugeMetricFamily("gridbpf_lb_backend_weight", "configured weight", labels=["service", "backend"])
        for s in st["services"]:
            for what in ("packets", "bytes", "new_flows"):
                fams[("svc", what)].add_metric([s["name"], s["vip"], str(s["port"]), s["protocol"]], s[what])
            for b in s["backends"]:
                lab = [s["name"], b["address"]]
                for what in ("packets", "bytes", "new_flows"):
                    fams[("be", what)].add_metric(lab, b[what])
                up.add_metric(lab, int(b["healthy"]))
                in_table.add_metric(lab, int(b["in_table"]))
                weight.add_metric(lab, b["weight"])
        yield from fams.values()
        yield up
        yield in_table
        yield weight
        if self.bgp:
            yield from _bgp_families(self.bgp())


def _bgp_families(st: dict):
    """Each BGP session's state (as BIRD reports it) and each VIP's announcement."""
    session = GaugeMetricFamily("gridbpf_lb_bgp_session_up", "1 if the BGP session is established",
                                labels=["peer", "remote_as", "state"])
    bfd = GaugeMetricFamily("gridbpf_lb_bgp_bfd_up", "1 if the peer's BFD session is up "
                            "(no sample for peers without BFD)", labels=["peer"])
    for s in st.get("sessions", []):
        session.add_metric([s["peer"], str(s["remote_as"]), s["state"]], int(s["established"]))
        if s["bfd"] != "off":
            bfd.add_metric([s["peer"]], int(s["bfd"] == "Up"))
    announced = GaugeMetricFamily("gridbpf_lb_vip_announced", "1 if this node announces the VIP",
                                  labels=["vip"])
    for vip, v in st.get("vips", {}).items():
        announced.add_metric([vip], int(v["announced"]))
    yield session
    yield bfd
    yield announced


class _Server:
    def __init__(self, dp, addr: str, port: int, bgp=None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(dp, bgp))
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise OSError(f"cannot serve /metrics on {addr}:{port}: {e.strerror}") from None
        self.port = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(dp, addr: str, port: int, bgp=None) -> _Server:
    """BGP: a callable returning the BGP status (see bgp.status), or None."""
    return _Server(dp, addr, port, bgp)
