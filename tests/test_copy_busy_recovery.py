"""copy() never spins on a lock SQLite made permanent (docs/api.md#copy-and-acopy: no retry loop spins forever on a state retrying cannot clear).

The cause: sqlite3_backup_step() retries only the exact codes SQLITE_BUSY
and SQLITE_LOCKED.  Any other code, extended BUSY codes included, is stored
as the backup's error (backup.c, isFatalError) and every later step returns
it without trying again.  A step that meets a WAL recovery in progress in
another connection gets SQLITE_BUSY_RECOVERY (261): from then on that
sqlite3_backup answers 261 forever, even after the recovery ended, while a
fresh one succeeds at once.  Backup.step() now begins afresh itself on such
a code (tests/test_backup_sticky_lock.py); these tests pin that copy()
finishes, counts the restarts and never spins.

The recovery is played deterministically by a helper process that does what
a connection running WAL recovery does: it holds the WAL write, checkpoint
and recover locks (bytes 120..122 of the -shm file) and leaves the
wal-index header invalid, so every reader must wait for the recovery.
"""

import subprocess
import sys
import threading
import time

import pytest
from copy_helpers import make_source, query

import apsw_backup
from apsw_backup import copy

BOUND = 20
SQLITE_BUSY_RECOVERY = apsw_backup.SQLITE_BUSY | (1 << 8)

RECOVERING = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 3, 120)
os.pwrite(fd, b"\0" * 136, 0)
print("recovering", flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture
def wal_source(tmp_path):
    """A WAL source kept open by another connection (so its -shm stays)."""
    path = make_source(tmp_path / "wal.db", rows=400, journal="wal")
    keeper = apsw_backup.Connection(str(path))
    keeper.execute("SELECT count(*) FROM t").fetchall()
    yield path
    keeper.close()


def recovering(path, seconds):
    """A helper process 'recovering' the WAL of path for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RECOVERING, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "recovering"
    return proc


@pytest.mark.parametrize("source_kind", ["path", "connection"])
def test_copy_finishes_after_busy_recovery_with_a_fresh_backup_counted_as_restart(
    wal_source, tmp_path, source_kind
):
    dest = tmp_path / "dest.db"
    statuses = []
    src = (
        apsw_backup.Connection(str(wal_source), apsw_backup.SQLITE_OPEN_READONLY)
        if source_kind == "connection"
        else wal_source
    )
    proc = recovering(wal_source, 0.3)
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
    wal_source, tmp_path
):
    # Bounded retrying: a fresh Backup per sticky answer, with the growing
    # waits of any locked step (1 ms doubling to 16 ms), never a spin.
    proc = recovering(wal_source, 0.6)
    times = []

    def progress(status, remaining, total):
        if status == SQLITE_BUSY_RECOVERY:
            times.append(time.monotonic())

    try:
        copy(wal_source, tmp_path / "dest.db", sleep=0.1, timeout=10, progress=progress)
    finally:
        proc.wait(BOUND)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 10 <= len(times) < 0.6 / 0.016 + 10
    assert gaps[0] < 0.01
    assert max(gaps) < 0.1
    assert sorted(gaps)[len(gaps) // 2] >= 0.012  # grown to 16 ms


def test_busy_recovery_that_never_ends_gives_up_at_timeout_saying_so(
    wal_source, tmp_path
):
    proc = recovering(wal_source, 30)
    start = time.monotonic()
    try:
        with pytest.raises(apsw_backup.BusyError) as excinfo:
            copy(wal_source, tmp_path / "dest.db", sleep=0.05, timeout=1)
    finally:
        proc.kill()
        proc.wait(BOUND)
    assert time.monotonic() - start < 3
    message = str(excinfo.value)
    assert "deadline passed" in message
    assert "locked" in message
    assert not (tmp_path / "dest.db").exists()
