"""SciTags end to end in lab namespaces: the daemon (`gridbpf scitags run`) in the server
namespace marks a real 100 MB TCP transfer registered through the named pipe with the exact
lines StoRM WebDAV writes; every packet captured in the client namespace is checked; an
untagged concurrent transfer stays untouched; fireflies are received and schema-checked."""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from gridbpf.lab import Lab
from gridbpf.scitags import firefly, label

SIZE = 100 * 1000 * 1000
SERVER6, CLIENT6 = "fd00:57::2", "fd00:57::1"
SERVER4, CLIENT4 = "10.57.0.2", "10.57.0.1"
DATA_PORT, TAGGED_SPORT, UNTAGGED_SPORT = 5001, 40001, 40002
API = "127.0.0.1:8793"
COLLECTOR_PORT = 10515


def max_ip_bytes(payload: int) -> int:
    """The most IP bytes PAYLOAD can take on a 1500-byte MTU: every segment full-size with its
    own IPv6+TCP(+timestamps) headers (72 B per 1428 B), as when tc sees unaggregated packets,
    plus the handshake and teardown."""
    return payload * 1500 // 1428 + 10_000


SENDER = r"""
import socket, sys, threading
size, n = int(sys.argv[1]), int(sys.argv[2])
ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("::", 5001)); ls.listen(8)
print("listening", flush=True)
chunk = b"\0" * (1 << 20)
def send(c):
    left = size
    while left:
        left -= c.send(chunk[:min(left, len(chunk))])
    c.close()
ts = []
for _ in range(n):
    c, _a = ls.accept()
    t = threading.Thread(target=send, args=(c,)); t.start(); ts.append(t)
for t in ts: t.join()
"""

RECEIVER = r"""
import json, socket, sys, threading
server, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
got = {}
def pull(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::", port)); s.connect((server, 5001))
    n = 0
    while True:
        b = s.recv(1 << 20)
        if not b: break
        n += len(b)
    got[port] = n
ts = [threading.Thread(target=pull, args=(p,)) for p in ports]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(got))
"""


class Listener:
    """UDP listener in a namespace, collecting fireflies in a thread."""

    def __init__(self, host, port):
        with host.enter():
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", port))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, bytes]] = []
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop:
            try:
                data, _ = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            self.got.append((time.time(), data))

    def messages(self, src_port=None, state=None):
        out = []
        for t, data in list(self.got):
            header, msg = firefly.parse_packet(data)
            if src_port is not None and msg["flow-id"]["dst-port"] != src_port:
                continue
            if state is not None and msg["flow-lifecycle"]["state"] != state:
                continue
            out.append((t, header, msg))
        return out

    def wait(self, dst_port, state, timeout=10):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = self.messages(dst_port, state)
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"no {state} firefly for port {dst_port}; got {[d[:120] for _, d in self.got]}")

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def wait_listening(proc, timeout=10):
    deadline = time.time() + timeout
    while "listening" not in proc.output():
        assert proc.alive() and time.time() < deadline, proc.output()
        time.sleep(0.05)


def write_pipe(path, text):
    """As StoRM WebDAV does: RandomAccessFile(pipe, "rw").writeBytes(line), then close."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def read_pcap(path):
    """(label, src, sport, dst, dport, seq, payload length, tcp flags) of each IPv6 TCP packet."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    assert magic == 0xA1B2C3D4, "dumpcap -P writes little-endian pcap"
    linktype = struct.unpack("<I", data[20:24])[0]
    assert linktype == 1
    off, out = 24, []
    while off + 16 <= len(data):
        _s, _us, incl, orig = struct.unpack("<IIII", data[off:off + 16])
        pkt = data[off + 16:off + 16 + incl]
        off += 16 + incl
        if pkt[12:14] != b"\x86\xdd" or pkt[20] != 6:
            continue
        word0 = struct.unpack("!I", pkt[14:18])[0]
        src, dst = socket.inet_ntop(socket.AF_INET6, pkt[22:38]), socket.inet_ntop(socket.AF_INET6, pkt[38:54])
        sport, dport, seq = struct.unpack("!HHI", pkt[54:62])
        thl = (pkt[66] >> 4) * 4
        out.append((word0 & 0xFFFFF, src, sport, dst, dport, seq, orig - 14 - 40 - thl, pkt[67]))
    return out


