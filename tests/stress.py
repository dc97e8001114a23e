"""Seeded concurrency stress of apsw_backup (docs/locking.md).

Several threads pick random operations on one shared pool of Connections
(rollback-journal and WAL files, private and shared-cache in-memory
databases), Backups and Cursors: step(n), finish(), close() with and without
force, ``__exit__``, ``del`` + ``gc.collect()`` (some objects sit in
reference cycles so that only the collector frees them), execute and fetch,
cursor churn, long recursive-CTE queries (the GIL is released while they
run), write transactions held open, busy handlers that call back into the
library, interrupt(), page-size changes and copy().

Library exceptions such as ThreadingViolationError, ConnectionClosedError or
BusyError are expected.  A failure is: a crash or a sanitizer report (seen by
the driver, which runs each seed in a subprocess), a hang (per-seed
watchdog), an exception of any other class, or a broken invariant:

- every database, file or in memory, is always consistent: ``meta`` agrees
  with table ``t`` (triggers keep it so in every transaction), and
  ``integrity_check`` is ok -- so a backup destination holds either its old
  content or a complete copy, never a partial one;
- once every backup is finished or collected, no connection is left locked
  (each one runs SQL), every connection closes, and another connection can
  write every file;

The operations of thread ``i`` come from ``random.Random(f"{seed}:{i}")``, so
a seed repeats the same operations; the interleaving is the scheduler's, so
a failing seed reproduces often but not always (run it a few times).

    python tests/stress.py --seed 7 --seconds 5 --threads 4   # one seed, here
    python tests/stress.py --seeds 0-9 --seconds 4            # a subprocess each
    python tests/stress.py --budget 60 --seconds 4            # seeds for 60 s

The driver prints one line per seed and, for a failure, the sanitizer's
summary and frames, the child's failure lines and the last operations each
thread started; it exits 1 if any seed failed.
"""

import argparse
import collections
import faulthandler
import gc
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import weakref

ROWS = 120  # about 30 pages of 4 KiB per database: a copy takes several steps
PAD = 800

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(k INTEGER PRIMARY KEY CHECK (k = 1),
                                n INTEGER NOT NULL, total INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL, pad BLOB);
CREATE INDEX IF NOT EXISTS t_v ON t(v);
CREATE TRIGGER IF NOT EXISTS t_ins AFTER INSERT ON t
  BEGIN UPDATE meta SET n = n + 1, total = total + new.v; END;
CREATE TRIGGER IF NOT EXISTS t_del AFTER DELETE ON t
  BEGIN UPDATE meta SET n = n - 1, total = total - old.v; END;
CREATE TRIGGER IF NOT EXISTS t_upd AFTER UPDATE OF v ON t
  BEGIN UPDATE meta SET total = total - old.v + new.v; END;
INSERT OR IGNORE INTO meta VALUES (1, 0, 0);
"""
FILL = (
    "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
    "INSERT INTO t(v, pad) SELECT abs(random() % 1000), randomblob(?) FROM c"
)
# 1 when the database is consistent; one statement, so one snapshot.
CONSISTENT = (
    "SELECT (SELECT count(*) FROM t) = n AND (SELECT total(v) FROM t) = total FROM meta"
)
LONG_QUERY = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "SELECT count(*) FROM n"
)

STOP_GRACE = 15  # seconds: every operation is bounded far below this
FILES = {"r0.db": "delete", "r1.db": "delete", "w0.db": "wal", "w1.db": "wal"}
SHARED_URI = "file:stress-shared-{seed}?mode=memory&cache=shared"


class HandlerError(Exception):
    """Raised on purpose by a busy handler; comes out of the waiting call."""


class BodyError(Exception):
    """Raised on purpose inside a with-block."""


class InvariantError(AssertionError):
    """A guarantee of the library did not hold."""


def expected_exceptions(ab):
    """What the operations may raise without it being a failure."""
    return (
        ab.ThreadingViolationError,
        ab.ConnectionClosedError,
        ab.CursorClosedError,
        ab.BusyError,
        ab.LockedError,
        ab.InterruptError,
        ab.SQLError,  # "in use", "within a transaction", savepoint mix-ups
        ab.ReadOnlyError,  # the page-size trap of WAL / in-memory destinations
        ab.AbortError,  # statements aborted by a rollback
        ab.SchemaChangeError,
        HandlerError,
        BodyError,
    )


# backup() refuses, with ValueError, a pair that is one database (docs/locking.md).
REFUSED_PAIRS = ("share one SQLite cache", "same database file")

# Errors that are wrong even though their class is "expected": they mean
# data went missing.
LOST_WORDS = ("no such table", "malformed")


def build_files(directory):
    """The file databases, built with the standard library's sqlite3."""
    for name, mode in FILES.items():
        db = sqlite3.connect(os.path.join(directory, name), isolation_level=None)
        try:
            db.execute(f"PRAGMA journal_mode={mode}")
            db.executescript(SCHEMA)
            db.execute(FILL, (ROWS, PAD))
        finally:
            db.close()


