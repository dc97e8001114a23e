"""ThreadingViolationError's three meanings, each its own subclass.

- InUseError: a call in another thread holds the connection (transient:
  try again once it has returned);
- ReentrancyError: a callback of this thread's own call (a busy handler, a
  binding's lookup, an executemany item) uses the connection that call
  holds (waiting would wait for itself);
- DestinationLockedError: the connection is the destination of an
  unfinished Backup (until the backup is finished).

`except ThreadingViolationError` still catches all three.  B.13 of the
trust review: one class for all three made copy() wait where waiting
cannot help.
"""

import contextlib
import sqlite3
import threading

import pytest
from backup_helpers import build_file, in_thread

import apsw_backup
from apsw_backup import (
    DestinationLockedError,
    InUseError,
    ReentrancyError,
    ThreadingViolationError,
)


@pytest.fixture
def pair(connect):
    build_file(connect.path("s.db"))
    return connect("s.db"), connect("d.db")


@contextlib.contextmanager
def parked_in_busy_handler(conn, path):
    """Another thread inside conn, parked in its busy handler (another
    connection holds the file) until the block ends."""
    locker = sqlite3.connect(str(path), isolation_level=None, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    parked, release = threading.Event(), threading.Event()

    def handler(count):
        parked.set()
        return not release.wait(0.01)

    conn.set_busy_handler(handler)

    def write():
        with contextlib.suppress(apsw_backup.Error):
            conn.execute("CREATE TABLE IF NOT EXISTS parked(x)")

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        assert parked.wait(10), "the other thread never reached the handler"
        yield
    finally:
        locker.rollback()
        locker.close()
        release.set()
        thread.join(10)
        assert not thread.is_alive()
        conn.set_busy_handler(None)


def raised(call):
    try:
        call()
    except ThreadingViolationError as exc:  # all three meanings
        return exc
    return None


def test_the_three_meanings_are_subclasses_of_threading_violation():
    for cls in (InUseError, ReentrancyError, DestinationLockedError):
        assert issubclass(cls, ThreadingViolationError)
        assert issubclass(cls, apsw_backup.Error)
    assert len({InUseError, ReentrancyError, DestinationLockedError}) == 3


def test_connection_busy_in_another_thread_is_in_use(connect, pair):
    src, dst = pair
    other = connect("o.db")
    with parked_in_busy_handler(src, connect.path("s.db")):
        calls = {
            "execute": lambda: src.execute("SELECT 1"),
            "cursor": src.cursor,
            "get_autocommit": src.get_autocommit,
            "close": src.close,
            "backup_from": lambda: other.backup("main", src, "main"),
            "backup_into": lambda: src.backup("main", other, "main"),
            "set_busy_timeout": lambda: src.set_busy_timeout(10),
        }
        seen = {name: raised(call) for name, call in calls.items()}
    for name, exc in seen.items():
        assert type(exc) is InUseError, (name, exc)
        assert "another thread" in str(exc), (name, exc)
    assert src.execute("SELECT count(*) FROM parked").fetchall() == [(0,)]


def test_backup_step_while_its_source_is_busy_in_another_thread_is_in_use(
    connect, pair
):
    src, dst = pair
    b = dst.backup("main", src, "main")
    with parked_in_busy_handler(src, connect.path("s.db")):
        exc = raised(lambda: b.step(1))
        entered = raised(b.__enter__)
    assert type(exc) is InUseError, exc
    assert type(entered) is InUseError, entered
    assert b.step(-1) is True
    b.finish()


def test_callback_using_the_connection_of_its_call_is_reentrancy(connect, pair):
    """A busy handler, a mapping's lookup and an executemany item run inside
    the call that holds the connection."""
    src, _ = pair
    seen = {}

    def handler(count):
        seen["busy_handler"] = raised(lambda: src.execute("SELECT 1"))
        return False

    src.set_busy_handler(handler)
    locker = sqlite3.connect(str(connect.path("s.db")), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(apsw_backup.BusyError):
        src.execute("CREATE TABLE x(a)")
    locker.rollback()
    locker.close()
    src.set_busy_handler(None)

    class Lookup(dict):
        def __getitem__(self, key):
            seen["binding_lookup"] = raised(lambda: src.execute("SELECT 2"))
            return 1

    assert src.execute("SELECT :k", Lookup()).fetchall() == [(1,)]

    def items():
        seen["executemany_item"] = raised(src.get_autocommit)
        yield (1,)

    src.executemany("SELECT ?", items()).fetchall()
    for name in ("busy_handler", "binding_lookup", "executemany_item"):
        assert type(seen[name]) is ReentrancyError, (name, seen[name])
        assert "callback" in str(seen[name]), seen[name]
    assert src.execute("SELECT 3").fetchall() == [(3,)]  # usable after


def test_backup_methods_from_a_busy_handler_inside_its_step_are_reentrancy(
    connect, pair
):
    src, dst = pair
    b = dst.backup("main", src, "main")
    b.step(1)
    seen = {}

    def handler(count):
        for name, call in (
            ("step", lambda: b.step(1)),
            ("finish", b.finish),
            ("close", b.close),
            ("enter", b.__enter__),
            ("source_execute", lambda: src.execute("SELECT 1")),
        ):
            seen[name] = raised(call)
        # The destination is locked by the backup: that is said first.
        seen["dest_execute"] = raised(lambda: dst.execute("SELECT 1"))
        return False

    src.set_busy_handler(handler)
    locker = sqlite3.connect(str(connect.path("s.db")), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(apsw_backup.BusyError):
        b.step(1)
    locker.rollback()
    locker.close()
    for name in ("step", "finish", "close", "enter", "source_execute"):
        assert type(seen[name]) is ReentrancyError, (name, seen[name])
    assert type(seen["dest_execute"]) is DestinationLockedError
    assert b  # the refused finish left it open
    src.set_busy_handler(None)
    assert b.step(-1) is True
    b.finish()


def test_locked_destination_is_destination_locked(connect, pair):
    src, dst = pair
    other = connect("o.db")
    cursor = dst.cursor()
    b = dst.backup("main", src, "main")
    calls = {
        "execute": lambda: dst.execute("SELECT 1"),
        "cursor": dst.cursor,
        "cursor_execute": lambda: cursor.execute("SELECT 1"),
        "second_backup": lambda: dst.backup("main", other, "main"),
        "as_source": lambda: other.backup("main", dst, "main"),
        "close": dst.close,
        "set_busy_timeout": lambda: dst.set_busy_timeout(5),
    }
    seen = {name: raised(call) for name, call in calls.items()}
    seen["from_another_thread"] = in_thread(lambda: dst.execute("SELECT 1"))
    for name, exc in seen.items():
        assert type(exc) is DestinationLockedError, (name, exc)
        assert "unfinished Backup" in str(exc), (name, exc)
    assert "finish" in str(seen["execute"])
    b.finish()
    assert dst.execute("SELECT 1").fetchall() == [(1,)]


def test_destination_used_from_another_thread_while_the_backup_steps(connect, pair):
    """Busy in another thread and locked at once: the lock is what lasts,
    and what is said."""
    src, dst = pair
    b = dst.backup("main", src, "main")
    b.step(1)
    outcome = {}

    def handler(count):
        outcome["dest"] = in_thread(lambda: dst.execute("SELECT 1"))
        outcome["source"] = in_thread(lambda: src.execute("SELECT 1"))
        return False

    src.set_busy_handler(handler)
    locker = sqlite3.connect(str(connect.path("s.db")), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(apsw_backup.BusyError):
        b.step(1)
    locker.rollback()
    locker.close()
    assert type(outcome["dest"]) is DestinationLockedError
    assert type(outcome["source"]) is InUseError
    src.set_busy_handler(None)
    assert b.step(-1) is True
    b.finish()
