"""Metric families aggregated in bulk with numpy, shared by every capability and exporter.

A capability hands over a whole batch (one numpy array of values and one label tuple per value)
rather than calling observe() per event; we bucket with searchsorted and add with bincount. The
same cumulative state is read by the Prometheus collector and the OTLP exporter, so both always
agree. Label sets beyond `max_series` fold into one overflow series (all labels "_OTHER") and are
counted, so cardinality stays bounded whatever the traffic.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

OVERFLOW = "_OTHER"

# OpenTelemetry's recommended boundaries for http.server.request.duration (seconds)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# body sizes in bytes: 0 B .. 10 GB
SIZE_BUCKETS = (0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000, 100_000_000,
                1_000_000_000, 10_000_000_000)


@dataclass
class _Series:
    buckets: np.ndarray          # counts per bucket, the last one is +Inf
    count: int = 0
    total: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")


@dataclass
class HistogramFamily:
    """A histogram with labels. `name` is the OpenTelemetry name ('http.server.request.duration'),
    `unit` its UCUM unit ('s', 'By'); the Prometheus name is derived from both."""
    name: str
    description: str
    unit: str
    labelnames: tuple[str, ...]
    bounds: tuple[float, ...]
    max_series: int = 1000
    # OTLP attribute types where a label is not a string (e.g. status code: int); an empty
    # label value is left out of the OTLP attributes
    attribute_types: dict = field(default_factory=dict)
    series: dict = field(default_factory=dict)
    overflowed: int = 0
    start_ns: int = field(default_factory=time.time_ns)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _series_for(self, labels: tuple, n: int) -> _Series:
        s = self.series.get(labels)
        if s is not None:
            return s
        if len(self.series) >= self.max_series:
            # cardinality cap: fold into the one overflow series and count what was folded
            self.overflowed += n
            labels = (OVERFLOW,) * len(self.labelnames)
            s = self.series.get(labels)
            if s is not None:
                return s
        s = self.series[labels] = _Series(np.zeros(len(self.bounds) + 1, np.int64))
        return s

    def observe_many(self, values, labels: list[tuple]) -> None:
        """Add VALUES (array-like), the i-th with label tuple LABELS[i]."""
        keys, inverse = group_labels(labels)
        self.observe_grouped(values, keys, inverse)

    def observe_grouped(self, values, keys: list[tuple], inverse: np.ndarray) -> None:
        """Add VALUES, the i-th with label tuple KEYS[INVERSE[i]] (see group_labels): callers
        that fill several families from one batch group it once."""
        values = np.asarray(values, dtype=np.float64)
        if not len(values):
            return
        idx = np.searchsorted(np.asarray(self.bounds, np.float64), values, side="left")
        with self.lock:
            for k, key in enumerate(keys):
                sel = inverse == k
                if not sel.any():
                    continue
                v = values[sel]
                s = self._series_for(key, len(v))
                s.buckets += np.bincount(idx[sel], minlength=len(self.bounds) + 1)
                s.count += len(v)
                s.total += float(v.sum())
                s.min = min(s.min, float(v.min()))
                s.max = max(s.max, float(v.max()))

    def add_counts(self, labels: tuple, buckets: np.ndarray, count: int, total: float,
                   vmin: float, vmax: float) -> None:
        """Add observations already bucketed elsewhere (the kernel's histograms): per-bucket
        COUNTS on this family's bounds, their number, sum, min and max."""
        if not count:
            return
        with self.lock:
            s = self._series_for(labels, count)
            s.buckets += buckets
            s.count += count
            s.total += total
            s.min = min(s.min, vmin)
            s.max = max(s.max, vmax)

    def snapshot(self) -> list[tuple[tuple, _Series]]:
        with self.lock:
            return [(k, _Series(s.buckets.copy(), s.count, s.total, s.min, s.max))
                    for k, s in self.series.items()]

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self.name, self.unit)

    def attributes(self, labels: tuple) -> dict:
        out = {}
        for name, value in zip(self.labelnames, labels):
            if value == "":
                continue
            conv = self.attribute_types.get(name)
            if conv is not None:
                try:
                    value = conv(value)
                except ValueError:
                    pass        # e.g. the overflow series' "_OTHER"
            out[name] = value
        return out


def group_labels(labels: list[tuple]) -> tuple[list[tuple], np.ndarray]:
    """(distinct label tuples, index of each value's tuple): one dict lookup per value."""
    groups: dict[tuple, int] = {}
    inverse = np.fromiter((groups.setdefault(k, len(groups)) for k in labels), np.int64,
                          count=len(labels))
    return list(groups), inverse


@dataclass
class CounterFamily:
    """A monotonic counter read from a callable (e.g. a BPF per-CPU stats map) at export time."""
    name: str                    # OpenTelemetry-style dotted name
    description: str
    unit: str
    read: object                 # () -> dict[label tuple, number]
    labelnames: tuple[str, ...] = ()
    start_ns: int = field(default_factory=time.time_ns)

    @property
    def prometheus_name(self) -> str:
        return prometheus_name(self.name, self.unit)


_UNIT_SUFFIX = {"s": "seconds", "By": "bytes", "ms": "milliseconds", "1": "", "{request}": "",
                "{event}": "", "{connection}": ""}


def prometheus_name(name: str, unit: str) -> str:
    """OpenTelemetry -> Prometheus naming: dots to underscores, unit suffix appended once."""
    base = name.replace(".", "_").replace("-", "_")
    suffix = _UNIT_SUFFIX.get(unit, unit.strip("{}"))
    if suffix and not base.endswith("_" + suffix):
        base += "_" + suffix
    return base


class Registry:
    """The families of one process; exporters read from it."""

    def __init__(self):
        self.histograms: list[HistogramFamily] = []
        self.counters: list[CounterFamily] = []

    def histogram(self, *args, **kw) -> HistogramFamily:
        h = HistogramFamily(*args, **kw)
        self.histograms.append(h)
        return h

    def counter(self, *args, **kw) -> CounterFamily:
        c = CounterFamily(*args, **kw)
        self.counters.append(c)
        return c
