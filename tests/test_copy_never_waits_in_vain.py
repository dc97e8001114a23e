"""copy() waits only where waiting can help (docs/locking.md).

- A target connection that is the destination of an unfinished Backup is
  refused at once with DestinationLockedError (no wait can end it).
- copy() called from a connection's own busy handler, on that connection, is
  refused at once with ReentrancyError (its call cannot return meanwhile).
(A progress callback that forks: tests/test_fork.py.)
"""

import sqlite3
import time

import apsw_backup


def make_source(path, rows=50):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(2000))", [()] * rows)
    conn.commit()
    conn.close()


def test_the_destination_of_an_unfinished_backup_is_refused_at_once(tmp_path):
    make_source(str(tmp_path / "s.db"))
    source = apsw_backup.Connection(str(tmp_path / "s.db"))
    dest = apsw_backup.Connection(str(tmp_path / "d.db"))
    other = apsw_backup.Connection(":memory:")
    backup = dest.backup("main", source, "main")
    try:
        started = time.monotonic()
        try:
            apsw_backup.copy(other, dest)
        except apsw_backup.DestinationLockedError as exc:
            assert "unfinished Backup" in str(exc)
        else:
            raise AssertionError("copy() into a locked destination returned")
        assert time.monotonic() - started < 1.0
    finally:
        backup.finish()
        for conn in (other, dest, source):
            conn.close()


def test_copy_from_the_targets_own_busy_handler_is_refused_at_once(tmp_path):
    path = str(tmp_path / "d.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t(x)")
    holder.execute("BEGIN EXCLUSIVE")
    dest = apsw_backup.Connection(path)
    other = apsw_backup.Connection(":memory:")
    seen = {}

    def handler(count):
        if count == 0:
            started = time.monotonic()
            try:
                apsw_backup.copy(other, dest)
            except apsw_backup.Error as exc:
                seen["error"] = exc
            seen["seconds"] = time.monotonic() - started
        return False

    dest.set_busy_handler(handler)
    try:
        try:
            dest.execute("INSERT INTO t VALUES (1)").fetchall()
        except apsw_backup.BusyError:
            pass
        assert isinstance(seen["error"], apsw_backup.ReentrancyError), seen
        assert seen["seconds"] < 1.0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        dest.close()
        other.close()
