"""docs/api.md#backup: Connection.backup() checks, step(), finish()/close(),
attributes, context manager, bool and repr."""

import gc
import sqlite3
import weakref

import pytest
from backup_helpers import build_file, dump, dump_path

import apsw_backup

OK = [("ok",)]
OLD = [(0,), (1,), (2,)]


@pytest.fixture
def closed_src(connect):
    conn = connect("closed.db")
    conn.close()
    return conn


@pytest.fixture
def busy_dest(connect, dest):
    """dest with an unfinished backup from another source."""
    other = connect("other.db")
    backup = dest.backup("main", other, "main")
    yield dest
    backup.finish()


def old_rows(conn):
    return conn.execute("SELECT n FROM old ORDER BY n").fetchall()


# -- 3.1 the checks of Connection.backup(), in order -------------------------


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("main",),
        (1, 2, 3),
        ("ma\0in", None, "main"),
        ("main", "not a connection", "main"),
    ],
)
def test_backup_on_closed_destination_is_connection_closed_before_arguments(
    connect, src, args
):
    dest = connect("dest.db")
    dest.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        dest.backup(*args)


def test_backup_on_closed_destination_is_connection_closed_for_good_arguments(
    connect, src
):
    dest = connect("dest.db")
    dest.close()
    with pytest.raises(apsw_backup.ConnectionClosedError):
        dest.backup("main", src, "main")


BAD_TYPES = [
    pytest.param(lambda s: (), id="no-arguments"),
    pytest.param(lambda s: ("main",), id="one-argument"),
    pytest.param(lambda s: ("main", s), id="two-arguments"),
    pytest.param(lambda s: ("main", s, "main", "main"), id="four-arguments"),
    pytest.param(lambda s: (1, s, "main"), id="int-databasename"),
    pytest.param(lambda s: (None, s, "main"), id="none-databasename"),
    pytest.param(lambda s: (b"main", s, "main"), id="bytes-databasename"),
    pytest.param(lambda s: ("main", s, 0), id="int-sourcedatabasename"),
    pytest.param(lambda s: ("main", s, None), id="none-sourcedatabasename"),
]


@pytest.mark.parametrize("make_args", BAD_TYPES)
def test_backup_with_wrong_argument_count_or_type_is_type_error(dest, src, make_args):
    with pytest.raises(TypeError):
        dest.backup(*make_args(src))
    assert old_rows(dest) == OLD  # not locked


@pytest.mark.parametrize("make_args", BAD_TYPES)
def test_backup_argument_types_are_checked_before_source_is_open(
    dest, closed_src, make_args
):
    with pytest.raises(TypeError):
        dest.backup(*make_args(closed_src))


def test_backup_with_unknown_keyword_is_type_error(dest, src):
    with pytest.raises(TypeError):
        dest.backup(
            databasename="main", sourceconnection=src, sourcedatabasename="main", x=1
        )
    with pytest.raises(TypeError):
        dest.backup(dbname="main", sourceconnection=src, sourcedatabasename="main")


@pytest.mark.parametrize(
    "names", [("ma\0in", "main"), ("main", "ma\0in"), ("\0", "\0")]
)
def test_backup_with_nul_in_a_name_is_value_error(dest, src, closed_src, names):
    with pytest.raises(ValueError):
        dest.backup(names[0], src, names[1])
    # checked before the source's state
    with pytest.raises(ValueError):
        dest.backup(names[0], closed_src, names[1])
    assert old_rows(dest) == OLD


@pytest.mark.parametrize(
    "make_source",
    [
        pytest.param(lambda path: None, id="None"),
        pytest.param(lambda path: str(path), id="path-str"),
        pytest.param(lambda path: path, id="path"),
        pytest.param(lambda path: sqlite3.connect(str(path)), id="sqlite3-connection"),
        pytest.param(lambda path: object(), id="object"),
    ],
)
def test_backup_source_must_be_a_connection(connect, dest, make_source):
    build_file(connect.path("src.db"))
    source = make_source(connect.path("src.db"))
    try:
        with pytest.raises(TypeError):
            dest.backup("main", source, "main")
    finally:
        if isinstance(source, sqlite3.Connection):
            source.close()
    assert old_rows(dest) == OLD


def test_backup_source_may_be_a_connection_subclass(connect, dest):
    class MyConnection(apsw_backup.Connection):
        pass

    build_file(connect.path("src.db"))
    source = MyConnection(str(connect.path("src.db")))
    try:
        with dest.backup("main", source, "main") as b:
            assert b.step(-1) is True
        assert dump(dest) == dump(source)
    finally:
        source.close()


def test_backup_from_closed_source_is_connection_closed(dest, closed_src):
    with pytest.raises(apsw_backup.ConnectionClosedError):
        dest.backup("main", closed_src, "main")
    assert old_rows(dest) == OLD


