"""The one binding to libbpf: objects, programs, maps, links, ring buffers, test runs, pins."""
from .btf import Btf, from_python, to_python
from .errors import BpfError, VerifierError
from .links import Link
from .maps import Map
from .object import BpfObject, Program, TestRunResult, object_path, run_time_stats
from .pins import PIN_ROOT, list_pins, pin_path, remove_pins
from .ringbuf import RingBuffer

__all__ = ["Btf", "BpfError", "BpfObject", "Link", "Map", "PIN_ROOT", "Program", "RingBuffer",
           "TestRunResult", "VerifierError", "from_python", "list_pins", "object_path", "pin_path",
           "remove_pins", "run_time_stats", "to_python"]
