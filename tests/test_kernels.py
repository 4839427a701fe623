"""Every BPF object loads and attaches on the running kernel, and what a kernel lacks is named
in one line. `make test-kernels` runs this file inside Debian 12's 6.1 too."""
import ctypes.util
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import TESTS, gridbpf_cli
from gridbpf.bpf import BpfObject
from gridbpf.bpf import features as F
from gridbpf.bpf.object import OBJECT_DIR
from gridbpf.lab import Lab

OBJECTS = sorted(p.name.removesuffix(".bpf.o") for p in OBJECT_DIR.glob("*.bpf.o"))
LIBC = next(p for p in ("/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6",
                        "/usr/lib/libc.so.6", ctypes.util.find_library("c")) if p and os.path.exists(p))


@pytest.fixture(scope="module")
def veth():
    with Lab("kern") as lab:
        a, b = lab.host("a"), lab.host("b")
        lab.link(a, b, ["10.79.0.1/24"], ["10.79.0.2/24"], "eth0", "eth0")
        yield b.netns


def attach(prog, netns):
    """Attach PROG where its section says, on harmless targets: the veth, libc's getpid."""
    kind = prog.section.split("/")[0]
    if kind == "xdp":
        return prog.attach_xdp("eth0", mode="native", netns=netns)
    if kind == "tc":
        return prog.attach_tc("eth0", "egress", netns=netns)
    if kind in ("uprobe", "uretprobe"):
        return prog.attach_uprobe(LIBC, "getpid", retprobe=kind == "uretprobe")
    if kind == "perf_event":
        from gridbpf.doctor import _perf_event_fd
        fd = _perf_event_fd()
        try:
            return prog.attach_perf_event(fd)
        finally:
            os.close(fd)
    return prog.attach()          # tracepoint/, raw_tp/, tp_btf/, kprobe/, fentry/: by section


# what this machine's kernel is known to refuse: kprobes not built, fentry attach refused
OPTIONAL_HOOKS = {"kprobe", "fentry"}


