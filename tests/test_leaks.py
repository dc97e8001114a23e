"""Leaks (docs/locking.md "no sequence of calls may leak a lock,
a reference or memory").

One test runs 20,000 cycles after a warm-up.  A cycle opens a fresh
connection, makes a backup, steps it and ends it one of four ways (finish()
after a step loop, a with-block, the garbage collector freeing an unfinished
backup -- by reference count or through a reference cycle --, closing the
source or the destination in mid-copy), runs one of the error paths of
docs/api.md#backup, docs/api.md#errors-from-step (unknown schema name, source == destination, closed source,
BUSY step then finish, step on a finished backup) and closes the fresh
connection.  After the warm-up the cycles run in two equal windows:

- Python objects still alive that a cycle allocated (tracemalloc traces
  with a frame in this file: other threads and pytest are not counted)
  grow by less than PY_BOUND in at least one window.  A leak grows in
  both; what grows in one only is the interpreter rebuilding a table of
  its own whose old copy was allocated before tracing began, so its free
  is not seen (CPython 3.13 after a full suite: the interned-strings dict,
  rebuilt once its slots are used up; docs/testing.md, "Leak test on CPython 3.13");
- over both windows, memory SQLite holds (sqlite3_memory_used of the one
  shared libsqlite3, read through ctypes) grows by less than SQLITE_BOUND -- a leaked
  connection, backup or statement shows up here exactly;
- the process's resident set (/proc/self/statm) grows by less than
  RSS_BOUND, which catches C allocations outside both (not checked under
  AddressSanitizer, whose quarantine holds freed memory back by design);
- sys.getrefcount of the long-lived connections and of the schema-name
  strings given to backup() is back to its starting value.

The figures are printed (pytest -s shows them).  The bounds were checked to
trip when a cycle deliberately keeps its backup, its exception or its fresh
connection alive.
"""

import ctypes
import gc
import resource
import sys
import time
import tracemalloc

import pytest

import apsw_backup

pytestmark = pytest.mark.heavy  # too slow for valgrind

WARMUP = 1_000
CYCLES = 20_000  # two windows of 10,000
COLLECT_EVERY = 250
PY_BOUND = 128 * 1024  # per window of 10,000 cycles
TRACE_FRAMES = 4
SQLITE_BOUND = 64 * 1024
RSS_BOUND = 2 * 1024 * 1024

_sqlite = ctypes.CDLL("libsqlite3.so.0")
_sqlite.sqlite3_memory_used.restype = ctypes.c_int64


def sqlite_memory_used():
    return _sqlite.sqlite3_memory_used()


def under_asan():
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def current_rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def expect(exc_class, func, *args):
    """Call func(*args); it must raise exactly exc_class with a message.
    (pytest.raises costs more than the cycle it guards.)"""
    try:
        func(*args)
    except Exception as exc:  # noqa: BLE001 - the class is checked exactly
        assert type(exc) is exc_class, repr(exc)
        assert str(exc), repr(exc)
    else:
        raise AssertionError(f"{func!r} did not raise {exc_class.__name__}")


def fresh_name(text):
    """A str equal to text but not interned, so its refcount is ours alone."""
    return "".join(list(text))


