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
        self.bird = self.announcer = None
        self.bird_retry_at = 0.0

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
            self.dp = Datapath.create(cfg.instance, cfg.table_size, cfg.conntrack_size, policy=cfg.conntrack)
            # a crashed predecessor may have left pins (the lock is free, so nobody uses them)
            self.dp.unpin()
            apply_config(self.dp, cfg, self.log)
            self.link = self.dp.obj.program("xdp_lb").attach_xdp(cfg.interface, cfg.xdp_mode, cfg.netns)
            self.dp.pin()
            self.health = HealthChecker(self.dp, self.health_of, cfg.netns, self.on_health, self.log)
            if cfg.bgp:
                from .bgp import Announcer, Bird
                self.bird = Bird(cfg, self.log)
                self.bird.start()     # from the main thread: BIRD dies with it
                self.announcer = Announcer(cfg, self.bird, self.vip_eligibility, self.log)
            if cfg.metrics_addr:
                from .metrics import serve
                self.metrics = serve(self.dp, *cfg.metrics_addr, bgp=self.bgp_status if cfg.bgp else None)
            self.health.start()
            if self.announcer:
                self.announcer.start()
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
        if self.announcer:
            self.announcer.poke()     # a withdrawal must not wait for the next tick

    def vip_eligibility(self) -> dict[str, str]:
        """{vip: ""} for VIPs that may be announced, else why not. A backend counts as healthy
        when it is in the table and has passed a health check since the daemon started (or
        its service checks nothing): a fresh daemon announces nothing it has not seen work."""
        need = self.cfg.bgp.min_healthy
        out: dict[str, str] = {}
        attached = self.xdp_attached()
        for svc in self.dp.services().values():
            if not attached:
                out[svc.vip] = "program detached"
                continue
            checked = self.health_of(svc.name).check != "none"
            n = sum(1 for b in svc.backends.values()
                    if b.in_table and (not checked or self.health.has_passed(svc.name, b.address)))
            if n < need:
                out[svc.vip] = out.get(svc.vip) or f"service {svc.name}: {n} healthy backends, {need} needed"
            else:
                out.setdefault(svc.vip, "")
        return out

    def xdp_attached(self) -> bool:
        """Our XDP link still holds the interface: the kernel detaches it when the interface
        goes away or someone runs `bpftool link detach`; its fdinfo then says ifindex 0."""
        fd = getattr(self.link, "fd", None)
        if fd is None:
            return self.link is not None
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("ifindex:"):
                        return int(line.split()[1]) != 0
        except (OSError, ValueError):
            return False
        return True

    def bgp_status(self) -> dict:
        from .bgp import status
        return status(self.cfg.instance, self.cfg) or {}

    def reload(self) -> None:
        try:
            cfg = _config.load(self.cfg_path)
            if (cfg.interface, cfg.netns, cfg.instance, cfg.table_size, cfg.bgp, cfg.conntrack_size,
                    cfg.conntrack) != (self.cfg.interface, self.cfg.netns, self.cfg.instance,
                                       self.cfg.table_size, self.cfg.bgp, self.cfg.conntrack_size,
                                       self.cfg.conntrack):
                raise LbError("interface, netns, instance, table_size, the connection table's settings "
                              "and [bgp] change only with a restart")
            with self.dp.locked():
                apply_config(self.dp, cfg, self.log)
            self.cfg = cfg
            if self.announcer:
                self.announcer.poke()
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
            if self.bird and (self.bird.exited() is not None or self.bird.proc is None) \
                    and time.monotonic() >= self.bird_retry_at:
                self.restart_bird()
        self.log("stopping")

    def restart_bird(self) -> None:
        """BIRD died on its own (its sessions closed, so the routers dropped this node): start
        a new one from this thread (the parent-death signal follows the forking thread); the
        announcer announces again what is still eligible."""
        if self.bird.proc is not None:
            self.log(f"bgp: BIRD exited (status {self.bird.exited()}); starting it again")
        try:
            self.announcer.restart_speaker()
        except LbError as e:
            self.log(f"{e}; retrying in 5 s")
            self.bird_retry_at = time.monotonic() + 5

    def withdraw(self) -> None:
        """SIGTERM with BGP: withdraw every VIP, give the routers withdraw_wait seconds to
        move the flows to the other nodes, and only then detach."""
        if not self.announcer:
            return
        had = set(self.bird.announced)
        self.announcer.withdraw_all()
        if had:
            self.log(f"bgp: withdrawn {', '.join(sorted(had))}; waiting {self.cfg.bgp.withdraw_wait:g} s")
            time.sleep(self.cfg.bgp.withdraw_wait)

    def shutdown(self) -> None:
        if self.announcer:
            self.announcer.stop()
            try:
                self.announcer.withdraw_all()
            except Exception as e:
                self.log(f"bgp: withdrawing: {e}")
        if self.health:
            self.health.stop()
        if self.metrics:
            self.metrics.close()
        if self.link:
            self.link.detach()
            self.link = None
        if self.bird:
            self.bird.stop()
        if self.dp:
            self.dp.unpin()
            self.dp.close()
        if self.lock:
            self.lock.release()
        if getattr(self, "iface_lock", None):
            self.iface_lock.release()
        self.dp = self.link = self.health = self.metrics = self.lock = self.iface_lock = None
        self.bird = self.announcer = None


def run(cfg_path: str) -> int:
    d = Daemon(cfg_path)
    d.start()
    try:
        d.serve_forever()
        d.withdraw()
    finally:
        d.shutdown()
    return 0
