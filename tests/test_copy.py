"""copy() and acopy() (docs/api.md#copy-and-acopy): a whole online backup of a live database.

Sources are built with the standard library's sqlite3 (the same libsqlite3),
which also plays the other connections: a writer, a lock holder, and the
reference backup() the progress sequence is compared with.  Every thread is
joined with a timeout, so a hang fails the test instead of stalling the run.
"""

import asyncio
import itertools
import math
import sqlite3
import threading
import time

import pytest
from child_process import run_bounded
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import CopyResult, acopy, copy

OK, DONE, BUSY = apsw_backup.SQLITE_OK, apsw_backup.SQLITE_DONE, apsw_backup.SQLITE_BUSY
BOUND = 20  # seconds any copy in these tests may take before it counts as a hang


def tables(path):
    return [row[0] for row in query(path, "SELECT name FROM sqlite_master ORDER BY 1")]


def assert_old_content(path):
    assert query(path, "SELECT note FROM old") == [("old content",)]
    assert "t" not in tables(path)


def assert_same_rows(source, target):
    sql = "SELECT id, data FROM t ORDER BY id"
    assert query(target, sql) == query(source, sql)
    assert query(target, "PRAGMA integrity_check") == [("ok",)]


def bounded(func, timeout=BOUND):
    """func() in a thread: its result, or its exception; fails on a hang."""
    outcome = {}

    def run():
        try:
            outcome["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not return within {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Writer:
    """Another connection committing a small write every ``every`` seconds."""

    def __init__(self, path, every=0.002):
        self.times = []
        self._path, self._every = str(path), every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        db = sqlite3.connect(self._path, timeout=BOUND, isolation_level=None)
        db.execute("PRAGMA synchronous=OFF")  # no fsync stalls: commit steadily
        try:
            while not self._stop.wait(self._every):
                db.execute("INSERT INTO w(at) VALUES (?)", (time.monotonic(),))
                self.times.append(time.monotonic())
        finally:
            db.close()

    def commits_between(self, start, end):
        return sum(start <= t <= end for t in self.times)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + BOUND
        while not self.times and time.monotonic() < deadline:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(BOUND)
        assert not self._thread.is_alive(), "the writer did not stop"


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


@pytest.fixture
def target(tmp_path):
    return make_target(tmp_path / "target.db")


# 1. Paths and Connections; progress exactly as the standard library's.


def test_copy_of_paths_copies_database_and_reports_pages_steps_bytes(source, tmp_path):
    dest = tmp_path / "new.db"
    result = copy(source, dest, pages=7)

    assert_same_rows(source, dest)
    total = query(source, "PRAGMA page_count")[0][0]
    page_size = query(source, "PRAGMA page_size")[0][0]
    assert isinstance(result, CopyResult)
    assert (result.pages, result.steps, result.restarts) == (
        total,
        math.ceil(total / 7),
        0,
    )
    assert (result.page_size, result.bytes) == (page_size, total * page_size)
    assert (result.waits, result.snapshot) == (0, False)
    assert 0 < result.elapsed < BOUND


def test_copy_result_is_frozen(source, tmp_path):
    result = copy(source, tmp_path / "new.db")
    with pytest.raises(AttributeError):
        result.pages = 0


def test_copy_between_connections_replaces_target_and_leaves_both_open(source, target):
    src = apsw_backup.Connection(str(source))
    dst = apsw_backup.Connection(str(target))
    try:
        copy(src, dst, pages=10)
        assert dst.execute("SELECT count(*) FROM t").fetchall() == [(300,)]
        assert src.execute("SELECT count(*) FROM t").fetchall() == [(300,)]
        assert "old" not in [
            r[0] for r in dst.execute("SELECT name FROM sqlite_master")
        ]
    finally:
        src.close()
        dst.close()
    assert_same_rows(source, target)


def test_copy_into_attached_schema_by_names(source, tmp_path):
    dst = apsw_backup.Connection(":memory:")
    try:
        dst.execute(f"ATTACH '{tmp_path / 'side.db'}' AS side")
        copy(source, dst, target_name="side")
        assert dst.execute("SELECT count(*) FROM side.t").fetchall() == [(300,)]
    finally:
        dst.close()


def test_copy_of_missing_source_path_raises_cantopen_naming_it_and_creates_nothing(
    tmp_path,
):
    missing, dest = tmp_path / "missing.db", tmp_path / "dest.db"
    with pytest.raises(apsw_backup.CantOpenError, match="no such file") as excinfo:
        copy(missing, dest)
    assert str(missing) in str(excinfo.value)
    assert excinfo.value.result == apsw_backup.SQLITE_CANTOPEN
    assert not missing.exists()
    assert not dest.exists()


@pytest.mark.parametrize(
    ("argument", "value", "error"),
    [
        ("pages", "5", TypeError),
        ("pages", 2.5, TypeError),
        ("progress", 5, TypeError),
        ("sleep", -1, ValueError),
        ("sleep", float("nan"), ValueError),
        ("timeout", -0.5, ValueError),
        ("timeout", "1", ValueError),
        ("snapshot", "yes", ValueError),
        ("snapshot", 1, ValueError),
    ],
)
def test_copy_rejects_bad_arguments_before_opening_anything(
    source, tmp_path, argument, value, error
):
    dest = tmp_path / "dest.db"
    with pytest.raises(error, match=argument):
        copy(source, dest, **{argument: value})
    assert not dest.exists()


@pytest.mark.parametrize("pages", [-1, 0, 1, 3, 7, 32, 10_000])
def test_progress_sequence_equals_stdlib_backup_for_same_database_and_pages(
    source, tmp_path, pages
):
    expected, seen = [], []
    stdlib_source = sqlite3.connect(str(source))
    stdlib_target = sqlite3.connect(str(tmp_path / "stdlib.db"))
    try:
        stdlib_source.backup(
            stdlib_target, pages=pages, progress=lambda *a: expected.append(a)
        )
    finally:
        stdlib_source.close()
        stdlib_target.close()

    bounded(
        lambda: copy(
            source,
            tmp_path / "ours.db",
            pages=pages,
            progress=lambda *a: seen.append(a),
        )
    )

    assert seen == expected
    assert seen[-1][0] == DONE
    assert seen[-1][1] == 0


# 2. A progress callback that raises, closes the target or closes the source.


def test_progress_raising_aborts_target_keeps_old_content_exception_unchanged(
    source, target
):
    boom = ValueError("stop here")
    calls = []

    def progress(status, remaining, total):
        calls.append(status)
        if len(calls) == 3:
            raise boom

    with pytest.raises(ValueError, match="stop here") as excinfo:
        copy(source, target, pages=2, progress=progress)
    assert excinfo.value is boom
    assert calls == [OK, OK, OK]
    assert_old_content(target)


def test_progress_raising_leaves_target_connection_unlocked(source, target):
    dst = apsw_backup.Connection(str(target))
    try:
        with pytest.raises(KeyError):
            copy(source, dst, pages=2, progress=lambda *a: {}["x"])
        assert dst.execute("SELECT note FROM old").fetchall() == [("old content",)]
    finally:
        dst.close()


CALLBACK_CLOSES = r"""
import sys
import apsw_backup

source_path, target_path, action = sys.argv[1:4]
source = apsw_backup.Connection(source_path)
target = apsw_backup.Connection(target_path)

def progress(status, remaining, total):
    if action == "target":
        target.close()
    elif action == "target-force":
        target.close(force=True)
    else:
        source.close()

try:
    apsw_backup.copy(source, target, pages=1, progress=progress)
except apsw_backup.Error as exc:
    print(type(exc).__name__, exc, sep="|")
else:
    print("no error")
source.close()
target.close()
"""


@pytest.mark.parametrize(
    ("action", "error", "words"),
    [
        ("target", "DestinationLockedError", ("unfinished backup", "finish")),
        (
            "target-force",
            "ConnectionClosedError",
            ("finished outside copy()", "rolled back"),
        ),
        ("source", "ConnectionClosedError", ("finished outside copy()", "rolled back")),
    ],
)
def test_progress_closing_target_or_source_gives_clean_error_not_crash(
    source, target, action, error, words
):
    proc = run_bounded(CALLBACK_CLOSES, source, target, action, timeout=BOUND)
    assert proc.returncode == 0, proc.stderr
    name, _, message = proc.stdout.strip().partition("|")
    assert name == error
    for word in words:
        assert word in message.lower()
    assert_old_content(target)


# 3. The source connection's own write transaction.


def test_source_own_write_transaction_raises_busy_within_a_second(source, target):
    src = apsw_backup.Connection(str(source))
    calls = []
    try:
        src.execute("BEGIN; INSERT INTO w(at) VALUES (1)")
        start = time.monotonic()
        with pytest.raises(apsw_backup.BusyError) as excinfo:
            bounded(
                lambda: copy(src, target, pages=5, progress=lambda *a: calls.append(a))
            )
        assert time.monotonic() - start < 1
        message = str(excinfo.value)
        assert "own open write transaction" in message
        assert "Commit or roll back" in message
        assert calls == [(BUSY, 0, 0)]
        # The caller's transaction is theirs: still open, untouched.
        assert src.txn_state("main") == apsw_backup.SQLITE_TXN_WRITE
        src.execute("ROLLBACK")
    finally:
        src.close()
    assert_old_content(target)


# 4. A source locked by another connection: retried every `sleep`, `timeout`.


@pytest.fixture
def locked(source):
    """Another connection holding an exclusive lock on the source."""
    locker = sqlite3.connect(str(source), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    yield locker
    if locker.in_transaction:
        locker.execute("COMMIT")
    locker.close()


def test_locked_source_is_retried_after_growing_waits_then_every_sleep(
    source, tmp_path, locked
):
    dest = tmp_path / "dest.db"
    busy_times = []

    def progress(status, remaining, total):
        if status == BUSY:
            busy_times.append(time.monotonic())

    def release_later():
        time.sleep(1.6)
        locked.execute("COMMIT")

    releaser = threading.Thread(target=release_later)
    releaser.start()
    try:
        result = bounded(
            lambda: copy(source, dest, pages=50, sleep=0.15, progress=progress)
        )
    finally:
        releaser.join(BOUND)

    assert_same_rows(source, dest)
    assert len(busy_times) == result.waits
    start = busy_times[0]
    gaps = [(a - start, b - a) for a, b in itertools.pairwise(busy_times)]
    short = [gap for at, gap in gaps if at < 0.9]
    long = [gap for at, gap in gaps if at > 1.1]
    # 1 ms, then doubling to 16 ms while young: each wait is at least its
    # step of the schedule (a loaded machine only adds to a gap, so the
    # lower bounds are exact and the upper ones generous).
    assert short[0] < 0.01
    for i, gap in enumerate(short[:5]):
        assert gap >= 0.9 * min(0.001 * 2**i, 0.016), (i, short[:5])
    assert sorted(short)[len(short) // 2] < 0.016 + 0.02
    assert long
    assert all(0.14 <= gap < 0.15 + 0.5 for gap in long)  # then every sleep


def test_locked_source_with_timeout_gives_up_with_busy_error_after_about_timeout(
    source, target, locked
):
    start = time.monotonic()
    with pytest.raises(apsw_backup.BusyError) as excinfo:
        bounded(lambda: copy(source, target, sleep=0.4, timeout=0.5))
    elapsed = time.monotonic() - start

    assert 0.45 <= elapsed < 0.75  # the last sleep is cut short at the deadline
    error = excinfo.value
    assert (error.result, error.extendedresult) == (BUSY, BUSY)
    assert "gave up after" in str(error)
    assert "timeout=0.5 s" in str(error)
    assert "locked by another connection" in str(error)
    assert isinstance(error.__cause__, apsw_backup.BusyError)
    locked.execute("COMMIT")
    assert_old_content(target)


def test_timeout_zero_gives_up_after_the_first_locked_step(source, target, locked):
    calls = []
    with pytest.raises(apsw_backup.BusyError, match="gave up"):
        bounded(
            lambda: copy(source, target, timeout=0, progress=lambda *a: calls.append(a))
        )
    assert calls == [(BUSY, 0, 0)]


# 5. Livelock: another connection commits every few ms.


# A live source of about 800 pages: with pages=5 and STEP_DELAY per step, a
# pass over it takes 0.3 s or more, while the writer commits every 2 ms.
LIVE_ROWS = 3000
STEP_DELAY = 0.002


def slow_progress(delay):
    """A progress callback that makes every step take at least `delay` s, so
    a pass over the source always overlaps the writer's commits."""
    return lambda *args: time.sleep(delay)


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_livelock_auto_snapshot_finishes_after_restarts(tmp_path, journal):
    source = make_source(
        tmp_path / "live.db", rows=LIVE_ROWS, blob=1000, journal=journal
    )
    dest = tmp_path / "dest.db"
    src = apsw_backup.Connection(str(source))
    try:
        with Writer(source):
            result = bounded(
                lambda: copy(
                    src, dest, pages=5, sleep=0.01, progress=slow_progress(STEP_DELAY)
                )
            )
        assert src.get_autocommit()  # the snapshot's transaction was ended
    finally:
        src.close()

    assert result.restarts >= 1
    assert result.snapshot
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    assert query(dest, "SELECT count(*) FROM t") == [(LIVE_ROWS,)]
    assert query(dest, "PRAGMA page_count") == [(result.pages,)]


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_livelock_without_snapshot_gives_up_cleanly_at_timeout(tmp_path, journal):
    source = make_source(
        tmp_path / "live.db", rows=LIVE_ROWS, blob=1000, journal=journal
    )
    target = make_target(tmp_path / "target.db")
    start = time.monotonic()
    with Writer(source), pytest.raises(apsw_backup.BusyError) as excinfo:
        bounded(
            lambda: copy(
                source,
                target,
                pages=5,
                sleep=0.01,
                timeout=2,
                snapshot=False,
                progress=slow_progress(STEP_DELAY),
            )
        )
    elapsed = time.monotonic() - start

    assert 2 <= elapsed < 5
    message = str(excinfo.value)
    assert "gave up after" in message
    assert "restarted" in message
    assert "snapshot='auto' or True" in message
    assert_old_content(target)


def test_wal_writer_keeps_committing_during_a_snapshot_copy(tmp_path):
    source = make_source(tmp_path / "live.db", rows=1500, blob=1000, journal="wal")
    dest = tmp_path / "dest.db"
    steps = []

    def progress(status, remaining, total):
        steps.append(time.monotonic())
        time.sleep(0.003)

    with Writer(source) as writer:
        result = bounded(
            lambda: copy(source, dest, pages=5, snapshot=True, progress=progress)
        )
    commits = writer.commits_between(steps[0], steps[-1])
    assert steps[-1] - steps[0] > 0.2
    assert commits >= 5
    assert result.snapshot
    assert result.restarts == 0  # held from the first step: it cannot restart
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
    assert query(dest, "SELECT count(*) FROM w")[0][0] < len(writer.times)


def test_snapshot_ends_its_read_transaction_when_copy_fails(source, target):
    src = apsw_backup.Connection(str(source))
    try:
        with pytest.raises(ZeroDivisionError):
            copy(src, target, pages=2, snapshot=True, progress=lambda *a: 1 / 0)
        assert src.get_autocommit()
        assert src.txn_state("main") == apsw_backup.SQLITE_TXN_NONE
    finally:
        src.close()
    assert_old_content(target)


@pytest.mark.skipif(
    tuple(map(int, apsw_backup.sqlite_lib_version().split("."))) < (3, 34),
    reason="SQLite < 3.34 has no sqlite3_txn_state: txn_state() cannot tell a "
    "read transaction from a write one (docs/testing.md, SQLite versions)",
)
def test_snapshot_uses_and_leaves_open_a_read_transaction_the_source_had(
    source, tmp_path
):
    src = apsw_backup.Connection(str(source))
    try:
        src.execute("BEGIN; SELECT count(*) FROM t").fetchall()
        result = copy(src, tmp_path / "dest.db", pages=5, snapshot=True)
        assert result.snapshot
        assert src.txn_state("main") == apsw_backup.SQLITE_TXN_READ
        src.execute("COMMIT")
    finally:
        src.close()


def test_snapshot_false_never_opens_a_transaction_on_source(source, tmp_path):
    src = apsw_backup.Connection(str(source))
    states = []
    try:
        copy(
            src,
            tmp_path / "dest.db",
            pages=5,
            snapshot=False,
            progress=lambda *a: states.append(src.get_autocommit()),
        )
    finally:
        src.close()
    assert states
    assert all(states)


# 6. acopy()


def test_acopy_copies_with_progress_in_the_loop_thread(source, tmp_path):
    loop_thread, threads, seen = threading.get_ident(), set(), []

    def progress(*args):
        threads.add(threading.get_ident())
        seen.append(args)

    result = asyncio.run(
        asyncio.wait_for(
            acopy(source, tmp_path / "async.db", pages=3, progress=progress), BOUND
        )
    )
    expected = []
    copy(source, tmp_path / "sync.db", pages=3, progress=lambda *a: expected.append(a))

    assert_same_rows(source, tmp_path / "async.db")
    assert seen == expected
    assert threads == {loop_thread}
    assert isinstance(result, CopyResult)
    assert (result.pages, result.steps) == (expected[-1][2], len(expected))


def test_acopy_steps_run_off_the_event_loop(source, tmp_path, locked):
    # The lock is released by a coroutine: only a free loop can release it.
    step_threads = set()

    def busy_handler(count):
        step_threads.add(threading.get_ident())
        return False

    async def release_later():
        await asyncio.sleep(0.2)
        locked.execute("COMMIT")

    async def main():
        src = apsw_backup.Connection(str(source))
        src.set_busy_handler(busy_handler)
        try:
            releaser = asyncio.create_task(release_later())
            result = await acopy(src, tmp_path / "dest.db", pages=5, sleep=0.02)
            await releaser
            return result
        finally:
            src.close()

    result = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert result.waits >= 1
    assert step_threads
    assert threading.get_ident() not in step_threads
    assert_same_rows(source, tmp_path / "dest.db")


def test_acopy_cancelled_mid_copy_leaves_target_with_old_content(source, target):
    calls = []

    def progress(status, remaining, total):
        calls.append(status)
        if len(calls) == 5:
            asyncio.current_task().cancel()

    async def main():
        dst = apsw_backup.Connection(str(target))
        try:
            with pytest.raises(asyncio.CancelledError):
                await acopy(source, dst, pages=2, progress=progress)
            # Finished before re-raising: the target is unlocked.
            return dst.execute("SELECT note FROM old").fetchall()
        finally:
            dst.close()

    assert asyncio.run(main()) == [("old content",)]
    assert calls == [OK] * 5
    assert_old_content(target)


def test_acopy_cancelled_during_a_step_waits_for_it_then_finishes(
    source, target, locked
):
    in_step, step_may_end, step_ended = (threading.Event() for _ in range(3))

    def busy_handler(count):
        in_step.set()
        step_may_end.wait(BOUND)  # the step stays in flight until then
        step_ended.set()
        return False

    async def main():
        src = apsw_backup.Connection(str(source))
        src.set_busy_handler(busy_handler)
        try:
            task = asyncio.create_task(acopy(src, str(target), pages=5, sleep=0.01))
            while not in_step.is_set():
                await asyncio.sleep(0.005)
            cancelled_at = time.monotonic()
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=0.3)
            assert not done, "the cancelled acopy() did not wait for its step"
            assert not step_ended.is_set()
            step_may_end.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert step_ended.is_set()  # the step in flight was allowed to end
            return time.monotonic() - cancelled_at
        finally:
            step_may_end.set()
            src.close()

    waited = asyncio.run(asyncio.wait_for(main(), BOUND))
    assert waited >= 0.2  # the step in flight was allowed to end
    locked.execute("COMMIT")
    assert_old_content(target)


def test_acopy_timeout_gives_up_with_busy_error(source, target, locked):
    with pytest.raises(apsw_backup.BusyError, match="gave up"):
        asyncio.run(
            asyncio.wait_for(acopy(source, target, sleep=0.05, timeout=0.3), BOUND)
        )
    locked.execute("COMMIT")
    assert_old_content(target)
