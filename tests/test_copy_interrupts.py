"""Every copy()/acopy() guarantee at every interruption point (docs/api.md#copy-and-acopy, docs/command-line.md).

Interruptions: an exception and KeyboardInterrupt raised from the progress
callback at each status, from verify, from a busy handler of the source;
acopy() cancelled at each of its awaits (the step, the wait after a step,
verify, the rename), hit deterministically: the cancel is requested from
inside the call that runs at that point, so the task meets it at that await.

After each: the target holds its old content -- a new target does not exist
-- or, only when the interruption came at or after the last step completing,
the complete copy; never a partial one; no temporary file is left; the
source lost nothing and holds no transaction; no connection is left locked.
"""

import asyncio
import os
import sys
import threading

import pytest
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import acopy, copy, files

OK, DONE, BUSY = apsw_backup.SQLITE_OK, apsw_backup.SQLITE_DONE, apsw_backup.SQLITE_BUSY
BOUND = 20


class Boom(Exception):
    pass


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db", rows=300)


def state(path):
    """'missing', 'old' or 'complete'; anything else fails the test."""
    if not os.path.exists(path):
        return "missing"
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    names = {row[0] for row in query(path, "SELECT name FROM sqlite_master")}
    if names == {"old"}:
        assert query(path, "SELECT note FROM old") == [("old content",)]
        return "old"
    assert query(path, "SELECT count(*) FROM t") == [(300,)]
    return "complete"


def assert_clean(tmp_path, source, src=None):
    assert not [n for n in os.listdir(tmp_path) if files.is_temporary_name(n)]
    assert query(source, "SELECT count(*) FROM t") == [(300,)]
    if src is not None:
        assert src.get_autocommit()


def targets(tmp_path, kind):
    """(what to pass as target, its path, the connection to close or None)."""
    path = tmp_path / "target.db"
    if kind == "new":
        return path, path, None
    make_target(path)
    if kind == "existing":
        return path, path, None
    conn = apsw_backup.Connection(str(path))
    return conn, path, conn


def expected(kind, at_or_after_last_step):
    if kind == "new":
        return "missing"
    return "complete" if at_or_after_last_step else "old"


def assert_target_unlocked(conn):
    if conn is not None:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        conn.close()


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", ["first", "middle", "busy", "done"])
@pytest.mark.parametrize("kind", ["new", "existing", "connection"])
@pytest.mark.parametrize("source_kind", ["path", "connection"])
def test_progress_raising_at_each_status(
    tmp_path, source, exc_type, at, kind, source_kind
):
    target, path, target_conn = targets(tmp_path, kind)
    src = apsw_backup.Connection(str(source)) if source_kind == "connection" else None
    locker = None
    if at == "busy":
        locker = apsw_backup.Connection(str(source))
        locker.execute("BEGIN EXCLUSIVE")
    calls = []

    def progress(status, remaining, total):
        calls.append(status)
        hit = {
            "first": len(calls) == 1,
            "middle": len(calls) == 5,
            "busy": status == BUSY,
            "done": status == DONE,
        }[at]
        if hit:
            raise exc_type("stop")

    try:
        with pytest.raises(exc_type):
            copy(src or source, target, pages=3, snapshot=True, progress=progress)
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
    assert state(path) == expected(kind, at == "done")
    assert_clean(tmp_path, source, src)
    assert_target_unlocked(target_conn)
    if src is not None:
        src.close()


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["new", "existing", "connection"])
def test_verify_raising(tmp_path, source, exc_type, kind):
    target, path, target_conn = targets(tmp_path, kind)

    def verify(copied):
        raise exc_type("bad copy")

    with pytest.raises(exc_type):
        copy(source, target, verify=verify)
    # verify runs once the last step committed: an existing target holds
    # the complete copy, a new one never appears.
    assert state(path) == expected(kind, True)
    assert_clean(tmp_path, source)
    assert_target_unlocked(target_conn)


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["new", "existing"])
def test_busy_handler_of_the_source_raising(tmp_path, source, exc_type, kind):
    target, path, _ = targets(tmp_path, kind)
    src = apsw_backup.Connection(str(source))
    locker = apsw_backup.Connection(str(source))
    locker.execute("BEGIN EXCLUSIVE")

    def handler(count):
        raise exc_type("from the busy handler")

    src.set_busy_handler(handler)
    try:
        with pytest.raises(exc_type):
            copy(src, target, pages=3, snapshot=False)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert state(path) == expected(kind, False)
    assert_clean(tmp_path, source, src)
    src.close()


