"""Loading gridbpf's Java TLS agent into a running HotSpot JVM, and holding a lease on it.

The HotSpot attach handshake, done here in Python (no jattach, no JDK tool needed):
  1. the JVM's pid in its own pid namespace (NSpid), its uid/gid, its root (/proc/PID/root);
  2. unless its attach socket /tmp/.java_pid<NSPID> exists: create /tmp/.attach_pid<NSPID> (owned by
     the JVM's uid) and send SIGQUIT; the JVM's attach listener then creates the socket;
  3. connect to the socket with the JVM's euid/egid (it checks the peer's credentials) and send
     "1\\0load\\0instrument\\0false\\0<jar>=<args>\\0"; the answer is the agentmain's outcome.
The jars are copied first into /tmp/.gridbpf-jvm-<NSPID>/ inside the JVM's mount namespace, owned
by its uid, mode 0700; the agent writes agent.json there and watches the tracers' lease files.

SIGQUIT without an attach listener would make the JVM print a thread dump into the service's log
(or, with -Xrs, kill it): so a JVM started with -XX:+DisableAttachMechanism or -Xrs is refused
before any signal, with a one-line reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

JAR_DIR = Path(__file__).resolve().parents[2] / "_java"
AGENT_JAR = "gridbpf-jvm-agent.jar"
ATTACH_TIMEOUT = 10.0
# records one system call of the agent carries at most (the bridge's BATCH_MAX, HTTP_JVM_BATCH_MAX)
BATCH_MAX = 16


class JvmAttachError(RuntimeError):
    """The agent could not be loaded; str() is a one-line reason naming the pid."""


class JvmNotReady(JvmAttachError):
    """The JVM is still starting (its signal handling is not up yet): try again later."""


@dataclass(frozen=True)
class JvmProcess:
    pid: int          # as seen from here
    nspid: int        # as seen by the JVM itself
    uid: int          # effective uid/gid: what the attach listener checks
    gid: int

    @property
    def root(self) -> Path:
        return Path(f"/proc/{self.pid}/root")

    @property
    def agent_dir(self) -> str:
        """The agent's directory as the JVM names it (inside its mount namespace)."""
        return f"/tmp/.gridbpf-jvm-{self.nspid}"

    def host_path(self, jvm_path: str) -> Path:
        """A path inside the JVM's mount namespace, reached from here."""
        return self.root / jvm_path.lstrip("/")


def is_hotspot(pid: int) -> bool:
    """True if the process maps HotSpot's libjvm.so."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(line.rstrip().endswith("/libjvm.so") for line in f)
    except OSError:
        return False


def jvm_process(pid: int) -> JvmProcess:
    """Reads what the attach needs from /proc; JvmAttachError if pid is no HotSpot JVM."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise JvmAttachError(f"pid {pid}: no such process ({e.strerror})") from None
    if not is_hotspot(pid):
        raise JvmAttachError(f"pid {pid}: not a HotSpot JVM (no libjvm.so mapped)")
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    nspid = int(fields.get("NSpid", str(pid)).split()[-1])
    uid = int(fields["Uid"].split()[1])
    gid = int(fields["Gid"].split()[1])
    return JvmProcess(pid, nspid, uid, gid)


