"""Automatic tagging of traced storage requests by path prefix.

The input interface for the tracing capability (gridbpf.trace): call
`AutoTagger.on_request(flow, path)` when a request's headers have been parsed on a
connection, with FLOW oriented in the direction the data goes (see `data_direction`), and
`on_close(flow)` when the connection closes. A connection keeps its tag across keep-alive
requests with the same tag; a request under another prefix re-tags it (a new flow).
"""
from __future__ import annotations

import logging

from .config import AutoTagRule
from .flows import FiveTuple, FlowEvent, InputError, make_tuple
from .registry import Registry, RegistryError

log = logging.getLogger("gridbpf.scitags")
UPLOAD_METHODS = {"PUT", "POST", "PATCH"}


def data_direction(method: str, protocol: str, server_ip, server_port: int, client_ip, client_port: int) -> FiveTuple:
    """The flow in the direction of its bulk data: uploads go client -> server, everything
    else (GET, HEAD, PROPFIND, COPY pulls served here...) server -> client."""
    if method.upper() in UPLOAD_METHODS:
        return make_tuple(protocol, client_ip, client_port, server_ip, server_port)
    return make_tuple(protocol, server_ip, server_port, client_ip, client_port)


class AutoTagger:
    def __init__(self, daemon, rules: list[AutoTagRule], registry: Registry):
        for r in rules:     # validate at start, not at the first request
            registry.resolve(r.experiment, r.activity)
        # longest prefix first, so /atlas/tape/ wins over /atlas/
        self.rules = sorted(rules, key=lambda r: len(r.prefix), reverse=True)
        self.daemon = daemon

    def match(self, path: str) -> AutoTagRule | None:
        path = path.split("?", 1)[0]
        for r in self.rules:
            if path.startswith(r.prefix):
                return r
        return None

    def on_request(self, flow: FiveTuple, path: str):
        """Tag FLOW if PATH matches a rule; returns the daemon's Flow or None."""
        rule = self.match(path)
        if rule is None:
            return None
        current = self.daemon.active.get(flow)
        if current is not None:
            exp_id, act_id, *_ = self.daemon.registry.resolve(rule.experiment, rule.activity)
            if (current.experiment_id, current.activity_id) == (exp_id, act_id):
                return current
        try:
            return self.daemon.start_flow(FlowEvent("start", flow, rule.experiment, rule.activity), "trace")
        except (InputError, RegistryError) as exc:
            self.daemon.input_errors["trace"] += 1
            log.error("trace: %s not tagged: %s", flow, exc)
            return None

    def on_close(self, flow: FiveTuple):
        if flow in self.daemon.active and self.daemon.active[flow].source == "trace":
            return self.daemon.end_flow(flow, "trace")
        return None