# acopy(): a cancel at each await.

COPY_MODULE = sys.modules["apsw_backup.copy"]


def run_cancelled(make_coro):
    """Run make_coro(arm) as a task; whether it ended cancelled.

    arm(), called from inside acopy's own calls -- in the loop's thread or a
    worker's -- cancels the task so that it meets the cancellation at the
    await it is at (or reaches next): deterministic, no sleeps.
    """

    async def main():
        loop = asyncio.get_running_loop()
        task = None

        def arm():
            if threading.current_thread() is threading.main_thread():
                task.cancel()
            else:
                # Queued before the worker's result: met at that await.
                loop.call_soon_threadsafe(task.cancel)

        task = asyncio.ensure_future(make_coro(arm))
        try:
            await asyncio.wait_for(asyncio.shield(task), BOUND)
        except asyncio.CancelledError:
            return True
        return False

    return asyncio.run(main())


AWAITS = ["step", "last step", "wait after step", "locked wait", "verify", "rename"]


@pytest.mark.parametrize("at", AWAITS)
@pytest.mark.parametrize("kind", ["new", "existing", "connection"])
def test_acopy_cancelled_at_each_await(tmp_path, source, at, kind, monkeypatch):
    target, path, target_conn = targets(tmp_path, kind)
    src = apsw_backup.Connection(str(source))
    locker = None
    if at == "locked wait":
        locker = apsw_backup.Connection(str(source))
        locker.execute("BEGIN EXCLUSIVE")
    steps = []
    reported = []
    armed = {}

    def make_coro(arm):
        armed["arm"] = arm

        def progress(status, remaining, total):  # the loop's thread
            reported.append(status)
            # Counted in progress calls: steps run in batches, ahead of them.
            if at == "wait after step" and status == OK and len(reported) == 3:
                arm()
            if at == "locked wait" and status == BUSY:
                locker.execute("ROLLBACK")
                arm()

        def verify(copied):  # a worker thread
            if at == "verify":
                arm()

        return acopy(src, target, pages=3, sleep=0.01, progress=progress, verify=verify)

    real_step = COPY_MODULE._Copy.step

    def step(self):  # a worker thread
        steps.append(self._backup.remaining if self._backup else None)
        remaining = steps[-1]
        last = remaining is not None and 0 < remaining <= 3
        if (at == "step" and len(steps) == 3) or (at == "last step" and last):
            armed["arm"]()
        return real_step(self)

    monkeypatch.setattr(COPY_MODULE._Copy, "step", step)
    real_publish = files.NewFile.publish

    def publish(self):  # a worker thread
        if at == "rename":
            armed["arm"]()
        real_publish(self)

    monkeypatch.setattr(files.NewFile, "publish", publish)
    try:
        cancelled = run_cancelled(make_coro)
    finally:
        if locker is not None:
            if not locker.get_autocommit():
                locker.execute("ROLLBACK")
            locker.close()

    if at == "rename" and kind != "new":
        assert not cancelled  # nothing to rename: it just completes
        assert state(path) == "complete"
    elif at == "rename":
        assert cancelled
        assert state(path) == "complete"  # the rename in flight was waited for
    else:
        assert cancelled
        after_last_step = at in ("last step", "verify")
        assert state(path) == expected(kind, after_last_step)
    assert_clean(tmp_path, source, src)
    assert_target_unlocked(target_conn)
    src.close()


