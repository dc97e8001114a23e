"""Connection (docs/api.md#connection): opening, attributes, closing, transactions, busy
handling, subclassing and the result codes carried by errors."""

import os
import sys
import time

import pytest

import apsw_backup

DEFAULT_FLAGS = apsw_backup.SQLITE_OPEN_READWRITE | apsw_backup.SQLITE_OPEN_CREATE


def rows(connection, sql="SELECT x FROM t ORDER BY rowid"):
    return list(connection.execute(sql))


def same_file(a, b):
    return os.path.realpath(a) == os.path.realpath(b)


# -- opening ---------------------------------------------------------------


def test_open_with_str_creates_the_database(db_path):
    connection = apsw_backup.Connection(str(db_path))
    try:
        connection.execute("CREATE TABLE t(x)")
        assert db_path.exists()
    finally:
        connection.close()


def test_open_with_pathlib_path(db_path):
    connection = apsw_backup.Connection(db_path)
    try:
        connection.execute("CREATE TABLE t(x)")
        assert db_path.exists()
        assert same_file(connection.filename, db_path)
    finally:
        connection.close()


def test_open_with_os_pathlike(db_path):
    class Where:
        def __fspath__(self):
            return str(db_path)

    connection = apsw_backup.Connection(Where())
    try:
        assert same_file(connection.filename, db_path)
    finally:
        connection.close()


@pytest.mark.parametrize("name", [":memory:", ""], ids=["memory", "empty"])
def test_open_memory_and_temporary_databases(name):
    connection = apsw_backup.Connection(name)
    try:
        connection.execute("CREATE TABLE t(x); INSERT INTO t VALUES(7)")
        assert rows(connection) == [(7,)]
        assert connection.filename == ""
    finally:
        connection.close()


def test_memory_connections_are_private():
    first = apsw_backup.Connection(":memory:")
    second = apsw_backup.Connection(":memory:")
    try:
        first.execute("CREATE TABLE t(x)")
        with pytest.raises(apsw_backup.SQLError, match="no such table"):
            second.execute("SELECT * FROM t")
    finally:
        first.close()
        second.close()


def test_open_uri_name_with_sqlite_open_uri(
    populated_db, populated_rows, open_connection
):
    uri = populated_db.as_uri() + "?mode=ro"
    connection = open_connection(uri, flags=DEFAULT_FLAGS | apsw_backup.SQLITE_OPEN_URI)
    assert (
        list(connection.execute("SELECT id, name FROM t ORDER BY id")) == populated_rows
    )
    assert connection.readonly("main") is True
    assert same_file(connection.filename, populated_db)


def test_filename_is_the_full_path(tmp_path, monkeypatch, open_connection):
    monkeypatch.chdir(tmp_path)
    connection = open_connection("relative.db")
    assert os.path.isabs(connection.filename)
    assert same_file(connection.filename, tmp_path / "relative.db")


def test_open_flags_reports_the_flags_used(db_path, populated_db, open_connection):
    default = open_connection(str(db_path))
    assert isinstance(default.open_flags, int)
    assert default.open_flags & DEFAULT_FLAGS == DEFAULT_FLAGS

    readonly = open_connection(
        str(populated_db), flags=apsw_backup.SQLITE_OPEN_READONLY
    )
    assert readonly.open_flags & apsw_backup.SQLITE_OPEN_READONLY
    assert not readonly.open_flags & apsw_backup.SQLITE_OPEN_READWRITE


def test_open_vfs_is_a_str(conn):
    assert isinstance(conn.open_vfs, str)
    assert conn.open_vfs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="unix VFS names")
def test_open_vfs_names_the_vfs_asked_for(db_path, open_connection):
    connection = open_connection(str(db_path), vfs="unix-excl")
    assert connection.open_vfs == "unix-excl"
    connection.execute("CREATE TABLE t(x)")


def test_unknown_vfs_is_sql_error(db_path):
    with pytest.raises(apsw_backup.SQLError, match="no such vfs"):
        apsw_backup.Connection(str(db_path), vfs="no-such-vfs")


