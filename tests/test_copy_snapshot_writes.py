"""No write to the source is lost to copy()'s snapshot (docs/command-line.md).

copy() used to begin its snapshot with BEGIN on the caller's source
connection and end it with ROLLBACK, discarding whatever the application
wrote through that connection meanwhile.  Now the snapshot is only ever a
read transaction on a read-only connection of copy()'s own, so the caller's
connection is never put into a transaction.

Each test writes a numbered row at each chance -- from the progress callback
at every status (SQLITE_OK, a locked status, SQLITE_DONE), or from another
thread all along -- and records the writes that returned normally.  Every
recorded write must be in the source afterwards, the source connection must
be in autocommit mode, and the copy must be sound.  A write may fail with a
clear error (in rollback-journal mode the snapshot's read lock makes a
writer wait, and one in the progress callback cannot wait), but never
return and then vanish.
"""

import sqlite3
import sys
import threading
import time

import pytest
from copy_helpers import make_source, query

import apsw_backup
from apsw_backup import copy

copy_module = sys.modules["apsw_backup.copy"]

OK, DONE, BUSY = apsw_backup.SQLITE_OK, apsw_backup.SQLITE_DONE, apsw_backup.SQLITE_BUSY
BOUND = 20


class OtherWriter:
    """Another connection committing every 2 ms, so the copy restarts and
    snapshot='auto' takes its snapshot."""

    def __init__(self, path):
        self._path = str(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error = None

    def _run(self):
        db = sqlite3.connect(self._path, timeout=BOUND, isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")
        try:
            while not self._stop.wait(0.002):
                db.execute("INSERT INTO w(at) VALUES (-1)")
        except sqlite3.Error as exc:
            # With a busy timeout far longer than any copy here, a locked
            # error means a lock was held for BOUND seconds: a deadlock.
            self.error = exc
        finally:
            db.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(BOUND)
        assert not self._thread.is_alive()
        assert self.error is None, f"the other writer failed: {self.error!r}"


def written(path):
    return {row[0] for row in query(path, "SELECT n FROM w WHERE n IS NOT NULL")}


def run_copy(src, dest, snapshot, progress, journal):
    """copy() with settings that make 'auto' take its snapshot under a writer."""
    return copy(src, dest, pages=5, sleep=0.01, snapshot=snapshot, progress=progress)


@pytest.fixture(params=["delete", "wal"])
def journal(request):
    return request.param


@pytest.fixture
def live(tmp_path, journal):
    return make_source(tmp_path / "live.db", rows=800, blob=1000, journal=journal)


def assert_sound_copy(dest):
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    assert query(dest, "SELECT count(*) FROM t") == [(800,)]


@pytest.mark.parametrize("snapshot", [True, "auto"])
@pytest.mark.parametrize("source_kind", ["connection", "path"])
@pytest.mark.parametrize("status", ["ok", "done", "every"])
def test_progress_writes_through_source_are_never_lost(
    live, tmp_path, journal, snapshot, source_kind, status
):
    dest = tmp_path / "dest.db"
    src = apsw_backup.Connection(str(live))
    # A path source is copy()'s own connection: the application's nearest
    # equivalent is a connection of its own to the same file.
    writer = src
    src.set_busy_timeout(50)
    recorded, failed, seen = [], [], []

    def progress(code, remaining, total):
        seen.append(code)
        time.sleep(0.002)  # a pass overlaps the other writer's commits
        wanted = (
            status == "every"
            or (status == "ok" and code == OK)
            or (status == "done" and code == DONE)
        )
        if not wanted:
            return
        n = len(recorded) + len(failed) + 1
        # Blocked by the snapshot's read lock, a write here would wait for
        # ever; by SQLITE_DONE only the other writer can be in the way.
        writer.set_busy_timeout(BOUND * 1000 if code == DONE else 5)
        try:
            writer.execute("INSERT INTO w(n) VALUES (?)", (n,))
        except apsw_backup.BusyError:
            failed.append(n)  # told: the snapshot's read lock (rollback journal)
            return
        recorded.append(n)

    outcome = None
    try:
        with OtherWriter(live):
            try:
                result = run_copy(
                    src if source_kind == "connection" else live,
                    dest,
                    snapshot,
                    progress,
                    journal,
                )
            except apsw_backup.BusyError as exc:
                outcome = exc
        assert src.get_autocommit()
        assert src.txn_state("main") == apsw_backup.SQLITE_TXN_NONE
    finally:
        src.close()

    assert set(recorded) <= written(live)
    assert not set(failed) & written(live)
    assert recorded or failed
    assert seen[-1] == DONE
    assert outcome is None, outcome
    assert result.snapshot or (snapshot == "auto" and result.restarts < 3)
    if status == "done":
        assert recorded, (failed, seen[-5:])  # the snapshot ended by SQLITE_DONE
    if journal == "wal":
        assert not failed  # WAL writers never wait for a reader
    assert_sound_copy(dest)


def test_issue_example_row_written_at_done_survives(tmp_path):
    src = apsw_backup.Connection(str(tmp_path / "src.db"))
    src.execute("CREATE TABLE t(x)")
    src.execute("INSERT INTO t VALUES (1)")

    def progress(status, remaining, total):
        if status == DONE:
            src.execute("INSERT INTO t VALUES (2)")

    copy(src, tmp_path / "dst.db", snapshot=True, progress=progress)
    src.close()
    assert query(tmp_path / "src.db", "SELECT x FROM t") == [(1,), (2,)]


@pytest.mark.parametrize("snapshot", [True, "auto"])
@pytest.mark.parametrize("source_kind", ["connection", "path"])
def test_writes_from_another_thread_during_copy_are_never_lost(
    live, tmp_path, journal, snapshot, source_kind
):
    dest = tmp_path / "dest.db"
    src = apsw_backup.Connection(str(live))
    src.set_busy_timeout(BOUND * 1000)
    thread_conn = src if source_kind == "connection" else None
    recorded, refused, failed = [], [], []
    stop, copied, wrote_after_copy = (threading.Event() for _ in range(3))

    def write_all_along():
        conn = thread_conn or apsw_backup.Connection(str(live))
        conn.set_busy_timeout(BOUND * 1000)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                try:
                    conn.execute("INSERT INTO w(n) VALUES (?)", (n,))
                except apsw_backup.ThreadingViolationError:
                    refused.append(n)  # the source was busy in a step: told
                except apsw_backup.Error as exc:
                    # BusyError after a BOUND-second busy timeout: copy()
                    # held the lock this write waited for while it waited
                    # for this call (fixed: a deadlock, 1 run in 3).
                    failed.append(exc)
                    return
                else:
                    recorded.append(n)
                    if copied.is_set():
                        wrote_after_copy.set()
                time.sleep(0.001)
        finally:
            if conn is not thread_conn:
                conn.close()

    thread = threading.Thread(target=write_all_along, daemon=True)
    try:
        with OtherWriter(live):
            thread.start()
            result = copy(
                src if source_kind == "connection" else live,
                dest,
                pages=5,
                sleep=0.01,
                snapshot=snapshot,
                progress=lambda *a: time.sleep(0.002),
            )
            copied.set()  # some writes after the copy too:
            assert wrote_after_copy.wait(BOUND) or failed, "no write after the copy"
            stop.set()
            thread.join(BOUND)
        assert not thread.is_alive()
        assert src.get_autocommit()
    finally:
        stop.set()
        src.close()

    assert failed == []
    assert recorded
    assert set(recorded) <= written(live)
    assert not set(refused) & written(live)
    assert result.snapshot or (snapshot == "auto" and result.restarts < 3)
    assert_sound_copy(dest)


def test_caller_connection_is_never_in_a_transaction_during_a_snapshot_copy(
    tmp_path,
):
    source = make_source(tmp_path / "s.db", rows=300)
    src = apsw_backup.Connection(str(source))
    states = []
    try:
        result = copy(
            src,
            tmp_path / "dest.db",
            pages=3,
            snapshot=True,
            progress=lambda *a: states.append(src.get_autocommit()),
        )
    finally:
        src.close()
    assert result.snapshot
    assert result.restarts == 0  # held from the first step
    assert states
    assert all(states)


@pytest.mark.parametrize("snapshot", [True, "auto"])
def test_a_write_on_the_callers_connection_waiting_for_the_snapshot_is_no_deadlock(
    tmp_path, monkeypatch, snapshot
):
    """Another thread's write on the caller's source connection, begun just
    as copy() takes its snapshot, waits for the snapshot's read lock to
    commit.  copy() must not wait for that call meanwhile: it used to finish
    the Backup reading through that connection only after taking the
    snapshot, and finishing waits for the connection's call -- each waited
    for the other until the write's busy timeout (BusyError)."""
    live = make_source(tmp_path / "live.db", rows=300, journal="delete")
    src = apsw_backup.Connection(str(live))
    src.set_busy_timeout(3000)
    outcome = {}

    def write():
        try:
            src.execute("INSERT INTO w(n) VALUES (42)")
            outcome["written"] = True
        except apsw_backup.Error as exc:
            outcome["error"] = exc

    writer = threading.Thread(target=write, daemon=True)
    real = copy_module._SourceSide.take_snapshot

    def take_snapshot_then_write(self):
        real(self)
        if self.snapshot and not outcome.get("started"):
            outcome["started"] = True
            writer.start()
            deadline = time.monotonic() + BOUND
            while time.monotonic() < deadline:  # until the write is waiting
                try:
                    src.get_autocommit()
                except apsw_backup.ThreadingViolationError:
                    break
                time.sleep(0.001)
            time.sleep(0.05)  # at its commit, for the snapshot's lock

    monkeypatch.setattr(
        copy_module._SourceSide, "take_snapshot", take_snapshot_then_write
    )
    # "auto" takes its snapshot after restarts: a first step, then one by
    # another connection's commit, make the Backup on `src` copy pages first.
    progress_calls = []

    def progress(status, remaining, total):
        progress_calls.append(status)
        if snapshot == "auto" and not outcome.get("started"):
            other = sqlite3.connect(str(live), isolation_level=None)
            other.execute("INSERT INTO w(n) VALUES (-1)")
            other.close()

    try:
        started = time.monotonic()
        result = copy(
            src,
            tmp_path / "dest.db",
            pages=5,
            snapshot=snapshot,
            sleep=0.01,
            progress=progress,
        )
        writer.join(BOUND)
        elapsed = time.monotonic() - started
    finally:
        src.close()
    assert outcome.get("started") and result.snapshot
    assert not writer.is_alive()
    assert outcome.get("error") is None, outcome
    assert outcome.get("written")
    assert elapsed < 2.5, (
        f"the write waited for copy() and copy() for it: {elapsed:.1f} s"
    )
    assert query(live, "SELECT count(*) FROM w WHERE n = 42") == [(1,)]
    assert query(tmp_path / "dest.db", "PRAGMA integrity_check") == [("ok",)]
    assert query(tmp_path / "dest.db", "SELECT count(*) FROM t") == [(300,)]
