"""Follow writes in the kernel, finish each closed file in userspace, store the attribute.

The kernel (bpf/checksum.bpf.c) sends four kinds of records on one ring buffer, read in bulk:
  range     a segment of a file that was left for a write elsewhere (start, length, adler)
  progress  sum mode "ranges": the running segment so far, every few MiB
  close     the last close of a followed file: final segment, size, mtime, path, unfollowed reasons
  rename    a rename by a target process (a file moved into a watched tree)
Python runs once per closed file (plus once per discontinuity or progress step), never per write.

Files are followed from their open anywhere on the watched directories' filesystems (with
follow_renames, the default): a temporary file elsewhere that is moved into a watched tree,
before or after its close, gets its attribute; one that never enters a watched tree is dropped
(counted). A file moved in that was not followed (opened before we started, or its record
expired) is read in userspace and marked so.
"""
from __future__ import annotations

import ctypes
import os
import stat
import time
from dataclasses import dataclass, field

from ..bpf import BpfObject, RingBuffer
from . import adler, xattr
from .pagecache import PageCacheSummer
from .targets import Target

AT_FDCWD = -100
# Names of the unfollowed reasons, counters and record kinds come from the object's BTF enums
# (enum unfollowed_reason, stat_index, event_type in checksum.bpf.c), see _enum().
MISSED_RUNS_REASON = "kernel-skipped-program-runs"   # set in userspace, from recursion_misses

PENDING_SECONDS = 10.0        # how long a closed file may stay missing, waiting for its rename
OUTSIDE_SECONDS = 600.0       # how long a file closed outside the watched trees may still move in
OUTSIDE_MAX = 65536           # files closed outside the watched trees kept at once
RECENT_MAX = 4096             # finished files remembered (a rename of one needs nothing)
MOVED_IN_DELAY = 0.3          # an unknown file moved in: wait this long for its close record
MOVED_IN_QUIET = 2.0          # ... and read it once unmodified for this long (not being written)
MOVED_IN_REASON = "moved-in-not-followed"
PROGRESS_BYTES = 256 << 10     # sum mode "ranges": the kernel reports the running segment this often
SUM_MODES = {"kernel": 0, "ranges": 1, "copy-only": 2}   # enum sum_mode in checksum.bpf.c


def _enum(btf, name: str, prefix: str) -> dict[str, int]:
    """{'concurrent': 1, ...} from 'enum NAME' members 'PREFIXCONCURRENT' in BTF."""
    return {m[0][len(prefix):].lower(): m[1] for m in btf.find(f"enum {name}").members
            if m[0].startswith(prefix)}


@dataclass
class Result:
    """One closed file: what was stored, where the value came from, how long it took."""
    path: str | None
    size: int
    adler32: str | None
    source: str                   # "kernel", "page-cache" or "userspace"
    stored: bool
    status: str                   # stored | unlinked | gone | not-stored
    reasons: list[str] = field(default_factory=list)
    pid: int = 0
    comm: str = ""
    writes: int = 0
    bytes_summed: int = 0
    ranges: int = 0
    first_write_to_stored_ms: float | None = None
    close_to_stored_ms: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Closed:
    ev: dict
    ranges: list | None           # None in sum mode "ranges": see summed
    path: str | None
    deadline: float
    summed: tuple | None = None   # sum mode "ranges": (ranges, error) from the page cache