def test_missing_file_opened_readonly_is_cant_open_and_not_created(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(apsw_backup.CantOpenError) as excinfo:
        apsw_backup.Connection(str(missing), flags=apsw_backup.SQLITE_OPEN_READONLY)
    assert excinfo.value.result == apsw_backup.SQLITE_CANTOPEN
    assert not missing.exists()


def test_querying_a_junk_file_is_not_a_db_error(tmp_path, open_connection):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is certainly not an SQLite database file\n" * 200)
    connection = open_connection(str(junk))
    with pytest.raises(apsw_backup.NotADBError) as excinfo:
        connection.execute("SELECT * FROM sqlite_master")
    assert excinfo.value.result == apsw_backup.SQLITE_NOTADB


def test_nul_in_filename_is_value_error(tmp_path):
    with pytest.raises(ValueError):
        apsw_backup.Connection(str(tmp_path / "a\x00b.db"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((123,), {}),
        ((None,), {}),
        ((["x.db"],), {}),
        ((":memory:",), {"flags": "6"}),
        ((":memory:",), {"flags": 6.0}),
        ((":memory:",), {"vfs": 3}),
        ((), {}),
    ],
    ids=[
        "int-name",
        "none-name",
        "list-name",
        "str-flags",
        "float-flags",
        "int-vfs",
        "no-args",
    ],
)
def test_wrong_argument_types_are_type_error(args, kwargs):
    with pytest.raises(TypeError):
        apsw_backup.Connection(*args, **kwargs)


def test_nomutex_flag_is_refused_with_value_error(db_path):
    with pytest.raises(ValueError):
        apsw_backup.Connection(
            str(db_path), flags=DEFAULT_FLAGS | apsw_backup.SQLITE_OPEN_NOMUTEX
        )


# -- closing ---------------------------------------------------------------


def test_close_is_idempotent(conn):
    conn.close()
    conn.close()
    conn.close(force=True)


CLOSED_CALLS = {
    "cursor": lambda c: c.cursor(),
    "execute": lambda c: c.execute("SELECT 1"),
    "executemany": lambda c: c.executemany("SELECT ?", [(1,)]),
    "set_busy_timeout": lambda c: c.set_busy_timeout(100),
    "set_busy_handler": lambda c: c.set_busy_handler(lambda n: False),
    "changes": lambda c: c.changes(),
    "total_changes": lambda c: c.total_changes(),
    "last_insert_rowid": lambda c: c.last_insert_rowid(),
    "in_transaction": lambda c: c.in_transaction,
    "get_autocommit": lambda c: c.get_autocommit(),
    "db_names": lambda c: c.db_names(),
    "readonly": lambda c: c.readonly("main"),
    "interrupt": lambda c: c.interrupt(),
    "enter": lambda c: c.__enter__(),
}


@pytest.mark.parametrize("call", CLOSED_CALLS.values(), ids=CLOSED_CALLS.keys())
def test_methods_on_a_closed_connection_raise_connection_closed(conn, call):
    conn.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        call(conn)


def test_closing_the_connection_closes_its_cursors(conn):
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES(1), (2)")
    mid_rows = conn.execute("SELECT x FROM t")
    assert mid_rows.fetchone() == (1,)
    fresh = conn.cursor()
    conn.close()
    with pytest.raises(apsw_backup.CursorClosedError):
        mid_rows.fetchone()
    with pytest.raises(apsw_backup.CursorClosedError):
        fresh.execute("SELECT 1")


# -- transactions ----------------------------------------------------------


def test_with_connection_commits_on_success(conn, db_path, open_connection):
    conn.execute("CREATE TABLE t(x)")
    with conn:
        conn.execute("INSERT INTO t VALUES(1)")
        assert conn.in_transaction is True
    assert conn.in_transaction is False
    other = open_connection(str(db_path))
    assert rows(other) == [(1,)]


def test_with_connection_returns_the_connection(conn):
    with conn as entered:
        assert entered is conn


def test_with_connection_rolls_back_and_propagates_on_exception(conn):
    conn.execute("CREATE TABLE t(x)")
    with pytest.raises(ZeroDivisionError):
        with conn:
            conn.execute("INSERT INTO t VALUES(1)")
            raise ZeroDivisionError("body failed")
    assert rows(conn) == []
    assert conn.in_transaction is False


def test_with_connection_nests(conn, db_path, open_connection):
    conn.execute("CREATE TABLE t(x)")
    with conn:
        conn.execute("INSERT INTO t VALUES(1)")
        with pytest.raises(KeyError):
            with conn:
                conn.execute("INSERT INTO t VALUES(2)")
                raise KeyError("inner")
        with conn:
            conn.execute("INSERT INTO t VALUES(3)")
        assert rows(conn) == [(1,), (3,)]
    other = open_connection(str(db_path))
    assert rows(other) == [(1,), (3,)]


def test_outer_rollback_undoes_a_released_inner_block(conn):
    conn.execute("CREATE TABLE t(x)")
    with pytest.raises(RuntimeError):
        with conn:
            with conn:
                conn.execute("INSERT INTO t VALUES(1)")
            raise RuntimeError("outer")
    assert rows(conn) == []


def test_changes_total_changes_and_last_insert_rowid(conn):
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES(1), (2), (3)")
    assert conn.changes() == 3
    assert conn.total_changes() == 3
    conn.execute("UPDATE t SET x = x + 10 WHERE x >= 2")
    assert conn.changes() == 2
    assert conn.total_changes() == 5
    conn.execute("INSERT INTO t(rowid, x) VALUES(42, 0)")
    assert conn.last_insert_rowid() == 42
    assert conn.changes() == 1


def test_in_transaction_and_get_autocommit_follow_begin_and_commit(conn):
    conn.execute("CREATE TABLE t(x)")
    assert conn.in_transaction is False
    assert conn.get_autocommit() is True
    conn.execute("BEGIN")
    assert conn.in_transaction is True
    assert conn.get_autocommit() is False
    conn.execute("INSERT INTO t VALUES(1)")
    conn.execute("COMMIT")
    assert conn.in_transaction is False
    assert conn.get_autocommit() is True


def test_db_names_lists_attached_databases(conn, tmp_path):
    conn.execute("ATTACH ? AS other", (str(tmp_path / "other.db"),))
    assert conn.db_names() == ["main", "temp", "other"]


def test_readonly_is_false_for_a_writable_main(conn):
    assert conn.readonly("main") is False


def test_readonly_is_true_for_a_database_opened_readonly(populated_db, open_connection):
    connection = open_connection(
        str(populated_db), flags=apsw_backup.SQLITE_OPEN_READONLY
    )
    assert connection.readonly("main") is True


def test_readonly_with_unknown_name_is_sql_error(conn):
    with pytest.raises(apsw_backup.SQLError):
        conn.readonly("nosuchdb")


def test_writing_a_readonly_database_is_readonly_error(populated_db, open_connection):
    connection = open_connection(
        str(populated_db), flags=apsw_backup.SQLITE_OPEN_READONLY
    )
    with pytest.raises(apsw_backup.ReadOnlyError) as excinfo:
        connection.execute("INSERT INTO t VALUES(10, 'ten')")
    assert excinfo.value.result == apsw_backup.SQLITE_READONLY


# -- busy handling ---------------------------------------------------------


@pytest.fixture
def locked_db(populated_db, open_connection):
    """Path of a database another Connection holds with BEGIN EXCLUSIVE."""
    holder = open_connection(str(populated_db))
    holder.execute("BEGIN EXCLUSIVE")
    return populated_db


def test_busy_timeout_waits_about_that_long_then_busy_error(locked_db, open_connection):
    waiter = open_connection(str(locked_db))
    waiter.set_busy_timeout(300)
    start = time.monotonic()
    with pytest.raises(apsw_backup.BusyError) as excinfo:
        waiter.execute("SELECT count(*) FROM t")
    elapsed = time.monotonic() - start
    assert 0.8 * 0.3 <= elapsed < 5.0
    assert excinfo.value.result == apsw_backup.SQLITE_BUSY


def test_without_busy_timeout_busy_error_is_immediate(locked_db, open_connection):
    waiter = open_connection(str(locked_db))
    start = time.monotonic()
    with pytest.raises(apsw_backup.BusyError):
        waiter.execute("SELECT count(*) FROM t")
    assert time.monotonic() - start < 0.2


def test_busy_handler_gets_increasing_retry_counts_until_it_returns_false(
    locked_db, open_connection
):
    counts = []

    def handler(count):
        counts.append(count)
        return count < 3

    waiter = open_connection(str(locked_db))
    waiter.set_busy_handler(handler)
    with pytest.raises(apsw_backup.BusyError):
        waiter.execute("SELECT count(*) FROM t")
    assert counts == [0, 1, 2, 3]


def test_busy_handler_exception_propagates_out_of_execute(locked_db, open_connection):
    class HandlerFailed(Exception):
        pass

    def handler(count):
        raise HandlerFailed(count)

    waiter = open_connection(str(locked_db))
    waiter.set_busy_handler(handler)
    with pytest.raises(HandlerFailed):
        waiter.execute("SELECT count(*) FROM t")


def test_busy_handler_none_removes_the_handler(locked_db, open_connection):
    counts = []
    waiter = open_connection(str(locked_db))
    waiter.set_busy_handler(lambda count: counts.append(count) or count < 100)
    waiter.set_busy_handler(None)
    with pytest.raises(apsw_backup.BusyError):
        waiter.execute("SELECT count(*) FROM t")
    assert counts == []


@pytest.mark.parametrize(
    "handler", [42, "handler", object()], ids=["int", "str", "object"]
)
def test_busy_handler_not_callable_is_type_error(conn, handler):
    with pytest.raises(TypeError):
        conn.set_busy_handler(handler)


def test_busy_timeout_not_int_is_type_error(conn):
    with pytest.raises(TypeError):
        conn.set_busy_timeout("100")


# -- subclassing -----------------------------------------------------------


class CountingConnection(apsw_backup.Connection):
    def __init__(self, filename, label):
        super().__init__(filename)
        self.label = label

    def count(self, table):
        return self.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_connection_can_be_subclassed(populated_db, populated_rows):
    connection = CountingConnection(str(populated_db), label="mine")
    try:
        assert isinstance(connection, apsw_backup.Connection)
        assert connection.label == "mine"
        assert connection.count("t") == len(populated_rows)
        assert connection.cursor().connection is connection
        assert same_file(connection.filename, populated_db)
    finally:
        connection.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        connection.count("t")


# -- result codes on errors ------------------------------------------------


def test_unique_violation_is_constraint_error_with_extended_code(conn):
    conn.execute("CREATE TABLE u(x UNIQUE); INSERT INTO u VALUES(1)")
    with pytest.raises(apsw_backup.ConstraintError) as excinfo:
        conn.execute("INSERT INTO u VALUES(1)")
    assert excinfo.value.result == 19
    assert excinfo.value.extendedresult == 2067
    assert "UNIQUE" in str(excinfo.value)


def test_undecodable_filename_round_trips_like_os_fsencode(tmp_path):
    name = tmp_path / "caf\udce9.db"  # b"caf\xe9.db": not UTF-8
    conn = apsw_backup.Connection(name)
    try:
        conn.execute("CREATE TABLE t(x)")
        assert conn.filename == str(name)
        assert os.path.exists(os.fsencode(name))
    finally:
        conn.close()


def test_busy_handler_exception_comes_out_even_when_sqlite_gets_on(tmp_path):
    """A declined wait does not always fail the statement: PRAGMA
    wal_checkpoint answers a row (busy=1).  The handler's exception must
    still come out (before: SystemError, a result with an exception set)."""
    path = str(tmp_path / "w.db")
    a = apsw_backup.Connection(path)
    a.execute("PRAGMA journal_mode=WAL").fetchall()
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)").fetchall()
    reader = apsw_backup.Connection(path)
    reader.execute("BEGIN; SELECT * FROM t").fetchall()

    def handler(count):
        raise KeyError("from the busy handler")

    a.set_busy_handler(handler)
    with pytest.raises(KeyError, match="from the busy handler"):
        a.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    a.set_busy_handler(None)
    assert a.execute("SELECT x FROM t").fetchall() == [(1,)]
    reader.close()
    a.close()


