"""A marked transfer for `make demo`: call `run(console)` from gridbpf.demo.

server --veth-- client (IPv6). The scitags daemon runs in this process with tc on the server's
interface; a line written to its named pipe exactly as StoRM WebDAV writes it registers one of
two concurrent 20 MB transfers; an AF_PACKET socket in the client namespace reads every packet's
flow label, and a UDP socket there receives the fireflies."""
from __future__ import annotations

import collections
import os
import socket
import struct
import sys
import tempfile
import threading
import time

from rich.table import Table

from ..lab import Lab
from . import firefly, label
from .config import Config
from .daemon import Daemon
from .marker import Interface

SERVER6, CLIENT6 = "fd00:59::2", "fd00:59::1"
SIZE = 20 * 1000 * 1000
SENDER = ("import socket\nls=socket.socket(socket.AF_INET6);ls.bind(('::',5001));ls.listen(4);print('up',flush=True)\n"
          "import threading\ndef s(c):\n c.sendall(b'\\0'*%d);c.close()\n"
          "ts=[threading.Thread(target=s,args=(ls.accept()[0],)) for _ in range(2)]\n[t.start() for t in ts]\n"
          "[t.join() for t in ts]\n" % SIZE)
RECEIVER = ("import socket,sys,threading\ndef r(p):\n s=socket.socket(socket.AF_INET6);s.bind(('::',p));"
            "s.connect((sys.argv[1],5001))\n while s.recv(1<<20): pass\n"
            "ts=[threading.Thread(target=r,args=(p,)) for p in (40001,40002)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n")


def _capture(host, stop: threading.Event, seen: collections.Counter) -> socket.socket:
    with host.enter():
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
    s.bind(("eth0", 0))
    s.settimeout(0.2)

    def loop():
        while not stop.is_set():
            try:
                pkt = s.recv(128)
            except socket.timeout:
                continue
            except OSError:          # closed under us at the end (stop is set just before)
                return
            if len(pkt) >= 58 and pkt[20] == 6:
                fl = struct.unpack("!I", pkt[14:18])[0] & 0xFFFFF
                sport, dport = struct.unpack("!HH", pkt[54:58])
                if sport == 5001:
                    seen[(dport, fl)] += 1
    threading.Thread(target=loop, daemon=True).start()
    return s


def run(console) -> bool:
    with Lab("stdemo") as lab, tempfile.TemporaryDirectory() as tmp:
        server, client = lab.host("server"), lab.host("client")
        lab.link(server, client, [f"{SERVER6}/64"], [f"{CLIENT6}/64"], "eth0", "eth0")
        server.sysctl("net.ipv6.auto_flowlabels", 0)
        cfg = Config(interfaces=[Interface("eth0", server.netns)], pipe_path=os.path.join(tmp, "flowd"),
                     api_listen=("127.0.0.1", 0), lock_path=os.path.join(tmp, "lock"))
        daemon = Daemon(cfg)
        with server.enter():        # fireflies leave from the server's namespace, as on a real node
            daemon.sender.socket(socket.AF_INET6)
        with client.enter():
            ff = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        ff.bind(("::", firefly.PORT))
        ff.settimeout(3)
        stop, seen = threading.Event(), collections.Counter()
        cap = _capture(client, stop, seen)
        daemon.start()
        try:
            fd = os.open(cfg.pipe_path, os.O_RDWR)      # as StoRM WebDAV writes it
            os.write(fd, f"start tcp {SERVER6} 5001 {CLIENT6} 40001 2 15\n".encode())
            os.close(fd)
            deadline = time.time() + 5
            while not daemon.active and time.time() < deadline:
                time.sleep(0.05)
            sender = server.popen([sys.executable, "-c", SENDER], name="sender")
            while "up" not in sender.output():
                time.sleep(0.05)
            client.run([sys.executable, "-c", RECEIVER, SERVER6])
            flow = next(iter(daemon.active.values()))
            daemon.handle_line(f"end tcp {SERVER6} 5001 {CLIENT6} 40001 2 15")
            deadline = time.time() + 6
            while daemon.active and time.time() < deadline:   # what `run` does every 0.1 s
                daemon.reap()
                time.sleep(0.1)
            fireflies = []
            while True:
                try:
                    fireflies.append(firefly.parse_packet(ff.recv(65536))[1])
                except socket.timeout:
                    break
                ff.settimeout(0.3)
        finally:
            stop.set()
            daemon.close()
            cap.close()
            ff.close()
    table = Table("flow (server -> client)", "packets seen", "flow labels seen", "decoded")
    for dport in (40001, 40002):
        labels = {fl: n for (p, fl), n in seen.items() if p == dport}
        decoded = ", ".join("/".join(str(x) for x in daemon.registry.names(*label.decode(fl))) if fl else "unmarked"
                            for fl in labels)
        table.add_row(f"{SERVER6} 5001 -> {CLIENT6} {dport}" + (" (registered)" if dport == 40001 else ""),
                      str(sum(labels.values())), ", ".join(f"0x{fl:05x}" for fl in labels), decoded)
    console.print(table)
    for msg in fireflies:
        console.print(f"firefly {msg['flow-lifecycle']['state']}: {msg['context']} usage {msg.get('usage')}")
    ok = {fl for (p, fl) in seen if p == 40001} == {flow.label} and {fl for (p, fl) in seen if p == 40002} == {0}
    console.print(f"every packet of the registered transfer carried label 0x{flow.label:05x} "
                  f"(atlas/Production Input), the other none: {'yes' if ok else 'NO'}")
    return ok
