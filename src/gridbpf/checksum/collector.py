"""The checksum watcher as an agent collector: metrics in the shared registry, results per batch.

An agent owns the loop: it calls poll() every drain period; each call handles one batch of
closed files (never one write) and returns them, for logging or forwarding.
"""
from __future__ import annotations

import collections
import threading

from ..export.metrics import Registry
from .watcher import Result, Watcher

# Seconds from close to attribute stored (the kernel path is ~1 ms; a re-read takes longer).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ChecksumCollector:
    def __init__(self, registry: Registry, watcher: Watcher):
        self.watcher = watcher
        self._files = collections.Counter()
        self._lock = threading.Lock()
        registry.counter("gridbpf.checksum.files", "Closed files by where their ADLER32 came from "
                         "(kernel or userspace) and what happened (stored, unlinked, gone, ...).",
                         "1", self._read_files, ("source", "status"))
        registry.counter("gridbpf.checksum.kernel", "Counters of the in-kernel checksum program "
                         "(*_lost, *_full: records or state the kernel could not keep).", "1",
                         lambda: {(k,): v for k, v in watcher.stats().items()}, ("counter",))
        self.latency = registry.histogram("gridbpf.checksum.close_to_stored.duration",
                                          "Time from a file's last close to its attribute stored.",
                                          "s", ("source",), LATENCY_BUCKETS)

    def _read_files(self) -> dict:
        with self._lock:
            return {k: v for k, v in self._files.items()}

    def poll(self, timeout_ms: int = 100) -> list[Result]:
        results = self.watcher.poll(timeout_ms)
        if results:
            with self._lock:
                self._files.update((r.source, r.status.split(":")[0]) for r in results)
            timed = [r for r in results if r.close_to_stored_ms is not None]
            self.latency.observe_many([r.close_to_stored_ms / 1000 for r in timed],
                                      [(r.source,) for r in timed])
        return results