def covered(intervals, start, size):
    """Do the TCP segments (seq, len) cover [start, start + size) without a gap (mod 2^32)?"""
    rel = sorted(((s - start) % (1 << 32), n) for s, n in intervals if n > 0)
    end = 0
    for s, n in rel:
        if s > end:
            return False
        end = max(end, s + n)
    return end >= size


def api(host, method, path, body=None):
    with host.enter():
        req = urllib.request.Request(f"http://{API}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scitags")
    with Lab("stlab") as lab:
        client, server = lab.host("client"), lab.host("server")
        lab.link(server, client, [f"{SERVER6}/64", f"{SERVER4}/24"], [f"{CLIENT6}/64", f"{CLIENT4}/24"],
                 "eth0", "eth0")
        # kernel-chosen flow labels off: an untouched flow then carries label 0
        server.sysctl("net.ipv6.auto_flowlabels", 0)
        cfg = tmp / "scitags.toml"
        cfg.write_text(f"""
[marking]
interfaces = ["eth0"]
[pipe]
path = "{tmp}/flowd"
[api]
listen = "{API}"
[firefly]
collectors = ["[{CLIENT6}]:{COLLECTOR_PORT}"]
interval = 1
application = "gridbpf test"
[daemon]
lock = "{tmp}/scitags.lock"
""")
        listener, collector = Listener(client, firefly.PORT), Listener(client, COLLECTOR_PORT)
        daemon = server.popen([sys.executable, "-m", "gridbpf.cli", "scitags", "run", "--config", str(cfg)],
                              name="scitags")
        deadline = time.time() + 20
        while not os.path.exists(tmp / "flowd") or api(server, "GET", "/flows")[0] != 200:
            assert daemon.alive(), daemon.output()
            assert time.time() < deadline, daemon.output()
            time.sleep(0.1)
        yield {"lab": lab, "client": client, "server": server, "tmp": tmp, "cfg": cfg, "daemon": daemon,
               "pipe": str(tmp / "flowd"), "listener": listener, "collector": collector}
        listener.close()
        collector.close()


