"""Runs a systemd unit's service the way systemd would, for machines whose PID 1 is not systemd
(containers, this CI): ExecStart as written, the capability bounding set and no_new_privs
applied with setpriv, Environment=, readiness by sd_notify over a NOTIFY_SOCKET we listen on,
KillSignal= and TimeoutStopSec= on stop, Restart=on-failure after a crash.

What it does not reproduce: ProtectSystem/ProtectHome and the other namespace sandboxing, the
journal (output goes to a log file), cgroups. Where PID 1 is systemd, SystemdUnit drives the
real manager instead.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def parse_unit(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """[Section] -> key -> values (systemd keys may repeat; an empty value resets the list)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = out.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return out


def systemd_is_pid1() -> bool:
    return os.path.isdir("/run/systemd/system")


def program_ids(pid: int) -> set[int]:
    """IDs of the BPF programs a process holds (program and link fds, from /proc/PID/fdinfo)."""
    ids = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            text = Path(fdinfo, fd).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def live_programs(ids: set[int], settle: float = 5.0) -> set[int]:
    """Those of IDS still loaded in the kernel after up to SETTLE seconds: the kernel frees a
    program after an RCU grace period (longer for uprobe programs), not at the last close."""
    deadline = time.monotonic() + settle
    while True:
        live = {i for i in ids if subprocess.run(["bpftool", "prog", "show", "id", str(i)],
                                                 capture_output=True).returncode == 0}
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.1)


class Supervisor:
    def __init__(self, unit_path: str | Path, log_path: str | Path, extra_caps: tuple[str, ...] = (),
                 drop_caps: tuple[str, ...] = ()):
        self.unit = parse_unit(unit_path)
        self.name = Path(unit_path).name
        svc = self.unit["Service"]
        assert svc["Type"] == ["notify"], f"{self.name}: Type={svc.get('Type')}"
        self.exec_start = shlex.split(svc["ExecStart"][0])
        self.caps = [c.lower().removeprefix("cap_") for v in svc.get("CapabilityBoundingSet", [])
                     for c in v.split() if c.lower().removeprefix("cap_") not in drop_caps] + list(extra_caps)
        self.no_new_privs = svc.get("NoNewPrivileges", ["no"])[-1] == "yes"
        self.kill_signal = getattr(signal, svc.get("KillSignal", ["SIGTERM"])[-1])
        self.stop_timeout = float(svc.get("TimeoutStopSec", ["90"])[-1])
        self.start_timeout = float(svc.get("TimeoutStartSec", ["90"])[-1])
        self.restart = svc.get("Restart", ["no"])[-1]
        self.no_restart_status = {int(s) for v in svc.get("RestartPreventExitStatus", []) for s in v.split()}
        self.log_path = str(log_path)
        self.proc: subprocess.Popen | None = None
        self.status = ""
        self.starts = 0
        self._dir = tempfile.mkdtemp(prefix="gb-sup-")

    def command(self) -> list[str]:
        wrap = ["setpriv"]
        if self.no_new_privs:
            wrap.append("--no-new-privs")
        if self.caps:
            wrap += ["--bounding-set", "-all," + ",".join("+" + c for c in self.caps),
                     "--inh-caps", "-all"]
        return wrap + ["--"] + self.exec_start

    def start(self) -> int:
        """Start and wait for READY=1; returns the main pid. Raises if the service exits or
        the start times out (systemd would fail the start job)."""
        sock_path = os.path.join(self._dir, f"notify{self.starts}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(sock_path)
        env = dict(os.environ, NOTIFY_SOCKET=sock_path)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.starts += 1
        deadline = time.monotonic() + self.start_timeout
        try:
            sock.settimeout(0.2)
            while True:
                try:
                    msg = sock.recv(4096).decode()
                except socket.timeout:
                    msg = ""
                fields = dict(line.partition("=")[::2] for line in msg.splitlines())
                self.status = fields.get("STATUS", self.status)
                if fields.get("READY") == "1":
                    return self.proc.pid
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before READY=1: "
                                       f"{self.log()[-600:]}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"{self.name}: no READY=1 within {self.start_timeout}s")
        finally:
            sock.close()
            os.unlink(sock_path)

    def stop(self) -> int:
        """KillSignal to the main process; after TimeoutStopSec SIGKILL (systemd's KillMode=mixed).
        Returns the exit status (negative: killed by that signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.kill_signal)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(10)

    def should_restart(self) -> bool:
        """Restart=on-failure: a non-zero exit (not listed in RestartPreventExitStatus) or a signal."""
        rc = self.proc.returncode
        return self.restart in ("on-failure", "always") and rc != 0 and rc not in self.no_restart_status

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")
