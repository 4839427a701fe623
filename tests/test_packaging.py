"""Packaging: the example configs pass the validators; a wheel built in a clean directory carries
the compiled objects, installs into a fresh venv and runs `doctor --json` and a capability
without the checkout; `doctor` names what is missing."""
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from gridbpf.agent.config import ConfigError as AgentConfigError, load as load_agent, parse as parse_agent
from gridbpf.lb.config import ConfigError as LbConfigError, load as load_lb
from gridbpf.scitags.config import ConfigError as ScitagsConfigError, load as load_scitags

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "packaging" / "examples"


def test_example_configs_pass_the_validators():
    storm = load_agent(EXAMPLES / "agent-storm-webdav.toml")
    assert storm.targets.units == ["storm-webdav.service"]
    assert storm.checksum.unit == "storm-webdav.service" and storm.checksum.store
    assert storm.checksum.paths == ["/storage/atlas", "/storage/cms"] and "stuck" in storm.collectors
    ngx = load_agent(EXAMPLES / "agent-nginx-webdav.toml")
    assert ngx.targets.units == ["nginx.service"] and "/var/lib/nginx/body" in ngx.checksum.paths
    s = load_scitags(EXAMPLES / "scitags-storm-webdav.toml")
    assert s.pipe_path == "/var/run/flowd" and [i.name for i in s.interfaces] == ["eth0"]
    s = load_scitags(EXAMPLES / "scitags-nginx-webdav.toml")
    assert s.pipe_path == "" and [r.prefix for r in s.auto_tag] == ["/atlas/", "/cms/"]
    lb = load_lb(EXAMPLES / "lb.toml")
    assert lb.services[0].health.check == "https" and len(lb.services[0].backends) == 2


@pytest.mark.parametrize("example, change, error", [
    ("agent-storm-webdav.toml", ('paths = ["/storage/atlas"', 'paths = ["storage/atlas"'), "checksum.paths"),
    ("agent-storm-webdav.toml", ('store = true', 'store = "yes"'), "checksum.store"),
    ("agent-storm-webdav.toml", ('unit = ["storm-webdav.service"]', 'unit = ["storm-webdav.service"]\ncomm = ["java"]'),
     "checksum: [targets] selects 2"),
    ("agent-nginx-webdav.toml", ('[checksum]', '[checksum]\ncomm = "nginx"\npid = 1'), "one writer selector"),
    ("scitags-storm-webdav.toml", ('path = "/var/run/flowd"', 'path = 7'), "pipe.path"),
    ("lb.toml", ('check = "https"', 'check = "ftp"'), "health.check"),
])
def test_a_broken_example_names_the_key(tmp_path, example, change, error):
    text = (EXAMPLES / example).read_text()
    assert change[0] in text
    path = tmp_path / example
    path.write_text(text.replace(change[0], change[1], 1))
    load = {"agent": load_agent, "scitags": load_scitags, "lb": load_lb}[example.split("-")[0].split(".")[0]]
    with pytest.raises((AgentConfigError, ScitagsConfigError, LbConfigError), match=error.replace("[", r"\[")):
        load(path)


def test_agent_checksum_section_defaults():
    cfg = parse_agent({"targets": {"comm": ["java"]}, "checksum": {"paths": ["/data"]}})
    assert (cfg.checksum.comm, cfg.checksum.store, cfg.checksum.unit) == ("java", True, None)
    assert parse_agent({"targets": {"comm": ["java"]}}).checksum is None


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """`make wheel` (a fresh copy of the tree plus the objects), then a fresh venv with it."""
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run(["make", "-s", "-C", str(ROOT), "wheel", f"WHEEL_DIR={d}/dist"], check=True,
                   capture_output=True, timeout=300)
    wheels = list((d / "dist").glob("gridbpf-*.whl"))
    assert len(wheels) == 1
    # a venv without its own pip (ensurepip alone takes ~10 s here): our pip installs into it.
    # No PYTHONPATH: pip would take the checkout's src for an installed gridbpf and skip the wheel
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d / "venv")], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(d / "venv/bin/python"), "install", "-q",
                    "--disable-pip-version-check", str(wheels[0])],
                   check=True, capture_output=True, timeout=600, env=clean_env(d / "venv"))
    assert (d / "venv/bin/gridbpf").exists()
    return d, wheels[0]


