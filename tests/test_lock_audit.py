"""No public entry point drops a POSIX lock an application holds.

On Linux, closing any descriptor of a file drops every POSIX lock the
process holds on it, SQLite's included (sqlite.org/howtocorrupt.html, 2.2).
An application that holds SOURCE (or DEST) through its own connection -- the
standard library's or this library's; both use the one system SQLite, whose
unix VFS shares the process's locks -- must hold exactly the same locks
after backup(), copy(), acopy(), the command line run in-process, and
verify() as before.  The audit reads this process's entries in /proc/locks
for the database and its -shm file.  The multi-process tests show what a
dropped lock costs: another process commits inside the application's
transaction (rollback mode), or deletes -wal/-shm under it and a later
committed row is lost (WAL mode).
"""

import asyncio
import os
import sqlite3
import time

import pytest
from child_process import run_bounded

import apsw_backup
from apsw_backup import cli, files
from apsw_backup.verify import verify

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/locks"), reason="needs Linux's /proc/locks"
)


def held_locks(path):
    """This process's POSIX lock entries on path's file, as a sorted list of
    distinct (type, start, end); [] when the file does not exist.

    /proc/locks is made page by page as it is read: while other processes
    take and let go of locks, a read can show an entry twice or miss one.
    The kernel merges one process's locks of one type on one range into one
    entry, so duplicates are dropped here; a missed entry is seen again by
    the next read (assert_same_locks looks again before failing)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return []
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    mine = str(os.getpid())
    found = set()
    for _ in range(2):  # an entry one read missed, the other shows
        with open("/proc/locks") as table:  # /proc/locks: no lock of ours on it
            for line in table:
                fields = line.split()
                if "->" in fields[:2]:
                    continue  # a waiter, not a lock held
                kind, _, access, pid, dev, start, end = fields[1:8]
                if kind == "POSIX" and pid == mine and dev == device:
                    found.add((access, start, end))
    return sorted(found)


def snapshot(path):
    return {p: held_locks(p) for p in (path, path + "-shm")}


def assert_same_locks(path, before):
    """The same locks as before: looked at again for up to 2 s before
    failing (a read of /proc/locks can miss or repeat an entry while other
    processes change the table; a lock really dropped or kept stays so)."""
    deadline = time.monotonic() + 2
    while True:
        after = snapshot(path)
        if after == before or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    with open("/proc/locks") as table:  # /proc/locks: no lock of ours on it
        lines = table.read()
    assert after == before, lines


def make_db(path, mode, rows=300):
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA journal_mode={mode}")
    conn.execute("CREATE TABLE t(x INTEGER PRIMARY KEY, y TEXT)")
    conn.executemany("INSERT INTO t(y) VALUES (?)", [("v" * 200,)] * rows)
    conn.commit()
    conn.close()


def open_app(kind, path):
    """The application's connection, its transaction left to the test."""
    if kind == "stdlib":
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        return conn, conn.execute
    conn = apsw_backup.Connection(path)
    return conn, lambda sql: conn.execute(sql).fetchall()


def hold(execute, txn):
    if txn == "read":
        execute("BEGIN")
        execute("SELECT count(*) FROM t")
    elif txn == "write":
        execute("BEGIN IMMEDIATE")
        execute("INSERT INTO t(y) VALUES ('app')")
    else:  # "none": a WAL connection that has read holds shared locks
        execute("SELECT count(*) FROM t")


def call_copy(src, tmp_path):
    apsw_backup.copy(src, str(tmp_path / "out.db"))


def call_copy_existing(src, tmp_path):
    out = tmp_path / "old.db"
    make_db(str(out), "delete", rows=3)
    apsw_backup.copy(src, str(out))


def call_acopy(src, tmp_path):
    asyncio.run(apsw_backup.acopy(src, str(tmp_path / "out.db")))


def call_cli(src, tmp_path):
    assert cli.main(["--no-progress", src, str(tmp_path / "out.db")]) == 0


