"""The command line: doctor probes for real; errors are one line naming the problem."""
import json

from conftest import gridbpf_cli as gridbpf


def test_doctor_reports_what_works_here():
    r = json.loads(gridbpf("doctor", "--json").stdout)
    assert r["root"] and r["btf"] and r["mounts"]["bpffs"] and r["mounts"]["tracefs"]
    works = {k: v["works"] for k, v in r["attach"].items()}
    # what this kernel offers, and what it lacks (kprobes not built, fentry refused)
    assert works == {"xdp": True, "tc": True, "tracepoint": True, "raw_tp": True, "tp_btf": True,
                     "uprobe": True, "perf_event": True, "kprobe": False, "fentry": False}
    assert r["attach"]["kprobe"]["detail"].startswith(("attach refused", "load refused"))
    assert r["program_types"]["xdp"] and r["program_types"]["sched_cls"]
    assert r["tools"]["clang"].startswith("Debian clang") and r["tools"]["libbpf"].startswith("1.")
    assert all(c["ready"] for c in r["capabilities"].values())


def test_bad_input_is_one_clear_line():
    r = gridbpf("lab", "up", "nosuchtopology", check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "gridbpf: error: unknown topology 'nosuchtopology' (known: web, ecmp)"
    r = gridbpf("lab", "up", "web", "--name", "bad-name", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "bad-name" in r.stderr


def test_demo_parts_are_wired():
    """`make demo` runs every part in turn; the parts themselves run in each capability's
    tests. Here: the demo module imports, and every capability demo it calls exists."""
    import importlib
    from gridbpf import demo
    assert [f.__name__ for _, f in demo.PARTS] == ["show_doctor", "show_lb_site", "show_http_tracing",
                                                   "show_stuck", "show_checksums", "show_scitags"]
    for module, function in [("gridbpf.lb.demo", "run"), ("gridbpf.trace.http.demo", "run"),
                             ("gridbpf.trace.stuck.demo", "run"), ("gridbpf.checksum.demo", "uploads"),
                             ("gridbpf.scitags.demo", "run")]:
        assert callable(getattr(importlib.import_module(module), function)), module