def test_backup_from_closed_source_is_checked_before_destination_lock(
    busy_dest, closed_src
):
    with pytest.raises(apsw_backup.ConnectionClosedError):
        busy_dest.backup("main", closed_src, "main")


def test_backup_from_itself_is_value_error(dest):
    with pytest.raises(ValueError):
        dest.backup("main", dest, "main")
    with pytest.raises(ValueError):
        dest.backup("temp", dest, "main")
    assert old_rows(dest) == OLD


def test_backup_from_itself_is_checked_before_destination_lock(busy_dest):
    with pytest.raises(ValueError):
        busy_dest.backup("main", busy_dest, "main")


def test_backup_into_destination_with_unfinished_backup_is_threading_violation(
    busy_dest, src
):
    with pytest.raises(apsw_backup.ThreadingViolationError) as info:
        busy_dest.backup("main", src, "main")
    assert "unfinished backup" in str(info.value).lower()
    # checked before SQLite sees the names
    with pytest.raises(apsw_backup.ThreadingViolationError):
        busy_dest.backup("nosuch", src, "nosuch")


@pytest.mark.parametrize("names", [("nosuch", "main"), ("main", "nosuch")])
def test_backup_with_unknown_schema_is_sql_error(dest, src, names):
    with pytest.raises(apsw_backup.SQLError) as info:
        dest.backup(names[0], src, names[1])
    assert "unknown database" in str(info.value)
    assert "nosuch" in str(info.value)
    assert info.value.result == apsw_backup.SQLITE_ERROR
    # a failed backup() leaves the destination unlocked
    assert old_rows(dest) == OLD


def test_backup_into_destination_with_active_statement_is_sql_error_in_use(dest, src):
    cursor = dest.execute("SELECT n FROM old ORDER BY n")
    assert next(cursor) == (0,)

    with pytest.raises(apsw_backup.SQLError) as info:
        dest.backup("main", src, "main")

    assert "destination database is in use" in str(info.value)
    # nothing is locked: the statement carries on, the connection works
    assert list(cursor) == [(1,), (2,)]
    assert old_rows(dest) == OLD


def test_backup_into_destination_with_open_transaction_is_sql_error_in_use(dest, src):
    dest.execute("BEGIN IMMEDIATE").fetchall()
    with pytest.raises(apsw_backup.SQLError) as info:
        dest.backup("main", src, "main")
    assert "destination database is in use" in str(info.value)
    dest.execute("ROLLBACK").fetchall()
    with dest.backup("main", src, "main") as b:
        assert b.step(-1) is True


def test_backup_accepts_keyword_arguments(dest, src):
    b = dest.backup(
        databasename="main", sourceconnection=src, sourcedatabasename="main"
    )
    with b:
        assert b.step(-1) is True
    assert dump(dest) == dump(src)


def test_backup_accepts_mixed_positional_and_keyword_arguments(dest, src):
    with dest.backup("main", sourcedatabasename="main", sourceconnection=src) as b:
        assert b.step(-1) is True
    assert dump(dest) == dump(src)


def test_backup_keeps_both_connections_alive(connect):
    build_file(connect.path("src.db"))
    b = apsw_backup.Connection(str(connect.path("dest.db"))).backup(
        "main", apsw_backup.Connection(str(connect.path("src.db"))), "main"
    )
    gc.collect()
    assert b.step(-1) is True
    b.finish()
    assert dump_path(connect.path("dest.db")) == dump_path(connect.path("src.db"))


# -- 3.2 step() ----------------------------------------------------------------


def test_remaining_and_page_count_are_zero_before_first_step(dest, src):
    with dest.backup("main", src, "main") as b:
        assert (b.remaining, b.page_count, b.pagecount) == (0, 0, 0)
        assert b.done is False
        assert b.restarts == 0


def test_step_zero_fills_in_counts_without_copying(dest, src):
    with dest.backup("main", src, "main") as b:
        assert b.step(0) is False
        assert b.page_count > 100
        assert b.remaining == b.page_count
        assert b.done is False
        assert b.step(0) is False
        assert b.remaining == b.page_count
        b.finish()
    assert old_rows(dest) == OLD


@pytest.mark.parametrize("npages", [-1, -5, -(2**31)])
def test_negative_step_copies_every_remaining_page(dest, src, npages):
    with dest.backup("main", src, "main") as b:
        b.step(3)
        assert b.step(npages) is True
        assert b.done is True
        assert b.remaining == 0
        assert b.page_count > 100
    assert dump(dest) == dump(src)


def test_step_default_copies_every_page(dest, src):
    with dest.backup("main", src, "main") as b:
        assert b.step() is True
        assert b.done is True
    assert dump(dest) == dump(src)


def test_step_accepts_npages_keyword(dest, src):
    with dest.backup("main", src, "main") as b:
        assert b.step(npages=2) is False
        assert b.page_count - b.remaining == 2
        assert b.step(npages=-1) is True