def call_cli_into_folder(src, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    assert cli.main(["--no-progress", "--keep", "2", src, str(folder) + "/"]) == 0


def call_verify_source(src, tmp_path):
    # verify() of the very file the application holds
    verify(src)


def call_cli_verify(src, tmp_path):
    assert cli.main(["verify", src]) == 0


def call_read_header(src, tmp_path):
    assert files.read_header(src).startswith(b"SQLite format 3")


ENTRY_POINTS = {
    "copy": call_copy,
    "copy-existing": call_copy_existing,
    "acopy": call_acopy,
    "cli": call_cli,
    "cli-folder": call_cli_into_folder,
    "verify": call_verify_source,
    "cli-verify": call_cli_verify,
    "read_header": call_read_header,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    "kind,mode,txn",
    [
        ("stdlib", "delete", "read"),
        ("stdlib", "delete", "write"),
        ("ours", "delete", "read"),
        ("stdlib", "wal", "none"),
        ("ours", "wal", "write"),
    ],
)
def test_an_entry_point_leaves_the_applications_locks(tmp_path, entry, kind, mode, txn):
    src = str(tmp_path / "app.db")
    make_db(src, mode)
    app, execute = open_app(kind, src)
    try:
        hold(execute, txn)
        before = snapshot(src)
        if txn != "none" or mode == "wal":
            assert before[src], "the application holds no lock: nothing audited"
        if "verify" in entry and txn == "write" and mode == "delete":
            pytest.skip("a write transaction in rollback mode keeps readers out")
        ENTRY_POINTS[entry](src, tmp_path)
        assert_same_locks(src, before)
    finally:
        app.close()


@pytest.mark.parametrize("kind", ["stdlib", "ours"])
def test_backup_into_a_file_the_application_is_writing(tmp_path, kind):
    """Creating a Backup into a file another connection of this process is
    writing reads the destination's header: through SQLite, so the writer
    keeps its lock and its COMMIT still succeeds."""
    src, dst = str(tmp_path / "src.db"), str(tmp_path / "dst.db")
    make_db(src, "delete")
    make_db(dst, "delete", rows=5)
    app, execute = open_app(kind, dst)
    source = apsw_backup.Connection(src)
    dest = apsw_backup.Connection(dst)
    try:
        hold(execute, "write")
        before = snapshot(dst)
        assert before[dst]
        backup = dest.backup("main", source, "main")
        assert_same_locks(dst, before)
        backup.close(True)
        assert_same_locks(dst, before)
        execute("COMMIT")
    finally:
        dest.close(True)
        source.close(True)
        app.close()
    check = sqlite3.connect(dst)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert check.execute("SELECT count(*) FROM t").fetchone() == (6,)
    check.close()


WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
try:
    conn.execute("INSERT INTO t(y) VALUES ('other process')")
except sqlite3.OperationalError as exc:
    print("refused", exc)
else:
    print("committed")
conn.close()
"""


def other_process_writes(path):
    proc = run_bounded(WRITER, path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("entry", ["copy", "acopy", "cli"])
@pytest.mark.parametrize("kind", ["stdlib", "ours"])
def test_rollback_mode_no_write_lands_inside_the_applications_read(
    tmp_path, entry, kind
):
    src = str(tmp_path / "app.db")
    make_db(src, "delete")
    app, execute = open_app(kind, src)
    try:
        hold(execute, "read")
        assert other_process_writes(src).startswith("refused")  # the baseline
        ENTRY_POINTS[entry](src, tmp_path)
        # Still inside the application's read transaction: no other process
        # may commit until it ends.
        assert other_process_writes(src).startswith("refused")
        execute("COMMIT")
    finally:
        app.close()
    assert other_process_writes(src) == "committed"


@pytest.mark.parametrize("entry", ["copy", "acopy", "cli", "verify"])
@pytest.mark.parametrize("kind", ["stdlib", "ours"])
def test_wal_mode_no_committed_row_is_lost(tmp_path, entry, kind):
    src = str(tmp_path / "app.db")
    make_db(src, "wal")
    app, execute = open_app(kind, src)
    try:
        execute("INSERT INTO t(y) VALUES ('app before')")
        ENTRY_POINTS[entry](src, tmp_path)
        # Another process writes and closes: it must not take itself for
        # the last connection (checkpoint, delete -wal and -shm) while the
        # application still has the database open.
        assert other_process_writes(src) == "committed"
        assert os.path.exists(src + "-wal")
        execute("INSERT INTO t(y) VALUES ('app after')")
    finally:
        app.close()
    check = sqlite3.connect(src)
    rows = [y for (y,) in check.execute("SELECT y FROM t WHERE y NOT LIKE 'v%'")]
    check.close()
    assert rows == ["app before", "other process", "app after"]


def test_remove_unused_shm_never_touches_a_database_this_process_has_open(tmp_path):
    """files.remove_unused_shm (verify's clean-up of a -shm it made) takes
    an exclusive lock that would not conflict with this process's own
    connection, and its descriptor's close would drop that connection's
    locks: with the database open here, it does nothing."""
    src = str(tmp_path / "app.db")
    make_db(src, "wal")
    app, execute = open_app("stdlib", src)
    try:
        hold(execute, "read")
        before = snapshot(src)
        assert before[src] and os.path.exists(src + "-shm")
        assert files.remove_unused_shm(src) is False
        assert os.path.exists(src + "-shm")
        assert_same_locks(src, before)
        execute("COMMIT")
    finally:
        app.close()
