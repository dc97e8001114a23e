"""copy() waits only where waiting can help, and a forked child leaves the
parent's copy alone (docs/locking.md).

- A target connection that is the destination of an unfinished Backup is
  refused at once with DestinationLockedError (no wait can end it).
- copy() called from a connection's own busy handler, on that connection, is
  refused at once with ReentrancyError (its call cannot return meanwhile).
- A progress callback that forks: the child's copy() stops, and its
  clean-up removes nothing of the parent's new file, which the parent puts
  in place complete.
"""

import os
import sqlite3
import time

from child_process import run_child

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


FORK_IN_PROGRESS = """
import apsw_backup, sqlite3
folder = sys.argv[1]
source, target = os.path.join(folder, "s.db"), os.path.join(folder, "out.db")
when = sys.argv[2]
parent = os.getpid()
calls = []

def progress(status, remaining, total):
    calls.append(status)
    due = status == apsw_backup.SQLITE_DONE if when == "done" else len(calls) == 3
    if due and os.getpid() == parent:
        pid = os.fork()
        if pid == 0:
            return  # the child goes on inside copy()
        os.waitpid(pid, 0)
        report("after_child", sorted(os.listdir(folder)))

try:
    apsw_backup.copy(source, target, pages=20, progress=progress)
    outcome = "ok"
except BaseException as exc:
    outcome = type(exc).__name__
if os.getpid() != parent:
    os._exit(0)
report("outcome", outcome)
conn = sqlite3.connect(target)
report("check", conn.execute("PRAGMA integrity_check").fetchone()[0])
report("rows", conn.execute("SELECT count(*) FROM t").fetchone()[0])
conn.close()
report("files", sorted(os.listdir(folder)))
"""


def test_a_child_forked_in_a_progress_callback_leaves_the_parents_copy(tmp_path):
    make_source(str(tmp_path / "s.db"), rows=300)
    for when in ("middle", "done"):
        for name in os.listdir(tmp_path):
            if name != "s.db":
                os.remove(tmp_path / name)
        result = run_child(FORK_IN_PROGRESS, tmp_path, when)
        assert any(".partial" in name for name in result["after_child"]), result
        assert result["outcome"] == "ok", result
        assert result["check"] == "ok"
        assert result["rows"] == 300
        assert result["files"] == ["out.db", "s.db"]
