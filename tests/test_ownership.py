"""docs/locking.md: ownership while the GIL is released; finish() waits, not refuses;
Connection.close() while another thread drops one of its cursors; what other
threads see of a Backup while a claimed finish runs.  (Source and destination
that are one database: tests/test_one_database_on_both_sides.py.)

The crash cases run in a subprocess: before the fix they died with SIGSEGV
(double finish / use after free), which would take pytest down with them.
Each subprocess is bounded in time, so a hang fails the test instead.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from attack_helpers import child_env, under_asan
from backup_helpers import dump
from child_process import run_bounded

import apsw_backup
import apsw_backup as ab

TIMEOUT = 60

# Opens src (a populated file) and dst (old content), starts a backup, and
# runs a query on src in thread C long enough for the other threads to act
# while it holds src's SQLite mutex with the GIL released.
PRELUDE = """
import gc, os, sys, threading, time
import apsw_backup as ab
d = sys.argv[1]
src = ab.Connection(os.path.join(d, "s.db"))
src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
dst = ab.Connection(os.path.join(d, "d.db"))
dst.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)")
b = dst.backup("main", src, "main")
b.step(1)

def busy(c):
    # True while c is busy in another thread (or already closed by it).
    try:
        c.get_autocommit()
    except (ab.ThreadingViolationError, ab.ConnectionClosedError):
        return True
    return False

LONG = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i<3000000) SELECT count(*) FROM n")
tc = threading.Thread(target=lambda: src.execute(LONG).fetchall())
tc.start()
while not busy(src) and tc.is_alive():
    time.sleep(0.001)