class Box:
    """A pool slot's content.  A cyclic box references itself, so the object
    in it is freed only by the garbage collector (its tp_clear path)."""

    def __init__(self, obj, cyclic, **info):
        self.obj = obj
        self.info = info
        self.me = self if cyclic else None


class Stress:
    def __init__(self, ab, seed, seconds, threads, directory, shared_cache=True):
        self.ab = ab
        self.seed = seed
        self.seconds = seconds
        self.nthreads = threads
        self.directory = directory
        self.shared_cache = shared_cache
        self.expected = expected_exceptions(ab)
        self.conns = [None] * 8
        self.backups = [None] * 4
        self.cursors = [None] * 8
        self.every_conn = []  # weakref.ref of every Connection made
        self.every_conn_lock = threading.Lock()
        self.failures = []
        self.errors = collections.Counter()
        self.ops = collections.Counter()
        self.unraisable = collections.Counter()
        self.logs = [collections.deque(maxlen=25) for _ in range(threads)]
        self.trace_fd = None
        self.copies = 0
        self.steps_done = 0
        self.stop = threading.Event()

    # -- bookkeeping ------------------------------------------------------

    def fail(self, what):
        self.failures.append(what)

    def trace(self, index, text):
        self.logs[index].append(f"{time.monotonic():.3f} {text}")
        if self.trace_fd is not None:
            os.write(self.trace_fd, f"t{index} {text}\n".encode())

    def pick(self, rng, slots):
        box = slots[rng.randrange(len(slots))]
        return box

    def pick_obj(self, rng, slots):
        box = self.pick(rng, slots)
        return None if box is None else box.obj

    def check_error(self, where, exc):
        """Sort an exception an operation raised: expected, or a failure."""
        name = type(exc).__name__
        if isinstance(exc, self.expected) and not any(
            w in str(exc) for w in LOST_WORDS
        ):
            self.errors[name] += 1
            return
        if type(exc) is ValueError and any(w in str(exc) for w in REFUSED_PAIRS):
            self.errors["ValueError (pair refused)"] += 1
            return
        if where == "copy" and isinstance(exc, FileExistsError):
            # Two copies into one new path: the second will not overwrite.
            self.errors["FileExistsError (copy target appeared)"] += 1
            return
        self.fail(f"{where}: unexpected {name}: {exc}")

    def unraisable_hook(self, info):
        exc = info.exc_value
        self.unraisable[type(exc).__name__] += 1
        if not isinstance(exc, self.expected):
            self.fail(f"unraisable {type(exc).__name__} in {info.object!r}: {exc}")

    # -- connections ------------------------------------------------------

    def target(self, rng):
        kinds = list(FILES) + [":memory:"] * 2
        if self.shared_cache:
            kinds.append("shared")
        return rng.choice(kinds)

    def open_connection(self, rng, kind):
        ab = self.ab
        if kind == "shared":
            flags = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE
            conn = ab.Connection(
                SHARED_URI.format(seed=self.seed), flags | ab.SQLITE_OPEN_URI
            )
        elif kind == ":memory:":
            conn = ab.Connection(":memory:")
        else:
            conn = ab.Connection(os.path.join(self.directory, kind))
        with self.every_conn_lock:
            self.every_conn.append((kind, weakref.ref(conn)))
        try:
            conn.execute("PRAGMA synchronous=off").fetchall()
            if kind in (":memory:", "shared"):
                self.fill_memory(conn)
            self.set_busy(rng, conn)
        except BaseException:
            conn.close(force=True)
            raise
        return conn

    def fill_memory(self, conn):
        conn.execute("BEGIN IMMEDIATE").fetchall()
        try:
            conn.execute(SCHEMA).fetchall()
            if conn.execute("SELECT n FROM meta").fetchall() == [(0,)]:
                conn.execute(FILL, (ROWS, PAD)).fetchall()
            conn.execute("COMMIT").fetchall()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK").fetchall()
            raise

    def set_busy(self, rng, conn):
        kind = rng.choice(["none", "timeout", "sleep", "reenter", "reenter", "raise"])
        if kind == "timeout":
            conn.set_busy_timeout(rng.choice([0, 5, 20, 100]))
        elif kind == "sleep":
            conn.set_busy_handler(lambda count: time.sleep(0.001) or count < 20)
        elif kind == "reenter":
            # The handler keeps its connection alive: a cycle via the handler.
            handler_seed = rng.random()

            def reenter(count, conn=conn):
                self.reenter(random.Random(handler_seed + count), conn)
                return count < 8

            conn.set_busy_handler(reenter)
        elif kind == "raise":

            def explode(count):
                if count >= 3:
                    raise HandlerError("busy handler gave up on purpose")
                return True

            conn.set_busy_handler(explode)

    def reenter(self, rng, own):
        """Inside a busy handler (the GIL taken back inside a SQLite call):
        call back into the library.  Anything expected is swallowed here;
        what escapes is reported by the waiting call."""
        action = rng.choice(
            ["own", "conn", "step", "finish", "close", "attrs", "fetch", "gc", "intr"]
        )
        try:
            if action == "own":
                own.get_autocommit()
            elif action == "conn":
                other = self.pick_obj(rng, self.conns)
                if other is not None:
                    other.execute("SELECT count(*) FROM t").fetchall()
            elif action in ("step", "finish", "close", "attrs"):
                b = self.pick_obj(rng, self.backups)
                if b is None:
                    return
                if action == "step":
                    b.step(1)
                elif action == "finish":
                    b.finish()
                elif action == "close":
                    b.close(force=True)
                else:
                    (b.remaining, b.page_count, b.done, repr(b), bool(b))
            elif action == "fetch":
                cur = self.pick_obj(rng, self.cursors)
                if cur is not None:
                    cur.fetchone()
            elif action == "gc":
                gc.collect()
            else:
                other = self.pick_obj(rng, self.conns)
                if other is not None:
                    other.interrupt()
        except self.expected as exc:
            self.errors["handler:" + type(exc).__name__] += 1

    # -- the operations -----------------------------------------------------

    def op_open(self, rng):
        slot = rng.randrange(len(self.conns))
        conn = self.open_connection(rng, self.target(rng))
        self.conns[slot] = Box(conn, rng.random() < 0.3)

    def op_close(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is not None:
            conn.close(force=rng.random() < 0.5)

    def op_drop_connection(self, rng):
        self.conns[rng.randrange(len(self.conns))] = None
        if rng.random() < 0.5:
            gc.collect()

    def op_write(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        which = rng.randrange(3)
        if which == 0:
            conn.execute(
                "INSERT INTO t(v, pad) VALUES (?, randomblob(?))",
                (rng.randrange(1000), rng.randrange(2000)),
            ).fetchall()
        elif which == 1:
            conn.execute(
                "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 2)"
            ).fetchall()
        else:
            conn.execute(
                "UPDATE t SET v = v + 1 WHERE id % 7 = ?", (rng.randrange(7),)
            ).fetchall()

    def op_transaction(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        try:
            with conn:
                for _ in range(rng.randrange(1, 4)):
                    conn.execute(
                        "INSERT INTO t(v, pad) VALUES (?, randomblob(100))",
                        (rng.randrange(1000),),
                    ).fetchall()
                if rng.random() < 0.3:
                    raise BodyError("roll the savepoint back")
        except BodyError:
            pass

    def op_held_transaction(self, rng):
        """A write transaction held open with the GIL free: others wait."""
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        conn.execute("BEGIN IMMEDIATE").fetchall()
        try:
            conn.execute(
                "INSERT INTO t(v) VALUES (?)", (rng.randrange(1000),)
            ).fetchall()
            time.sleep(rng.random() * 0.03)
            conn.execute("COMMIT").fetchall()
        finally:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK").fetchall()
            except self.expected:
                pass

    def op_long_query(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        n = rng.choice([10_000, 200_000, 1_000_000, 2_000_000])
        got = conn.execute(LONG_QUERY, (n,)).fetchall()
        if got != [(n,)]:
            self.fail(f"long query counted {got}, not {n}")

    def op_read(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        got = conn.execute(CONSISTENT).fetchall()
        if got != [(1,)]:
            self.fail(f"inconsistent database seen by {conn.filename!r}: {got}")

    def op_interrupt(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is not None:
            conn.interrupt()

    def op_set_busy(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is not None:
            self.set_busy(rng, conn)

    def op_page_size(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        size = rng.choice([1024, 4096, 8192])
        conn.execute(f"PRAGMA page_size={size}").fetchall()
        conn.execute("VACUUM").fetchall()

    def op_checkpoint(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is not None:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def op_misc(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        (conn.get_autocommit(), conn.changes(), conn.total_changes())
        (conn.in_transaction, conn.db_names(), conn.txn_state(), conn.readonly("main"))
        (conn.filename, conn.open_flags, conn.last_insert_rowid())

    def two_connections(self, rng):
        """A destination and a source on different databases, or None."""
        boxes = [b for b in self.conns if b is not None]
        rng.shuffle(boxes)
        for dest in boxes:
            for src in boxes:
                if src.obj is not dest.obj and src.obj.filename != dest.obj.filename:
                    return dest.obj, src.obj
                if src.obj is not dest.obj and dest.obj.filename == "":
                    return dest.obj, src.obj  # private in-memory databases
        return None

    def op_backup(self, rng):
        pair = self.two_connections(rng)
        if pair is None:
            return
        dest, src = pair
        b = dest.backup("main", src, "main")
        self.backups[rng.randrange(len(self.backups))] = Box(
            b, rng.random() < 0.4, dest=weakref.ref(dest), source=weakref.ref(src)
        )

    def op_close_end(self, rng):
        """close() a backup's destination (force) or source: the backup is
        finished from inside Connection.close(), which releases the GIL."""
        box = self.pick(rng, self.backups)
        if box is None:
            return
        side = rng.choice(["dest", "source"])
        conn = box.info[side]()
        box = None
        if conn is not None:
            conn.close(force=side == "dest" or rng.random() < 0.5)

    def op_step(self, rng):
        b = self.pick_obj(rng, self.backups)
        if b is not None and b.step(rng.choice([-1, 0, 1, 1, 3, 10])):
            self.steps_done += 1

    def op_finish(self, rng):
        b = self.pick_obj(rng, self.backups)
        if b is not None:
            b.finish()

    def op_close_backup(self, rng):
        b = self.pick_obj(rng, self.backups)
        if b is not None:
            b.close(force=rng.random() < 0.5)

    def op_exit_backup(self, rng):
        b = self.pick_obj(rng, self.backups)
        if b is None:
            return
        if rng.random() < 0.5:
            b.__exit__(None, None, None)
        else:
            err = BodyError("body")
            if b.__exit__(BodyError, err, None) is not False:
                self.fail("Backup.__exit__ swallowed the body's exception")

    def op_backup_attributes(self, rng):
        b = self.pick_obj(rng, self.backups)
        if b is None:
            return
        values = (b.remaining, b.page_count, b.pagecount, b.restarts)
        if not all(isinstance(v, int) and v >= 0 for v in values):
            self.fail(f"bad backup attributes {values}")
        (b.done, repr(b), bool(b))

    def op_drop_backup(self, rng):
        self.backups[rng.randrange(len(self.backups))] = None
        if rng.random() < 0.5:
            gc.collect()

    def op_with_backup(self, rng):
        pair = self.two_connections(rng)
        if pair is None:
            return
        dest, src = pair
        try:
            with dest.backup("main", src, "main") as b:
                for _ in range(rng.randrange(1, 6)):
                    if b.step(rng.choice([1, 5, -1])):
                        break
                if rng.random() < 0.3:
                    raise BodyError("leave the with-block by an exception")
        except BodyError:
            pass

    def op_copy(self, rng):
        ab = self.ab
        src = self.pick_obj(rng, self.conns)
        if src is None:
            return
        target = os.path.join(self.directory, f"copy{rng.randrange(2)}.db")
        if rng.random() < 0.5:
            pair = self.two_connections(rng)
            if pair is not None:
                target, src = pair

        def progress(status, remaining, total):
            if rng.random() < 0.1:
                self.reenter(rng, src)

        ab.copy(
            src,
            target,
            pages=rng.choice([-1, 5]),
            sleep=0.005,
            timeout=0.3,
            snapshot=rng.choice(["auto", True, False]),
            progress=progress,
        )
        self.copies += 1

    def op_cursor(self, rng):
        conn = self.pick_obj(rng, self.conns)
        if conn is None:
            return
        if rng.random() < 0.3:
            cur = conn.cursor()
        else:
            cur = conn.execute("SELECT id, v, pad FROM t ORDER BY id")
        self.cursors[rng.randrange(len(self.cursors))] = Box(cur, rng.random() < 0.3)

    def op_fetch(self, rng):
        cur = self.pick_obj(rng, self.cursors)
        if cur is None:
            return
        for _ in range(rng.randrange(1, 20)):
            row = cur.fetchone()
            if row is None:
                break
            # (id, v, pad) or (1, 2, 3); a re-execute by another thread may
            # have put the cursor on the long query's (count,) row.
            if not (isinstance(row, tuple) and len(row) in (1, 3)):
                self.fail(f"bad row {row!r}")

    def op_cursor_execute(self, rng):
        cur = self.pick_obj(rng, self.cursors)
        if cur is None:
            return
        if rng.random() < 0.5:
            cur.execute("SELECT id, v, pad FROM t WHERE id > ?", (rng.randrange(100),))
        else:
            cur.execute(LONG_QUERY + "; SELECT 1, 2, 3", (rng.choice([1000, 300_000]),))
            cur.fetchall()

    def op_cursor_close(self, rng):
        cur = self.pick_obj(rng, self.cursors)
        if cur is not None:
            cur.close(force=rng.random() < 0.5)

    def op_drop_cursor(self, rng):
        self.cursors[rng.randrange(len(self.cursors))] = None
        if rng.random() < 0.3:
            gc.collect()

    def op_gc(self, rng):
        gc.collect()

    WEIGHTS = {
        "open": 6,
        "close": 2,
        "drop_connection": 2,
        "write": 6,
        "transaction": 3,
        "held_transaction": 2,
        "long_query": 3,
        "read": 4,
        "interrupt": 2,
        "set_busy": 1,
        "page_size": 1,
        "checkpoint": 1,
        "misc": 2,
        "backup": 6,
        "step": 10,
        "close_end": 3,
        "finish": 3,
        "close_backup": 2,
        "exit_backup": 1,
        "backup_attributes": 2,
        "drop_backup": 3,
        "with_backup": 2,
        "copy": 1,
        "cursor": 4,
        "fetch": 4,
        "cursor_execute": 2,
        "cursor_close": 2,
        "drop_cursor": 2,
        "gc": 1,
    }

    # -- running --------------------------------------------------------

    def worker(self, index):
        rng = random.Random(f"{self.seed}:{index}")
        names = list(self.WEIGHTS)
        weights = [self.WEIGHTS[n] for n in names]
        while not self.stop.is_set():
            name = rng.choices(names, weights)[0]
            self.trace(index, name)
            self.ops[name] += 1
            try:
                getattr(self, "op_" + name)(rng)
            except Exception as exc:  # noqa: BLE001 - sorted by check_error
                self.check_error(name, exc)

    def run(self):
        """Run the threads for the given seconds, then check the invariants.
        Returns a summary dict; raises InvariantError on failure."""
        build_files(self.directory)
        hook, sys.unraisablehook = sys.unraisablehook, self.unraisable_hook
        try:
            threads = [
                threading.Thread(target=self.worker, args=(i,), daemon=True)
                for i in range(self.nthreads)
            ]
            for thread in threads:
                thread.start()
            time.sleep(self.seconds)
            self.stop.set()
            deadline = time.monotonic() + STOP_GRACE
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                for box in list(self.conns):
                    if box is not None:
                        try:
                            box.obj.interrupt()
                        except self.expected:
                            pass
                for thread in threads:
                    thread.join(0.05)
            stuck = [i for i, t in enumerate(threads) if t.is_alive()]
            if stuck:
                self.fail(
                    f"HANG: threads {stuck} did not stop {STOP_GRACE} s after the end"
                )
                faulthandler.dump_traceback(all_threads=True)
                for line in native_stacks():
                    print("  native " + line, file=sys.stderr)
            else:
                self.check_end()
        finally:
            sys.unraisablehook = hook
        summary = self.summary()
        if self.failures:
            raise InvariantError("\n".join(self.failures))
        return summary

    def check_end(self):
        """Finish or collect every backup, then check the invariants."""
        rng = random.Random(f"{self.seed}:end")
        for i, box in enumerate(self.backups):
            if box is not None and rng.random() < 0.5:
                try:
                    box.obj.close(force=True)
                except Exception as exc:  # noqa: BLE001
                    self.fail(f"close(force=True) of a backup at the end: {exc!r}")
            self.backups[i] = None
        self.cursors = [None] * len(self.cursors)
        box = None
        gc.collect()
        gc.collect()
        conns = []
        with self.every_conn_lock:
            for kind, ref in self.every_conn:
                conn = ref()
                if conn is not None:
                    conns.append((kind, conn))
        for kind, conn in conns:
            self.check_connection(kind, conn)
        self.conns = [None] * len(self.conns)
        conns = conn = None
        gc.collect()
        for name in list(FILES) + ["copy0.db", "copy1.db"]:
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                self.check_file(path)

    def check_connection(self, kind, conn):
        ab = self.ab
        try:
            conn.get_autocommit()
        except ab.ConnectionClosedError:
            return  # closed by an operation: fine
        except Exception as exc:  # noqa: BLE001
            self.fail(
                f"{kind}: still locked or in use after every backup ended: {exc!r}"
            )
            return
        try:
            conn.set_busy_timeout(2000)
            if conn.in_transaction:
                conn.execute("ROLLBACK").fetchall()
            if kind in (":memory:", "shared"):
                self.check_consistent(kind, conn.execute)
            conn.close()
        except Exception as exc:  # noqa: BLE001
            self.fail(f"{kind}: checking and closing it at the end: {exc!r}")
            try:
                conn.close(force=True)
            except Exception as exc2:  # noqa: BLE001
                self.fail(f"{kind}: close(force=True) at the end: {exc2!r}")

    def check_consistent(self, what, execute):
        ok = execute("PRAGMA integrity_check").fetchall()
        if ok != [("ok",)]:
            self.fail(f"{what}: integrity_check {ok[:5]}")
            return
        got = execute(CONSISTENT).fetchall()
        if got != [(1,)]:
            self.fail(f"{what}: meta does not match t (a partial copy?): {got}")

    def check_file(self, path):
        name = os.path.basename(path)
        db = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            try:
                db.execute("BEGIN IMMEDIATE")
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self.fail(f"{name}: a lock is left once everything closed: {exc}")
                return
            try:
                if (
                    name.startswith("copy")
                    and not db.execute("SELECT count(*) FROM sqlite_master").fetchone()[
                        0
                    ]
                ):
                    return  # made by a copy() that failed: never written
                self.check_consistent(name, db.execute)
            except sqlite3.DatabaseError as exc:
                self.fail(f"{name}: {exc}")
        finally:
            db.close()

    def summary(self):
        return {
            "seed": self.seed,
            "seconds": self.seconds,
            "threads": self.nthreads,
            "ops": sum(self.ops.values()),
            "completed_steps": self.steps_done,
            "copies": self.copies,
            "errors": dict(self.errors.most_common()),
            "unraisable": dict(self.unraisable),
            "failures": self.failures,
        }

    def last_ops(self):
        return [f"thread {i}: " + " | ".join(log) for i, log in enumerate(self.logs)]


NATIVE = re.compile(
    r"sqlite3|src/\w+\.c|take_gil|pthread_mutex|pthread_cond|futex|lll_lock"
)


def native_stacks(frames=10):
    """The C stacks of this process's threads, by gdb if there is one: the
    frames in SQLite, in our extension and in lock waits."""
    # Into a file, not a pipe: gdb stops this process, which then could not
    # drain a full pipe, and gdb would wait on it for ever.
    with tempfile.TemporaryFile("w+", errors="replace") as f:
        try:
            subprocess.run(
                [
                    "gdb",
                    "-p",
                    str(os.getpid()),
                    "-batch",
                    "-nx",
                    "-ex",
                    "thread apply all bt 30",
                ],
                stdout=f,
                stderr=subprocess.DEVNULL,
                timeout=30,
                env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
            )
        except (OSError, subprocess.SubprocessError):
            return []
        f.seek(0)
        out = f.read()
    lines, left = [], 0
    for line in out.splitlines():
        if line.startswith("Thread "):
            lines.append(line)
            left = frames
        elif left and line.startswith("#") and NATIVE.search(line):
            lines.append("  " + re.sub(r" \(.*?\) at ", " at ", line)[:160])
            left -= 1
    return lines


def run_seed(
    seed, seconds=3.0, threads=4, directory=None, shared_cache=True, trace=None
):
    """Run one seed in this process; returns the summary dict or raises
    InvariantError."""
    import apsw_backup

    with tempfile.TemporaryDirectory(prefix="stress-", dir=directory) as d:
        stress = Stress(apsw_backup, seed, seconds, threads, d, shared_cache)
        if trace:
            stress.trace_fd = os.open(trace, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            return stress.run()
        except InvariantError:
            for line in stress.last_ops():
                print("  last ops", line, file=sys.stderr)
            raise
        finally:
            if stress.trace_fd is not None:
                os.close(stress.trace_fd)


# -- the driver: one subprocess per seed -------------------------------------

SANITIZER = re.compile(
    r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|"
    r"WARNING: ThreadSanitizer|SUMMARY: (Address|Undefined)"
)
FRAME = re.compile(r"^\s+#\d+ 0x[0-9a-f]+ in \S+")


def sanitizer_lines(text, frames=8):
    """The report's headline, summary and first frames of each stack."""
    out, in_stack = [], 0
    for line in text.splitlines():
        if SANITIZER.search(line) or line.startswith(("READ of", "WRITE of")):
            out.append(line.strip())
            in_stack = frames
        elif in_stack and FRAME.match(line):
            out.append("  " + line.strip())
            in_stack -= 1
        elif re.match(r"^(freed by|previously allocated by) thread", line):
            out.append(line.strip())
            in_stack = frames
    return out


def run_seed_subprocess(seed, seconds, threads, timeout, shared_cache=True, env=None):
    """Run one seed in a child process.  Returns (status, lines, summary):
    status 'ok', 'crash', 'sanitizer', 'hang' or 'fail'."""
    with tempfile.TemporaryDirectory(prefix="stress-driver-") as d:
        trace = os.path.join(d, "trace")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--seed",
            str(seed),
            "--seconds",
            str(seconds),
            "--threads",
            str(threads),
            "--trace",
            trace,
            "--watchdog",
            str(timeout - 5),
        ]
        if not shared_cache:
            cmd.append("--no-shared-cache")
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=timeout,
                env=env,
                cwd=d,
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if exc.stdout else ""
            err = exc.stderr.decode(errors="replace") if exc.stderr else ""
            rc = None
        summary = None
        for line in out.splitlines():
            if line.startswith("STRESS-RESULT "):
                summary = json.loads(line[len("STRESS-RESULT ") :])
        lines = sanitizer_lines(err)
        if rc is None or "Timeout (" in err or "FAIL: HANG" in err:
            status = "hang"
        elif lines:
            status = "sanitizer"
        elif rc < 0:
            status = "crash"
            lines = [f"killed by {signal.Signals(-rc).name}"]
        elif rc != 0 or summary is None:
            status = "fail"
        else:
            status = "ok"
        if status != "ok":
            errlines = err.splitlines()
            lines += [ln for ln in errlines if ln.startswith("FAIL")]
            lines += [ln for ln in errlines if ln.startswith(("  native", "  last"))]
            if status in ("hang", "crash", "fail"):
                lines += faulthandler_lines(err)
            if os.path.exists(trace):
                with open(trace, errors="replace") as f:
                    tail = f.read().splitlines()[-16:]
                lines += ["last operations started: " + ", ".join(tail)]
            if status == "fail" and not any(ln.startswith("FAIL") for ln in lines):
                lines += err.splitlines()[-20:]
        return status, lines, summary


def faulthandler_lines(text, limit=40):
    """Python stacks of every thread as faulthandler printed them."""
    out = []
    for line in text.splitlines():
        if line.startswith(
            ("Thread 0x", "Current thread", "Timeout (", "Fatal Python")
        ) or (line.startswith("  File ") and len(out) < limit):
            out.append(line)
    return out[:limit]


def drive(seeds, seconds, threads, timeout, budget=None, shared_cache=True, out=None):
    """Run seeds (an iterable) one subprocess each, printing a line per
    seed; with a budget, stop starting seeds once it is spent.  Returns
    (runs, failed) where failed lists (seed, status, lines)."""
    out = out or sys.stdout
    start = time.monotonic()
    runs, failed = 0, []
    for seed in seeds:
        if budget is not None and time.monotonic() - start + seconds > budget:
            break
        t0 = time.monotonic()
        status, lines, summary = run_seed_subprocess(
            seed, seconds, threads, timeout, shared_cache
        )
        runs += 1
        took = time.monotonic() - t0
        if status == "ok":
            errs = sum(summary["errors"].values())
            print(
                f"seed {seed}: ok ({took:.1f} s, {summary['ops']} ops, {errs} expected "
                f"errors, {summary['completed_steps']} completed copies)",
                file=out,
                flush=True,
            )
        else:
            failed.append((seed, status, lines))
            print(f"seed {seed}: {status.upper()} ({took:.1f} s)", file=out, flush=True)
            for line in lines:
                print("    " + line, file=out, flush=True)
    return runs, failed


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            seeds.extend(range(int(a), int(b) + 1))
        else:
            seeds.append(int(part))
    return seeds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, help="run this one seed in this process")
    p.add_argument("--seeds", help="seeds to run, one subprocess each: 0-9,12")
    p.add_argument("--budget", type=float, help="run seeds for this many seconds")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=4.0, help="per seed")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--timeout", type=float, help="per seed subprocess")
    p.add_argument("--no-shared-cache", action="store_true")
    p.add_argument("--trace", help=argparse.SUPPRESS)
    p.add_argument("--watchdog", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shared = not args.no_shared_cache

    if args.seed is not None:
        if "asan" not in os.environ.get("LD_PRELOAD", ""):
            # Python stacks on a fatal signal; under ASan its own report
            # (C stacks) is worth more, and chaining would muddle it.
            faulthandler.enable()
        faulthandler.dump_traceback_later(
            args.watchdog or args.seconds * 3 + 60, exit=True
        )
        try:
            summary = run_seed(
                args.seed,
                args.seconds,
                args.threads,
                shared_cache=shared,
                trace=args.trace,
            )
        except InvariantError as exc:
            for line in str(exc).splitlines():
                print("FAIL: " + line, file=sys.stderr)
            return 1
        finally:
            faulthandler.cancel_dump_traceback_later()
        print("STRESS-RESULT " + json.dumps(summary))
        return 0

    timeout = args.timeout or args.seconds * 3 + 60
    if args.seeds:
        seeds = parse_seeds(args.seeds)
    else:
        seeds = iter(range(args.first_seed, 2**31))
        if args.budget is None:
            p.error("give --seed, --seeds or --budget")
    start = time.monotonic()
    runs, failed = drive(
        seeds, args.seconds, args.threads, timeout, args.budget, shared
    )
    took = time.monotonic() - start
    print(
        f"stress: {runs} seeds x {args.seconds:g} s, {args.threads} threads, "
        f"{took:.0f} s in all: {len(failed)} failed"
        + (": " + ", ".join(f"{s} ({st})" for s, st, _ in failed) if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
