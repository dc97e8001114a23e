"""A BUSY step's message names the real cause.

SQLite answers SQLITE_BUSY from a backup step for several reasons: another
connection holds a lock on the source or the destination file, the source
connection has its own write transaction, or the source is itself the
destination of an unfinished backup that holds its write transaction.  The
message blames a cause only when it is the one in force.
"""

import sqlite3

import pytest
from backup_helpers import build_file

import apsw_backup


@pytest.fixture
def trio(connect):
    """src (populated), dst (empty) and s0, a populated source for a backup
    into src."""
    build_file(connect.path("s.db"))
    build_file(connect.path("s0.db"))
    return connect("s.db"), connect("d.db"), connect("s0.db")


def hold(path, how="EXCLUSIVE"):
    locker = sqlite3.connect(str(path), isolation_level=None, timeout=0)
    locker.execute(f"BEGIN {how}")
    return locker


def step_error(backup):
    with pytest.raises(apsw_backup.BusyError) as info:
        backup.step(1)
    return str(info.value)


def finish(*backups):
    for backup in backups:
        try:
            backup.finish()
        except apsw_backup.BusyError:
            pass  # its last step was BUSY: rolled back, as it says


BLAME_BACKUP = "itself the destination of an unfinished Backup"


@pytest.mark.parametrize("held", ["d.db", "s.db"])
def test_busy_step_does_not_blame_a_backup_into_the_source_that_never_stepped(
    connect, trio, held
):
    """B.12 of the trust review: the BUSY step blamed "the source is itself
    the destination of an unfinished Backup" when that Backup never stepped
    (it holds nothing) and the real cause was another connection holding
    the destination (or source) file."""
    src, dst, s0 = trio
    b = dst.backup("main", src, "main")
    b0 = src.backup("main", s0, "main")  # never stepped
    locker = hold(connect.path(held))
    try:
        message = step_error(b)
    finally:
        locker.rollback()
        locker.close()
    assert BLAME_BACKUP not in message, message
    assert "another connection holds a lock" in message, message
    assert "still usable" in message and "step() again" in message
    assert b.step(-1) is True  # the lock is gone: it was the cause
    finish(b, b0)


def test_busy_step_blames_the_backup_into_the_source_once_it_holds_its_write(
    connect, trio
):
    """The cause B.12's message names, when it is the cause: the backup
    writing into the source has stepped, so it holds the source's write
    transaction, and SQLite refuses to copy from it."""
    src, dst, s0 = trio
    b = dst.backup("main", src, "main")
    b0 = src.backup("main", s0, "main")
    b0.step(1)
    message = step_error(b)
    assert BLAME_BACKUP in message, message
    assert "s0.db" in message  # which backup
    assert "Finish that backup first" in message
    finish(b0)
    assert b.step(-1) is True
    finish(b)


def test_busy_step_blames_the_source_connections_own_write_transaction(trio):
    src, dst, _ = trio
    b = dst.backup("main", src, "main")
    src.execute("BEGIN IMMEDIATE; DELETE FROM t WHERE rowid = 1")
    message = step_error(b)
    assert "has its own open write transaction" in message, message
    assert "COMMIT" in message and "ROLLBACK" in message
    assert BLAME_BACKUP not in message
    src.execute("ROLLBACK")
    assert b.step(-1) is True
    finish(b)
