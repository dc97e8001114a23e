"""docs/api.md#errors-from-step, docs/api.md#backup: step errors -- BUSY that can be retried, the two known traps
reported clearly and at once, sticky errors."""

import time

import pytest
from backup_helpers import (
    build_file,
    dump,
    dump_path,
    exclusive_lock,
    make_old_content,
    populate,
)

import apsw_backup

OK = [("ok",)]
OLD = [(0,), (1,), (2,)]


@pytest.fixture
def src_lock(connect, src):
    """Another connection holding BEGIN EXCLUSIVE on the source file."""
    with exclusive_lock(connect.path("src.db")) as other:
        yield other


def old_rows(conn):
    return conn.execute("SELECT n FROM old ORDER BY n").fetchall()


def abandoned_busy_backup(dest, src, src_lock):
    """A backup whose last step failed with BUSY and was not retried."""
    b = dest.backup("main", src, "main")
    with pytest.raises(apsw_backup.BusyError):
        b.step(5)
    return b


# -- item 4: BUSY ------------------------------------------------------------


def test_step_is_busy_while_another_connection_holds_exclusive_lock(
    dest, src, src_lock
):
    b = dest.backup("main", src, "main")
    with pytest.raises(apsw_backup.BusyError) as info:
        b.step(5)
    message = str(info.value)
    assert message.strip().lower() != "not an error"
    assert "not an error" not in message.lower()
    assert "lock" in message.lower()
    assert info.value.result == apsw_backup.SQLITE_BUSY == 5
    assert info.value.extendedresult & 0xFF == 5
    assert b  # still usable
    b.close(True)


def test_step_is_busy_while_another_connection_locks_destination(connect, dest, src):
    b = dest.backup("main", src, "main")
    with exclusive_lock(connect.path("dest.db")):
        with pytest.raises(apsw_backup.BusyError) as info:
            b.step(5)
        assert "not an error" not in str(info.value).lower()
        assert info.value.result == 5
        assert b
    assert b.step(-1) is True
    b.finish()
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_step_busy_is_retryable(connect, dest, src, src_lock):
    b = dest.backup("main", src, "main")
    for _ in range(2):
        with pytest.raises(apsw_backup.BusyError):
            b.step(5)
    assert b and not b.done

    src_lock.execute("COMMIT").fetchall()

    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_step_busy_after_some_pages_is_retryable(connect, dest, src):
    b = dest.backup("main", src, "main")
    b.step(10)
    with exclusive_lock(connect.path("src.db")), pytest.raises(apsw_backup.BusyError):
        b.step(10)
    assert b.step(-1) is True
    b.finish()
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_finish_after_abandoned_busy_step_is_busy_then_silent(dest, src, src_lock):
    b = abandoned_busy_backup(dest, src, src_lock)

    with pytest.raises(apsw_backup.BusyError) as info:
        b.finish()
    assert "not an error" not in str(info.value).lower()
    assert info.value.result == 5

    assert not b  # finished anyway
    assert b.finish() is None
    assert b.close() is None
    assert old_rows(dest) == OLD  # unlocked, old content


def test_close_after_abandoned_busy_step_is_busy(dest, src, src_lock):
    b = abandoned_busy_backup(dest, src, src_lock)
    with pytest.raises(apsw_backup.BusyError):
        b.close()
    assert not b
    assert b.close() is None
    assert old_rows(dest) == OLD


def test_close_force_swallows_finish_busy_error(dest, src, src_lock):
    b = abandoned_busy_backup(dest, src, src_lock)
    assert b.close(True) is None
    assert not b
    assert old_rows(dest) == OLD


def test_exit_raises_finish_busy_error_when_body_succeeded(dest, src, src_lock):
    b = dest.backup("main", src, "main")
    with pytest.raises(apsw_backup.BusyError):
        b.step(5)
    # the block's body succeeds; leaving it finishes, and that fails
    with pytest.raises(apsw_backup.BusyError), b:
        pass
    assert not b
    assert old_rows(dest) == OLD


