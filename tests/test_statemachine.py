"""A hypothesis state machine over three connections and their backups
(docs/api.md#connection, docs/api.md#backup, docs/api.md#errors).

Connections: slot 0 and slot 2 are files in a temporary directory, slot 1 is
":memory:".  Rules write through a connection (create/drop table, insert,
delete), BEGIN/COMMIT/ROLLBACK, start a backup between two connections, step
it by -1, 0, 1, 2 or 5 pages, end it (finish, close(force), a with-block,
del + gc.collect()), close a connection (forced or not) and reopen it.

The model holds, per connection, the tables and rows it reads through itself
(``current``) and what is committed (``committed``), and per backup whether
it is finished, complete, writing (it has taken the destination's write
lock) and whether its last step was BUSY (then finishing it reports
BusyError).  Every call is checked against the exact exception class the
model predicts, so only documented classes (docs/api.md#backup, docs/api.md#errors) can pass, and no
message may be empty or say "not an error".  After every rule:

- a destination is locked (ThreadingViolationError naming the unfinished
  backup) exactly while its backup is unfinished, and usable once the backup
  is finished or collected;
- every open, unlocked connection reads what the model says: a completed
  backup replaced the destination's content by the source's as it was at
  completion; an unfinished one that was finished, closed or collected left
  the destination as it was before the backup started;
- finished backups are false, with remaining == page_count == 0.

Examples in CI: MAX_EXAMPLES (200) sequences of up to STEPS (30) rules.
"""

import gc
import os
import shutil
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import apsw_backup

pytestmark = pytest.mark.heavy  # too slow for valgrind

MAX_EXAMPLES = 200
STEPS = 30

SLOTS = (("a.db", False), (":memory:", True), ("c.db", False))
TABLES = ("t", "u")
PAD = 1500  # bytes of zeroblob per row: about two rows a 4 KiB page
LOCK_WORDS = ("unfinished backup", "finish")


def check_message(exc):
    message = str(exc)
    assert message, f"{type(exc).__name__} has an empty message"
    assert "not an error" not in message, message


def call(expected, func, *args):
    """func(*args) must succeed (expected None) or raise exactly expected.
    Returns (result, exception)."""
    try:
        result = func(*args)
    except Exception as exc:
        if expected is None or type(exc) is not expected:
            want = "success" if expected is None else expected.__name__
            raise AssertionError(
                f"{func.__name__}{args!r}: expected {want}, got {exc!r}"
            ) from exc
        check_message(exc)
        return None, exc
    if expected is not None:
        raise AssertionError(
            f"{func.__name__}{args!r}: expected {expected.__name__}, got {result!r}"
        )
    return result, None


def run_sql(conn, sql, bindings=None):
    return conn.execute(sql, bindings).fetchall()


def read_content(conn):
    names = run_sql(
        conn, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    )
    return {
        name: sorted(run_sql(conn, f'SELECT x, pad FROM "{name}"')) for (name,) in names
    }


class Slot:
    def __init__(self, directory, name, memory):
        self.memory = memory
        self.filename = name if memory else os.path.join(directory, name)
        self.conn = None  # kept after closing, to check calls on it
        self.is_open = False
        self.committed = {}
        self.current = {}
        self.open()

    def open(self):
        self.conn = apsw_backup.Connection(self.filename)
        self.is_open = True
        if not self.memory:
            run_sql(self.conn, "PRAGMA synchronous=OFF")
        if self.memory:
            self.committed = {}
        self.current = dict(self.committed)

    def closed(self):
        self.is_open = False
        self.current = dict(self.committed)


class Record:
    """A Backup and what the model knows about it."""

    def __init__(self, backup, dest, source):
        self.backup = backup
        self.dest = dest  # Slot
        self.source = source  # Slot
        self.dest_conn = dest.conn
        self.source_conn = source.conn
        self.finished = False
        self.done = False
        self.writing = False  # holds the destination's write transaction
        self.last_busy = False

    def state(self):
        if self.finished:
            return "finished"
        return "complete" if self.done else "unfinished"

    def finish_error(self):
        """What sqlite3_backup_finish reports: the last step's BUSY."""
        if not self.finished and self.last_busy and not self.done:
            return apsw_backup.BusyError
        return None


class BackupMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="apsw_backup_sm_")
        self.slots = [Slot(self.directory, name, memory) for name, memory in SLOTS]
        self.records = []
        self.unraisable = []
        self.saved_hook = sys.unraisablehook
        sys.unraisablehook = self.unraisable.append
        # gc.collect() in a rule then only walks objects made during this
        # example, not hypothesis's whole heap (a hundredfold faster).
        gc.freeze()

    def teardown(self):
        for slot in self.slots:
            slot.conn.close(force=True)  # finishes every backup, silently
        self.records.clear()
        sys.unraisablehook = self.saved_hook
        gc.unfreeze()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- model helpers ------------------------------------------------------

    def unfinished(self):
        return [r for r in self.records if not r.finished]

    def locking(self, slot):
        """The unfinished backup writing into slot's connection, if any."""
        for record in self.unfinished():
            if record.dest_conn is slot.conn:
                return record
        return None

    def conn_error(self, slot):
        """The error any use of slot's connection gets, or None."""
        if not slot.is_open:
            return apsw_backup.ConnectionClosedError
        if self.locking(slot) is not None:
            return apsw_backup.DestinationLockedError
        return None

    def source_busy(self, slot):
        """A step reading from slot is BUSY when slot's connection has a
        write transaction: its own, or that of a backup writing into it."""
        record = self.locking(slot)
        if record is not None:
            return record.writing
        return slot.conn.txn_state("main") == apsw_backup.SQLITE_TXN_WRITE

    def complete(self, record):
        event("a backup completed")
        record.done = True
        record.writing = False
        snapshot = dict(record.source.current)
        record.dest.current = dict(snapshot)
        record.dest.committed = dict(snapshot)

    def finished(self, record):
        if not record.finished:
            event(f"finished a {record.state()} backup")
        record.finished = True
        record.writing = False

    def after_write(self, slot):
        if slot.conn.get_autocommit():
            slot.committed = dict(slot.current)

    # -- writes and transactions -------------------------------------------

    @initialize(rows=st.lists(st.integers(0, 12), min_size=3, max_size=3))
    def fill(self, rows):
        """Give each database a table of a few pages (or none) to copy."""
        for slot, count in zip(self.slots, rows, strict=False):
            if count:
                self.write(self.slots.index(slot), "t", "create", [0])
                self.write(self.slots.index(slot), "t", "insert", list(range(count)))

    @rule(
        index=st.integers(0, 2),
        table=st.sampled_from(TABLES),
        op=st.sampled_from(("create", "drop", "insert", "delete")),
        values=st.lists(st.integers(-5, 50), min_size=1, max_size=6),
    )
    def write(self, index, table, op, values):
        slot = self.slots[index]
        expected = self.conn_error(slot)
        exists = table in slot.current
        rows = list(slot.current.get(table, []))
        if op == "create":
            sql, bindings, ok = f"CREATE TABLE {table}(x, pad)", None, not exists
            new = []
        elif op == "drop":
            sql, bindings, ok = f"DROP TABLE {table}", None, exists
            new = None
        elif op == "insert":
            sql = f"INSERT INTO {table} VALUES " + ", ".join(
                [f"(?, zeroblob({PAD}))"] * len(values)
            )
            bindings, ok = values, exists
            new = sorted(rows + [(v, bytes(PAD)) for v in values])
        else:
            sql, bindings, ok = f"DELETE FROM {table} WHERE x % 2 = 0", None, exists
            new = [row for row in rows if row[0] % 2]
        if expected is None and not ok:
            expected = apsw_backup.SQLError
        _, exc = call(expected, run_sql, slot.conn, sql, bindings)
        if exc is None:
            if new is None:
                del slot.current[table]
            else:
                slot.current[table] = new
            self.after_write(slot)

    @rule(
        index=st.integers(0, 2),
        statement=st.sampled_from(("BEGIN", "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")),
    )
    def transaction(self, index, statement):
        slot = self.slots[index]
        expected = self.conn_error(slot)
        if expected is None:
            in_txn = not slot.conn.get_autocommit()
            if in_txn == statement.startswith("BEGIN"):
                expected = apsw_backup.SQLError
        _, exc = call(expected, run_sql, slot.conn, statement)
        if exc is None and statement == "COMMIT":
            slot.committed = dict(slot.current)
        elif exc is None and statement == "ROLLBACK":
            slot.current = dict(slot.committed)

    # -- backups ------------------------------------------------------------

    @rule(
        dest_index=st.integers(0, 2),
        offset=st.integers(1, 2),
        bad_name=st.sampled_from((None,) * 8 + ("dest", "source")),
    )
    def start_backup(self, dest_index, offset, bad_name):
        dest = self.slots[dest_index]
        source = self.slots[(dest_index + offset) % 3]
        dest_name = "nosuch" if bad_name == "dest" else "main"
        source_name = "nosuch" if bad_name == "source" else "main"
        # docs/api.md#backup, in order: destination closed, source closed, destination
        # busy with a backup (or the source locked as one's destination),
        # then sqlite3_backup_init's own refusals.
        if not dest.is_open or not source.is_open:
            expected = apsw_backup.ConnectionClosedError
        elif self.locking(dest) is not None or self.locking(source) is not None:
            expected = apsw_backup.DestinationLockedError
        elif bad_name is not None:
            expected = apsw_backup.SQLError
        elif not dest.conn.get_autocommit():
            # "destination database is in use": any open transaction, even a
            # BEGIN that has not read yet (docs/api.md#backup)
            expected = apsw_backup.SQLError
        else:
            expected = None
        backup, exc = call(
            expected, dest.conn.backup, dest_name, source.conn, source_name
        )
        event("backup(): " + (type(exc).__name__ if exc else "started"))
        if exc is not None:
            return
        assert backup and not backup.done
        assert (backup.remaining, backup.page_count) == (0, 0)
        self.records.append(Record(backup, dest, source))

    @rule(
        dest_index=st.integers(0, 2),
        offset=st.integers(1, 2),
        npages=st.sampled_from((-1, 0, 1, 2, 5)),
    )
    def start_and_step(self, dest_index, offset, npages):
        """backup() with valid names, then a first step: hypothesis picks
        rules evenly, and most interesting states need a backup under way."""
        count = len(self.records)
        self.start_backup(dest_index, offset, None)
        if len(self.records) > count:
            self.step(-1, npages)  # which < 0: the newest backup

    def pick(self, which):
        """Mostly an unfinished backup (which < 0 or none left: any)."""
        candidates = self.unfinished() if which >= 0 else []
        candidates = candidates or self.records
        return candidates[which % len(candidates)]

    @precondition(lambda self: self.records)
    @rule(which=st.integers(-3, 30), npages=st.sampled_from((-1, 0, 1, 2, 5)))
    def step(self, which, npages):
        record = self.pick(which)
        b = record.backup
        if record.finished:
            call(apsw_backup.ConnectionClosedError, b.step, npages)
            return
        if record.done:
            assert call(None, b.step, npages)[0] is True
            return
        if self.source_busy(record.source):
            call(apsw_backup.BusyError, b.step, npages)
            event("step BUSY: the source has a write transaction")
            record.last_busy = True
            assert b and not b.done
            return
        result, _ = call(None, b.step, npages)
        record.last_busy = False
        assert result is b.done
        assert b.remaining >= 0 and b.page_count >= 0
        if npages < 0:
            assert result is True
        if result:
            assert b.remaining == 0
            self.complete(record)
        else:
            assert b.remaining > 0
            record.writing = True

    @precondition(lambda self: self.records)
    @rule(which=st.integers(-3, 30), npages=st.sampled_from((0, 1, 2)))
    def step_small(self, which, npages):
        """Small steps again: hypothesis picks rules evenly, and most
        interesting states need a backup left part-way."""
        self.step(which, npages)

    @precondition(lambda self: self.records)
    @rule(
        which=st.integers(-3, 30),
        how=st.sampled_from(("finish", "close", "close-force", "with", "with-raise")),
    )
    def end_backup(self, which, how):
        record = self.pick(which)
        b = record.backup
        expected = record.finish_error()
        event(f"end_backup {how} of a {record.state()} backup")
        if how == "finish":
            call(expected, b.finish)
        elif how == "close":
            call(expected, b.close)
        elif how == "close-force":
            call(None, b.close, True)
        elif record.finished:
            call(apsw_backup.ConnectionClosedError, b.__enter__)
        elif how == "with":
            call(expected, self.with_block, b, None)
        else:
            # The body's exception comes out; a finish error is suppressed.
            call(KeyError, self.with_block, b, KeyError("body"))
        self.finished(record)
        assert not b
        assert (b.remaining, b.page_count) == (0, 0)
        assert b.done is record.done

    @staticmethod
    def with_block(backup, body_exc):
        with backup as entered:
            assert entered is backup
            if body_exc is not None:
                raise body_exc

    @precondition(lambda self: self.records)
    @rule(which=st.integers(-3, 30), in_cycle=st.booleans())
    def collect_backup(self, which, in_cycle):
        """del of the last reference frees the backup at once; one held by a
        reference cycle is freed by the collector (its tp_clear)."""
        record = self.pick(which)
        self.records.remove(record)
        expected = record.finish_error()
        if in_cycle:
            loop = [record.backup]
            loop.append(loop)
            del loop
        del record.backup
        gc.collect()
        event(f"collected a {record.state()} backup (in a cycle: {in_cycle})")
        seen, self.unraisable[:] = list(self.unraisable), []
        if expected is None:
            assert seen == [], [u.exc_value for u in seen]
        else:
            assert len(seen) == 1 and type(seen[0].exc_value) is expected, seen
            check_message(seen[0].exc_value)

    # -- closing and reopening ----------------------------------------------

    @rule(index=st.integers(0, 2), force=st.booleans(), reopen=st.booleans())
    def close_connection(self, index, force, reopen):
        slot = self.slots[index]
        conn = slot.conn
        if not slot.is_open:
            call(None, conn.close, force)  # idempotent
            return
        locker = self.locking(slot)
        sources = [r for r in self.unfinished() if r.source_conn is conn]
        if locker is not None and not force:
            call(apsw_backup.DestinationLockedError, conn.close, force)
            return
        errors = [r.finish_error() for r in sources if r.finish_error() is not None]
        expected = errors[0] if errors and not force else None
        _, exc = call(expected, conn.close, force)
        event(f"close(force={force}) of a source: {expected}" if sources else "close")
        if locker is not None:
            self.finished(locker)
        for record in sources:
            self.finished(record)
        if exc is None:
            slot.closed()
            if reopen:
                slot.open()

    @precondition(lambda self: not all(slot.is_open for slot in self.slots))
    @rule(which=st.integers(0, 2))
    def reopen(self, which):
        closed = [slot for slot in self.slots if not slot.is_open]
        closed[which % len(closed)].open()

    # -- invariants ----------------------------------------------------------

    @invariant()
    def backups_match_model(self):
        for record in self.records:
            b = record.backup
            assert bool(b) is not record.finished
            assert b.done is record.done
            if record.finished:
                assert (b.remaining, b.page_count) == (0, 0)

    @invariant()
    def destinations_locked_exactly_while_unfinished(self):
        for slot in self.slots:
            if not slot.is_open:
                continue
            if self.locking(slot) is not None:
                _, exc = call(
                    apsw_backup.DestinationLockedError, run_sql, slot.conn, "SELECT 1"
                )
                for word in LOCK_WORDS:
                    assert word in str(exc).lower(), str(exc)
            else:
                assert run_sql(slot.conn, "SELECT 1") == [(1,)]

    @invariant()
    def connections_read_the_model(self):
        for slot in self.slots:
            if not slot.is_open or self.locking(slot) is not None:
                continue
            conn = slot.conn
            # Reading inside a BEGIN that has not read yet would open a read
            # transaction and change what backup() may do next: only read
            # in autocommit mode or inside a write transaction.
            if (
                conn.get_autocommit()
                or conn.txn_state("main") == apsw_backup.SQLITE_TXN_WRITE
            ):
                assert read_content(conn) == slot.current
                assert run_sql(conn, "PRAGMA integrity_check") == [("ok",)]

    @invariant()
    def nothing_unraisable(self):
        assert self.unraisable == [], [u.exc_value for u in self.unraisable]


TestBackupStateMachine = BackupMachine.TestCase
# The model reads txn_state() to know when a step must be BUSY (the source's
# own write transaction): before SQLite 3.34 it cannot tell a read
# transaction from a write one (docs/testing.md, SQLite versions).
TestBackupStateMachine = pytest.mark.skipif(
    tuple(map(int, apsw_backup.sqlite_lib_version().split("."))) < (3, 34),
    reason="SQLite < 3.34: txn_state() cannot tell read from write",
)(TestBackupStateMachine)
TestBackupStateMachine.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
