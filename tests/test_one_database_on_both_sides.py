"""One database on both sides (docs/locking.md): a backup whose source and
destination are one database must be refused, never hang.

A4: the destination connection has ATTACHed the source's shared cache under
another schema name: `step()` self-deadlocks inside SQLite (no CPU,
interrupt() cannot help) -- the check compares only the two named schemas.
A5: the memdb VFS shares a database between connections by name
(`file:/name?vfs=memdb`): no file, so the inode check cannot see it; every
step is BUSY, and copy() with the default timeout=None retries for ever.

Hang-prone cases run in a subprocess.
"""

import pytest
from attack_helpers import child_env
from backup_helpers import build_file
from child_process import run_bounded

import apsw_backup
import apsw_backup as ab

URI = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI


@pytest.mark.skipif(
    tuple(map(int, ab.sqlite_lib_version().split("."))) < (3, 39),
    reason="listing the destination's schemas without SQL needs sqlite3_db_name "
    "(3.39+); before it only main and temp are checked (docs/testing.md)",
)
def test_destination_attached_source_shared_cache_refused(tmp_path):
    proc = run_bounded(
        """
        import apsw_backup as ab
        F = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI
        s = ab.Connection("file:attack_a4?mode=memory&cache=shared", F)
        s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        d = ab.Connection(":memory:", F)
        d.execute("ATTACH 'file:attack_a4?mode=memory&cache=shared' AS aux")
        try:
            b = d.backup("main", s, "main")
        except ValueError as exc:
            print("REFUSED", exc)
        else:
            print("STEP", b.step(-1), flush=True)   # the defect: never returns
            b.finish()
        """,
        timeout=15,
        env=child_env(tmp_path),
    )
    assert "REFUSED" in proc.stdout and "cache" in proc.stdout, (
        proc.stdout + proc.stderr
    )


def test_memdb_same_database_backup_refused():
    s = ab.Connection("file:/attack_a5?vfs=memdb", URI)
    d = ab.Connection("file:/attack_a5?vfs=memdb", URI)
    try:
        s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        with pytest.raises(ValueError, match="same database"):
            d.backup("main", s, "main").close(force=True)
    finally:
        d.close(force=True)
        s.close(force=True)


def test_memdb_same_database_copy_does_not_spin(tmp_path):
    proc = run_bounded(
        """
        import apsw_backup as ab
        F = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI
        s = ab.Connection("file:/attack_a5c?vfs=memdb", F)
        s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        d = ab.Connection("file:/attack_a5c?vfs=memdb", F)
        try:
            ab.copy(s, d)        # timeout=None: the defect spins for ever
        except ValueError as exc:
            print("REFUSED", exc)
        """,
        timeout=15,
        env=child_env(tmp_path),
    )
    assert "REFUSED" in proc.stdout, proc.stdout + proc.stderr


def test_renamed_source_file_opened_as_destination_refused(tmp_path):
    import os

    s = ab.Connection(str(tmp_path / "a.db"))
    s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    os.rename(tmp_path / "a.db", tmp_path / "b.db")  # s still has the file open
    d = ab.Connection(str(tmp_path / "b.db"))  # the same file, another name
    try:
        with pytest.raises(ValueError, match="same database file"):
            d.backup("main", s, "main").close(force=True)
    finally:
        d.close(force=True)
        s.close(force=True)


def test_replaced_source_path_is_not_the_same_file(tmp_path):
    import os

    s = ab.Connection(str(tmp_path / "c.db"))
    s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (2)")
    o = ab.Connection(str(tmp_path / "other.db"))
    o.execute("CREATE TABLE o(x)")
    o.close()
    os.rename(tmp_path / "other.db", tmp_path / "c.db")  # s keeps the old file
    d = ab.Connection(str(tmp_path / "c.db"))  # another file under s's name
    try:
        b = d.backup("main", s, "main")
        assert b.step(-1) is True
        b.finish()
        assert d.execute("SELECT x FROM t").fetchall() == [(2,)]
    finally:
        d.close(force=True)
        s.close(force=True)


