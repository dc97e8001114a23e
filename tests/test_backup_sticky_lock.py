"""A lock SQLite would report for ever, at the Backup level (docs/api.md#errors-from-step): an extended BUSY or
LOCKED answer must not make a Backup answer it for ever.

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

import pytest
from backup_helpers import build_file, dump

import apsw_backup

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
