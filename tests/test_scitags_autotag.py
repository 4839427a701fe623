"""Automatic SciTags tagging by request path, end to end: the daemon traces a real HTTP server
(python's http.server) in the server namespace with the HTTP tracer and tags its connections
by path prefix as soon as the request line is read; packets are captured in the client
namespace with an AF_PACKET socket. The /atlas/ download carries the atlas label from (almost)
the response's start, the /other/ download carries none, and the connection's close ends the
flow."""
import json
import os
import socket
import struct
import sys
import threading
import time
import urllib.request

from gridbpf.lab import Lab
from gridbpf.scitags import label

SIZE = 20 * 1000 * 1000
SERVER6, CLIENT6 = "fd00:58::2", "fd00:58::1"
PORT, ATLAS_CPORT, OTHER_CPORT = 8080, 40101, 40102
API = "127.0.0.1:8794"
SOL_PACKET, PACKET_STATISTICS = 263, 6


class Sniffer:
    """IPv6 TCP packets from the server port seen on the client's eth0: (dst port, label,
    TCP payload bytes). The payload size comes from the IPv6 header, so GSO packets count
    whole although only their first 128 bytes are read."""

    def __init__(self, host):
        with host.enter():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
        self.sock.bind(("eth0", 0))
        self.sock.settimeout(0.2)
        self.packets: list[tuple[int, int, int]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                pkt = self.sock.recv(128)
            except socket.timeout:
                continue
            if len(pkt) < 14 + 40 + 20 or pkt[20] != 6:
                continue
            sport, dport = struct.unpack("!HH", pkt[54:58])
            if sport != PORT:
                continue
            plen = struct.unpack("!H", pkt[18:20])[0]
            payload = plen - (pkt[66] >> 4) * 4
            self.packets.append((dport, struct.unpack("!I", pkt[14:18])[0] & 0xFFFFF, payload))

    def close(self) -> int:
        """Stop; returns the packets the kernel dropped for this socket."""
        self.stop = True
        self.thread.join()
        _n, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.sock.close()
        return drops


def api(host, path):
    with host.enter():
        with urllib.request.urlopen(f"http://{API}{path}", timeout=5) as r:
            return json.loads(r.read())


def test_requests_under_a_prefix_are_tagged_while_their_response_flows(tmp_path):
    www = tmp_path / "www"
    for d in ("atlas", "other"):
        (www / d).mkdir(parents=True)
        (www / d / "file").write_bytes(os.urandom(SIZE))
    with Lab("statag") as lab:
        client, server = lab.host("client"), lab.host("server")
        lab.link(server, client, [f"{SERVER6}/64"], [f"{CLIENT6}/64"], "eth0", "eth0")
        server.sysctl("net.ipv6.auto_flowlabels", 0)     # an untouched flow carries label 0
        http = server.popen([sys.executable, "-m", "http.server", "-b", SERVER6, str(PORT),
                             "-d", str(www)], name="http")
        server.wait_port(SERVER6, PORT)
        cfg = tmp_path / "scitags.toml"
        cfg.write_text(f"""
[marking]
interfaces = ["eth0"]
[pipe]
path = ""
[api]
listen = "{API}"
[firefly]
enabled = false
[[auto_tag]]
prefix = "/atlas/"
experiment = "atlas"
activity = "Production Input"
[trace]
pids = [{http.pid}]
[daemon]
lock = "{tmp_path}/scitags.lock"
""")
        daemon = server.popen([sys.executable, "-m", "gridbpf.cli", "scitags", "run", "--config",
                               str(cfg)], name="scitags")
        deadline = time.time() + 20
        while "auto tagging requests of pid" not in daemon.output() or "running" not in daemon.output():
            assert daemon.alive() and time.time() < deadline, daemon.output()
            time.sleep(0.1)
        sniff = Sniffer(client)
        try:
            for path, cport in (("/atlas/file", ATLAS_CPORT), ("/other/file", OTHER_CPORT)):
                # 40 MB/s: a transfer that lasts (0.5 s), as over a wide-area link
                r = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--limit-rate",
                                "40M", "--local-port", str(cport), f"http://[{SERVER6}]:{PORT}{path}"])
                assert r.stdout == str(SIZE)
            time.sleep(0.3)
        finally:
            drops = sniff.close()
        assert drops == 0
        flows = {}
        for dport, lab_, n in sniff.packets:
            flows.setdefault(dport, []).append((lab_, n))
        atlas, other = flows[ATLAS_CPORT], flows[OTHER_CPORT]
        # the whole body was seen (GSO packets counted by their IPv6 length)
        assert sum(n for _l, n in atlas) >= SIZE and sum(n for _l, n in other) >= SIZE
        labels = {lab_ for lab_, n in atlas if lab_}
        assert len(labels) == 1, labels                  # one label, entropy constant in the flow
        (value,) = labels
        assert label.decode(value) == (2, 15)            # atlas / Production Input
        marked = sum(n for lab_, n in atlas if lab_) / sum(n for _l, n in atlas)
        print(f"atlas download: {marked:.4%} of payload bytes marked")
        assert marked > 0.95, marked
        # once marked, every later packet is marked: only the first ones may precede the tag
        first = next(i for i, (lab_, _n) in enumerate(atlas) if lab_)
        assert all(lab_ == value for lab_, _n in atlas[first:])
        assert {lab_ for lab_, _n in other} == {0}
        # the close of the connection ended the flow; the daemon counted its bytes
        deadline = time.time() + 10
        while api(server, "/flows")["flows"]:
            assert time.time() < deadline, api(server, "/flows")
            time.sleep(0.1)
        with server.enter():
            metrics = urllib.request.urlopen(f"http://{API}/metrics", timeout=5).read().decode()
        assert 'gridbpf_scitags_flows_started_total{activity="Production Input",experiment="atlas"} 1.0' in metrics
        sent = [line for line in metrics.splitlines() if line.startswith("gridbpf_scitags_bytes_total")
                and 'experiment="atlas"' in line and 'direction="sent"' in line]
        assert len(sent) == 1 and float(sent[0].split()[-1]) > SIZE * marked
        assert daemon.stop(timeout=10) == 0, daemon.output()
        log = open(daemon.log_path).read()
        assert "Traceback" not in log and "error" not in log.lower(), log
        http.stop()