def test_exit_hides_finish_busy_error_when_body_raised(dest, src, src_lock):
    class BodyError(Exception):
        pass

    with pytest.raises(BodyError) as info, dest.backup("main", src, "main") as b:
        with pytest.raises(apsw_backup.BusyError):
            b.step(5)
        raise BodyError("from the body")
    assert str(info.value) == "from the body"
    assert not b
    assert old_rows(dest) == OLD


def test_exit_lets_busy_step_error_from_body_out(dest, src, src_lock):
    # the body's own BusyError comes out; finish's error does not replace it
    raised = []
    with (
        pytest.raises(apsw_backup.BusyError) as info,
        dest.backup("main", src, "main") as b,
    ):
        try:
            b.step(5)
        except apsw_backup.BusyError as exc:
            raised.append(exc)
            raise
    assert info.value is raised[0]
    assert not b
    assert old_rows(dest) == OLD


# -- item 5: the source's own write transaction ---------------------------------


def test_source_own_write_transaction_is_busy_at_once_naming_the_cure(dest, src):
    src.set_busy_timeout(5000)
    dest.set_busy_timeout(5000)
    src.execute(
        "BEGIN; INSERT INTO t(name, data) VALUES ('uncommitted', x'00')"
    ).fetchall()
    b = dest.backup("main", src, "main")

    start = time.monotonic()
    with pytest.raises(apsw_backup.BusyError) as info:
        b.step(5)
    elapsed = time.monotonic() - start

    assert elapsed < 1.0
    message = str(info.value).lower()
    assert "transaction" in message
    assert "commit" in message
    assert "rollback" in message or "roll back" in message
    assert "not an error" not in message
    assert info.value.result == 5
    assert b  # still usable
    b.close(True)
    src.execute("ROLLBACK").fetchall()


def test_source_own_write_transaction_backup_proceeds_after_commit(connect, dest, src):
    src.execute(
        "BEGIN; INSERT INTO t(name, data) VALUES ('committed', x'00')"
    ).fetchall()
    b = dest.backup("main", src, "main")
    with pytest.raises(apsw_backup.BusyError):
        b.step(5)

    src.execute("COMMIT").fetchall()

    assert b.step(-1) is True
    b.finish()
    assert dest.execute(
        "SELECT count(*) FROM t WHERE name = 'committed'"
    ).fetchall() == [(1,)]
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_source_own_read_transaction_does_not_block(dest, src):
    src.execute("BEGIN").fetchall()
    assert src.execute("SELECT count(*) FROM t").fetchall() == [(400,)]
    with dest.backup("main", src, "main") as b:
        assert b.step(-1) is True
    src.execute("COMMIT").fetchall()
    assert dump(dest) == dump(src)


# -- item 5: a WAL or in-memory destination of another page size ----------------


@pytest.fixture
def src_1024(connect):
    build_file(connect.path("src1024.db"), page_size=1024, rows=50)
    return connect("src1024.db")


@pytest.fixture
def wal_dest(connect):
    conn = connect("wal.db")
    conn.execute("PRAGMA page_size=4096").fetchall()
    assert conn.execute("PRAGMA journal_mode=wal").fetchall() == [("wal",)]
    make_old_content(conn)
    return conn


@pytest.fixture
def memory_dest(connect):
    conn = connect(":memory:")
    conn.execute("PRAGMA page_size=4096").fetchall()
    make_old_content(conn)
    return conn


@pytest.fixture(params=["wal", "memory"])
def fixed_size_dest(request):
    return request.getfixturevalue(f"{request.param}_dest")


def test_wal_destination_with_other_page_size_is_readonly_naming_both_sizes(
    wal_dest, src_1024
):
    b = wal_dest.backup("main", src_1024, "main")
    with pytest.raises(apsw_backup.ReadOnlyError) as info:
        b.step(5)
    message = str(info.value)
    assert "1024" in message and "4096" in message
    assert "wal" in message.lower()
    assert "not an error" not in message.lower()
    assert info.value.result == apsw_backup.SQLITE_READONLY
    b.close(True)


def test_memory_destination_with_other_page_size_is_readonly_naming_both_sizes(
    memory_dest, src_1024
):
    b = memory_dest.backup("main", src_1024, "main")
    with pytest.raises(apsw_backup.ReadOnlyError) as info:
        b.step(5)
    message = str(info.value)
    assert "1024" in message and "4096" in message
    assert "memory" in message.lower()
    assert info.value.result == apsw_backup.SQLITE_READONLY
    b.close(True)