def test_storm_lines_mark_every_packet_of_a_100mb_transfer(env):
    client, server, pipe, listener = env["client"], env["server"], env["pipe"], env["listener"]
    # garbage first: logged in one line each, and the daemon goes on
    write_pipe(pipe, "start tcp nonsense\nstart tcp ::1 1 ::2 2 atlas NoSuchActivity\n")
    # exactly what StoRM WebDAV writes for a GET (local address is the source), ids as numbers
    t_start = time.time()
    write_pipe(pipe, f"start tcp {SERVER6} {DATA_PORT} {CLIENT6} {TAGGED_SPORT} 2 15\n")
    flows, deadline = [], time.time() + 10
    while not flows:
        assert time.time() < deadline, open(env["daemon"].log_path).read()
        flows = json.loads(api(server, "GET", "/flows")[1])["flows"]
        time.sleep(0.05)
    (f,) = flows
    assert (f["experiment"], f["activity"], f["markable"]) == ("atlas", "Production Input", True)
    expected = f["label"]
    assert label.decode(expected) == (2, 15)

    pcap = env["tmp"] / "client.pcap"
    cap = client.popen(["dumpcap", "-i", "eth0", "-s", "128", "-P", "-B", "64", "-f", "ip6 and tcp port 5001",
                        "-w", str(pcap)], name="dumpcap")
    deadline = time.time() + 10
    while "Capturing on" not in cap.output():
        assert cap.alive() and time.time() < deadline, cap.output()
        time.sleep(0.05)
    sender = server.popen([sys.executable, "-c", SENDER, str(SIZE), "2"], name="sender")
    wait_listening(sender)
    r = client.run([sys.executable, "-c", RECEIVER, SERVER6, str(TAGGED_SPORT), str(UNTAGGED_SPORT)], timeout=120)
    got = json.loads(r.stdout)
    assert got == {str(TAGGED_SPORT): SIZE, str(UNTAGGED_SPORT): SIZE}
    t_done = time.time()
    time.sleep(0.5)
    write_pipe(pipe, f"end tcp {SERVER6} {DATA_PORT} {CLIENT6} {TAGGED_SPORT} 2 15\n")
    cap.stop(signal.SIGINT)
    stats = open(cap.log_path).read()      # Process.output() refuses after stop()
    m = re.search(r"received/dropped on interface 'eth0': (\d+)/(\d+)", stats)
    assert m and int(m.group(2)) == 0, stats                # the capture lost nothing

    packets = read_pcap(pcap)
    assert len(packets) == int(m.group(1))
    tagged = [p for p in packets if (p[1], p[2], p[4]) == (SERVER6, DATA_PORT, TAGGED_SPORT)]
    untagged = [p for p in packets if (p[1], p[2], p[4]) == (SERVER6, DATA_PORT, UNTAGGED_SPORT)]
    # every packet of the registered flow carries the label, entropy bits constant in the flow
    assert len(tagged) > 100 and {p[0] for p in tagged} == {expected}, open(env["daemon"].log_path).read()
    # the concurrent unregistered flow: not one packet touched
    assert len(untagged) > 100 and {p[0] for p in untagged} == {0}
    # the capture really saw the whole transfer of both flows
    for flow in (tagged, untagged):
        (synack,) = [p for p in flow if p[7] & 0x12 == 0x12]
        assert covered([(p[5], p[6]) for p in flow], synack[5] + 1, SIZE)

    # fireflies: start then end, to the destination and the collector, schema-valid
    (t_end_rx, header, end), = listener.wait(TAGGED_SPORT, "end")
    (_t, _h, start), = listener.wait(TAGGED_SPORT, "start")
    for msg in (start, end):
        firefly.validate(msg)
        assert msg["flow-id"] == {"afi": "ipv6", "src-ip": SERVER6, "dst-ip": CLIENT6, "protocol": "tcp",
                                  "src-port": DATA_PORT, "dst-port": TAGGED_SPORT}
        assert msg["context"] == {"experiment-id": 2, "activity-id": 15, "application": "gridbpf test"}
    assert header["app_name"] == "flowd" and header["msgid"] == "firefly-json"
    ts = lambda s: __import__("datetime").datetime.fromisoformat(s).timestamp()
    assert t_start - 1 < ts(start["flow-lifecycle"]["start-time"]) < t_start + 2
    assert ts(end["flow-lifecycle"]["start-time"]) == ts(start["flow-lifecycle"]["start-time"])
    assert t_done < ts(end["flow-lifecycle"]["end-time"]) < t_end_rx + 0.5
    # usage from the kernel's per-flow counters: IP bytes of the data, and of the ACKs back
    usage = end["usage"]
    assert SIZE < usage["sent"] <= max_ip_bytes(SIZE), usage
    assert 0 < usage["received"] < SIZE * 0.05, usage
    assert "usage" not in start
    coll = env["collector"].wait(TAGGED_SPORT, "end")
    assert coll[0][2] == end
    # the untagged flow produced no firefly at all
    assert not listener.messages(UNTAGGED_SPORT)
    log = env["daemon"].output()
    assert "pipe: rejected 'start tcp nonsense': expected 8 fields" in log
    assert "activity 'NoSuchActivity' is not registered for experiment atlas" in log