def test_step_larger_than_remaining_completes(dest, src):
    with dest.backup("main", src, "main") as b:
        assert b.step(2**31 - 1) is True
        assert b.remaining == 0


def test_step_after_done_returns_true(dest, src):
    with dest.backup("main", src, "main") as b:
        assert b.step(-1) is True
        pages = b.page_count
        assert b.step(1) is True
        assert b.step(0) is True
        assert b.step(-1) is True
        assert (b.done, b.remaining, b.page_count) == (True, 0, pages)
    assert dump(dest) == dump(src)


def test_remaining_never_increases_while_stepping_without_restart(dest, src):
    with dest.backup("main", src, "main") as b:
        b.step(7)
        total = b.page_count
        previous = b.remaining
        assert previous == total - 7
        while not b.done:
            done = b.step(7)
            assert done == b.done
            assert b.page_count == total
            assert b.remaining == max(previous - 7, 0)
            previous = b.remaining
        assert b.restarts == 0


def test_done_becomes_true_only_with_the_last_page(dest, src):
    with dest.backup("main", src, "main") as b:
        b.step(0)
        total = b.page_count
        assert b.step(total - 1) is False
        assert (b.done, b.remaining) == (False, 1)
        assert b.step(1) is True
        assert (b.done, b.remaining) == (True, 0)


def test_counts_are_zero_after_finish(dest, src):
    b = dest.backup("main", src, "main")
    b.step(5)
    b.finish()
    assert (b.remaining, b.page_count, b.pagecount) == (0, 0, 0)

    b = dest.backup("main", src, "main")
    b.step(-1)
    b.finish()
    assert (b.remaining, b.page_count, b.pagecount) == (0, 0, 0)


@pytest.mark.parametrize("npages", ["1", 1.5, None, b"1", [1]])
def test_step_with_non_int_npages_is_type_error(dest, src, npages):
    with dest.backup("main", src, "main") as b:
        with pytest.raises(TypeError):
            b.step(npages)
        assert b.remaining == 0  # nothing was copied
        assert b.step(-1) is True


@pytest.mark.parametrize("npages", [2**31, -(2**31) - 1, 2**64, -(2**100)])
def test_step_with_npages_outside_c_int_is_overflow_error(dest, src, npages):
    with dest.backup("main", src, "main") as b:
        with pytest.raises(OverflowError):
            b.step(npages)
        assert b.step(-1) is True


def test_step_with_too_many_arguments_is_type_error(dest, src):
    with dest.backup("main", src, "main") as b:
        with pytest.raises(TypeError):
            b.step(1, 2)
        with pytest.raises(TypeError):
            b.step(pages=1)


def test_step_on_finished_backup_is_connection_closed(dest, src):
    b = dest.backup("main", src, "main")
    b.step(2)
    b.finish()
    with pytest.raises(apsw_backup.ConnectionClosedError) as info:
        b.step(1)
    assert "finished" in str(info.value)
    with pytest.raises(apsw_backup.ConnectionClosedError):
        b.step(-1)


# -- 3.3 finish(), close(), attributes, context manager ------------------------


def test_finish_after_partial_copy_rolls_destination_back(connect, dest, src):
    b = dest.backup("main", src, "main")
    b.step(10)
    b.finish()
    assert old_rows(dest) == OLD
    assert dump_path(connect.path("dest.db"))[0][1] == {"old": OLD}


def test_finish_after_complete_copy_keeps_it(connect, dest, src):
    b = dest.backup("main", src, "main")
    b.step(-1)
    b.finish()
    assert dump(dest) == dump(src)
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_finish_twice_is_silent(dest, src):
    b = dest.backup("main", src, "main")
    b.step(1)
    assert b.finish() is None
    assert b.finish() is None
    assert b.close() is None
    assert b.close(True) is None


def test_finish_unlocks_destination(dest, src):
    b = dest.backup("main", src, "main")
    b.step(1)
    b.finish()
    assert old_rows(dest) == OLD
    with dest.backup("main", src, "main") as again:
        assert again.step(-1) is True


@pytest.mark.parametrize("force", [False, True, 0, 1])
def test_close_finishes_backup(dest, src, force):
    b = dest.backup("main", src, "main")
    b.step(4)
    assert b.close(force) is None
    assert not b
    assert old_rows(dest) == OLD


def test_close_accepts_force_keyword(dest, src):
    b = dest.backup("main", src, "main")
    b.close(force=True)
    assert not b


@pytest.mark.parametrize("force", ["yes", None, 1.0, []])
def test_close_with_non_bool_force_is_type_error_and_leaves_backup_open(
    dest, src, force
):
    b = dest.backup("main", src, "main")
    b.step(2)
    with pytest.raises(TypeError):
        b.close(force)
    with pytest.raises(TypeError):
        b.close(force=force)
    assert b
    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)


