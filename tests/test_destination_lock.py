"""docs/locking.md: the destination lock (no SQL runs on a backup's
destination while the backup is unfinished), closing the source mid-backup,
and garbage-collected backups."""

import gc
import os
import sys
import weakref

import pytest
from backup_helpers import (
    LOCK_WORDS,
    build_file,
    dump,
    dump_path,
    exclusive_lock,
    in_thread,
    make_old_content,
)

import apsw_backup
import apsw_backup as ab

OK = [("ok",)]
OLD = [(0,), (1,), (2,)]
OLD_DUMP = {"old": OLD}


def old_rows(conn):
    return conn.execute("SELECT n FROM old ORDER BY n").fetchall()


def dest_file_tables(connect):
    (_, tables), check = dump_path(connect.path("dest.db"))
    assert check == OK
    return tables


def assert_names_unfinished_backup(exc):
    assert type(exc) is apsw_backup.DestinationLockedError
    message = str(exc).lower()
    for word in LOCK_WORDS:
        assert word in message


# Every use of a locked destination.  Each takes (dest, other_source, cursors)
# where cursors were made on dest before the backup started.
LOCKED_USES = {
    "execute": lambda d, o, c: d.execute("SELECT 1"),
    "executemany": lambda d, o, c: d.executemany("INSERT INTO old VALUES (?)", [(9,)]),
    "cursor": lambda d, o, c: d.cursor(),
    "earlier-cursor-execute": lambda d, o, c: c["fresh"].execute("SELECT 1"),
    "earlier-cursor-iterate": lambda d, o, c: next(c["ended"]),
    "earlier-cursor-fetchall": lambda d, o, c: c["ended"].fetchall(),
    "backup": lambda d, o, c: d.backup("main", o, "main"),
    "as-backup-source": lambda d, o, c: o.backup("main", d, "main"),
    "set_busy_timeout": lambda d, o, c: d.set_busy_timeout(100),
    "set_busy_handler": lambda d, o, c: d.set_busy_handler(None),
    "with-transaction": lambda d, o, c: d.__enter__(),
    "close": lambda d, o, c: d.close(),
    "close-force-false": lambda d, o, c: d.close(force=False),
}


@pytest.fixture
def locked(connect, dest, src):
    """(backup, dest, other source, cursors made before the backup)."""
    cursors = {
        "fresh": dest.cursor(),
        "ended": dest.execute("SELECT n FROM old WHERE n < 0"),
    }
    other = connect("other.db")
    b = dest.backup("main", src, "main")
    b.step(10)
    yield b, dest, src, other, cursors
    b.close(True)


@pytest.mark.parametrize("use", LOCKED_USES.values(), ids=LOCKED_USES.keys())
def test_destination_use_is_threading_violation_naming_backup(locked, use):
    b, dest, src, other, cursors = locked
    with pytest.raises(apsw_backup.ThreadingViolationError) as info:
        use(dest, other, cursors)
    assert_names_unfinished_backup(info.value)
    # nothing changed: the backup carries on and completes
    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)


@pytest.mark.parametrize("use", LOCKED_USES.values(), ids=LOCKED_USES.keys())
def test_destination_use_from_another_thread_is_threading_violation(locked, use):
    b, dest, src, other, cursors = locked
    exc = in_thread(lambda: use(dest, other, cursors))
    assert exc is not None, "the locked destination was usable from another thread"
    assert_names_unfinished_backup(exc)
    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)


def test_locked_destination_is_not_modified_by_refused_calls(connect, locked):
    b, dest, src, other, cursors = locked
    for use in LOCKED_USES.values():
        with pytest.raises(apsw_backup.ThreadingViolationError):
            use(dest, other, cursors)
    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_destination_close_force_finishes_backup_and_keeps_old_content(
    connect, dest, src
):
    b = dest.backup("main", src, "main")
    b.step(10)
    assert not b.done

    dest.close(force=True)

    assert not b
    with pytest.raises(apsw_backup.ConnectionClosedError):
        b.step(1)
    with pytest.raises(apsw_backup.ConnectionClosedError):
        dest.execute("SELECT 1")
    assert dest_file_tables(connect) == OLD_DUMP
    # the source is free again
    assert src.execute("SELECT count(*) FROM t").fetchall() == [(400,)]


def test_destination_close_force_from_another_thread_finishes_backup(
    connect, dest, src
):
    b = dest.backup("main", src, "main")
    b.step(10)
    assert in_thread(lambda: dest.close(force=True)) is None
    assert not b
    assert dest_file_tables(connect) == OLD_DUMP


