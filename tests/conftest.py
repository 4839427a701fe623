"""Shared fixtures: the tests load real programs into the running kernel, as root."""
import os
import subprocess
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


def build_c(name: str, tmp_path: Path) -> Path:
    """Compile tests/cprogs/NAME.c with symbols; returns the binary."""
    out = tmp_path / name
    subprocess.run(["gcc", "-g", "-O1", "-o", str(out), str(TESTS / "cprogs" / f"{name}.c")], check=True)
    return out