def test_file_header_reads_through_sqlites_own_handle(tmp_path):
    path = tmp_path / "h.db"
    conn = apsw_backup.Connection(str(path))
    try:
        assert conn.file_header() == b""  # nothing written yet
        conn.execute("PRAGMA page_size=8192; CREATE TABLE t(x)")
        header = conn.file_header()
        assert len(header) == 100 and header.startswith(b"SQLite format 3\0")
        assert int.from_bytes(header[16:18], "big") == 8192
        conn.execute("PRAGMA journal_mode=wal")
        assert conn.file_header("main")[18:20] == b"\x02\x02"
        assert conn.file_header("temp") == b""  # no file behind it
        with pytest.raises(apsw_backup.SQLError, match="unknown database 'nope'"):
            conn.file_header("nope")
        with pytest.raises(TypeError):
            conn.file_header(3)
    finally:
        conn.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        conn.file_header()


def test_file_header_leaves_every_posix_lock_in_place(tmp_path):
    # A read transaction holds a SHARED lock; reading the header through a
    # descriptor of our own would drop it on close (sqlite.org/howtocorrupt).
    path = str(tmp_path / "locks.db")
    conn = apsw_backup.Connection(path)
    conn.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    conn.execute("BEGIN; SELECT * FROM t").fetchall()
    info = os.stat(path)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"

    def our_locks():
        with open("/proc/locks") as f:
            return sorted(
                line.split(":", 1)[1].split()
                for line in f
                if line.split()[-3:-2] == [device]
                and line.split()[-4:-3] == [str(os.getpid())]
            )

    before = our_locks()
    assert before, "the read transaction should hold a lock"
    conn.file_header()
    other = apsw_backup.Connection(path, apsw_backup.SQLITE_OPEN_READONLY)
    other.file_header()
    other.close()
    deadline = time.monotonic() + 2  # a doubled entry seen for a moment
    while our_locks() != before and time.monotonic() < deadline:
        assert set(map(tuple, before)) <= set(map(tuple, our_locks()))
        time.sleep(0.05)
    with open("/proc/locks") as f:
        table = f.read()
    assert our_locks() == before, table
    conn.execute("COMMIT")
    conn.close()