def test_destination_close_force_after_complete_copy_keeps_the_copy(connect, dest, src):
    # every page was copied: finishing commits, as finish() would
    b = dest.backup("main", src, "main")
    assert b.step(-1) is True
    dest.close(force=True)
    assert not b
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_destination_works_normally_after_finish(connect, dest, src):
    fresh = dest.cursor()
    b = dest.backup("main", src, "main")
    b.step(10)
    b.finish()

    assert old_rows(dest) == OLD
    assert fresh.execute("SELECT count(*) FROM old").fetchall() == [(3,)]
    dest.cursor().execute("INSERT INTO old VALUES (3)")
    dest.executemany("INSERT INTO old VALUES (?)", [(4,), (5,)])
    dest.set_busy_timeout(100)
    with dest:
        dest.execute("INSERT INTO old VALUES (6)")
    with dest.backup("main", src, "main") as again:
        assert again.step(-1) is True
    assert dump(dest) == dump(src)
    dest.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        dest.execute("SELECT 1")


def test_destination_unlocks_after_finish_from_another_thread(dest, src):
    b = dest.backup("main", src, "main")
    b.step(10)
    assert in_thread(b.finish) is None
    assert old_rows(dest) == OLD


# -- item 8: the source closed mid-backup ---------------------------------------


def test_source_close_mid_backup_finishes_it_and_destination_keeps_old_content(
    connect, dest, src
):
    b = dest.backup("main", src, "main")
    b.step(10)
    b.step(10)

    src.close()

    assert not b
    with pytest.raises(apsw_backup.ConnectionClosedError) as info:
        b.step(1)
    assert "finished" in str(info.value)
    with pytest.raises(apsw_backup.ConnectionClosedError):
        src.execute("SELECT 1")
    assert old_rows(dest) == OLD  # unlocked and rolled back
    assert dest_file_tables(connect) == OLD_DUMP


def test_source_close_with_busy_finish_error_raises_and_source_stays_open(
    connect, dest, src
):
    b = dest.backup("main", src, "main")
    b.step(10)
    with exclusive_lock(connect.path("src.db")) as other:
        with pytest.raises(apsw_backup.BusyError):
            b.step(10)

        with pytest.raises(apsw_backup.BusyError):
            src.close()

        assert not b  # finished anyway
        with pytest.raises(apsw_backup.ConnectionClosedError):
            b.step(1)
        other.execute("COMMIT").fetchall()

    # the source is still open and usable
    assert src.execute("SELECT count(*) FROM t").fetchall() == [(400,)]
    assert old_rows(dest) == OLD
    assert dest_file_tables(connect) == OLD_DUMP
    src.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        src.execute("SELECT 1")


def test_source_close_force_always_closes(connect, dest, src):
    b = dest.backup("main", src, "main")
    b.step(10)
    with exclusive_lock(connect.path("src.db")):
        with pytest.raises(apsw_backup.BusyError):
            b.step(10)

        assert src.close(force=True) is None

        assert not b
        with pytest.raises(apsw_backup.ConnectionClosedError):
            src.execute("SELECT 1")
    assert old_rows(dest) == OLD
    assert dest_file_tables(connect) == OLD_DUMP


def test_source_close_finishes_every_backup_reading_from_it(connect, src):
    dests = [connect(f"dest{n}.db") for n in range(3)]
    backups = []
    for d in dests:
        make_old_content(d)
        backups.append(d.backup("main", src, "main"))
        backups[-1].step(5)

    src.close()

    assert not any(backups)
    for d in dests:
        assert old_rows(d) == OLD


# -- item 9: garbage collection ---------------------------------------------------


def test_collected_unfinished_backup_unlocks_and_rolls_back_destination(
    connect, dest, src
):
    b = dest.backup("main", src, "main")
    b.step(10)
    b.step(10)
    with pytest.raises(apsw_backup.ThreadingViolationError):
        dest.execute("SELECT 1")

    del b
    gc.collect()

    assert old_rows(dest) == OLD
    assert dest_file_tables(connect) == OLD_DUMP
    with dest.backup("main", src, "main") as again:
        assert again.step(-1) is True


def test_collected_backup_in_reference_cycle_unlocks_destination(dest, src):
    class Holder:
        pass

    holder = Holder()
    holder.self = holder
    holder.backup = dest.backup("main", src, "main")
    holder.backup.step(10)

    del holder
    gc.collect()

    assert old_rows(dest) == OLD


def test_backup_in_cycle_with_destination_busy_handler_is_collected(connect, src):
    def make_cycle():
        dest = apsw_backup.Connection(str(connect.path("dest.db")))
        make_old_content(dest)
        holder = []
        dest.set_busy_handler(lambda count: bool(holder))  # dest -> handler -> b
        holder.append(dest.backup("main", src, "main"))  # b -> dest
        holder[0].step(10)
        return weakref.ref(dest)

    dest_ref = make_cycle()
    gc.collect()

    assert dest_ref() is None
    assert dest_file_tables(connect) == OLD_DUMP


