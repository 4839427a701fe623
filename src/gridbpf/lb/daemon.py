"""`gridbpf lb run`: load, configure, attach, pin, health-check, serve /metrics, until SIGTERM.

Order matters for "nothing attached on error": the config is validated and the interface looked
up before anything is loaded; the program is attached only once the maps hold the whole config,
and pinned last; any failure on the way unwinds what was done.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
import sys
import threading
import time

from .. import netns as _netns
from .. import sdnotify
from . import config as _config
from .datapath import LOCK_DIR, Datapath, LbError
from .health import HealthChecker


def apply_config(dp: Datapath, cfg: _config.Config, log=lambda m: None) -> None:
    """Make the maps match CFG with the fewest changes: services and backends that did not
    change keep their ids, their connection-table entries and their health state."""
    dp.set_encap(cfg.source_v4, cfg.source_v6, cfg.gue_port)
    current = dp.services()
    wanted = {s.name: s for s in cfg.services}
    for name, svc in current.items():
        w = wanted.get(name)
        if w is None or (svc.vip, svc.port, svc.protocol, svc.mode, svc.no_sport) != \
                (w.vip, w.port, w.protocol, w.mode, w.hash == "no-sport"):
            dp.remove_service(name)
            log(f"service {name}: removed" if w is None else f"service {name}: redefined")
    current = dp.services()
    for name, w in wanted.items():
        if name not in current:
            dp.add_service(name, w.vip, w.port, w.protocol, w.mode, w.hash == "no-sport")
            log(f"service {name}: {w.vip} port {w.port}/{w.protocol} {w.mode}")
        have = dp.service(name).backends
        want = {b.address: b for b in w.backends}
        for addr in have:
            if addr not in want:
                dp.remove_backend(name, addr)
                log(f"service {name}: backend {addr} removed")
        for addr, b in want.items():
            if addr not in have:
                dp.add_backend(name, addr, b.mac, b.weight, b.state)
                log(f"service {name}: backend {addr} weight {b.weight} {b.state}")
                continue
            cur = have[addr]
            if cur.mac != b.mac:
                dp.set_mac(name, addr, b.mac)
            if cur.weight != b.weight:
                dp.set_weight(name, addr, b.weight)
            if cur.state != b.state:
                dp.set_state(name, addr, b.state)


class InstanceLock:
    """One daemon per instance name and per interface: exclusive flocks held for the daemon's
    life (the instance names the pins, the interface is where the program attaches)."""

    def __init__(self, instance: str, what: str | None = None):
        os.makedirs(LOCK_DIR, exist_ok=True)
        self.path = os.path.join(LOCK_DIR, f"lb-{instance}.pid")
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.f.seek(0)
            pid = self.f.read().strip() or "?"
            self.f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise LbError(f"a balancer for {what or 'instance ' + repr(instance)} is already "
                              f"running (pid {pid})") from None
            raise
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"{os.getpid()}\n")
        self.f.flush()

    def release(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.f.close()


class Daemon:
    def __init__(self, cfg_path: str, log=None):
        self.cfg_path = cfg_path
        self.log = log or (lambda m: print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} gridbpf lb: {m}",
                                           file=sys.stderr, flush=True))
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()
        self.dp = self.link = self.health = self.metrics = self.lock = None

    def start(self) -> None:
        cfg = _config.load(self.cfg_path)
        try:
            _netns.ifindex(cfg.interface, cfg.netns)
        except FileNotFoundError as e:
            raise _config.ConfigError(f"{self.cfg_path}: balancer.netns: {e}") from None
        except ValueError as e:
            raise _config.ConfigError(f"{self.cfg_path}: balancer.interface: {e}") from None
        self.cfg = cfg
        self.lock = InstanceLock(cfg.instance)
        try:
            where = f"{cfg.netns or 'host'}-{cfg.interface}"
            self.iface_lock = InstanceLock(f"if-{where}", f"interface {cfg.interface}" +
                                           (f" in {cfg.netns}" if cfg.netns else ""))
        except BaseException:
            self.lock.release()
            self.lock = None
            raise
        try:
            self.dp = Datapath.create(cfg.instance, cfg.table_size, cfg.conntrack_size)
            # a crashed predecessor may have left pins (the lock is free, so nobody uses them)
            self.dp.unpin()
            apply_config(self.dp, cfg, self.log)
            self.link = self.dp.obj.program("xdp_lb").attach_xdp(cfg.interface, cfg.xdp_mode, cfg.netns)
            self.dp.pin()
            if cfg.metrics_addr:
                from .metrics import serve
                self.metrics = serve(self.dp, *cfg.metrics_addr)
            self.health = HealthChecker(self.dp, self.health_of, cfg.netns, self.on_health, self.log)
            self.health.start()
        except BaseException:
            self.shutdown()
            raise
        where = f"{cfg.interface}" + (f" in {cfg.netns}" if cfg.netns else "")
        self.log(f"attached xdp_lb ({cfg.xdp_mode}) on {where}; instance {cfg.instance}; "
                 f"{len(cfg.services)} services" +
                 (f"; metrics on http://{cfg.metrics_addr[0]}:{self.metrics.port}/metrics" if self.metrics else ""))

    def health_of(self, service: str) -> _config.Health:
        for s in self.cfg.services:
            if s.name == service:
                return s.health
        return _config.Health()

    def on_health(self, service: str, address: str, healthy: bool, why: str) -> None:
        with self.dp.locked():
            self.dp.set_down(service, address, not healthy)
        self.log(f"service {service}: backend {address} {'up' if healthy else 'DOWN'} ({why})")

    def reload(self) -> None:
        try:
            cfg = _config.load(self.cfg_path)
            if (cfg.interface, cfg.netns, cfg.instance, cfg.table_size) != \
                    (self.cfg.interface, self.cfg.netns, self.cfg.instance, self.cfg.table_size):
                raise LbError("interface, netns, instance and table_size change only with a restart")
            with self.dp.locked():
                apply_config(self.dp, cfg, self.log)
            self.cfg = cfg
            self.log("configuration reloaded")
        except Exception as e:   # a bad reload keeps the running configuration
            self.log(f"reload refused, running configuration kept: {e}")

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *a: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *a: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *a: self.reload_event.set())
        sdnotify.ready(f"balancing on {self.cfg.interface}")    # attached, pinned, /metrics up
        while not self.stop_event.is_set():
            self.stop_event.wait(0.2)
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()
        self.log("stopping")

    def shutdown(self) -> None:
        if self.health:
            self.health.stop()
        if self.metrics:
            self.metrics.close()
        if self.link:
            self.link.detach()
        if self.dp:
            self.dp.unpin()
            self.dp.close()
        if self.lock:
            self.lock.release()
        if getattr(self, "iface_lock", None):
            self.iface_lock.release()
        self.dp = self.link = self.health = self.metrics = self.lock = self.iface_lock = None


def run(cfg_path: str) -> int:
    d = Daemon(cfg_path)
    d.start()
    try:
        d.serve_forever()
    finally:
        d.shutdown()
    return 0