def _jvm_options(jvm: JvmProcess) -> str:
    """Everything that can carry JVM options: command line, option variables, hsperfdata vmArgs."""
    parts = []
    try:
        args = Path(f"/proc/{jvm.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        parts.append(" ".join(args))
        for arg in args:            # the launcher's @argfiles, relative to the JVM's start directory
            if arg.startswith("@") and len(arg) > 1:
                f = Path(arg[1:])
                f = jvm.host_path(str(f)) if f.is_absolute() else Path(f"/proc/{jvm.pid}/cwd") / f
                try:
                    parts.append(f.read_text(errors="replace")[:1 << 20])
                except OSError:
                    pass
    except OSError:
        pass
    try:
        for var in Path(f"/proc/{jvm.pid}/environ").read_bytes().split(b"\0"):
            if var.startswith((b"JAVA_TOOL_OPTIONS=", b"JDK_JAVA_OPTIONS=", b"_JAVA_OPTIONS=")):
                parts.append(var.decode(errors="replace"))
    except OSError:
        pass
    # the perf data file holds java.rt.vmArgs, options from @argfiles and env variables included
    try:
        for d in jvm.host_path("/tmp").glob("hsperfdata_*"):
            f = d / str(jvm.nspid)
            if f.exists():
                parts.append(f.read_bytes().decode("latin-1"))
                break
    except OSError:
        pass
    return "\n".join(parts)


def _has_signal_dispatcher(pid: int) -> bool:
    """HotSpot handles SIGQUIT in its "Signal Dispatcher" thread, started during VM init and
    never with -Xrs: without it a SIGQUIT could kill the JVM."""
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                if Path(f"/proc/{pid}/task/{task}/comm").read_text().startswith("Signal Dispatch"):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def check_attachable(jvm: JvmProcess) -> None:
    """Refuses, before any signal, a JVM that would not answer SIGQUIT with its attach listener
    (it would print a thread dump into the service's log instead, or die)."""
    opts = _jvm_options(jvm)
    if "-XX:+DisableAttachMechanism" in opts:
        raise JvmAttachError(f"pid {jvm.pid}: JVM attach disabled (-XX:+DisableAttachMechanism)")
    if "-Xrs" in opts.split():
        raise JvmAttachError(f"pid {jvm.pid}: JVM runs with -Xrs (SIGQUIT would not start its attach listener)")
    if not _has_signal_dispatcher(jvm.pid):
        raise JvmNotReady(f"pid {jvm.pid}: JVM still starting (no Signal Dispatcher thread yet): not attached")


def _chown(path: Path, jvm: JvmProcess) -> None:
    os.chown(path, jvm.uid, jvm.gid)


def install_jars(jvm: JvmProcess, jar_dir: Path | None = None) -> Path:
    """Copies the agent jar into the JVM's /tmp/.gridbpf-jvm-<NSPID>/ (its uid, 0700); returns that dir.
    An existing jar with the same content is left alone (the JVM may have it open); a changed one
    is replaced by rename, never overwritten in place."""
    jar_dir = jar_dir or JAR_DIR
    d = jvm.host_path(jvm.agent_dir)
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise JvmAttachError(f"pid {jvm.pid}: {jvm.agent_dir} exists and is not a directory")
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if (st.st_uid, st.st_gid) != (jvm.uid, jvm.gid):
        _chown(d, jvm)
    os.chmod(d, 0o700)
    for name in (AGENT_JAR,):
        src = jar_dir / name
        if not src.exists():
            raise JvmAttachError(f"{src} missing: run `make java`")
        dst = d / name
        data = src.read_bytes()
        if dst.exists() and dst.read_bytes() == data:
            continue
        tmp = d / f".{name}.tmp"
        tmp.write_bytes(data)
        _chown(tmp, jvm)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)
    return d