"""

EPILOGUE = """
tc.join(30)
assert not tc.is_alive()
check = ab.Connection(os.path.join(d, "d.db"))
assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
assert check.execute("SELECT n FROM old").fetchall() == [(7,)], "not rolled back"
print("survived")
"""


def run_script(tmp_path, body):
    script = PRELUDE + textwrap.dedent(body) + EPILOGUE
    proc = run_bounded(script, tmp_path, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "survived" in proc.stdout
    return proc


def test_backup_dropped_while_dest_force_close_waits_is_not_finished_twice(tmp_path):
    """Found in review: SIGSEGV 3 of 3 runs before the fix."""
    run_script(
        tmp_path,
        """
        ta = threading.Thread(target=lambda: dst.close(force=True))
        ta.start()
        while not busy(dst) and ta.is_alive():
            time.sleep(0.001)
        del b
        gc.collect()
        ta.join(30)
        assert not ta.is_alive()
        """,
    )


def test_backup_collected_in_a_cycle_while_dest_force_close_waits(tmp_path):
    run_script(
        tmp_path,
        """
        holder = [b]
        holder.append(holder)  # a cycle: freed by the collector (tp_clear)
        ta = threading.Thread(target=lambda: dst.close(force=True))
        ta.start()
        while not busy(dst) and ta.is_alive():
            time.sleep(0.001)
        del b, holder
        gc.collect()
        ta.join(30)
        assert not ta.is_alive()
        """,
    )


def test_backup_dropped_while_its_finish_waits_in_another_thread(tmp_path):
    run_script(
        tmp_path,
        """
        finish = b.finish
        ta = threading.Thread(target=finish)
        ta.start()
        while not busy(dst) and ta.is_alive():
            time.sleep(0.001)
        del b, finish
        gc.collect()
        ta.join(30)
        assert not ta.is_alive()
        """,
    )


def test_backup_dropped_while_source_close_finishes_it(tmp_path):
    """source.close() finishes the backups reading from it (GIL released);
    dropping the last reference meanwhile must not finish it again."""
    run_script(
        tmp_path,
        """
        tc.join(30)  # source.close() needs the source free
        b2 = ab.Connection(os.path.join(d, "d2.db"))
        b2b = b2.backup("main", src, "main")
        tc = threading.Thread(target=lambda: b2.close(force=True))
        ta = threading.Thread(target=lambda: src.close())
        ta.start()
        del b, b2b
        gc.collect()
        ta.join(30)
        tc.start()
        assert not ta.is_alive()
        """,
    )


def test_cursor_dropped_in_another_thread_while_its_connection_is_busy(tmp_path):
    """Cursors too: a cursor finalized by its dealloc (GIL released, waiting
    for the connection's mutex) is out of the connection's list, so
    close() never finalizes or releases it a second time."""
    run_script(
        tmp_path,
        """
        tc.join(30)
        b.close(True)
        c = ab.Connection(os.path.join(d, "c.db"))
        cursors = [c.execute("SELECT 1") for _ in range(20)]
        def long_query():
            try:
                c.execute(LONG).fetchall()
            except ab.ThreadingViolationError:
                pass  # fetchall() met a cursor being finalized: refused
        t1 = threading.Thread(target=long_query)
        t1.start()
        while not busy(c) and t1.is_alive():
            time.sleep(0.001)
        def drop():
            cursors.clear()
            gc.collect()
        t2 = threading.Thread(target=drop)
        t2.start()
        t1.join(30)
        for _ in range(2000):
            try:
                c.close()
                break
            except ab.ThreadingViolationError:
                time.sleep(0.005)
        t2.join(30)
        assert not t1.is_alive() and not t2.is_alive()
        c.close()
        """,
    )


# -- defect 4: finish(), close() and __exit__ wait for another thread ---------


class BusySource:
    """Runs a long query on a connection in another thread until stopped."""

    QUERY = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i<1500000) SELECT count(*) FROM n"
    )

    def __init__(self, conn):
        self.conn = conn
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.conn.execute(self.QUERY).fetchall()
        except apsw_backup.Error as exc:  # the interrupt, or a later refusal
            self.errors.append(exc)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.conn.get_autocommit()
            except apsw_backup.ThreadingViolationError:
                return self
            time.sleep(0.001)
        raise AssertionError("the query never started")

    def __exit__(self, *exc):
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def pair(connect, src, dest):
    return src, dest, dump(dest)


@pytest.mark.parametrize("how", ["finish", "close", "close_force", "exit"])
def test_finish_while_source_busy_in_another_thread_waits_and_finishes(pair, how):
    """Found in review: before, ThreadingViolationError and no finish."""
    src, dest, before = pair
    b = dest.backup("main", src, "main")
    b.step(3)
    with BusySource(src):
        if how == "finish":
            b.finish()
        elif how == "close":
            b.close()
        elif how == "close_force":
            b.close(force=True)
        else:
            b.__exit__(None, None, None)
        assert not b
    assert dump(dest) == before


def test_with_block_left_by_exception_while_source_busy_unlocks(pair):
    src, dest, before = pair
    busy = BusySource(src)
    with pytest.raises(KeyError):
        with dest.backup("main", src, "main") as b:
            b.step(3)
            busy.__enter__()  # still running when the block's exit finishes
            raise KeyError("body")
    busy.__exit__(None, None, None)
    assert not b
    assert dump(dest) == before


def test_copy_progress_error_while_source_busy_keeps_its_exception(pair):
    """The callback's KeyError comes out of copy(), and the target is
    unlocked -- not a ThreadingViolationError with the target still locked."""
    src, dest, before = pair
    busy = BusySource(src)

    def progress(status, remaining, total):
        busy.__enter__()
        raise KeyError("from progress")

    with pytest.raises(KeyError, match="from progress"):
        apsw_backup.copy(src, dest, pages=2, progress=progress)
    busy.__exit__(None, None, None)
    assert dump(dest) == before


def test_finish_from_busy_handler_inside_step_is_refused(connect, src, dest):
    """Only a re-entrant call is refused: the step that runs the handler is
    still inside the backup."""
    b = dest.backup("main", src, "main")
    b.step(3)
    seen = []

    def handler(count):
        for call in (b.finish, b.close, lambda: b.close(True)):
            try:
                call()
            except apsw_backup.ThreadingViolationError as exc:
                seen.append(str(exc))
        return False

    src.set_busy_handler(handler)
    locker = connect("src.db")
    locker.execute("BEGIN EXCLUSIVE").fetchall()
    with pytest.raises(apsw_backup.BusyError):
        b.step(3)
    locker.execute("ROLLBACK").fetchall()
    assert len(seen) == 3
    assert all("callback" in m for m in seen)
    assert b, "a refused finish must leave the backup open"
    assert b.step(-1) is True
    b.finish()


def test_exit_refused_from_a_callback_still_raises_the_body_exception(
    connect, src, dest
):
    b = dest.backup("main", src, "main")
    b.step(3)
    out = []

    def handler(count):
        out.append(b.__exit__(KeyError, KeyError("x"), None))
        return False

    src.set_busy_handler(handler)
    locker = connect("src.db")
    locker.execute("BEGIN EXCLUSIVE").fetchall()
    with pytest.raises(apsw_backup.BusyError):
        b.step(3)
    locker.execute("ROLLBACK").fetchall()
    assert out == [False]
    assert b
    b.close(True)


def test_backup_collected_while_source_busy_is_finished_when_the_call_ends(pair):
    """A collected Backup whose source is inside another thread's call is not
    finished under that call (that could deadlock on SQLite's mutexes): a
    stand-in keeps the destination locked and finishes it -- rolled back,
    unlocked -- as soon as the call ends."""
    import gc

    src, dest, before = pair
    b = dest.backup("main", src, "main")
    b.step(3)
    with BusySource(src) as busy:
        start = time.monotonic()
        del b
        gc.collect()
        assert time.monotonic() - start < 0.5, "the collection waited for the call"
        with pytest.raises(apsw_backup.ThreadingViolationError):
            dest.execute("SELECT 1")  # still locked: the copy is not yet undone
        busy.thread.join(30)
    assert dump(dest) == before


# ----------------------------------------------------------------------------
# Ownership (docs/locking.md): Connection.close() while another thread
# drops one of its cursors (a reproducer from an attack review).
#
# A9: Connection.close() walks its cursor list with borrowed pointers and
# calls cursor_close_internal(), which finalizes with the GIL released and
# then touches the cursor again (reset_state).  Another thread that drops
# the cursor's last reference in that window frees it under close():
# heap-use-after-free (ASan), SIGSEGV with PYTHONMALLOC=debug.
#
# The child runs with PYTHONMALLOC=debug so that the freed cursor is filled
# with dead bytes and the use after free crashes on any build.


UAF = r"""
import threading, apsw_backup as ab
for i in range(3000):
    conn = ab.Connection(":memory:")
    holder = [conn.execute("SELECT 1 UNION ALL SELECT 2")]  # live statement
    ev = threading.Event()
    def dropper():
        ev.wait()
        holder.clear()          # the cursor's last reference
    t = threading.Thread(target=dropper)
    t.start()
    ev.set()
    conn.close()                # finalizes that cursor, GIL released
    t.join()
print("SURVIVED")
"""


def test_cursor_dropped_while_connection_close_finalizes_it(tmp_path):
    # Under the ASan build, ASan's allocator takes the place of debug malloc.
    env = (
        child_env(tmp_path)
        if under_asan()
        else child_env(tmp_path, PYTHONMALLOC="debug")
    )
    proc = run_bounded(UAF, timeout=120, env=env)
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, (
        proc.returncode,
        proc.stderr[-2000:],
    )


INTERRUPT_DURING_CLOSE = r"""
import sys, threading, apsw_backup as ab
stop = False
box = [ab.Connection(":memory:")]
def hammer():
    while not stop:
        try:
            box[0].interrupt()
        except ab.Error:
            pass
t = threading.Thread(target=hammer)
t.start()
try:
    for i in range(300):
        c = ab.Connection(":memory:")
        box[0] = c
        c.close()      # sqlite3_close frees the handle, GIL released; db still set
finally:
    stop = True
    t.join()
print("SURVIVED")
"""


@pytest.mark.skipif(
    shutil.which("valgrind") is None or under_asan(),
    reason="needs valgrind (and not the ASan build)",
)
@pytest.mark.heavy  # a valgrind run: about 4 s
def test_interrupt_while_close_frees_the_handle():
    # The write happens inside libsqlite3, which ASan does not instrument:
    # valgrind sees it.
    env = dict(os.environ, PYTHONMALLOC="malloc")
    proc = subprocess.run(
        ["valgrind", "-q", sys.executable, "-c", INTERRUPT_DURING_CLOSE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "SURVIVED" in proc.stdout, proc.stderr[-2000:]
    assert "connection_interrupt" not in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------
# What other threads see of a Backup while a claimed finish runs
# (docs/api.md#backup: "bool(backup) is True until
# finished. repr shows ... progress, or that it is finished").
#
# A12: while another thread's finish() waits in sqlite3_backup_finish (GIL
# released), bool(b) is True but repr(b) already says "finished" (repr tests
# `backup == NULL`, bool tests `backup != NULL || finishing`).  The same
# during restart_backup.


LONG = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
    "WHERE i<30000000) SELECT count(*) FROM n"
)


def busy(conn):
    try:
        conn.get_autocommit()
    except ab.ThreadingViolationError:
        return True
    return False


def wait_until(pred, bound=10):
    deadline = time.monotonic() + bound
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_repr_and_bool_agree_during_another_threads_finish(tmp_path):
    src = ab.Connection(str(tmp_path / "s.db"))
    src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    dst = ab.Connection(str(tmp_path / "d.db"))
    b = dst.backup("main", src, "main")
    b.step(1)
    errors = []

    def query():
        try:
            src.execute(LONG).fetchall()
        except ab.InterruptError:
            pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    tc = threading.Thread(target=query)
    tc.start()
    ta = None
    try:
        wait_until(lambda: busy(src) or not tc.is_alive())
        ta = threading.Thread(target=b.finish)  # waits for the source's mutex
        ta.start()
        # The finish may end before it is seen (the query was between two
        # statements): then both must say finished, which is checked too.
        wait_until(lambda: busy(dst) or not ta.is_alive())
        alive, text = bool(b), repr(b)
    finally:
        # An interrupt before the query's first step is forgotten: repeat.
        deadline = time.monotonic() + 30
        while tc.is_alive() and time.monotonic() < deadline:
            src.interrupt()
            tc.join(0.05)
        if ta is not None:
            ta.join(30)
        tc.join(30)
    assert not errors
    assert not b
    assert ("finished" in text) == (not alive), (alive, text)
    src.close()
    dst.close()
