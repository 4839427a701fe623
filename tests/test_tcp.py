"""`trace tcp`: retransmits provoked in the lab (a route blackholed mid-transfer) are counted for
the right peer; bytes, RTT and state changes per peer."""
import json
import subprocess
import sys
import time

from gridbpf.lab import Lab
from gridbpf.trace.stuck.tcp import TcpTracer

SERVER = r"""
import socket, sys, threading
def serve(addr):
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, 5001)); ls.listen(8)
    while True:
        c, _ = ls.accept()
        threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(65536), b"")], daemon=True).start()
for a in sys.argv[1:]:
    threading.Thread(target=serve, args=(a,), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

# Two connections (DST@SRC), a chunk every 20 ms each, for SECONDS; the test blackholes one.
CLIENT = r"""
import socket, sys, time
time.sleep(float(sys.argv[1]))
conns = [socket.create_connection((a.split("@")[0], 5001), source_address=(a.split("@")[1], 0))
         for a in sys.argv[3:]]
for c in conns: c.setblocking(False)
end = time.monotonic() + float(sys.argv[2])
chunk = b"x" * 4096
while time.monotonic() < end:
    for c in conns:
        try: c.send(chunk)
        except BlockingIOError: pass
    time.sleep(0.02)
print("done", flush=True)
"""


def test_tcp_retransmits_for_the_right_peer(tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "client.py").write_text(CLIENT)
    with Lab("sktcp") as lab:
        c, s = lab.host("client"), lab.host("server")
        lab.link(c, s, ["10.77.0.1/24", "10.77.0.4/24"], ["10.77.0.2/24", "10.77.0.3/24"])
        srv = s.popen([sys.executable, str(tmp_path / "server.py"), "10.77.0.2", "10.77.0.3"])
        s.wait_port("10.77.0.2", 5001)
        cli = c.popen([sys.executable, str(tmp_path / "client.py"), "1.0", "4.0",
                       "10.77.0.2@10.77.0.1", "10.77.0.3@10.77.0.4"])
        with TcpTracer([cli.pid]) as tr:
            time.sleep(2.0)                       # both connections carry data now
            # the server's ACKs to .4 go nowhere: the client retransmits to 10.77.0.3 only
            s.ip("route", "add", "blackhole", "10.77.0.4/32")
            time.sleep(1.5)
            s.ip("route", "del", "blackhole", "10.77.0.4/32")
            deadline = time.monotonic() + 15
            while cli.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.3)
            peers = {p["peer"]: p for p in tr.peers()}
            stats = tr.stats()
        assert "done" in cli.output(), cli.output()
        srv.stop()
    assert stats == {"socks_full": 0, "peers_full": 0}
    good, bad = peers["10.77.0.2:5001"], peers["10.77.0.3:5001"]
    assert bad["retransmits"] >= 2, bad
    assert good["retransmits"] == 0, good
    for p in (good, bad):
        assert p["pid"] == cli.pid
        assert p["bytes_sent"] > 100_000
        assert p["opened"] == 1 and p["state_changes"]["ESTABLISHED"] == 1
        assert p["srtt_ms"] > 0
    assert len(peers) == 2


def test_tcp_cli_json_loopback(tmp_path):
    """The CLI on a process talking over loopback: one peer, bytes both ways, JSON output."""
    prog = tmp_path / "echo.py"
    prog.write_text(r"""
import socket, threading, time
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
def echo():
    c, _ = ls.accept()
    while (d := c.recv(65536)):
        c.sendall(d)
threading.Thread(target=echo, daemon=True).start()
time.sleep(1.5)
s = socket.create_connection(ls.getsockname())
for _ in range(50):
    s.sendall(b"y" * 1000); s.recv(65536); time.sleep(0.01)
s.close(); time.sleep(0.5)
""")
    p = subprocess.Popen([sys.executable, str(prog)])
    cli = subprocess.run([sys.executable, "-m", "gridbpf.cli", "trace", "tcp", "--pid", str(p.pid),
                          "--duration", "3s", "--json"], capture_output=True, text=True, timeout=60)
    p.wait(timeout=10)
    assert cli.returncode == 0, cli.stderr
    rep = json.loads(cli.stdout)
    assert rep["peers"], rep
    sent = sum(x["bytes_sent"] for x in rep["peers"])
    received = sum(x["bytes_received"] for x in rep["peers"])
    assert sent >= 50 * 1000 * 2 and received >= 50 * 1000 * 2    # both ends are this process
    assert all(x["retransmits"] == 0 for x in rep["peers"])
