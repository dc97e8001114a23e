"""Measurement tools shared by the scenarios' child processes.

A scenario measures in a fresh process (`python benchmarks/scenarios/X.py
...`), which imports this module.  Here:

- `CWriter`: a writer thread that commits one small row every `interval`
  seconds on its own connection to the *system* libsqlite3 through ctypes
  (the same library apsw_backup and the standard library load, so one
  SQLite in the process), and records each commit's latency.  It replaces
  SQLite's automatic checkpoint with the same rule done by hand in a
  `sqlite3_wal_hook` (a PASSIVE checkpoint once the WAL holds `autocheckpoint`
  frames), so it can count the checkpoint attempts, the time they take and
  what they manage to copy back.
- `percentile`, `latency_summary`, `stalls`.
- `FlushPacer`: the progress callback that bounds the dirty data a copy
  leaves for one flush (the disk_gentle prototype).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time

SQLITE_OK, SQLITE_BUSY, SQLITE_ROW, SQLITE_DONE = 0, 5, 100, 101
OPEN_READWRITE, OPEN_CREATE = 0x2, 0x4
CHECKPOINT_PASSIVE = 0

_lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
_lib.sqlite3_open_v2.argtypes = [
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.c_int,
    ctypes.c_char_p,
]
_lib.sqlite3_exec.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
]
_lib.sqlite3_errmsg.argtypes = [ctypes.c_void_p]
_lib.sqlite3_errmsg.restype = ctypes.c_char_p
_lib.sqlite3_busy_timeout.argtypes = [ctypes.c_void_p, ctypes.c_int]
_lib.sqlite3_close.argtypes = [ctypes.c_void_p]
_lib.sqlite3_wal_checkpoint_v2.argtypes = [
    ctypes.c_void_p,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.POINTER(ctypes.c_int),
    ctypes.POINTER(ctypes.c_int),
]
WAL_HOOK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
)
_lib.sqlite3_wal_hook.argtypes = [ctypes.c_void_p, WAL_HOOK, ctypes.c_void_p]
_lib.sqlite3_wal_hook.restype = ctypes.c_void_p


def percentile(ordered: list[float], q: float) -> float:
    """The q-quantile of an already sorted list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_summary(latencies: list[float]) -> dict:
    """p50/p99/max in ms of latencies in seconds."""
    if not latencies:
        return {"commits": 0}
    ordered = sorted(latencies)
    return {
        "commits": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * percentile(ordered, 0.99),
        "max_ms": 1000 * ordered[-1],
    }