def _connect_as(path: Path, uid: int, gid: int, timeout: float) -> socket.socket:
    """Connects to a UNIX socket with the given effective uid/gid (the JVM checks SO_PEERCRED).
    Switching our own euid would affect every thread of this process: a forked child connects
    and hands the connected socket back over a socketpair."""
    if (os.geteuid(), os.getegid()) == (uid, gid):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(str(path))
        return s
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:   # child: only syscalls, then _exit
        code = 1
        try:
            parent.close()
            os.setegid(gid)
            os.seteuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(str(path))
            socket.send_fds(child, [b"k"], [s.fileno()])
            code = 0
        except BaseException:
            try:
                child.send(b"e")
            except BaseException:
                pass
        os._exit(code)
    child.close()
    try:
        parent.settimeout(timeout + 1)
        msg, fds, _, _ = socket.recv_fds(parent, 16, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if msg != b"k" or not fds:
        raise OSError(f"connect to {path} as uid {uid} failed")
    s = socket.socket(fileno=fds[0])
    s.settimeout(timeout)
    return s


def _attach_socket(jvm: JvmProcess, timeout: float) -> Path:
    """The attach listener's socket, starting the listener with .attach_pid + SIGQUIT if needed."""
    sock = jvm.host_path(f"/tmp/.java_pid{jvm.nspid}")
    if sock.is_socket():
        return sock
    check_attachable(jvm)
    trigger = jvm.host_path(f"/tmp/.attach_pid{jvm.nspid}")
    try:
        trigger.touch()
        _chown(trigger, jvm)
    except OSError as e:
        raise JvmAttachError(f"pid {jvm.pid}: cannot create {trigger} ({e.strerror})") from None
    try:
        os.kill(jvm.pid, signal.SIGQUIT)
        deadline = time.monotonic() + timeout
        while not sock.is_socket():
            if time.monotonic() > deadline:
                raise JvmAttachError(f"pid {jvm.pid}: no attach socket after {timeout:.0f}s (attach listener did not start)")
            time.sleep(0.05)
    finally:
        trigger.unlink(missing_ok=True)
    return sock


def load_agent(jvm: JvmProcess, options: str, timeout: float = ATTACH_TIMEOUT) -> str:
    """Sends the attach "load" command for the instrument library; returns the JVM's answer."""
    sock_path = _attach_socket(jvm, timeout)
    jar = f"{jvm.agent_dir}/{AGENT_JAR}"
    request = b"".join(x.encode() + b"\0" for x in ("1", "load", "instrument", "false", f"{jar}={options}"))
    try:
        s = _connect_as(sock_path, jvm.uid, jvm.gid, timeout)
    except OSError as e:
        raise JvmAttachError(f"pid {jvm.pid}: cannot connect to its attach socket ({e})") from None
    with s:
        try:
            s.sendall(request)
            chunks = []
            while True:
                b = s.recv(4096)
                if not b:
                    break
                chunks.append(b)
        except socket.timeout:
            raise JvmAttachError(f"pid {jvm.pid}: attach timed out after {timeout:.0f}s") from None
        except OSError as e:
            raise JvmAttachError(f"pid {jvm.pid}: attach failed ({e})") from None
    answer = b"".join(chunks).decode(errors="replace")
    lines = answer.split("\n")
    # "0" = command done; then the agent load's own code ("0", or "return code: 0" on JDK 21+)
    if lines[0].strip() != "0":
        raise JvmAttachError(f"pid {jvm.pid}: attach refused: {' '.join(answer.split())[:200]}")
    rest = " ".join(lines[1:]).strip()
    code = rest.rsplit(":", 1)[-1].strip() if rest else "0"
    if code not in ("0", ""):
        raise JvmAttachError(f"pid {jvm.pid}: agent load failed: {' '.join(rest.split())[:200]}")
    return answer


@dataclass
class JvmAgent:
    """A loaded agent and this tracer's lease on it. While some lease is fresh (renewed within
    5 s) the agent writes records; release() (or 5 s without renew) makes it inactive again."""
    jvm: JvmProcess
    lease_id: str
    dir: Path                    # the agent's directory, reached from here
    info: dict = field(default_factory=dict)
    # how this tracer reads the records: "write" (write(2) to /dev/null, seen by the syscall
    # hook) or "recv" (read(2) of the record on an empty socket, seen at sock_recv_length)
    transport: str = "write"
    # records the agent's batches take at most (None: its default, 16; 1: every record alone).
    # Batches cut the agent's system calls, and the tracer's program runs, per request under load
    batch: int | None = None
    _stop: threading.Event | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.jvm.pid

    @property
    def nspid(self) -> int:
        return self.jvm.nspid

    @property
    def bridge_fd(self) -> int:
        """The fd whose system calls carry the records to this tracer, in the JVM process:
        write(2)s to /dev/null or reads of the empty socket (-1 if not installed)."""
        key = "bridge_recv_fd" if self.transport == "recv" else "bridge_fd"
        return int(self.info.get(key, -1))

    @property
    def installed(self) -> bool:
        return bool(self.info.get("installed"))

    @property
    def lease_path(self) -> Path:
        return self.dir / f"lease-{self.lease_id}"

    def renew(self) -> None:
        """Call about once a second while tracing."""
        p = self.lease_path
        try:
            os.utime(p)
        except FileNotFoundError:
            # the agent reads which transport this lease wants, and the batch size if any
            p.write_text(self.transport + (f" batch={self.batch}" if self.batch else ""))

    def keep_alive(self, interval: float = 1.0) -> None:
        """Renews the lease from a daemon thread until release()."""
        if self._stop is not None:
            return
        stop = self._stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                try:
                    self.renew()
                except OSError:
                    pass
        threading.Thread(target=loop, name=f"jvm-lease-{self.pid}", daemon=True).start()

    def release(self) -> None:
        """Drops this tracer's lease: the agent goes inactive within a second unless another
        tracer holds one. The agent itself stays loaded (a JVM cannot unload it)."""
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self.lease_path.unlink(missing_ok=True)

    def wait_active(self, timeout: float) -> None:
        """Until agent.json says active (the agent looks at leases 5 times a second), so that
        requests from now on are reported; raises JvmAttachError if it never does."""
        deadline = time.monotonic() + min(timeout, 3.0)
        while True:
            try:
                info = self.read_info()
                if info.get("active") and info.get(f"via_{self.transport}", True):
                    return
            except (OSError, ValueError):
                pass                  # agent.json being replaced: read again
            if time.monotonic() > deadline:
                self.release()
                raise JvmAttachError(f"pid {self.pid}: the loaded agent did not become active")
            if self.bridge_fd < 0 and self.info.get("installed"):
                self.release()
                why = self.info.get("skipped", {}).get("transport recv", "loaded by an older gridbpf")
                raise JvmAttachError(f"pid {self.pid}: the loaded agent has no {self.transport} transport ({why})")
            time.sleep(0.02)

    def read_info(self) -> dict:
        """agent.json as the agent last wrote it (records/errors refreshed every second)."""
        self.info = json.loads((self.dir / "agent.json").read_text())
        return self.info

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _proc_starttime(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


def loaded_agent_info(jvm: JvmProcess) -> dict | None:
    """agent.json of an agent already loaded and installed in this very JVM (same start time), else None."""
    try:
        info = json.loads(jvm.host_path(jvm.agent_dir + "/agent.json").read_text())
        if info.get("installed") and info.get("starttime") == _proc_starttime(jvm.pid):
            return info
    except (OSError, ValueError):
        pass
    return None


def attach(pid: int, lease_id: str, sink: str | None = None, timeout: float = ATTACH_TIMEOUT,
           jar_dir: Path | None = None, reload: bool = False, test_fail: str | None = None,
           transport: str = "write", batch: int | None = None) -> JvmAgent:
    """Loads the agent into JVM pid, or re-uses the one loaded there, and takes a lease.
    A JVM whose agent.json shows an installed agent (same JVM start time) is not attached again:
    only the lease file is added (on JDK 21+ every dynamic load prints a warning to the service's
    stderr). reload=True attaches anyway (the agent then only rewrites agent.json).
    sink: tests only, a path inside the JVM's namespace where records are appended instead of
    /dev/null (honoured by the first load only); test_fail: tests only, the install stage the
    agent fails at (bridge, dryrun, retransform); transport: how the caller reads records
    ("write" or "recv", see JvmAgent); batch: records a batch takes at most (see JvmAgent).
    Raises JvmAttachError with a one-line reason."""
    if transport not in ("write", "recv"):
        raise ValueError(f"bad transport {transport!r}")
    if batch is not None and not 1 <= batch <= BATCH_MAX:
        raise ValueError(f"bad batch size {batch!r} (1 to {BATCH_MAX})")
    if not lease_id or "/" in lease_id or "," in lease_id:
        raise ValueError(f"bad lease id {lease_id!r}")
    if sink and "," in sink:
        raise JvmAttachError(f"pid {pid}: sink path must not contain ',' ({sink})")
    jvm = jvm_process(pid)
    try:
        existing = None if reload else loaded_agent_info(jvm)
        if existing is not None:
            agent = JvmAgent(jvm, lease_id, jvm.host_path(jvm.agent_dir), existing, transport, batch)
            agent.renew()
            agent.wait_active(timeout)
            return agent
        return _load(jvm, lease_id, sink, timeout, jar_dir, test_fail, transport, batch)
    except OSError as e:         # e.g. EPERM without CAP_CHOWN/CAP_KILL for another user's JVM
        raise JvmAttachError(f"pid {pid}: cannot load the Java agent ({e.strerror or e})") from None


def _load(jvm: JvmProcess, lease_id: str, sink: str | None, timeout: float, jar_dir: Path | None,
          test_fail: str | None, transport: str, batch: int | None) -> JvmAgent:
    pid = jvm.pid
    if not jvm.host_path(f"/tmp/.java_pid{jvm.nspid}").is_socket():
        check_attachable(jvm)     # before leaving any file in the JVM's /tmp
    d = install_jars(jvm, jar_dir)
    agent = JvmAgent(jvm, lease_id, d, transport=transport, batch=batch)
    agent.renew()                 # the lease exists before the load: active from the first call
    info = d / "agent.json"
    before = info.stat().st_mtime_ns if info.exists() else 0
    options = f"dir={jvm.agent_dir}" + (f",sink={sink}" if sink else "") + (f",test_fail={test_fail}" if test_fail else "")
    try:
        load_agent(jvm, options, timeout)
        deadline = time.monotonic() + timeout
        while not info.exists() or info.stat().st_mtime_ns == before:
            if time.monotonic() > deadline:
                raise JvmAttachError(f"pid {pid}: agent loaded but wrote no agent.json within {timeout:.0f}s")
            time.sleep(0.02)
        agent.read_info()
    except BaseException:
        agent.release()
        raise
    if not agent.installed:
        reason = agent.info.get("failure") or "unknown reason"
        agent.release()
        raise JvmAttachError(f"pid {pid}: agent loaded but hooks not installed: {reason}")
    return agent


def remove_agent_dir(jvm: JvmProcess) -> None:
    """Tests: forget the jars and files (the loaded agent itself stays in the JVM)."""
    shutil.rmtree(jvm.host_path(jvm.agent_dir), ignore_errors=True)
