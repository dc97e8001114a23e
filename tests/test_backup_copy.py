"""docs/api.md#backup: the user's loop makes an exact copy.

The loop is ``with dest.backup("main", src, "main") as b: while not b.done:
b.step(100)`` (backup_helpers.user_loop), checked for every kind of source
and destination, and with the source written between steps.
"""

import os

import pytest
from backup_helpers import (
    build_file,
    dump,
    dump_path,
    integrity,
    make_old_content,
    page_size,
    populate,
    user_loop,
)

import apsw_backup

OK = [("ok",)]


def assert_progress_is_sane(seen):
    """The loop took several steps, remaining only went down, ended at 0."""
    assert len(seen) >= 3
    remainings = [remaining for remaining, _ in seen]
    assert remainings == sorted(remainings, reverse=True)
    assert remainings[-1] == 0
    assert len({count for _, count in seen}) == 1


def test_user_loop_copies_file_to_file(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect("dest.db")

    seen = user_loop(dest, "main", src, "main")

    assert_progress_is_sane(seen)
    assert dump(dest) == dump(src)
    assert integrity(dest) == OK
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_user_loop_copies_file_to_memory(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect(":memory:")

    assert_progress_is_sane(user_loop(dest, "main", src, "main"))

    assert dump(dest) == dump(src)
    assert integrity(dest) == OK


def test_user_loop_copies_memory_to_file(connect):
    src = populate(connect(":memory:"))
    dest = connect("dest.db")

    assert_progress_is_sane(user_loop(dest, "main", src, "main"))

    assert dump(dest) == dump(src)
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_user_loop_copies_into_temp_schema(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect("dest.db")
    make_old_content(dest)

    assert_progress_is_sane(user_loop(dest, "temp", src, "main"))

    assert dump(dest, "temp") == dump(src)
    assert integrity(dest, "temp") == OK
    # main of the destination is not touched
    assert dest.execute("SELECT n FROM main.old").fetchall() == [(0,), (1,), (2,)]


def test_user_loop_copies_into_attached_schema(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect("dest.db")
    make_old_content(dest)
    dest.execute("ATTACH ? AS aux", (str(connect.path("aux.db")),)).fetchall()

    assert_progress_is_sane(user_loop(dest, "aux", src, "main"))

    assert dump(dest, "aux") == dump(src)
    assert integrity(dest, "aux") == OK
    assert dest.execute("SELECT count(*) FROM main.old").fetchall() == [(3,)]
    assert dump_path(connect.path("aux.db")) == (dump(src), OK)


def test_user_loop_copies_from_attached_source_schema(connect):
    src = connect("src.db")
    make_old_content(src)
    src.execute("ATTACH ? AS aux", (str(connect.path("aux.db")),)).fetchall()
    populate(src, schema="aux")
    dest = connect("dest.db")

    assert_progress_is_sane(user_loop(dest, "main", src, "aux"))

    assert dump(dest) == dump(src, "aux")
    assert (
        dest.execute("SELECT name FROM sqlite_master WHERE name = 'old'").fetchall()
        == []
    )
    assert dump_path(connect.path("dest.db")) == (dump(src, "aux"), OK)


@pytest.mark.parametrize("dest_rows", [3000, 10], ids=["larger", "smaller"])
def test_user_loop_replaces_destination_of_any_size(connect, dest_rows):
    build_file(connect.path("src.db"))
    build_file(connect.path("dest.db"), rows=dest_rows, blob=700)
    src = connect("src.db")
    dest = connect("dest.db")
    make_old_content(dest)

    seen = user_loop(dest, "main", src, "main")

    assert_progress_is_sane(seen)
    assert dump(dest) == dump(src)
    dest.close()
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)
    # the file is exactly the source's pages: a larger one was truncated
    pages = seen[-1][1]
    assert os.path.getsize(connect.path("dest.db")) == pages * page_size(src)


@pytest.mark.parametrize(
    "src_size, dest_size", [(4096, 1024), (1024, 8192), (65536, 512)]
)
def test_user_loop_copies_into_rollback_destination_of_other_page_size(
    connect, src_size, dest_size
):
    build_file(connect.path("src.db"), page_size=src_size, rows=150)
    build_file(connect.path("dest.db"), page_size=dest_size, rows=50, blob=300)
    src = connect("src.db")
    dest = connect("dest.db")
    assert page_size(dest) == dest_size

    user_loop(dest, "main", src, "main", npages=10)

    assert dump(dest) == dump(src)
    assert integrity(dest) == OK
    # (SQLite re-reads the page size from the header only on the next read)
    assert page_size(dest) == src_size
    assert page_size(connect("dest.db")) == src_size
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_user_loop_copies_wal_source_including_uncheckpointed_pages(connect):
    src = connect("src.db")
    src.execute("PRAGMA wal_autocheckpoint=0").fetchall()
    populate(src, wal=True)
    assert src.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
    # the rows are still in the -wal file, not in the database file
    assert os.path.getsize(connect.path("src.db-wal")) > os.path.getsize(
        connect.path("src.db")
    )
    dest = connect("dest.db")

    assert_progress_is_sane(user_loop(dest, "main", src, "main"))

    assert dump(dest) == dump(src)
    dest.close()
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def insert_row(conn, name):
    conn.execute(
        "INSERT INTO t(name, data) VALUES (?, randomblob(3000))", (name,)
    ).fetchall()


def test_source_written_between_steps_through_same_connection_does_not_restart(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect("dest.db")

    with dest.backup("main", src, "main") as b:
        b.step(20)
        insert_row(src, "same-1")
        b.step(20)
        src.execute("UPDATE t SET name = name || '!' WHERE id % 7 = 0").fetchall()
        insert_row(src, "same-2")
        while not b.done:
            b.step(20)
            assert b.restarts == 0
        assert b.restarts == 0

    assert dump(dest) == dump(src)
    assert dest.execute(
        "SELECT count(*) FROM t WHERE name LIKE 'same-%'"
    ).fetchall() == [(2,)]
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_source_written_between_steps_through_other_connection_restarts(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    writer = connect("src.db")
    dest = connect("dest.db")

    with dest.backup("main", src, "main") as b:
        b.step(20)
        b.step(20)
        assert b.restarts == 0
        copied_before = b.page_count - b.remaining
        insert_row(writer, "other-1")
        b.step(20)
        assert b.restarts == 1
        # SQLite went back to page 1: fewer pages are copied than before
        assert b.page_count - b.remaining < copied_before + 20
        while not b.done:
            b.step(20)
        assert b.restarts == 1

    assert dump(dest) == dump(src)
    assert dest.execute("SELECT count(*) FROM t WHERE name = 'other-1'").fetchall() == [
        (1,)
    ]
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)


def test_restarts_counts_every_restart(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    writer = connect("src.db")
    dest = connect("dest.db")

    with dest.backup("main", src, "main") as b:
        for n in range(3):
            b.step(15)
            insert_row(writer, f"other-{n}")
        while not b.done:
            b.step(15)
        assert b.restarts == 3

    assert dump(dest) == dump(src)


def test_source_is_readable_between_steps(connect):
    build_file(connect.path("src.db"))
    src = connect("src.db")
    dest = connect("dest.db")

    with dest.backup("main", src, "main") as b:
        b.step(5)
        assert src.execute("SELECT count(*) FROM t").fetchall() == [(400,)]
        b.step(-1)

    assert dump(dest) == dump(src)


def test_copy_of_empty_source_is_empty(connect):
    src = connect("src.db")
    dest = connect("dest.db")
    make_old_content(dest)

    with dest.backup("main", src, "main") as b:
        assert b.step(-1) is True

    assert dump(dest) == dump(src) == ([], {})


def test_copy_subclass_connection_source(connect, tmp_path):
    class MyConnection(apsw_backup.Connection):
        pass

    build_file(tmp_path / "src.db")
    src = MyConnection(str(tmp_path / "src.db"))
    dest = connect("dest.db")
    try:
        user_loop(dest, "main", src, "main")
        assert dump(dest) == dump(src)
    finally:
        src.close()