@pytest.mark.parametrize("name", OBJECTS)
def test_every_object_loads_and_attaches(name, veth):
    obj = BpfObject.open(name)
    try:
        notes = F.drop_missing_tracepoints(obj)
        programs = [p for p in obj.programs.values() if p.autoload]
        if name == "probe":   # doctor's probes: each alone, the optional hooks may be refused
            from gridbpf.doctor import probe_attach
            results = {p.name.removeprefix("probe_"): None for p in programs}
            results.pop("adjust_room_decap")      # a test run, not an attach: test below
            for kind in results:
                results[kind] = probe_attach(kind, veth)
            print(f"{platform.release()}: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, (ok, _) in results.items()))
            assert all(ok for k, (ok, _) in results.items() if k not in OPTIONAL_HOOKS), results
            return
        obj.load()
        attached = []
        for prog in programs:
            link = attach(prog, veth)
            attached.append(prog.section)
            if prog.section.split("/")[0] in ("xdp", "tc"):
                link.detach()       # one program per hook point at a time
            else:
                obj._test_links = getattr(obj, "_test_links", []) + [link]
        for link in getattr(obj, "_test_links", []):
            link.detach()
        print(f"{name}: {len(attached)} programs attached on {platform.release()}"
              + "".join(f"; {n}" for n in notes))
        assert len(attached) == len(programs) > 0
        for n in notes:          # a missing optional tracepoint is one line naming it
            assert "\n" not in n and "lacks" in n and "added in Linux" in n
    finally:
        obj.close()


def test_missing_optional_tracepoint_is_one_line_note_and_the_tracer_still_runs(tmp_path):
    """trace tcp without sock_send_length/sock_recv_length (absent before 6.3; hidden here when
    the kernel has them): a one-line note, the other counters still work."""
    env = {}
    if F.has_tracepoint("sock_send_length"):
        env[F.HIDE_ENV] = "sock:sock_send_length/sock_recv_length"
    prog = tmp_path / "talk.py"
    prog.write_text(      # a connection every 0.2 s until killed: the tracer sees some of them
        "import socket, time\n"
        "ls = socket.socket(); ls.bind(('127.0.0.1', 0)); ls.listen(8)\n"
        "while True:\n"
        "    s = socket.create_connection(ls.getsockname()); c, _ = ls.accept()\n"
        "    s.sendall(b'x' * 1000); c.recv(1000); s.close(); c.close(); time.sleep(0.2)\n")
    p = subprocess.Popen([sys.executable, str(prog)])
    try:
        cli = subprocess.run([sys.executable, "-m", "gridbpf", "trace", "tcp", "--pid", str(p.pid),
                              "--duration", "4", "--json"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"), **env))
    finally:
        p.kill()
        p.wait()
    assert cli.returncode == 0, cli.stderr
    assert cli.stderr.strip().splitlines() == [
        f"gridbpf: note: kernel {platform.release()} lacks sock:sock_send_length/sock_recv_length "
        "(added in Linux 6.3): trace tcp counts no bytes each way and learns a socket's owner only "
        "from its state changes"]
    peers = json.loads(cli.stdout)["peers"]
    assert peers and sum(x["opened"] for x in peers) >= 1     # state changes still counted
    assert sum(x["bytes_sent"] for x in peers) == 0           # what the note says is lost


def test_missing_required_feature_is_one_line_error_not_a_traceback(tmp_path):
    """A helper the kernel lacks (hidden here: every kernel we test has bpf_loop, 5.17) stops
    `checksum watch` with one line naming it and the version that added it."""
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"), **{F.HIDE_ENV: "bpf_loop"})
    cli = subprocess.run([sys.executable, "-m", "gridbpf", "checksum", "watch", "--path", str(tmp_path),
                          "--no-store", "--duration", "1", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert cli.returncode == 2
    assert cli.stderr.splitlines() == [
        f"gridbpf: error: kernel {platform.release()} lacks bpf_loop (added in Linux 5.17): "
        "checksum.bpf.o calls it"]
    assert "Traceback" not in cli.stderr


def test_decap_flag_probe_matches_the_kernel():
    """bpf_skb_adjust_room's DECAP_L3 flags (6.3): the test-run probe says yes on 6.3+, no
    before, and the note names the tunnels that cannot be decapsulated."""
    major, minor = (int(x) for x in platform.release().split(".")[:2])
    assert F.has("bpf_skb_adjust_room DECAP_L3 flags") == ((major, minor) >= (6, 3))
    note = F.note("bpf_skb_adjust_room DECAP_L3 flags")
    assert (note is None) == ((major, minor) >= (6, 3))


def test_doctor_reports_kernel_features_and_optional_hooks():
    r = json.loads(gridbpf_cli("doctor", "--json").stdout)
    feats = {f["feature"]: f for f in r["kernel_features"]}
    assert feats["bpf_loop"]["present"] and feats["bpf_loop"]["since"] == "5.17"
    assert feats["BPF_MAP_TYPE_RINGBUF"]["present"]
    assert feats["sock:sock_send_length/sock_recv_length"]["present"] == F.has_tracepoint("sock_send_length")
    # request tracing: the socket hook where the kernel has it (6.3+), else the syscall fallback
    assert r["http_hook"]["hook"] == ("sock" if F.has_tracepoint("sock_recv_length") else "syscall")
    assert r["http_hook"]["reason"]
    for hook in OPTIONAL_HOOKS:      # reported truthfully, marked as not needed
        assert r["attach"][hook]["needed"] is False
    assert all(r["attach"][k]["needed"] for k in ("xdp", "tc", "tp_btf", "uprobe"))
    assert all(c["ready"] for c in r["capabilities"].values()), r["capabilities"]


def test_vm_test_list_names_existing_tests():
    """tools/test-kernels/tests.txt is run in the 6.1 VM: a renamed test must fail here, on the
    host, rather than only in `make test-kernels`."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    ids = [l.strip() for l in (root / "tools" / "test-kernels" / "tests.txt").read_text().splitlines()
           if l.strip() and not l.startswith("#")]
    r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", *ids], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