def test_api_ipv4_flows_are_accepted_reported_not_markable_and_get_ongoing_fireflies(env):
    server, listener = env["server"], env["listener"]
    status, body = api(server, "POST", "/flows", {"src": SERVER4, "src_port": DATA_PORT, "dst": CLIENT4,
                                                  "dst_port": 40004, "experiment": "cms", "activity": "Debug"})
    assert status == 200, body
    f = json.loads(body)
    assert (f["markable"], f["label"], f["experiment_id"]) == (False, None, 3)
    assert "IPv4" in f["not_markable_reason"]
    # real IPv4 traffic of that flow is counted by the kernel, not marked
    sender = server.popen([sys.executable, "-c", SENDER.replace('"::", 5001', '"0.0.0.0", 5001')
                           .replace("AF_INET6", "AF_INET"), str(1000000), "1"], name="sender4")
    wait_listening(sender)
    env["client"].run([sys.executable, "-c", RECEIVER.replace("AF_INET6", "AF_INET").replace('"::"', '"0.0.0.0"'),
                       SERVER4, "40004"])
    flows = {x["dst_port"]: x for x in json.loads(api(server, "GET", "/flows")[1])["flows"]}
    assert flows[40004]["sent_bytes"] > 1000000
    kernel = json.loads(api(server, "GET", "/flows")[1])["kernel"]
    assert kernel["v4_unmarkable"] > 0 and kernel["store_failed"] == 0
    ongoing = listener.wait(40004, "ongoing", timeout=5)
    for _t, _h, msg in ongoing:
        firefly.validate(msg)
        assert msg["flow-id"]["afi"] == "ipv4" and msg["usage"]["sent"] >= 0
    # bad API calls: 400 with the reason, the daemon goes on
    for bad, reason in [({"src": "x", "src_port": 1, "dst": CLIENT4, "dst_port": 2, "experiment": 2},
                         "source address 'x' is not an IP address"),
                        ({"src": SERVER4, "src_port": 1, "dst": CLIENT4, "dst_port": 2, "experiment": "nope"},
                         "experiment 'nope' is not in the registry")]:
        status, body = api(server, "POST", "/flows", bad)
        assert status == 400 and json.loads(body)["error"] == reason
    status, body = api(server, "POST", "/flows", {"state": "end", "src": SERVER4, "src_port": DATA_PORT,
                                                  "dst": CLIENT4, "dst_port": 40004})
    assert status == 200 and json.loads(body)["sent_bytes"] > 1000000
    end = listener.wait(40004, "end")[0][2]
    firefly.validate(end)
    assert end["usage"]["sent"] > 1000000


def test_udp_flow_registered_through_the_api_is_marked(env):
    server, client = env["server"], env["client"]
    status, body = api(server, "POST", "/flows", {"protocol": "udp", "src": SERVER6, "src_port": 2811,
                                                  "dst": CLIENT6, "dst_port": 40020,
                                                  "experiment": "dune", "activity": "Cache"})
    assert status == 200, body
    expected = json.loads(body)["label"]
    assert label.decode(expected) == (8, 3)
    with client.enter():
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    rx.bind(("::", 40020))
    sniff.bind(("eth0", 0))
    sniff.settimeout(2)
    with server.enter():
        tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    tx.bind(("::", 2811))
    for i in range(50):
        tx.sendto(b"%d" % i, (CLIENT6, 40020))       # the registered flow
        tx.sendto(b"other", (CLIENT6, 40021))        # same hosts, one port off: not registered
    seen = {40020: [], 40021: []}
    while sum(map(len, seen.values())) < 100:
        pkt = sniff.recv(128)
        if pkt[20] == 17 and struct.unpack("!H", pkt[54:56])[0] == 2811:
            seen[struct.unpack("!H", pkt[56:58])[0]].append(struct.unpack("!I", pkt[14:18])[0] & 0xFFFFF)
    for sock in (rx, sniff, tx):
        sock.close()
    assert seen[40020] == [expected] * 50
    assert seen[40021] == [0] * 50
    status, body = api(server, "POST", "/flows", {"state": "end", "protocol": "udp", "src": SERVER6,
                                                  "src_port": 2811, "dst": CLIENT6, "dst_port": 40020})
    assert status == 200 and json.loads(body)["sent_packets"] == 50


def test_nginx_access_log_writes_the_end_line_as_in_storm_deployments(env):
    """StoRM WebDAV behind nginx: StoRM writes `start`, nginx's access_log (log_format flowd,
    pointed at the pipe) writes `end` when the download is done; the pipe is a FIFO that
    nginx keeps open. Here nginx serves the file itself and the test writes StoRM's line."""
    server, client, tmp, listener = env["server"], env["client"], env["tmp"], env["listener"]
    www = tmp / "www"
    www.mkdir()
    (www / "f20m").write_bytes(os.urandom(20 * 1000 * 1000))
    conf = tmp / "nginx.conf"
    # StoRM's documented format is '... $upstream_http_x_scitag_actid $upstream_http_x_scitag_expid';
    # without the proxy the ids are constants here (an `end` line only needs the 5-tuple).
    conf.write_text(f"""
daemon off; user root; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;
events {{ worker_connections 64; }}
http {{
    log_format flowd 'end tcp $server_addr $server_port $remote_addr $remote_port 15 2';
    access_log {env["pipe"]} flowd;
    sendfile on;
    client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};
    uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
    server {{ listen [{SERVER6}]:8080; root {www}; }}
}}
""")
    nginx = server.popen(["nginx", "-c", str(conf), "-p", str(tmp)], name="nginx")
    server.wait_port(SERVER6, 8080)
    write_pipe(env["pipe"], f"start tcp {SERVER6} 8080 {CLIENT6} 40030 2 16\n")
    deadline = time.time() + 10
    while not any(f["dst_port"] == 40030 for f in json.loads(api(server, "GET", "/flows")[1])["flows"]):
        assert time.time() < deadline
        time.sleep(0.05)
    r = client.run(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}", "--local-port", "40030",
                    f"http://[{SERVER6}]:8080/f20m"])
    assert r.stdout == str(20 * 1000 * 1000)
    (_t, _h, end), = listener.wait(40030, "end")
    firefly.validate(end)
    assert end["context"]["activity-id"] == 16
    assert 20 * 1000 * 1000 < end["usage"]["sent"] <= max_ip_bytes(20 * 1000 * 1000)
    assert not any(f["dst_port"] == 40030 for f in json.loads(api(server, "GET", "/flows")[1])["flows"])
    nginx.stop()


