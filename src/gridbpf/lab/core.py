"""Network-namespace lab: hosts, veth links, bridges, addresses, routes, processes.

Every namespace is named gb-<lab>-<host>, so a lab's leftovers (after a crash) are found by name
and removed. Interfaces are created directly inside their namespaces, so their names only need
to be unique per host. Teardown kills the processes, deletes the namespaces (and with them every
veth and bridge) and removes the lab's pins, whatever happened in between.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .. import netns as _netns

NS_PREFIX = "gb-"


class LabError(RuntimeError):
    pass


def _run(cmd: list[str], check: bool = True, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {(p.stderr or p.stdout).strip().splitlines()[-1:] or p.returncode}")
    return p


def namespaces() -> list[str]:
    if not os.path.isdir(_netns.NETNS_RUN_DIR):
        return []
    return sorted(n for n in os.listdir(_netns.NETNS_RUN_DIR) if n.startswith(NS_PREFIX))


def labs() -> dict[str, list[str]]:
    """Labs that exist now (namespaces named gb-<lab>-<host>) -> their hosts."""
    out: dict[str, list[str]] = {}
    for ns in namespaces():
        lab, _, host = ns[len(NS_PREFIX):].partition("-")
        out.setdefault(lab, []).append(host)
    return out


def remove_namespace(ns: str) -> None:
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    for _ in range(50):
        if not _run(["ip", "netns", "pids", ns], check=False).stdout.split():
            break
        time.sleep(0.02)
    _run(["ip", "netns", "del", ns], check=False)


def remove_lab(name: str) -> list[str]:
    """Remove every namespace and pin of lab NAME; returns the namespaces removed."""
    gone = [ns for ns in namespaces() if ns.startswith(f"{NS_PREFIX}{name}-")]
    for ns in gone:
        remove_namespace(ns)
    from ..bpf.pins import PIN_ROOT
    pins = os.path.join(PIN_ROOT, "lab", name)
    if os.path.isdir(pins):
        shutil.rmtree(pins, ignore_errors=True)
    return gone


class Process:
    """A process running in a host's namespace, its output kept in a file."""

    def __init__(self, host: "Host", cmd: list[str], log_path: str, env: dict | None, cwd: str | None):
        self.host, self.cmd, self.log_path = host, cmd, log_path
        self._log = open(log_path, "wb")
        full_env = dict(os.environ, **(env or {}))
        self.popen = subprocess.Popen(["ip", "netns", "exec", host.netns, *cmd], stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=full_env, cwd=cwd, start_new_session=True)
        self.pid = self.popen.pid   # ip netns exec execs the command: same pid

    def output(self) -> str:
        """Everything the process wrote so far (also after stop())."""
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        self._log.close()
        return self.popen.returncode


