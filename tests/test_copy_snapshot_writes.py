"""No write to the source is lost to copy()'s snapshot (issue 10 defect 3,
SPEC 4.1).

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
import threading
import time

import pytest
from copy_helpers import make_source, query

import apsw_backup
from apsw_backup import copy

OK, DONE, BUSY = apsw_backup.SQLITE_OK, apsw_backup.SQLITE_DONE, apsw_backup.SQLITE_BUSY
BOUND = 20


class OtherWriter:
    """Another connection committing every 2 ms, so the copy restarts and
    snapshot='auto' takes its snapshot."""

    def __init__(self, path):
        self._path = str(path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        db = sqlite3.connect(self._path, timeout=BOUND, isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")
        try:
            while not self._stop.wait(0.002):
                db.execute("INSERT INTO w(at) VALUES (-1)")
        finally:
            db.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(BOUND)
        assert not self._thread.is_alive()


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
    recorded, refused = [], []
    stop = threading.Event()

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
                else:
                    recorded.append(n)
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
            time.sleep(0.05)  # some writes after the copy too
            stop.set()
            thread.join(BOUND)
        assert not thread.is_alive()
        assert src.get_autocommit()
    finally:
        stop.set()
        src.close()

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