@pytest.mark.parametrize("kind", ["temp", "attached-memory"])
def test_temp_or_attached_memory_destination_with_other_page_size_is_readonly(
    connect, src_1024, kind
):
    dest = connect("dest.db")
    if kind == "temp":
        name = "temp"
        dest.execute("CREATE TEMP TABLE old(n INTEGER)").fetchall()
    else:
        name = "mem"
        dest.execute("ATTACH ':memory:' AS mem").fetchall()
        make_old_content(dest, "mem")
    assert dest.execute(f"PRAGMA {name}.page_size").fetchall() == [(4096,)]

    b = dest.backup(name, src_1024, "main")
    with pytest.raises(apsw_backup.ReadOnlyError) as info:
        b.step(5)

    message = str(info.value)
    assert "1024" in message and "4096" in message
    assert "not an error" not in message.lower()
    b.close(True)
    # unlocked, and the schema keeps its old content
    rows = 0 if kind == "temp" else 3
    assert dest.execute(f"SELECT count(*) FROM {name}.old").fetchall() == [(rows,)]


def test_page_size_error_is_reported_at_once(fixed_size_dest, src_1024):
    fixed_size_dest.set_busy_timeout(5000)
    src_1024.set_busy_timeout(5000)
    b = fixed_size_dest.backup("main", src_1024, "main")
    start = time.monotonic()
    with pytest.raises(apsw_backup.ReadOnlyError):
        b.step(-1)
    assert time.monotonic() - start < 1.0
    b.close(True)


def test_page_size_error_is_sticky(fixed_size_dest, src_1024):
    b = fixed_size_dest.backup("main", src_1024, "main")
    with pytest.raises(apsw_backup.ReadOnlyError) as first:
        b.step(5)

    for npages in (5, 0, -1):
        with pytest.raises(apsw_backup.ReadOnlyError) as again:
            b.step(npages)
        assert "1024" in str(again.value) and "4096" in str(again.value)
    assert b

    with pytest.raises(apsw_backup.ReadOnlyError) as at_finish:
        b.finish()
    assert "1024" in str(at_finish.value) and "4096" in str(at_finish.value)
    assert str(at_finish.value) == str(first.value)

    assert not b
    assert b.finish() is None
    assert old_rows(fixed_size_dest) == OLD  # unlocked, untouched


def test_page_size_error_is_raised_by_exit(fixed_size_dest, src_1024):
    b = fixed_size_dest.backup("main", src_1024, "main")
    with pytest.raises(apsw_backup.ReadOnlyError):
        b.step(5)
    with pytest.raises(apsw_backup.ReadOnlyError), b:
        pass
    assert not b
    assert old_rows(fixed_size_dest) == OLD


def test_memory_destination_with_same_page_size_copies(connect, memory_dest):
    src = populate(connect(":memory:"), page_size=4096, rows=50)
    with memory_dest.backup("main", src, "main") as b:
        assert b.step(-1) is True
    assert dump(memory_dest) == dump(src)


def test_wal_destination_with_same_page_size_copies(connect, wal_dest, src):
    with wal_dest.backup("main", src, "main") as b:
        assert b.step(-1) is True
    assert dump(wal_dest) == dump(src)
    assert dump_path(connect.path("wal.db")) == (dump(src), OK)


def test_source_locked_as_destination_of_another_backup_says_finish_that_one():
    a, b, c = (apsw_backup.Connection(":memory:") for _ in range(3))
    a.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    b.execute("CREATE TABLE u(x); INSERT INTO u VALUES (2)")
    reading_b = c.backup("main", b, "main")
    writing_b = b.backup("main", a, "main")
    writing_b.step(0)  # takes b's write transaction and keeps it
    with pytest.raises(apsw_backup.BusyError) as info:
        reading_b.step(1)
    message = str(info.value)
    assert "destination of an unfinished Backup" in message
    assert "Finish that backup first" in message
    assert "COMMIT" not in message
    writing_b.finish()
    assert reading_b.step(-1) is True
    reading_b.finish()
    assert c.execute("SELECT x FROM u").fetchall() == [(2,)]