class Cycles:
    """The long-lived source and destination, and one cycle's script."""

    def __init__(self, tmp_path):
        # A str made once: building it from tmp_path in every cycle would
        # make CPython 3.13's pathlib intern (and free again) each part of
        # the path, churning the interpreter's interned-strings table.
        self.fresh_path = str(tmp_path / "fresh.db")
        self.main = fresh_name("main")
        self.missing = fresh_name("no_such_schema")
        self.src = apsw_backup.Connection(":memory:")
        # A source of a few pages (six at 4 KiB), so a step loop takes
        # several steps.
        self.src.execute(
            "CREATE TABLE t(x); WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL "
            "SELECT i + 1 FROM c WHERE i < 8) "
            "INSERT INTO t SELECT randomblob(1500) FROM c"
        ).fetchall()
        self.dst = apsw_backup.Connection(":memory:")
        self.closed = apsw_backup.Connection(":memory:")
        self.closed.close()
        self.expected = self.src.execute("SELECT x FROM t ORDER BY rowid").fetchall()

    def tracked(self):
        """The objects whose reference counts must come back."""
        return {
            "source": self.src,
            "destination": self.dst,
            "closed": self.closed,
            "name main": self.main,
            "name missing": self.missing,
        }

    def open_fresh(self, i):
        # A file for a step loop (i % 24 == 0) and for closing the
        # destination mid-copy (i % 24 == 10): never for the cycle-GC way,
        # whose file would stay locked until the collector runs.
        if i % 24 in (0, 10):
            conn = apsw_backup.Connection(self.fresh_path)
            conn.execute("PRAGMA synchronous=OFF").fetchall()
            return conn
        return apsw_backup.Connection(":memory:")

    # -- ways to run and end a backup -------------------------------------

    def end_by_step_loop(self, dest, source):
        b = dest.backup(self.main, source, self.main)
        while not b.step(2):
            pass
        b.finish()
        assert not b

    def end_by_with_block(self, dest, source):
        with dest.backup(self.main, source, self.main) as b:
            assert b.step(-1) is True

    def end_by_refcount_gc(self, dest, source):
        b = dest.backup(self.main, source, self.main)
        b.step(1)
        del b  # dealloc finishes it and unlocks dest

    def end_by_cycle_gc(self, fresh):
        """An unfinished backup and both its connections, only reachable
        from a reference cycle: the collector finishes and frees them."""
        source = apsw_backup.Connection(":memory:")
        source.execute("CREATE TABLE a(x); INSERT INTO a VALUES (1)").fetchall()
        b = fresh.backup(self.main, source, self.main)
        b.step(0)
        loop = [b, source]
        loop.append(loop)

    def end_by_closing_source(self, dest):
        source = apsw_backup.Connection(":memory:")
        source.execute("CREATE TABLE a(x); INSERT INTO a VALUES (1)").fetchall()
        b = dest.backup(self.main, source, self.main)
        b.step(1)
        source.close()
        assert not b

    def end_by_closing_destination(self, fresh):
        b = fresh.backup(self.main, self.src, self.main)
        b.step(1)
        fresh.close(force=True)
        assert not b

    # -- error paths ------------------------------------------------------

    def error_unknown_schema(self, dest):
        expect(apsw_backup.SQLError, dest.backup, self.missing, self.src, self.main)
        expect(apsw_backup.SQLError, dest.backup, self.main, self.src, self.missing)

    def error_same_connection(self, dest):
        expect(ValueError, dest.backup, self.main, dest, self.main)

    def error_closed_source(self, dest):
        expect(
            apsw_backup.ConnectionClosedError,
            dest.backup,
            self.main,
            self.closed,
            self.main,
        )

    def error_busy_then_finish(self, dest):
        self.src.execute("BEGIN; INSERT INTO t VALUES (1)").fetchall()
        b = dest.backup(self.main, self.src, self.main)
        expect(apsw_backup.BusyError, b.step, 1)
        expect(apsw_backup.BusyError, b.finish)
        self.src.execute("ROLLBACK").fetchall()
        expect(apsw_backup.ConnectionClosedError, b.step, 1)

    def run(self, i):
        # The cycle-GC way leaves garbage for the collector; collecting it
        # regularly keeps the memory it holds from masking (or faking) growth.
        if i % COLLECT_EVERY == 0:
            gc.collect()
        fresh = self.open_fresh(i)
        dest = self.dst if i % 2 else fresh
        way = (i // 2) % 6
        if way == 0:
            self.end_by_step_loop(dest, self.src)
        elif way == 1:
            self.end_by_with_block(dest, self.src)
        elif way == 2:
            self.end_by_refcount_gc(dest, self.src)
        elif way == 3:
            self.end_by_closing_source(dest)
        elif way == 4:
            self.end_by_cycle_gc(fresh)
            fresh = None  # the cycle owns it now
        else:
            self.end_by_closing_destination(fresh)
        errors = (
            self.error_unknown_schema,
            self.error_same_connection,
            self.error_closed_source,
            self.error_busy_then_finish,
        )
        errors[i % len(errors)](self.dst)
        if fresh is not None:
            fresh.close()

    def check_still_working(self):
        """After all the cycles, a plain backup still copies everything."""
        gc.collect()
        with self.dst.backup("main", self.src, "main") as b:
            b.step(-1)
        assert (
            self.dst.execute("SELECT x FROM t ORDER BY rowid").fetchall()
            == self.expected
        )


def traced_here(snapshot):
    """Bytes still allocated by code with a frame in this file."""
    mine = snapshot.filter_traces([tracemalloc.Filter(True, __file__, all_frames=True)])
    return sum(stat.size for stat in mine.statistics("filename"))


def test_backup_cycles_do_not_leak_memory_or_references(tmp_path):
    cycles = Cycles(tmp_path)
    tracemalloc.start(TRACE_FRAMES)
    try:
        for i in range(WARMUP):
            cycles.run(i)
        gc.collect()
        refcounts = {
            name: sys.getrefcount(obj) for name, obj in cycles.tracked().items()
        }
        rss_before = current_rss()
        sqlite_before = sqlite_memory_used()
        started = time.perf_counter()
        marks = [traced_here(tracemalloc.take_snapshot())]
        window = CYCLES // 2
        for start in (WARMUP, WARMUP + window):
            for i in range(start, start + window):
                cycles.run(i)
            gc.collect()
            marks.append(traced_here(tracemalloc.take_snapshot()))
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    py_growth = [
        after - before for before, after in zip(marks, marks[1:], strict=False)
    ]
    sqlite_growth = sqlite_memory_used() - sqlite_before
    rss_growth = current_rss() - rss_before
    after = {name: sys.getrefcount(obj) for name, obj in cycles.tracked().items()}
    print(
        f"\nleaks: {CYCLES} cycles after {WARMUP} warm-up in {elapsed:.1f} s; "
        f"growth: Python objects {py_growth} B (two windows), SQLite "
        f"{sqlite_growth} B, RSS {rss_growth} B; refcounts before {refcounts} "
        f"after {after}"
    )
    assert after == refcounts
    assert min(py_growth) < PY_BOUND, py_growth
    assert sqlite_growth < SQLITE_BOUND
    if not under_asan():
        assert rss_growth < RSS_BOUND
    cycles.check_still_working()