def clean_env(venv_dir: Path) -> dict:
    """No trace of the checkout: no PYTHONPATH, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv_dir}/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return env


def run_installed(venv_dir: Path, *args, **kw):
    """The venv's console script, run from /."""
    return subprocess.run([str(venv_dir / "bin" / "gridbpf"), *args], cwd="/", env=clean_env(venv_dir),
                          capture_output=True, text=True, **kw)


def test_wheel_carries_the_objects(venv):
    d, wheel = venv
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl") or "linux_" in wheel.name
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    objects = {Path(n).name for n in names if n.startswith("gridbpf/_objects/")}
    built = {p.name for p in (ROOT / "src/gridbpf/_objects").glob("*.bpf.o")}
    assert objects == built and "lb.bpf.o" in objects
    assert "gridbpf/data/scitags-api.json" in names
    assert not any(n.startswith(("tests/", "bpf/", "bench/")) for n in names)


def test_installed_doctor_and_a_capability_without_the_checkout(venv, tmp_path):
    d, _ = venv
    where = run_installed(d / "venv", "doctor", "--json", timeout=120)
    assert where.returncode == 0, where.stderr
    r = json.loads(where.stdout)
    pkg = Path(r["package"]["path"])
    assert pkg.is_relative_to(d / "venv") and not pkg.is_relative_to(ROOT)
    assert all(c["ready"] for c in r["capabilities"].values())
    assert {m["what"].split(" (")[0] for m in r["missing"]} <= {"the JVM agent"}
    # a capability: in-kernel checksums of a file written while `checksum watch` runs
    watched = tmp_path / "area"
    watched.mkdir()
    env = clean_env(d / "venv")
    p = subprocess.Popen([str(d / "venv/bin/gridbpf"), "checksum", "watch", "--path", str(watched),
                          "--count", "1", "--duration", "30", "--json", "--metrics-port", "0"],
                         cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "metrics" in json.loads(p.stdout.readline() or "{}"), p.stderr.read() if p.poll() else ""
        data = os.urandom(300_000)
        with open(watched / "f.root", "wb") as f:
            f.write(data)
        result = json.loads(p.stdout.readline())
    finally:
        p.terminate()
        p.wait(20)
    assert result["source"] in ("page-cache", "kernel") and result["adler32"] == f"{zlib.adler32(data):08x}"
    assert os.getxattr(watched / "f.root", "user.storm.checksum.adler32").decode() == result["adler32"]


def test_installed_doctor_names_what_is_missing(venv):
    """Negative control: an object taken out of the installed package is reported, with the fix."""
    d, _ = venv
    site = next((d / "venv/lib").glob("python3*/site-packages/gridbpf/_objects"))
    shutil.move(site / "scitags.bpf.o", d / "scitags.bpf.o")
    try:
        r = json.loads(run_installed(d / "venv", "doctor", "--json", timeout=120).stdout)
        text = run_installed(d / "venv", "doctor", timeout=120).stdout
    finally:
        shutil.move(d / "scitags.bpf.o", site / "scitags.bpf.o")
    assert not r["capabilities"]["scitags"]["ready"] and r["capabilities"]["lb"]["ready"]
    assert r["capabilities"]["scitags"]["objects_missing"] == ["scitags"]
    miss = [m for m in r["missing"] if "scitags" in m["what"]]
    assert miss and miss[0]["needed_by"] == "scitags" and "wheel" in miss[0]["fix"]
    assert "missing compiled BPF objects scitags" in " ".join(text.split())
