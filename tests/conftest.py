"""Shared fixtures: the tests load real programs into the running kernel, as root."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gridbpf.bpf import BpfObject

TESTS = Path(__file__).resolve().parent


def pytest_sessionstart(session):
    if os.geteuid() != 0:
        raise pytest.UsageError("gridbpf tests load BPF programs and build namespaces: run them as root")


@pytest.fixture
def selftest():
    """tests/bpf/selftest.bpf.o opened (not loaded): set .rodata, then load."""
    obj = BpfObject.open(TESTS / "bpf" / "selftest.bpf.o")
    yield obj
    obj.close()


def gridbpf_cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `gridbpf` command of this checkout (not whichever one pip installed last)."""
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent / "src"))
    return subprocess.run([sys.executable, "-m", "gridbpf", *args], capture_output=True, text=True,
                          check=check, timeout=timeout, env=env)


def build_c(name: str, tmp_path: Path) -> Path:
    """Compile tests/cprogs/NAME.c with symbols; returns the binary."""
    out = tmp_path / name
    subprocess.run(["gcc", "-g", "-O1", "-o", str(out), str(TESTS / "cprogs" / f"{name}.c")], check=True)
    return out