class CWriter(threading.Thread):
    """Commits one row every `interval` s; records latency and checkpoints.

    synchronous: the writer's PRAGMA synchronous (NORMAL: a WAL commit does
    not fsync, only checkpoints do; FULL: every commit fsyncs).
    autocheckpoint: frames after which a commit runs a PASSIVE checkpoint,
    as SQLite's wal_autocheckpoint does (0: never).  Only used in WAL mode.
    busy_ms: the writer's busy timeout.
    """

    def __init__(
        self,
        path: str,
        interval: float,
        *,
        synchronous: str = "NORMAL",
        autocheckpoint: int = 1000,
        busy_ms: int = 5000,
    ) -> None:
        super().__init__(daemon=True)
        self.db = ctypes.c_void_p()
        rc = _lib.sqlite3_open_v2(
            os.fsencode(path), ctypes.byref(self.db), OPEN_READWRITE, None
        )
        if rc != SQLITE_OK:
            raise RuntimeError(f"cannot open {path}: rc={rc}")
        _lib.sqlite3_busy_timeout(self.db, busy_ms)
        self.exec(
            f"PRAGMA synchronous={synchronous};"
            "CREATE TABLE IF NOT EXISTS bench_log(id INTEGER PRIMARY KEY, "
            "at REAL, note TEXT)"
        )
        self.interval = interval
        self.autocheckpoint = autocheckpoint
        self.stop = threading.Event()
        self.started = threading.Event()
        self.latencies: list[float] = []
        self.times: list[float] = []  # start of each commit (perf_counter)
        self.errors = 0
        self.checkpoints = 0  # attempts
        self.checkpoint_seconds = 0.0
        self.checkpoint_max = 0.0
        self.checkpoint_busy = 0
        self.frames_max = 0  # the largest WAL seen at a commit, in frames
        self.complete = 0  # attempts that copied the whole WAL back
        self.resets = 0  # commits after which the WAL had started again
        self.in_checkpoint: list[bool] = []  # per commit: it ran a checkpoint
        self._ran = False
        self._last_frames = 0
        # The hook replaces sqlite3_wal_autocheckpoint's own (one per db).
        self._hook = WAL_HOOK(self._wal_hook)
        _lib.sqlite3_wal_hook(self.db, self._hook, None)
        self._sql = (
            b"INSERT INTO bench_log(at, note) VALUES (1.0, '" + b"x" * 100 + b"')"
        )

    def exec(self, sql: str | bytes) -> int:
        if isinstance(sql, str):
            sql = sql.encode()
        return _lib.sqlite3_exec(self.db, sql, None, None, None)

    def _wal_hook(self, _arg, db, name, frames) -> int:
        if frames < self._last_frames:
            self.resets += 1
        self._last_frames = frames
        self.frames_max = max(self.frames_max, frames)
        if self.autocheckpoint and frames >= self.autocheckpoint:
            log, done = ctypes.c_int(), ctypes.c_int()
            start = time.perf_counter()
            rc = _lib.sqlite3_wal_checkpoint_v2(
                db, name, CHECKPOINT_PASSIVE, ctypes.byref(log), ctypes.byref(done)
            )
            spent = time.perf_counter() - start
            self.checkpoints += 1
            self.checkpoint_seconds += spent
            self.checkpoint_max = max(self.checkpoint_max, spent)
            self._ran = True
            if rc == SQLITE_BUSY:
                self.checkpoint_busy += 1
            elif rc == SQLITE_OK and done.value == log.value:
                self.complete += 1
        return SQLITE_OK

    def run(self) -> None:
        clock = time.perf_counter
        self.started.set()
        while not self.stop.is_set():
            start = clock()
            rc = _lib.sqlite3_exec(self.db, self._sql, None, None, None)
            end = clock()
            if rc != SQLITE_OK:
                self.errors += 1
            self.times.append(start)
            self.latencies.append(end - start)
            self.in_checkpoint.append(self._ran)
            self._ran = False
            if self.interval:
                time.sleep(self.interval)

    def mark(self) -> int:
        """The index of the next commit: cut the latencies into windows."""
        return len(self.latencies)

    def finish(self) -> None:
        self.stop.set()
        self.join()
        _lib.sqlite3_close(self.db)

    def counters(self) -> dict:
        return {
            "errors": self.errors,
            "checkpoints": self.checkpoints,
            "checkpoint_ms": round(1000 * self.checkpoint_seconds, 2),
            "checkpoint_max_ms": round(1000 * self.checkpoint_max, 2),
            "checkpoint_busy": self.checkpoint_busy,
            "checkpoints_complete": self.complete,
            "frames_max": self.frames_max,
            "wal_resets": self.resets,
        }

    def window(self, begin: int, end: int | None = None) -> dict:
        """Latency figures of commits begin..end, and what made the slowest slow.

        slowest_1pct_checkpoint: of the slowest 1% of those commits, the
        share that ran a checkpoint; p99_without_checkpoints: the p99 of the
        commits that did not.
        """
        lat = self.latencies[begin:end]
        ran = self.in_checkpoint[begin:end]
        out = latency_summary(lat)
        if not lat:
            return out
        ranked = sorted(zip(lat, ran, strict=True), reverse=True)
        top = ranked[: max(1, len(ranked) // 100)]
        plain = sorted(x for x, r in ranked if not r)
        out["checkpoint_commits"] = sum(ran)
        out["slowest_1pct_checkpoint"] = sum(r for _, r in top) / len(top)
        if plain:
            out["p99_without_checkpoints_ms"] = 1000 * percentile(plain, 0.99)
        return out


def wal_size(path: str) -> int:
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


class FlushPacer:
    """A progress callback that writes the copy out in slices as it goes.

    After every step it looks at how much the target file grew since the
    last flush; past `slice_bytes` it starts writeback of the new range and
    waits for it (fdatasync), so no flush, the copy's or anybody else's, ever
    finds more than about one slice of the copy's dirty data queued.  The
    target's pages reach its file as SQLite's page cache spills them, so the
    target's cache_size bounds what is still in memory.
    """

    def __init__(self, path: str, slice_bytes: int) -> None:
        self.path, self.slice = path, slice_bytes
        self.fd: int | None = None
        self.flushed = 0
        self.flushes = 0
        self.seconds = 0.0

    def __call__(self, status: int, remaining: int, total: int) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
        size = os.fstat(self.fd).st_size
        if size - self.flushed >= self.slice:
            start = time.perf_counter()
            os.fdatasync(self.fd)
            self.seconds += time.perf_counter() - start
            self.flushes += 1
            self.flushed = size

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def remove_db(path: str) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def result_fields(result) -> dict:
    """The CopyResult fields a scenario reports (wal_growth once copy.py has it)."""
    out = {
        "steps": result.steps,
        "restarts": result.restarts,
        "waits": getattr(result, "waits", None),
        "snapshot": getattr(result, "snapshot", None),
    }
    if hasattr(result, "wal_growth"):
        out["wal_growth"] = result.wal_growth
    return out