def test_private_memdb_databases_with_one_name_can_be_copied():
    # Without a leading "/", a memdb name is private to its connection:
    # two connections opening "file:m?vfs=memdb" have two databases.
    s = ab.Connection("file:attack_a17?vfs=memdb", URI)
    d = ab.Connection("file:attack_a17?vfs=memdb", URI)
    try:
        s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        assert d.execute("SELECT count(*) FROM sqlite_master").fetchall() == [(0,)]
        b = d.backup("main", s, "main")
        assert b.step(-1) is True
        b.finish()
        assert d.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        d.close(force=True)
        s.close(force=True)


@pytest.mark.parametrize("sname, dname", [("/attack_e1", "/attack_e2"), ("e3", "e3")])
def test_two_empty_memdb_databases_are_not_taken_for_one(sname, dname):
    # A memdb store that was never written has no content address: two such
    # stores must not compare equal (SQLite prints a NULL %p as "0").
    s = ab.Connection(f"file:{sname}?vfs=memdb", URI)
    d = ab.Connection(f"file:{dname}?vfs=memdb", URI)
    try:
        b = d.backup("main", s, "main")
        assert b.step(-1) is True
        b.finish()
    finally:
        d.close(force=True)
        s.close(force=True)


def test_one_empty_shared_memdb_database_is_refused_or_ends_at_the_timeout():
    # SQLite 3.40 names a shared memdb database "/name" (refused as one
    # database); 3.46+ names it "" and an empty store has no address to
    # compare, so the copy waits on its own lock until the timeout
    # (docs/testing.md, SQLite versions).  Either way it ends.
    s = ab.Connection("file:/attack_e4?vfs=memdb", URI)
    d = ab.Connection("file:/attack_e4?vfs=memdb", URI)
    try:
        with pytest.raises((ValueError, ab.BusyError)) as info:
            ab.copy(s, d, timeout=0.5)
        if isinstance(info.value, ValueError):
            assert "same database" in str(info.value)
        else:
            assert "deadline passed" in str(info.value)
        assert not d.in_transaction if hasattr(d, "in_transaction") else True
    finally:
        d.close(force=True)
        s.close(force=True)


# -- the same, between connections of one file or one shared cache -----------


@pytest.mark.parametrize(
    "uri",
    ["file:memdb1?mode=memory&cache=shared", "file:{d}/shared.db?cache=shared"],
)
def test_backup_between_connections_sharing_a_cache_is_refused(tmp_path, uri):
    """Found in review: step(-1) hung for ever (no CPU, deaf to
    interrupt()) before the fix."""
    proc = run_bounded(
        f"""
        import sys, apsw_backup as ab
        d = sys.argv[1]
        flags = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI
        uri = {uri!r}.format(d=d)
        a = ab.Connection(uri, flags)
        a.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
        b = ab.Connection(uri, flags)
        try:
            b.backup("main", a, "main").step(-1)
        except ValueError as exc:
            print("refused:", exc)
        """,
        tmp_path,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout
    assert "share one SQLite cache" in proc.stdout


def test_backup_between_two_connections_of_one_file_is_refused(connect, src):
    other = connect("src.db")
    with pytest.raises(ValueError, match="same database file"):
        other.backup("main", src, "main")
    other.execute("SELECT 1").fetchall()  # nothing locked


def test_backup_into_one_file_attached_elsewhere_is_refused(connect, src, tmp_path):
    other = connect("other.db")
    other.execute(f"ATTACH '{tmp_path / 'src.db'}' AS aux").fetchall()
    with pytest.raises(ValueError, match="same database file"):
        other.backup("aux", src, "main")
    assert other.backup("main", src, "main").step(-1) is True


def test_shared_cache_pair_on_other_schemas_still_works(tmp_path):
    """Two connections sharing a cache may still copy between *different*
    databases: only the same pager is refused."""
    flags = (
        apsw_backup.SQLITE_OPEN_READWRITE
        | apsw_backup.SQLITE_OPEN_CREATE
        | apsw_backup.SQLITE_OPEN_URI
    )
    uri = "file:memdb_other?mode=memory&cache=shared"
    a = apsw_backup.Connection(uri, flags)
    b = apsw_backup.Connection(uri, flags)
    build_file(tmp_path / "s.db")
    b.execute(f"ATTACH '{tmp_path / 's.db'}' AS s").fetchall()
    bk = a.backup("main", b, "s")
    assert bk.step(-1) is True
    bk.finish()
    assert a.execute("SELECT count(*) FROM t").fetchall() == [(400,)]
    b.close()
    a.close()
