"""A lock SQLite would report for ever (docs/api.md#errors-from-step): an
extended BUSY or LOCKED answer must not make a Backup answer it for ever,
nor copy() spin on it (the second half of this file).

sqlite3_backup_step() retries only the exact SQLITE_BUSY and SQLITE_LOCKED
codes; any other code -- SQLITE_BUSY_RECOVERY (261) while another connection
recovers the WAL, say -- is kept as the backup's error and returned by every
later step, even once the lock is long gone.  A loop that retries BusyError,
as the docs say it may, then spins for ever (copy() did, for 5 minutes).
Backup.step() therefore starts the copy again on a fresh sqlite3_backup:
BusyError with the extended code, still retryable, counted as a restart.

The recovery is played by a helper process that does what a connection
running WAL recovery does: it holds bytes 120..122 of the -shm file and
leaves the wal-index header invalid, so every reader must wait.
"""

import subprocess
import sys
import threading
import time

import pytest
from backup_helpers import build_file, dump
from copy_helpers import make_source, query

import apsw_backup
from apsw_backup import copy

BOUND = 20
SQLITE_BUSY_RECOVERY = apsw_backup.SQLITE_BUSY | (1 << 8)

RECOVERING = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 3, 120)
os.pwrite(fd, b"\0" * 136, 0)
print("recovering", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def wal_source(tmp_path):
    path = build_file(tmp_path / "wal.db", wal=True)
    keeper = apsw_backup.Connection(str(path))  # keeps the -shm in place
    keeper.execute("SELECT count(*) FROM t").fetchall()
    yield path
    keeper.close()


class Recovery:
    """A helper process 'recovering' the WAL until end() is called."""

    def __init__(self, path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RECOVERING, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "recovering"

    def end(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(BOUND)


def test_step_after_busy_recovery_is_retryable_and_then_completes(wal_source, tmp_path):
    src = apsw_backup.Connection(str(wal_source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(tmp_path / "dest.db"))
    recovery = Recovery(wal_source)
    try:
        b = dst.backup("main", src, "main")
        for _ in range(3):  # as long as the recovery lasts: BUSY, retryable
            with pytest.raises(apsw_backup.BusyError) as info:
                b.step(5)
            assert info.value.extendedresult == SQLITE_BUSY_RECOVERY
            assert "recovering the write-ahead log" in str(info.value)
            assert "still usable" in str(info.value)
            assert b and not b.done
        restarts = b.restarts
        recovery.end()
        assert b.step(-1) is True  # before: BUSY_RECOVERY for ever
        assert b.restarts == restarts
        b.finish()
    finally:
        recovery.end()
    assert dump(dst) == dump(src)
    assert restarts == 3
    src.close()
    dst.close()


def test_partial_copy_before_busy_recovery_is_rolled_back_then_redone(
    wal_source, tmp_path
):
    """The restart rolls the destination back like any restart: no mix of
    an old partial copy and a new one."""
    src = apsw_backup.Connection(str(wal_source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(tmp_path / "dest.db"))
    dst.execute("CREATE TABLE old(n); INSERT INTO old VALUES (1)").fetchall()
    b = dst.backup("main", src, "main")
    assert b.step(5) is False
    recovery = Recovery(wal_source)
    try:
        with pytest.raises(apsw_backup.BusyError):
            b.step(5)
        assert (b.remaining, b.page_count) == (0, 0)
    finally:
        recovery.end()
    b.finish()  # before the copy completed: rolled back to the old content
    assert dst.execute("SELECT n FROM old").fetchall() == [(1,)]
    b = dst.backup("main", src, "main")
    assert b.step(-1) is True
    b.finish()
    assert dump(dst) == dump(src)
    src.close()
    dst.close()


def test_finish_after_busy_recovery_reports_no_stale_error(wal_source, tmp_path):
    src = apsw_backup.Connection(str(wal_source), apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(str(tmp_path / "dest.db"))
    b = dst.backup("main", src, "main")
    recovery = Recovery(wal_source)
    try:
        with pytest.raises(apsw_backup.BusyError):
            b.step(5)
    finally:
        recovery.end()
    b.finish()  # the fresh backup never stepped: nothing to report
    assert not b
    dst.execute("SELECT 1").fetchall()
    src.close()
    dst.close()


# ----------------------------------------------------------------------------
# copy() never spins on a lock SQLite made permanent (docs/api.md#copy-and-acopy: no retry loop spins forever on a state retrying cannot clear).
#
# The cause: sqlite3_backup_step() retries only the exact codes SQLITE_BUSY
# and SQLITE_LOCKED.  Any other code, extended BUSY codes included, is stored
# as the backup's error (backup.c, isFatalError) and every later step returns
# it without trying again.  A step that meets a WAL recovery in progress in
# another connection gets SQLITE_BUSY_RECOVERY (261): from then on that
# sqlite3_backup answers 261 forever, even after the recovery ended, while a
# fresh one succeeds at once.  Backup.step() now begins afresh itself on such
# a code (the first half of this file); these tests pin that copy()
# finishes, counts the restarts and never spins.
#
# The recovery is played deterministically by a helper process that does what
# a connection running WAL recovery does: it holds the WAL write, checkpoint
# and recover locks (bytes 120..122 of the -shm file) and leaves the
# wal-index header invalid, so every reader must wait for the recovery.


RECOVERING_FOR = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 3, 120)
os.pwrite(fd, b"\0" * 136, 0)
print("recovering", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def wal_copy_source(tmp_path):
    """A WAL source kept open by another connection (so its -shm stays)."""
    path = make_source(tmp_path / "wal.db", rows=400, journal="wal")
    keeper = apsw_backup.Connection(str(path))
    keeper.execute("SELECT count(*) FROM t").fetchall()
    yield path
    keeper.close()


def recovering(path, seconds):
    """A helper process 'recovering' the WAL of path for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RECOVERING_FOR, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "recovering"
    return proc


@pytest.mark.parametrize("source_kind", ["path", "connection"])
def test_copy_finishes_after_busy_recovery_with_a_fresh_backup_counted_as_restart(
    wal_copy_source, tmp_path, source_kind
):
    dest = tmp_path / "dest.db"
    statuses = []
    src = (
        apsw_backup.Connection(str(wal_copy_source), apsw_backup.SQLITE_OPEN_READONLY)
        if source_kind == "connection"
        else wal_copy_source
    )
    proc = recovering(wal_copy_source, 0.3)
    outcome = {}

    def run():
        try:
            outcome["result"] = copy(
                src,
                dest,
                pages=5,
                timeout=5,
                progress=lambda status, *rest: statuses.append(status),
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    elapsed = time.monotonic() - start
    proc.wait(BOUND)
    if source_kind == "connection":
        src.close()
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert elapsed < 3  # not the 5 s timeout: it finished once recovery ended
    assert SQLITE_BUSY_RECOVERY in statuses
    assert statuses[-1] == apsw_backup.SQLITE_DONE
    assert result.restarts >= 1
    assert result.waits >= 1
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    assert query(dest, "SELECT count(*) FROM t") == [(400,)]


def test_each_fresh_backup_after_busy_recovery_waits_growing_waits_never_a_spin(
    wal_copy_source, tmp_path
):
    # Bounded retrying: a fresh Backup per sticky answer, with the growing
    # waits of any locked step (1 ms doubling to 16 ms), never a spin.
    proc = recovering(wal_copy_source, 0.6)
    times = []

    def progress(status, remaining, total):
        if status == SQLITE_BUSY_RECOVERY:
            times.append(time.monotonic())

    try:
        copy(
            wal_copy_source,
            tmp_path / "dest.db",
            sleep=0.1,
            timeout=10,
            progress=progress,
        )
    finally:
        proc.wait(BOUND)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 10 <= len(times) < 0.6 / 0.016 + 10
    assert gaps[0] < 0.01
    assert max(gaps) < 0.1
    assert sorted(gaps)[len(gaps) // 2] >= 0.012  # grown to 16 ms


def test_busy_recovery_that_never_ends_gives_up_at_timeout_saying_so(
    wal_copy_source, tmp_path
):
    proc = recovering(wal_copy_source, 30)
    start = time.monotonic()
    try:
        with pytest.raises(apsw_backup.BusyError) as excinfo:
            copy(wal_copy_source, tmp_path / "dest.db", sleep=0.05, timeout=1)
    finally:
        proc.kill()
        proc.wait(BOUND)
    assert time.monotonic() - start < 3
    message = str(excinfo.value)
    assert "deadline passed" in message
    assert "locked" in message
    assert not (tmp_path / "dest.db").exists()
