"""`trace mem`: a C program that maps and touches memory and grows its heap with brk; a JVM whose
GC pauses come through HotSpot's USDT probes."""
import json
import subprocess
import sys
import time

from gridbpf.trace.stuck.mem import MemTracer

C_PROGRAM = r"""
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(void)
{
	char line[8];
	printf("ready\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	size_t n = 64 << 20;
	char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 1;
	madvise(p, n, MADV_NOHUGEPAGE);   /* one fault per 4 KiB page, whatever THP says */
	memset(p, 1, n);
	for (int i = 0; i < 4; i++)
		if (sbrk(1 << 20) == (void *)-1)
			return 1;
	printf("touched\n");
	fflush(stdout);
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	munmap(p, n);
	return 0;
}
"""

JAVA_PROGRAM = """
public class Gc {
    public static void main(String[] a) throws Exception {
        System.out.println("ready");
        System.out.flush();
        new java.io.BufferedReader(new java.io.InputStreamReader(System.in)).readLine();
        for (int i = 0; i < 5; i++) {
            byte[][] junk = new byte[64][];
            for (int j = 0; j < 64; j++) junk[j] = new byte[1 << 16];
            System.gc();
        }
        System.out.println("done");
    }
}
"""


def test_mem_c_program(tmp_path):
    (tmp_path / "mem.c").write_text(C_PROGRAM)
    subprocess.run(["gcc", "-O1", "-o", str(tmp_path / "mem"), str(tmp_path / "mem.c")], check=True)
    p = subprocess.Popen([str(tmp_path / "mem")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        with MemTracer([p.pid]) as tr:
            before = tr.sample()[0]
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "touched"
            after = tr.sample()[0]
            p.stdin.write("go\n")
            p.stdin.flush()
            p.wait(timeout=10)
            stats = tr.stats()
    finally:
        p.kill()
    assert stats == {"procs_full": 0}
    assert after["RssAnon"] - before["RssAnon"] >= 60 << 20
    assert after["faults_user"] - before["faults_user"] >= (64 << 20) // 4096
    assert after["mmap_bytes"] - before["mmap_bytes"] >= 64 << 20
    assert after["brk_growth"] - before["brk_growth"] == 4 << 20
    assert after["faults_per_s"] > 0
    assert not after["jvm_gc_probes"]


def test_mem_jvm_gc_pauses(tmp_path):
    (tmp_path / "Gc.java").write_text(JAVA_PROGRAM)
    subprocess.run(["javac", "-d", str(tmp_path), str(tmp_path / "Gc.java")], check=True)
    p = subprocess.Popen(["java", "-cp", str(tmp_path), "Gc"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        cli = subprocess.Popen([sys.executable, "-m", "gridbpf.cli", "trace", "mem", "--pid",
                                str(p.pid), "--duration", "4s", "--interval", "1s", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        p.stdin.write("go\n")
        p.stdin.flush()
        out, err = cli.communicate(timeout=60)
        assert p.stdout.readline().strip() == "done"
        p.wait(timeout=10)
    finally:
        p.kill()
    assert cli.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    last = rows[-1]
    assert last["jvm_gc_probes"]
    assert last["gc_count"] >= 5 and last["gc_full"] >= 5      # System.gc() is a full GC
    assert 0 < last["gc_max_ns"] <= last["gc_total_ns"]
    assert len(rows) >= 3 and max(r.get("VmRSS", 0) for r in rows) > 0
    assert last["exited"]