def test_enter_returns_the_backup_and_exit_finishes_it(dest, src):
    b = dest.backup("main", src, "main")
    with b as entered:
        assert entered is b
        b.step(-1)
    assert not b
    assert dump(dest) == dump(src)


def test_exit_without_complete_copy_rolls_destination_back(dest, src):
    with dest.backup("main", src, "main") as b:
        b.step(3)
    assert not b
    assert old_rows(dest) == OLD


def test_exit_never_swallows_the_body_exception(dest, src):
    class BodyError(Exception):
        pass

    with pytest.raises(BodyError), dest.backup("main", src, "main") as b:
        b.step(3)
        raise BodyError
    assert not b
    assert old_rows(dest) == OLD


def test_exit_after_finish_in_body_is_silent(dest, src):
    with dest.backup("main", src, "main") as b:
        b.step(-1)
        b.finish()
    assert not b
    assert dump(dest) == dump(src)


def test_finish_drops_references_to_both_connections(connect):
    build_file(connect.path("src.db"))
    src = apsw_backup.Connection(str(connect.path("src.db")))
    dest = apsw_backup.Connection(str(connect.path("dest.db")))
    refs = [weakref.ref(src), weakref.ref(dest)]
    b = dest.backup("main", src, "main")
    b.step(-1)
    del src, dest
    gc.collect()
    assert all(ref() is not None for ref in refs)  # the backup holds them

    b.finish()
    gc.collect()

    assert [ref() for ref in refs] == [None, None]
    assert repr(b)  # still printable once its connections are gone


def test_enter_on_finished_backup_is_connection_closed(dest, src):
    b = dest.backup("main", src, "main")
    b.finish()
    with pytest.raises(apsw_backup.ConnectionClosedError) as info, b:
        pass
    assert "finished" in str(info.value)


def test_bool_is_true_until_finished(dest, src):
    b = dest.backup("main", src, "main")
    assert bool(b) is True
    b.step(3)
    assert bool(b) is True
    b.step(-1)
    assert bool(b) is True  # done, but not yet finished
    b.finish()
    assert bool(b) is False


def test_repr_shows_names_and_progress_then_finished(connect, src):
    dest = connect("dest.db")
    dest.execute("ATTACH ? AS aux", (str(connect.path("aux.db")),)).fetchall()
    b = dest.backup("aux", src, "main")
    b.step(5)
    text = repr(b)
    assert "'main'" in text and "'aux'" in text
    assert str(connect.path("src.db")) in text
    assert str(connect.path("dest.db")) in text
    assert f"{b.page_count - b.remaining} of {b.page_count}" in text
    assert f"{b.remaining} remaining" in text
    assert "finished" not in text

    b.step(-1)
    b.finish()
    text = repr(b)
    assert "finished" in text
    assert str(connect.path("src.db")) in text


def test_repr_names_memory_databases(connect, src):
    dest = connect(":memory:")
    with dest.backup("main", src, "main") as b:
        assert ":memory:" in repr(b)


def test_pagecount_is_alias_of_page_count(dest, src):
    with dest.backup("main", src, "main") as b:
        b.step(9)
        assert b.pagecount == b.page_count > 9


def test_attributes_are_read_only(dest, src):
    with dest.backup("main", src, "main") as b:
        for name in ("done", "remaining", "page_count", "pagecount", "restarts"):
            with pytest.raises(AttributeError):
                setattr(b, name, 1)


def test_backup_cannot_be_instantiated():
    with pytest.raises(TypeError):
        apsw_backup.Backup()


def test_backup_cannot_be_subclassed():
    with pytest.raises(TypeError):

        class MyBackup(apsw_backup.Backup):
            pass


def test_remaining_is_never_negative_when_another_backup_shrinks_the_source(tmp_path):
    """Found by the state machine: a backup writing into this backup's
    source connection truncates the source under it; SQLite then answers
    remaining == -1 on the last step.  The copy still matches the source."""
    empty = apsw_backup.Connection(str(tmp_path / "a.db"))
    memory = apsw_backup.Connection(":memory:")
    c = apsw_backup.Connection(str(tmp_path / "c.db"))
    c.execute("CREATE TABLE t(x, pad)").fetchall()
    for v in range(3):
        c.execute("INSERT INTO t VALUES (?, zeroblob(1500))", (v,)).fetchall()
    first = memory.backup("main", c, "main")
    assert first.step(2) is False
    second = c.backup("main", empty, "main")
    assert second.step(-1) is True
    second.finish()
    assert first.step(-1) is True
    assert first.remaining == 0 and first.page_count >= 0
    first.finish()
    assert memory.execute("SELECT name FROM sqlite_master").fetchall() == []
    for conn in (c, memory, empty):
        conn.close()