def test_backup_paths_leak_no_references(connect, dest, src):
    build_file(connect.path("src1024.db"), page_size=1024, rows=20)
    small = connect("src1024.db")
    memory = connect(":memory:")
    make_old_content(memory)
    name = b"main".decode()  # not interned: its count is ours alone

    def complete():
        with dest.backup(name, src, name) as b:
            b.step(-1)

    def partial():
        dest.backup(name, src, name).step(3)

    def init_fails():
        dest.backup("nosuch", src, name)

    def bad_npages():
        with dest.backup(name, src, name) as b:
            b.step("1")

    def sticky():
        with memory.backup(name, small, name) as b:
            b.step(1)

    def busy():
        b = dest.backup(name, src, name)
        with exclusive_lock(connect.path("src.db")):
            with pytest.raises(apsw_backup.BusyError):
                b.step(1)
            b.close(True)

    def counts():
        gc.collect()
        objects = (src, dest, small, memory, name, apsw_backup.Backup)
        return [sys.getrefcount(obj) for obj in objects]

    def run(path):
        try:
            path()
        except (apsw_backup.Error, TypeError):
            pass

    for path in (complete, partial, init_fails, bad_npages, sticky, busy):
        run(path)  # first run: one-time allocations
        before = counts()
        for _ in range(20):
            run(path)
        assert counts() == before, path.__name__
    # every path left the destination unlocked, holding the complete copy
    assert dump(dest) == dump(src)


def test_collected_backup_finish_error_goes_to_unraisablehook(
    connect, dest, src, monkeypatch
):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    b = dest.backup("main", src, "main")
    b.step(10)
    with exclusive_lock(connect.path("src.db")):
        with pytest.raises(apsw_backup.BusyError):
            b.step(10)

        del b
        gc.collect()

    assert len(seen) == 1
    assert seen[0].exc_type is apsw_backup.BusyError
    assert isinstance(seen[0].exc_value, apsw_backup.BusyError)
    assert "not an error" not in str(seen[0].exc_value).lower()
    assert old_rows(dest) == OLD  # unlocked and rolled back all the same


def test_collected_finished_backup_reports_nothing(dest, src, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    b = dest.backup("main", src, "main")
    b.step(-1)
    b.finish()
    del b
    gc.collect()
    assert seen == []


def test_creating_a_backup_leaves_other_connections_locks_in_place(tmp_path):
    # backup() reads the destination's header (for the page-size message)
    # through SQLite's own handle: a descriptor of its own, once closed,
    # would drop the write lock another connection of this process holds.
    dest_path = str(tmp_path / "d.db")
    writer = apsw_backup.Connection(dest_path)
    writer.execute("CREATE TABLE t(x)")
    writer.execute("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
    ino = os.stat(dest_path).st_ino

    def our_locks():
        with open("/proc/locks") as f:
            return sorted(
                line.split(":", 1)[1].split()
                for line in f
                if f":{ino} " in line and f" {os.getpid()} " in line
            )

    before = our_locks()
    assert before
    source = apsw_backup.Connection(":memory:")
    dest = apsw_backup.Connection(dest_path)
    b = dest.backup("main", source, "main")
    assert our_locks() == before
    b.finish()
    dest.close()
    source.close()
    writer.execute("COMMIT")
    writer.close()


# ----------------------------------------------------------------------------
# No SQL may run (docs/locking.md) on a backup's destination while the backup is unfinished -- it can commit
# the backup's write transaction (a partial copy).
#
# A8: a Cursor of the destination with a live statement on *another* schema
# (attached, or temp) does not stop backup(); closing or dropping that cursor
# during the backup finalizes the statement, and SQLite's autocommit then
# commits every schema's transaction -- the backup's partial copy included.
# finish() says "rolled back"; the destination is corrupt and its old content
# gone.


def make(tmp_path):
    s = ab.Connection(str(tmp_path / "s.db"))
    s.execute("PRAGMA page_size=1024")
    s.execute(
        "CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 "
        "FROM n WHERE i<2000) INSERT INTO t SELECT randomblob(900) FROM n"
    )
    a = ab.Connection(str(tmp_path / "aux.db"))
    a.execute("CREATE TABLE a(x); INSERT INTO a VALUES (1), (2), (3)")
    a.close()
    d = ab.Connection(str(tmp_path / "d.db"))
    d.execute("PRAGMA page_size=1024")
    d.execute("CREATE TABLE old(y); INSERT INTO old VALUES ('old content')")
    d.execute("ATTACH ? AS aux", (str(tmp_path / "aux.db"),))
    return s, d


@pytest.mark.parametrize("how", ["close", "del"])
def test_destination_cursor_finalized_during_backup_keeps_old_content(tmp_path, how):
    s, d = make(tmp_path)
    cur = d.execute("SELECT x FROM aux.a")
    assert cur.fetchone() == (1,)  # a live statement on another schema
    try:
        b = d.backup("main", s, "main")
    except (ab.ThreadingViolationError, ab.SQLError):
        b = None  # refusing the backup is a fine answer
    if b is not None:
        assert b.step(200) is False
        if how == "close":
            cur.close()
        else:
            del cur
        b.finish()  # before the copy completed: rolled back
    d.close(force=True)
    s.close()
    check = ab.Connection(str(tmp_path / "d.db"))
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute("SELECT y FROM old").fetchall() == [("old content",)]
    check.close()