class Watcher:
    """Load, configure and attach the checksum program; poll() returns finished files."""

    def __init__(self, paths: list[str], target: Target | None = None, store: bool = True,
                 follow_renames: bool = True, sum_mode: str = "ranges"):
        if not paths:
            raise ValueError("give at least one directory to watch")
        self.dirs = []
        for p in paths:
            real = os.path.realpath(p)
            if not os.path.isdir(real):
                raise NotADirectoryError(f"--path {p}: not a directory")
            if store and not xattr.supported(real):
                raise OSError(f"--path {p}: its filesystem does not accept user extended "
                              f"attributes (tmpfs needs Linux 6.6+); use --no-store to only compute")
            self.dirs.append(real)
        if len(self.dirs) > 64:
            raise ValueError("at most 64 watched directories")
        if sum_mode not in SUM_MODES:
            raise ValueError(f"sum mode {sum_mode!r}: one of {', '.join(SUM_MODES)}")
        if sum_mode == "copy-only" and store:
            raise ValueError("sum mode copy-only is for benchmarks (its values are wrong): use --no-store")
        self.target = target or Target()
        self.store = store
        self.follow_renames = follow_renames
        self.sum_mode = sum_mode
        self.summer = PageCacheSummer() if sum_mode == "ranges" else None
        self._outside: dict[tuple[int, int], _Closed] = {}    # closed outside, may move in
        self._recent: dict[tuple[int, int], tuple[int, int]] = {}   # finished: (size, mtime)
        self._moved_in: list[tuple[float, str]] = []          # (check after, path)
        self._lost_checked, self._lost_seen = 0.0, 0
        self._counts = {"outside_closed": 0, "outside_unlinked": 0, "outside_never_moved_in": 0,
                        "moved_in_not_followed": 0}
        self.obj: BpfObject | None = None
        self.links = []
        self.rb: RingBuffer | None = None
        self._ranges: dict[int, list] = {}
        self._pending: dict[tuple[int, int], _Closed] = {}

    @property
    def followed_source(self) -> str:
        """The source of values from files followed to the end: "kernel" or "page-cache"."""
        return "page-cache" if self.summer else "kernel"

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> "Watcher":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        obj = self.obj = BpfObject.open("checksum")
        self._reasons = {v: k.replace("_", "-") for k, v in _enum(obj.btf, "unfollowed_reason", "R_").items()}
        self._missed_bit = max(self._reasons) << 1
        self._reasons[self._missed_bit] = MISSED_RUNS_REASON
        self._stats = {k: v for k, v in _enum(obj.btf, "stat_index", "ST_").items() if k != "max"}
        ev = _enum(obj.btf, "event_type", "EV_")
        self._ev_range, self._ev_close, self._ev_rename = ev["range"], ev["close"], ev["rename"]
        self._ev_progress = ev["progress"]
        t = self.target
        obj.rodata["filter_mode"] = t.mode
        if t.comm:
            obj.rodata["target_comm"] = list(t.comm.encode().ljust(16, b"\0"))
        obj.rodata["target_cgroup_id"] = t.cgroup_id
        obj.rodata["target_cgroup_level"] = t.cgroup_level
        obj.rodata["sum_mode"] = SUM_MODES[self.sum_mode]
        obj.rodata["follow_renames"] = int(self.follow_renames)
        obj.rodata["progress_bytes"] = PROGRESS_BYTES
        obj.load()
        dirs, devs = obj.map("dirs"), obj.map("watched_devs")
        for i, d in enumerate(self.dirs):
            st = os.stat(d)
            dirs[{"ino": st.st_ino, "dev": _kernel_dev(st.st_dev)}] = i
            devs[_kernel_dev(st.st_dev)] = 1
        self._followed = obj.map("followed")
        pids = obj.map("target_pids")
        for pid in t.pids:
            pids[pid] = 1
        self._btf_types = {self._ev_range: obj.btf.struct("range_event"),
                           self._ev_progress: obj.btf.struct("range_event"),
                           self._ev_close: obj.btf.struct("close_event"),
                           self._ev_rename: obj.btf.struct("rename_event")}
        self.rb = RingBuffer(obj, "events")
        # Exits before enters: every write remembered at its enter then has its exit attached.
        progs = sorted(obj.programs.values(), key=lambda p: not p.name.startswith("ck_exit_"))
        for prog in progs:
            self.links.append(prog.attach())
        # fdinfo kept open and re-read with pread: opening 40 of them per batch cost ~3 ms
        self._fdinfo = [os.open(f"/proc/self/fdinfo/{p.fd}", os.O_RDONLY | os.O_CLOEXEC)
                        for p in obj.programs.values()]
        self._miss_windows: list[tuple[int, int]] = []
        self._miss_read_ns = time.monotonic_ns()
        self._miss_count = self._misses()

    def close(self) -> None:
        for link in reversed(self.links):     # enters first, exits last
            link.detach()
        self.links = []
        if self.summer is not None:
            self.summer.close_all()
        for fd in getattr(self, "_fdinfo", []):
            os.close(fd)
        self._fdinfo = []
        if self.rb is not None:
            self.rb.close()
            self.rb = None
        if self.obj is not None:
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # --- events -------------------------------------------------------------------------------

    def reasons(self, flags: int) -> list[str]:
        return [name for bit, name in sorted(self._reasons.items()) if flags & bit]

    def _misses(self) -> int:
        """Runs of our programs the kernel skipped (a BPF program already running on that CPU)."""
        total = 0
        for fd in self._fdinfo:
            text = os.pread(fd, 4096, 0)
            at = text.find(b"\nrecursion_misses:")
            if at >= 0:
                total += int(text[at + 18:text.index(b"\n", at + 1)])
        return total

    def _check_misses(self) -> None:
        # A skipped run may have been a write: every file open during the window is suspect.
        now, m = time.monotonic_ns(), self._misses()
        if m > self._miss_count:
            self._miss_windows = self._miss_windows[-99:] + [(self._miss_read_ns, now)]
            self._miss_count = m
        self._miss_read_ns = now

    def _missed_during(self, ev) -> bool:
        return any(lo <= ev.close_ns and ev.open_ns <= hi for lo, hi in self._miss_windows)

    def poll(self, timeout_ms: int = 100) -> list[Result]:
        """Wait up to TIMEOUT_MS for records, handle all of them, return the finished files."""
        out: list[Result] = []
        records = self.rb.poll(timeout_ms)
        if records:
            self._check_misses()     # after the drain: covers every close in this batch
        for raw in records:
            kind = int.from_bytes(raw[:4], "little")
            ctype = self._btf_types.get(kind)
            if ctype is None:
                continue
            rec = ctype.from_buffer_copy(raw.ljust(ctypes.sizeof(ctype), b"\0"))
            if kind == self._ev_progress:
                if self.summer is not None:
                    self.summer.progress(rec)
            elif kind == self._ev_range:
                if self.summer is not None:
                    self.summer.range(rec)
                else:
                    self._ranges.setdefault(rec.session, []).append((rec.start, rec.len, rec.adler))
            elif kind == self._ev_close:
                r = self._on_close(rec)
                if r:
                    out.append(r)
            else:
                out.extend(self._on_rename(rec))
        out.extend(self._expire())
        out.extend(self._check_moved_in())
        out.extend(self._check_lost_renames())
        return out

    def _check_lost_renames(self) -> list[Result]:
        """A lost rename record may have been a file of ours moving in: look for every file
        closed outside the trees in the trees themselves (one walk), about once a second."""
        now = time.monotonic()
        if not self._outside or now < self._lost_checked + 1.0:
            return []
        self._lost_checked = now
        lost = int(self.obj.map("stats").sum(self._stats["rename_lost"]) or 0) + int(self.rb.lost)
        if lost == self._lost_seen:
            return []
        self._lost_seen = lost
        found = []
        for top in self.dirs:
            for path in _files_below(top, limit=1_000_000):
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                key = (_kernel_dev(st.st_dev), st.st_ino)
                if key in self._outside:
                    found.append(self._finish(self._outside.pop(key), path))
        return found

    def drain(self, seconds: float = 0.5) -> list[Result]:
        """Poll until nothing arrives for SECONDS (tests and one-shot use)."""
        out, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < seconds:
            got = self.poll(50)
            if got:
                out.extend(got)
                quiet_since = time.monotonic()
        return out

    def stats(self) -> dict:
        m = self.obj.map("stats")
        counters = {name: int(m.sum(i) or 0) for name, i in sorted(self._stats.items(), key=lambda kv: kv[1])}
        counters["ring_lost"] = int(self.rb.lost)
        counters["program_runs_skipped"] = self._misses()
        counters["waiting_for_rename"] = len(self._pending)
        counters["outside_waiting"] = len(self._outside)
        counters.update(self._counts)
        if self.summer is not None:
            counters["page_cache_bytes_read"] = self.summer.bytes_read
        return counters

    def _on_close(self, ev) -> Result | None:
        ranges = self._ranges.pop(ev.session, [])
        if ev.seg_end > ev.seg_start:
            ranges.append((ev.seg_start, ev.seg_end - ev.seg_start, ev.seg_adler))
        path = None
        if ev.path_complete:
            off = type(ev).path.offset            # (slicing a char array stops at the first NUL)
            parts = bytes(ev)[off:off + ev.path_len].split(b"\0")
            parts = [os.fsdecode(p) for p in parts if p]
            # The watched directory the walk up from the final name reached: the file may
            # have been opened under another one, or outside, and renamed since.
            path = os.path.join(self.dirs[ev.path_dir], *reversed(parts))
        d = {name: getattr(ev, name) for name, *_ in ev._fields_ if name not in ("path",)}
        if self._missed_during(ev):
            d["flags"] |= self._missed_bit
        d["comm"] = bytes(ev.comm).split(b"\0")[0].decode(errors="replace")
        closed = _Closed(d, ranges, path, time.monotonic() + PENDING_SECONDS)
        if self.summer is not None:
            closed.ranges = None      # summed from the page cache in _finish
            if ev.nlink == 0 or d["flags"]:
                self.summer.forget(ev.session)
            else:
                # Sum the rest now, while cached, through our descriptor if we hold one.
                at = path if path is not None and _same_inode(path, d) else None
                closed.summed = self.summer.close(ev.session, ev.dev, ev.ino, ev.seg_start,
                                                  ev.seg_end, at)
        if ev.path_outside and ev.nlink == 0:
            self._counts["outside_unlinked"] += 1     # a temporary file removed: nothing to store
            return None
        if ev.nlink == 0:
            return self._result(closed, None, "unlinked", stored=False)
        if ev.path_outside:
            # Closed outside the watched trees: kept until it is moved in (rename record).
            self._counts["outside_closed"] += 1
            closed.deadline = time.monotonic() + OUTSIDE_SECONDS
            self._outside[(d["dev"], d["ino"])] = closed
            while len(self._outside) > OUTSIDE_MAX:
                self._drop_outside(next(iter(self._outside)))
            return None
        if path is None or not _same_inode(path, d):
            # Renamed after close (or while open, out of our sight): wait for its rename record.
            self._pending[(d["dev"], d["ino"])] = closed
            return None
        return self._finish(closed, path)

    def _on_rename(self, ev) -> list[Result]:
        if not (self._pending or self._outside or self.follow_renames):
            return []
        off = type(ev).newname.offset
        name = os.fsdecode(bytes(ev)[off:off + max(ev.len - 1, 0)])
        if not os.path.isabs(name):
            base = f"/proc/{ev.tgid}/cwd" if ev.newdfd == AT_FDCWD else f"/proc/{ev.tgid}/fd/{ev.newdfd}"
            try:
                name = os.path.join(os.readlink(base), name)
            except OSError:
                return []
        try:
            st = os.stat(name)
        except OSError:
            return []
        key = (_kernel_dev(st.st_dev), st.st_ino)
        closed = self._pending.pop(key, None)
        if closed:
            return [self._finish(closed, name)]
        if not self._in_watched_tree(name):
            return []
        if stat.S_ISDIR(st.st_mode):
            # A directory moved in: each file below it, as if moved in by itself.
            return [r for f in _files_below(name) for r in self._moved_in_file(f)]
        if not stat.S_ISREG(st.st_mode):
            return []
        return self._moved_in_file(name, key)

    def _moved_in_file(self, name: str, key=None) -> list[Result]:
        if key is None:
            try:
                st = os.stat(name)
            except OSError:
                return []
            key = (_kernel_dev(st.st_dev), st.st_ino)
        closed = self._pending.pop(key, None) or self._outside.pop(key, None)
        if closed:
            return [self._finish(closed, name)]
        if self.follow_renames:
            # Still open (its close will report it), or finished already? Ask again a little
            # later: its close record may be on its way.
            self._moved_in.append((time.monotonic() + MOVED_IN_DELAY, name))
        return []

    def _drop_outside(self, key) -> None:
        closed = self._outside.pop(key)
        self._counts["outside_never_moved_in"] += 1
        if self.summer is not None:
            self.summer.forget(closed.ev["session"])

    def _in_watched_tree(self, path: str) -> bool:
        real = os.path.realpath(path)
        return any(real.startswith(d.rstrip("/") + "/") for d in self.dirs)

    def _check_moved_in(self) -> list[Result]:
        """Files moved into a watched tree that no close record accounts for: read them here."""
        now, out, later = time.monotonic(), [], []
        for when, name in self._moved_in:
            if when > now:
                later.append((when, name))
                continue
            try:
                st = os.stat(name)
            except OSError:
                continue
            key = (_kernel_dev(st.st_dev), st.st_ino)
            if key in self._pending or key in self._outside:
                out.extend(self._on_rename_path(key, name))
                continue
            if self._recent.get(key) == (st.st_size, st.st_mtime_ns):
                continue                     # finished by us, unchanged: its attribute moved with it
            if self._followed.get({"ino": st.st_ino, "dev": key[0]}) is not None:
                continue                     # still open: its close will report it
            if time.time_ns() - st.st_mtime_ns < MOVED_IN_QUIET * 1e9:
                later.append((now + MOVED_IN_QUIET, name))   # still being written: not yet
                continue
            self._counts["moved_in_not_followed"] += 1
            ev = {"flags": 0, "size": st.st_size, "ino": st.st_ino, "dev": key[0], "tgid": 0,
                  "comm": "", "writes": 0, "bytes": 0, "ranges": 0, "first_write_ns": 0,
                  "close_ns": time.monotonic_ns(), "mtime_sec": 0, "mtime_nsec": 0}
            out.append(self._finish(_Closed(ev, [], name, now), name, why=[MOVED_IN_REASON]))
        self._moved_in = later
        return out

    def _on_rename_path(self, key, name) -> list[Result]:
        closed = self._pending.pop(key, None) or self._outside.pop(key, None)
        return [self._finish(closed, name)] if closed else []

    def _expire(self) -> list[Result]:
        now = time.monotonic()
        out = []
        for key, closed in list(self._pending.items()):
            if now > closed.deadline:
                del self._pending[key]
                # Renamed by a process we do not follow? Look for the inode in the watched trees.
                path = self._find_inode(*key)
                out.append(self._finish(closed, path) if path else
                           self._result(closed, None, "gone", stored=False))
        for key, closed in list(self._outside.items()):
            if now > closed.deadline:
                self._drop_outside(key)
        return out

    def _find_inode(self, dev: int, ino: int, limit: int = 200_000) -> str | None:
        seen = 0
        for top in self.dirs:
            for dirpath, _dirs, names in os.walk(top):
                for n in names:
                    seen += 1
                    p = os.path.join(dirpath, n)
                    try:
                        st = os.lstat(p)
                    except OSError:
                        continue
                    if st.st_ino == ino and _kernel_dev(st.st_dev) == dev:
                        return p
                if seen > limit:
                    return None
        return None

    def _finish(self, closed: _Closed, path: str, why: list[str] | None = None) -> Result:
        ev = closed.ev
        forced = why is not None
        why = why if forced else self.reasons(ev["flags"])
        value = None
        ranges = closed.ranges
        if not why and ranges is None:
            # Sum mode "ranges": summed from the page cache at close, or now by the final path.
            ranges, err = closed.summed if closed.summed else (None, None)
            if ranges is None and err is None:
                ranges, err = self.summer.close(ev["session"], ev["dev"], ev["ino"],
                                                ev["seg_start"], ev["seg_end"], path)
            if err:
                why = [err]
        if not why and not forced:
            try:
                value = adler.combine_ranges(ranges, ev["size"])
            except adler.NotTiled as e:
                why = [f"ranges: {e}"]
        if value is not None and not _same_file(path, ev):
            value, why = None, why + ["changed after close"]
        if self.store and value is not None:
            # Store only if the file is still what the kernel saw at close (size and mtime), and
            # check again afterwards: a writer that came back in between wins, we re-read.
            try:
                xattr.store(path, value)
            except OSError as e:
                return self._result(closed, path, f"not-stored: {e.strerror}", stored=False,
                                    value=value, why=why)
            if not _same_file(path, ev):
                value, why = None, why + ["changed after close"]
        # kernel: summed in the kernel; page-cache: the kernel's ranges, summed here while cached;
        # userspace: the file read whole here (reasons say why)
        source = self.followed_source if value is not None else "userspace"
        if value is None:
            try:
                before = os.stat(path)
                value, size = adler.file_adler32(path)
                if _changed(before, os.stat(path)):
                    # Written again while we read it: its writer's next close reports it.
                    return self._result(closed, path, "not-stored: changing while read",
                                        stored=False, source=source, why=why)
                ev = dict(ev, size=size)
                if self.store:
                    xattr.store(path, value)
            except OSError as e:
                return self._result(closed, path, f"not-stored: {e.strerror}", stored=False,
                                    source=source, why=why)
        try:
            st = os.stat(path)
            self._recent[(ev["dev"], ev["ino"])] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
        while len(self._recent) > RECENT_MAX:
            self._recent.pop(next(iter(self._recent)))
        return self._result(dict_closed(closed, ev), path, "stored" if self.store else "computed",
                            stored=self.store, value=value, source=source, why=why)

    def _result(self, closed: _Closed, path, status, stored, value=None, source="kernel",
                why=None) -> Result:
        ev = closed.ev
        now = time.monotonic_ns()
        return Result(
            path=path or closed.path, size=ev["size"],
            adler32=adler.fmt(value) if value is not None else None,
            source=source, stored=stored, status=status,
            reasons=why if why is not None else self.reasons(ev["flags"]),
            pid=ev["tgid"], comm=ev["comm"], writes=ev["writes"], bytes_summed=ev["bytes"],
            ranges=ev["ranges"] + 1 if ev["writes"] else 0,
            first_write_to_stored_ms=(now - ev["first_write_ns"]) / 1e6 if stored and ev["first_write_ns"] else None,
            close_to_stored_ms=(now - ev["close_ns"]) / 1e6 if stored else None)


def dict_closed(closed: _Closed, ev: dict) -> _Closed:
    return _Closed(ev, closed.ranges, closed.path, closed.deadline, closed.summed)


def _files_below(top: str, limit: int = 100_000) -> list[str]:
    out = []
    for dirpath, _dirs, names in os.walk(top):
        out += (os.path.join(dirpath, n) for n in names)
        if len(out) > limit:
            break
    return out


def _kernel_dev(st_dev: int) -> int:
    """st_dev (userspace dev_t encoding) -> the kernel's s_dev (MAJOR << 20 | MINOR)."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_size, a.st_mtime_ns) != (b.st_ino, b.st_size, b.st_mtime_ns)


def _same_inode(path: str, ev: dict) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_ino == ev["ino"] and _kernel_dev(st.st_dev) == ev["dev"]


def _same_file(path: str, ev: dict) -> bool:
    """True if PATH is the inode the kernel reported, unchanged since its last close."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_ino == ev["ino"] and _kernel_dev(st.st_dev) == ev["dev"] and st.st_size == ev["size"]
            and st.st_mtime_ns == ev["mtime_sec"] * 1_000_000_000 + ev["mtime_nsec"])
