"""`with connection:` always ends its transaction, whatever interrupts it.

An interrupt() that lands while a cursor of the connection is unfinished
stays in force until no statement runs: every new statement -- the
with-block's RELEASE, and its ROLLBACK too -- fails with SQLITE_INTERRUPT.
The block must still end its savepoint (rolling back when it cannot
commit), or the write lock stays held and every later write of the
connection is lost when it closes.
"""

import sqlite3
import sys
import threading

import pytest

import apsw_backup


@pytest.fixture
def unraisable(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    return seen


@pytest.fixture
def db(tmp_path):
    path = str(tmp_path / "w.db")
    conn = apsw_backup.Connection(path)
    conn.execute(
        "CREATE TABLE t(v); CREATE TABLE big(v); WITH RECURSIVE n(i) AS "
        "(SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<100) "
        "INSERT INTO big SELECT i FROM n"
    )
    yield path, conn
    conn.close(force=True)


def interrupt(conn, how):
    if how == "same_thread":
        conn.interrupt()
    else:
        thread = threading.Thread(target=conn.interrupt)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()


def assert_transaction_ended(path, conn):
    assert conn.in_transaction is False
    other = sqlite3.connect(path, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")  # no write lock left behind
        other.rollback()
    finally:
        other.close()
    # A later write of the connection is its own, committed transaction:
    # not part of a savepoint left open and rolled back at close.
    conn.execute("INSERT INTO t VALUES ('later')")
    conn.close()
    check = sqlite3.connect(path)
    try:
        return [r[0] for r in check.execute("SELECT v FROM t ORDER BY rowid")]
    finally:
        check.close()


@pytest.mark.parametrize("how", ["same_thread", "other_thread"])
def test_with_block_interrupted_between_statements_still_ends_its_transaction(db, how):
    """B.5 of the trust review: RELEASE and the fallback ROLLBACK both
    failed with SQLITE_INTERRUPT, the savepoint stayed open with the write
    lock, and the later write was rolled back at close."""
    path, conn = db
    with pytest.raises(apsw_backup.InterruptError):
        with conn:
            conn.execute("INSERT INTO t VALUES ('in block')")
            cursor = conn.execute("SELECT v FROM big")  # unfinished
            assert cursor.fetchone() == (1,)
            interrupt(conn, how)
    # It could not commit: the block's write was rolled back, and said so.
    assert assert_transaction_ended(path, conn) == ["later"]


@pytest.mark.parametrize("how", ["same_thread", "other_thread"])
def test_with_block_whose_body_raised_is_rolled_back_despite_interrupt(
    db, how, unraisable
):
    """B.5, the body raising: the rollback failed under the interrupt and
    the savepoint stayed open."""
    path, conn = db
    with pytest.raises(KeyError, match="body"):
        with conn:
            conn.execute("INSERT INTO t VALUES ('in block')")
            cursor = conn.execute("SELECT v FROM big")  # unfinished
            assert cursor.fetchone() == (1,)
            interrupt(conn, how)
            raise KeyError("body")
    assert assert_transaction_ended(path, conn) == ["later"]
    # The body's exception is the one raised; at most the interrupt is
    # reported aside.
    assert all(isinstance(u.exc_value, apsw_backup.InterruptError) for u in unraisable)


def test_nested_with_block_interrupted_ends_both_savepoints(db):
    """B.5 with savepoints inside savepoints: the inner block's end is
    interrupted; the outer block then sees the inner error and rolls back."""
    path, conn = db
    with pytest.raises(apsw_backup.InterruptError):
        with conn:
            conn.execute("INSERT INTO t VALUES ('outer')")
            with conn:
                conn.execute("INSERT INTO t VALUES ('inner')")
                cursor = conn.execute("SELECT v FROM big")  # unfinished
                assert cursor.fetchone() == (1,)
                conn.interrupt()
    assert assert_transaction_ended(path, conn) == ["later"]


def test_cursor_stopped_by_with_block_end_says_so(db):
    """The unfinished cursor the block had to reset tells its user, and
    runs again when asked."""
    path, conn = db
    with pytest.raises(apsw_backup.InterruptError):
        with conn:
            first = conn.execute("SELECT v FROM big")
            second = conn.execute("SELECT v FROM big WHERE v > 50")
            assert first.fetchone() == (1,) and second.fetchone() == (51,)
            conn.interrupt()
    for cursor in (first, second):
        with pytest.raises(apsw_backup.InterruptError, match="run it again"):
            cursor.fetchone()
    assert conn.execute("SELECT count(*) FROM big").fetchall() == [(100,)]
    assert assert_transaction_ended(path, conn) == ["later"]


def test_with_block_without_interrupt_commits(db):
    """The control: nothing interrupted, the block's write is kept."""
    path, conn = db
    with conn:
        conn.execute("INSERT INTO t VALUES ('in block')")
        cursor = conn.execute("SELECT v FROM big")  # unfinished
        assert cursor.fetchone() == (1,)
    assert assert_transaction_ended(path, conn) == ["in block", "later"]


def test_with_blocks_of_two_tasks_do_not_interleave(tmp_path):
    """Two asyncio tasks (or threads) sharing a connection: interleaved
    with-blocks ended each other's savepoints -- the block that raised had
    its row committed, the one that succeeded had its row rolled back, with
    no error.  A with-block is now refused while another thread's or task's
    is open; the open one keeps its own transaction."""
    import asyncio

    path = str(tmp_path / "x.db")
    c = apsw_backup.Connection(path)
    c.execute("CREATE TABLE t(who)")
    seen = {}

    async def failing():
        try:
            with c:
                c.execute("INSERT INTO t VALUES ('failed block')")
                await asyncio.sleep(0.05)
                raise ValueError("this block fails")
        except ValueError:
            pass

    async def second():
        await asyncio.sleep(0.01)
        try:
            with c:
                c.execute("INSERT INTO t VALUES ('second block')")
        except apsw_backup.ThreadingViolationError as exc:
            seen["refused"] = str(exc)

    async def main():
        await asyncio.gather(failing(), second())

    asyncio.run(main())
    assert "with-block is open" in seen["refused"]
    assert c.execute("SELECT who FROM t").fetchall() == []
    with c:  # free again, and nested blocks of one task still nest
        with c:
            c.execute("INSERT INTO t VALUES ('nested')")
    assert c.execute("SELECT who FROM t").fetchall() == [("nested",)]
    c.close()