def test_metrics_flows_cli_and_single_instance(env):
    server = env["server"]
    status, body = api(server, "GET", "/metrics")
    text = body.decode()
    assert status == 200
    assert 'gridbpf_scitags_flows_started_total{activity="Production Input",experiment="atlas"} 1.0' in text
    sent = [line for line in text.splitlines() if line.startswith("gridbpf_scitags_bytes_total")
            and 'experiment="atlas"' in line and 'activity="Production Input"' in line
            and 'direction="sent"' in line]
    assert len(sent) == 1 and float(sent[0].split()[-1]) > SIZE
    assert 'gridbpf_scitags_input_errors_total{source="pipe"} 2.0' in text
    assert 'gridbpf_scitags_input_errors_total{source="api"} 2.0' in text
    assert 'gridbpf_scitags_kernel_packets_total{event="marked"}' in text
    # the CLI talks to the daemon's API
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "flow", "start", "tcp", SERVER6, "443",
                    CLIENT6, "40010", "lhcb", "Cache", "--api", API, "--json"])
    assert json.loads(r.stdout)["experiment_id"] == 4
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "flows", "--api", API, "--json"])
    flows = json.loads(r.stdout)["flows"]
    assert [(f["dst_port"], f["activity"], f["source"]) for f in flows] == [(40010, "Cache", "api")]
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "flows", "--api", API])
    assert "lhcb/Cache" in r.stdout
    # a second daemon with the same config refuses to start, and leaves the first untouched
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "run", "--config", str(env["cfg"])], check=False)
    assert r.returncode == 2 and "already running" in r.stderr
    assert api(server, "GET", "/flows")[0] == 200


def test_sigterm_detaches_everything(env):
    server, daemon = env["server"], env["daemon"]
    assert "bpf" in server.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert daemon.stop(signal.SIGTERM, timeout=10) == 0, open(daemon.log_path).read()
    assert "bpf" not in server.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert "bpf" not in server.run(["tc", "filter", "show", "dev", "eth0", "ingress"]).stdout
    assert not os.path.exists(env["pipe"])      # the pipe it made is gone
    assert "Traceback" not in open(daemon.log_path).read()


def test_bad_interface_is_one_line_and_leaves_nothing_attached(env):
    server, tmp = env["server"], env["tmp"]
    cfg = tmp / "bad.toml"
    cfg.write_text(f"""
[marking]
interfaces = ["eth0", "nosuch0"]
[pipe]
path = "{tmp}/flowd-bad"
[api]
listen = "{API}"
[daemon]
lock = "{tmp}/bad.lock"
""")
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "run", "--config", str(cfg)], check=False)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("gridbpf: error:")]
    assert len(errors) == 1 and "nosuch0" in errors[0], r.stderr
    # eth0 had been attached before nosuch0 failed: it was detached again
    assert "bpf" not in server.run(["tc", "filter", "show", "dev", "eth0", "egress"]).stdout
    assert "clsact" not in server.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert not os.path.exists(tmp / "flowd-bad")
    cfg.write_text("[marking]\ninterfaces = 'eth0'\n")
    r = server.run([sys.executable, "-m", "gridbpf.cli", "scitags", "run", "--config", str(cfg)], check=False)
    assert r.returncode == 2 and "marking.interfaces: expected list, got str 'eth0'" in r.stderr