# acopy() runs steps in batches in a worker (copy.BATCH_SECONDS) and reports
# them afterwards: the reports, the interruptions and the target must be
# exactly what copy() gives.


def record_batches(monkeypatch):
    """Make every batch as long as it may be; return the batches' sizes."""
    sizes = []
    real_steps = COPY_MODULE._Copy.steps

    def steps(self, budget):
        ran = real_steps(self, 60.0)
        sizes.append(len(ran))
        return ran

    monkeypatch.setattr(COPY_MODULE._Copy, "steps", steps)
    return sizes


@pytest.mark.parametrize("flush_every", [None, 4096])
@pytest.mark.parametrize("pages", [1, 3, 7, -1])
def test_acopy_reports_the_same_progress_as_copy(
    tmp_path, source, pages, flush_every, monkeypatch
):
    sizes = record_batches(monkeypatch)
    by_copy, by_acopy = [], []

    def recorder(calls):
        return lambda *args: calls.append(args)

    copy(
        source,
        tmp_path / "a.db",
        pages=pages,
        progress=recorder(by_copy),
        flush_every=flush_every,
    )
    asyncio.run(
        acopy(
            source,
            tmp_path / "b.db",
            pages=pages,
            progress=recorder(by_acopy),
            flush_every=flush_every,
        )
    )
    assert by_acopy == by_copy
    assert by_copy[-1][0] == DONE
    assert state(tmp_path / "b.db") == "complete"
    # Batched indeed, and the step that completes the copy runs alone.
    assert sizes[-1] == 1
    if len(by_copy) > 3:
        assert max(sizes) > 1
    if pages > 0:
        assert sum(sizes) == len(by_copy)
    else:  # the slices of one whole-copy step are not reported
        assert by_copy == [(DONE, 0, by_copy[-1][2])]


@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", ["first", "middle", "busy", "before done", "done"])
@pytest.mark.parametrize("kind", ["new", "existing", "connection"])
def test_acopy_progress_raising_in_a_batch(
    tmp_path, source, exc_type, at, kind, monkeypatch
):
    sizes = record_batches(monkeypatch)
    target, path, target_conn = targets(tmp_path, kind)
    src = apsw_backup.Connection(str(source))
    locker = None
    if at == "busy":
        locker = apsw_backup.Connection(str(source))
        locker.execute("BEGIN EXCLUSIVE")
    calls = []

    def progress(status, remaining, total):
        calls.append(status)
        hit = {
            "first": len(calls) == 1,
            "middle": len(calls) == 5,
            "busy": status == BUSY,
            "before done": status == OK and 0 < remaining <= 3,
            "done": status == DONE,
        }[at]
        if hit:
            raise exc_type("stop")

    try:
        with pytest.raises(exc_type):
            asyncio.run(acopy(src, target, pages=3, snapshot=True, progress=progress))
    finally:
        if locker is not None:
            locker.execute("ROLLBACK")
            locker.close()
    assert state(path) == expected(kind, at == "done")
    if at in ("first", "middle"):
        assert max(sizes) > len(calls)  # steps ran that were never reported
    assert_clean(tmp_path, source, src)
    assert_target_unlocked(target_conn)
    src.close()


def test_acopy_cancel_from_progress_mid_batch_stops_the_reports(
    tmp_path, source, monkeypatch
):
    sizes = record_batches(monkeypatch)
    calls = []

    def progress(status, remaining, total):
        calls.append(status)
        if len(calls) == 4:
            asyncio.current_task().cancel()

    async def main():
        with pytest.raises(asyncio.CancelledError):
            await acopy(source, tmp_path / "new.db", pages=3, progress=progress)

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert calls == [OK] * 4
    assert sizes[0] > 4  # the batch held steps after the cancelling one
    assert state(tmp_path / "new.db") == "missing"
    assert_clean(tmp_path, source)