class Host:
    def __init__(self, lab: "Lab", name: str):
        self.lab, self.name = lab, name
        self.netns = f"{NS_PREFIX}{lab.name}-{name}"
        self.ifaces: dict[str, dict] = {}
        self.processes: list[Process] = []

    def __repr__(self):
        return f"<Host {self.name} ({self.netns})>"

    # --- commands inside the namespace ---------------------------------------------------------

    def run(self, cmd: list[str] | str, check: bool = True, timeout: float = 120, input: str | None = None):
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        return _run(["ip", "netns", "exec", self.netns, *cmd], check=check, timeout=timeout, input=input)

    def ip(self, *args: str, check: bool = True):
        return _run(["ip", "-n", self.netns, *args], check=check)

    def ip_batch(self, lines: list[str]) -> None:
        if lines:
            _run(["ip", "-n", self.netns, "-batch", "-"], input="\n".join(lines) + "\n")

    def sysctl(self, key: str, value) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def popen(self, cmd: list[str], name: str | None = None, env: dict | None = None,
              cwd: str | None = None) -> Process:
        label = name or os.path.basename(cmd[0])
        log = os.path.join(self.lab.workdir, f"{self.name}-{label}-{len(self.processes)}.log")
        p = Process(self, cmd, log, env, cwd)
        self.processes.append(p)
        return p

    def enter(self):
        """Context manager: the calling thread runs in this host's namespace (sockets, netlink)."""
        return _netns.enter(self.netns)

    def connect(self, addr: str, port: int, timeout: float = 5) -> socket.socket:
        """A TCP connection made from this host."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with self.enter():
            s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((addr, port))
        return s

    def wait_port(self, addr: str, port: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(addr, port, timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise LabError(f"{self.name}: nothing listening on {addr}:{port} after {timeout}s")
                time.sleep(0.05)

    def addr(self, ifname: str, family: int = 4) -> str:
        """First address of FAMILY on IFNAME, without prefix length."""
        for a in self.ifaces.get(ifname, {}).get("addrs", []):
            if ipaddress.ip_interface(a).version == family:
                return str(ipaddress.ip_interface(a).ip)
        raise LabError(f"{self.name}:{ifname} has no IPv{family} address")

    def mac(self, ifname: str) -> str:
        out = self.ip("-o", "link", "show", "dev", ifname).stdout
        return out.split("link/ether", 1)[1].split()[0]

    def add_addrs(self, ifname: str, addrs) -> None:
        lines = []
        for a in addrs:
            if ipaddress.ip_interface(a).version == 6:
                lines.append(f"addr add {a} dev {ifname} nodad")
            else:
                lines.append(f"addr add {a} dev {ifname}")
            self.ifaces.setdefault(ifname, {"addrs": []})["addrs"].append(a)
        self.ip_batch(lines)

    def route(self, spec: str) -> None:
        """`ip route add SPEC` (e.g. '10.9.0.0/24 via 10.1.0.1'); ':' in it means IPv6."""
        self.ip("-6" if ":" in spec.split()[0] or "::" in spec else "-4", "route", "add", *spec.split())


class Lab:
    """with Lab("t1") as lab: ... ; everything it made goes at the end, also after an exception."""

    def __init__(self, name: str):
        if not name or "-" in name or len(name) > 8 or not name.isalnum():
            raise ValueError(f"lab name {name!r}: 1-8 letters/digits, no '-'")
        self.name = name
        self.hosts: dict[str, Host] = {}
        self.workdir = tempfile.mkdtemp(prefix=f"gridbpf-lab-{name}-")
        self._links = 0
        remove_lab(name)   # leftovers of an earlier run that died

    @property
    def pin_prefix(self) -> str:
        """Pins made for this lab go under here and are removed with it."""
        return f"lab/{self.name}"

    def host(self, name: str, forwarding: bool = False) -> Host:
        if name in self.hosts:
            return self.hosts[name]
        h = Host(self, name)
        _run(["ip", "netns", "add", h.netns])
        self.hosts[name] = h
        h.ip("link", "set", "lo", "up")
        # No duplicate address detection: addresses (link-local ones too) usable at once.
        h.sysctl("net.ipv6.conf.all.accept_dad", 0)
        h.sysctl("net.ipv6.conf.default.accept_dad", 0)
        if forwarding:
            h.sysctl("net.ipv4.ip_forward", 1)
            h.sysctl("net.ipv6.conf.all.forwarding", 1)
        return h

    def link(self, a: Host, b: Host, a_addrs=(), b_addrs=(), a_if: str | None = None,
             b_if: str | None = None) -> tuple[str, str]:
        """A veth pair between hosts A and B, up, with addresses; returns the two names."""
        self._links += 1
        a_if = a_if or f"to-{b.name}"[:15]
        b_if = b_if or f"to-{a.name}"[:15]
        _run(["ip", "link", "add", a_if, "netns", a.netns, "type", "veth",
              "peer", "name", b_if, "netns", b.netns])
        for h, ifname, addrs in ((a, a_if, a_addrs), (b, b_if, b_addrs)):
            h.ifaces.setdefault(ifname, {"addrs": []})
            h.add_addrs(ifname, addrs)
            h.ip("link", "set", ifname, "up")
        return a_if, b_if

    def bridge(self, host: Host, name: str = "br0", addrs=()) -> str:
        # No multicast snooping: until ports send MLD reports (delayed up to ~1 s after link up)
        # a snooping bridge drops IPv6 neighbour solicitations, and new labs see "no route".
        host.ip_batch([f"link add {name} type bridge mcast_snooping 0", f"link set {name} up"])
        host.ifaces.setdefault(name, {"addrs": []})
        host.add_addrs(name, addrs)
        return name

    def attach_to_bridge(self, switch: Host, bridge: str, host: Host, addrs=(), host_if: str = "eth0") -> str:
        """Plug HOST into BRIDGE (which lives in SWITCH) with a veth; returns HOST's interface."""
        port = f"p-{host.name}"[:15]
        self.link(host, switch, addrs, (), a_if=host_if, b_if=port)
        switch.ip("link", "set", port, "master", bridge)
        return host_if

    def close(self) -> None:
        for h in self.hosts.values():
            for p in h.processes:
                with contextlib.suppress(Exception):
                    p.stop(timeout=3)
        remove_lab(self.name)
        self.hosts.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
