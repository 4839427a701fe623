"""In-kernel ADLER32 of the files storage services write, stored the StoRM way."""
from .watcher import Result, Watcher
from .xattr import XATTR

__all__ = ["Result", "Watcher", "XATTR"]
