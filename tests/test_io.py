"""`trace io`: a program writing a big file and calling fsync shows that fsync, on that path,
as the slowest operation; histograms per file and operation."""
import json
import subprocess
import sys
import time

from gridbpf.trace.stuck.io import IoTracer

C_PROGRAM = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char buf[1 << 20];
	char line[8];
	int mb = atoi(argv[2]);

	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	int fd = open(argv[1], O_CREAT | O_WRONLY | O_TRUNC, 0644);
	if (fd < 0)
		return 1;
	for (int i = 0; i < mb; i++) {
		memset(buf, i, sizeof(buf));
		if (write(fd, buf, sizeof(buf)) != sizeof(buf))
			return 1;
	}
	if (fsync(fd))
		return 1;
	close(fd);
	unlink(argv[1]);
	printf("done\n");
	return 0;
}
"""


def _build(tmp_path):
    (tmp_path / "writer.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-O1", "-g", "-o", str(tmp_path / "writer"), str(tmp_path / "writer.c")],
                   check=True)
    return tmp_path / "writer"


def test_io_fsync_is_slowest(tmp_path):
    exe = _build(tmp_path)
    big = tmp_path / "big.dat"          # on disk: fsync must write it out
    p = subprocess.Popen([str(exe), str(big), "128"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    with IoTracer([p.pid], slow_s=0.001) as tr:
        p.stdin.write("go\n")
        p.stdin.flush()
        end = time.monotonic() + 30
        while p.poll() is None and time.monotonic() < end:
            tr.poll(100)
        tr.poll(0)
        files, slow, stats = tr.files(), tr.slowest_ops(), tr.stats()
    assert p.returncode == 0
    assert stats == {"inflight_full": 0, "files_full": 0, "events_lost": 0}
    assert slow, "no slow operation recorded"
    assert slow[0].op == "fsync" and slow[0].path == str(big), [(s.op, s.path, s.latency_s) for s in slow]
    mine = {r["op"]: r for r in files if r["path"] == str(big)}
    assert mine["write"]["count"] == 128 and mine["write"]["bytes"] == 128 << 20
    assert mine["fsync"]["count"] == 1
    assert mine["fsync"]["max_s"] == slow[0].latency_s
    assert mine["openat"]["count"] == 1 and mine["close"]["count"] == 1
    assert sum(int(n) for n in mine["write"]["histogram_ns_log2"].values()) == 128


def test_io_cli_json(tmp_path):
    exe = _build(tmp_path)
    big = tmp_path / "cli.dat"
    p = subprocess.Popen([str(exe), str(big), "16"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    cli = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "trace", "io", "--pid", str(p.pid),
                            "--duration", "3s", "--slow", "0", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.stdin.write("go\n")
    p.stdin.flush()
    out, err = cli.communicate(timeout=30)
    p.wait(timeout=10)
    assert cli.returncode == 0, err
    rep = json.loads(out)
    ops = {r["op"] for r in rep["files"] if r["path"] == str(big)}
    assert {"openat", "write", "fsync", "close"} <= ops
    assert rep["slowest"] and all(s["latency_s"] >= 0 for s in rep["slowest"])
