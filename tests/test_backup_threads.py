"""docs/api.md#errors-from-step, docs/locking.md: callbacks inside a step, the GIL, and many threads.

Which busy handler runs during Backup.step()?  Found by experiment (the
first two tests pin it): SQLite calls the busy handler of the connection
whose database file is locked -- the *source* connection's handler while it
waits for the read lock on the source, the *destination* connection's
handler while it waits for the write lock on the destination.  The other
connection's handler is not called.
"""

import itertools
import random
import threading
import time

import pytest
from backup_helpers import (
    build_file,
    dump,
    dump_path,
    exclusive_lock,
    in_thread,
    integrity,
)

import apsw_backup

OK = [("ok",)]
OLD = [(0,), (1,), (2,)]


class Sides:
    """A source and destination with recording busy handlers, and a way to
    lock one side's file from another connection."""

    def __init__(self, connect, src, dest):
        self.connect, self.src, self.dest = connect, src, dest
        self.calls = []
        self.actions = {"source": None, "destination": None}
        src.set_busy_handler(lambda n: self._handler("source", n))
        dest.set_busy_handler(lambda n: self._handler("destination", n))

    def _handler(self, side, count):
        self.calls.append((side, count))
        action = self.actions[side]
        if action is not None:
            return action(count)
        return count < 2

    def lock(self, side):
        return exclusive_lock(
            self.connect.path("src.db" if side == "source" else "dest.db")
        )

    def start(self, side):
        """A backup ready to step into a lock held on side: for the source a
        few pages are copied first (SQLite holds the destination's write lock
        from the first step on, so that side is locked before any step)."""
        b = self.dest.backup("main", self.src, "main")
        if side == "source":
            b.step(10)
        return b


@pytest.fixture
def sides(connect, src, dest):
    return Sides(connect, src, dest)


SIDES = ["source", "destination"]


@pytest.mark.parametrize("side", SIDES)
def test_step_calls_busy_handler_of_the_locked_side_only(sides, side):
    b = sides.start(side)
    with sides.lock(side), pytest.raises(apsw_backup.BusyError):
        b.step(10)
    assert sides.calls == [(side, 0), (side, 1), (side, 2)]
    assert b.step(-1) is True
    b.finish()
    assert dump(sides.dest) == dump(sides.src)


@pytest.mark.parametrize("side", SIDES)
def test_busy_handler_returning_true_retries_until_lock_is_released(sides, side):
    b = sides.start(side)
    with sides.lock(side) as other:

        def release_after_three(count):
            if count == 3:
                other.execute("COMMIT").fetchall()
            return True

        sides.actions[side] = release_after_three
        assert b.step(-1) is True
    assert [c for _, c in sides.calls] == [0, 1, 2, 3]
    b.finish()
    assert dump(sides.dest) == dump(sides.src)


# -- item 10: re-entrancy from a busy handler -------------------------------------


BACKUP_CALLS = {
    "step": lambda b: b.step(1),
    "step-all": lambda b: b.step(-1),
    "finish": lambda b: b.finish(),
    "close": lambda b: b.close(),
    "close-force": lambda b: b.close(True),
    "with": lambda b: b.__enter__(),
    "exit": lambda b: b.__exit__(None, None, None),
}


@pytest.mark.parametrize("side", SIDES)
def test_backup_methods_from_busy_handler_are_threading_violation(sides, side):
    b = sides.start(side)
    before = (b.remaining, b.page_count, b.done)
    outcomes = {}
    readable = []

    def reenter(count):
        for name, call in BACKUP_CALLS.items():
            try:
                call(b)
                outcomes[name] = None
            except Exception as exc:  # noqa: BLE001 - recorded for the asserts
                outcomes[name] = exc
        readable.append((b.remaining, b.page_count, b.done, bool(b), repr(b)))
        return False

    sides.actions[side] = reenter
    with sides.lock(side), pytest.raises(apsw_backup.BusyError):
        b.step(5)

    assert set(outcomes) == set(BACKUP_CALLS)
    for name, exc in outcomes.items():
        assert type(exc) is apsw_backup.ReentrancyError, name
    assert len(readable) == 1
    assert readable[0][:4] == (*before, True)
    # the refused calls did nothing: the backup carries on
    assert b
    assert b.step(-1) is True
    b.finish()
    assert dump(sides.dest) == dump(sides.src)


@pytest.mark.parametrize("side", SIDES)
def test_exception_in_busy_handler_comes_out_of_step(sides, side):
    class HandlerError(Exception):
        pass

    def explode(count):
        raise HandlerError(f"busy {count}")

    b = sides.start(side)
    sides.actions[side] = explode
    with sides.lock(side), pytest.raises(HandlerError) as info:
        b.step(5)
    assert str(info.value) == "busy 0"
    assert sides.calls == [(side, 0)]
    # the lock is gone: the backup is still usable
    assert b.step(-1) is True
    b.finish()
    assert dump(sides.dest) == dump(sides.src)


def test_exception_in_destination_busy_handler_during_backup_call_propagates(
    connect, src
):
    """backup() itself needs no lock (sqlite3_backup_init takes none).  If
    the destination's busy handler runs during it anyway, its exception
    comes out of backup() as docs/api.md#connection says -- never a SystemError."""

    class HandlerError(Exception):
        pass

    calls = []

    def explode(count):
        calls.append(count)
        raise HandlerError("busy in backup()")

    build_file(connect.path("dest.db"), rows=5)
    dest = connect("dest.db")  # fresh: has not read the file yet
    dest.set_busy_handler(explode)
    with exclusive_lock(connect.path("dest.db")):
        try:
            b = dest.backup("main", src, "main")
        except HandlerError:
            b = None
        else:
            assert calls == []  # it did not wait, so no handler ran
    # the destination is not left locked either way
    if b is None:
        assert dest.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
    else:
        assert b.step(-1) is True
        b.finish()
        assert dump(dest) == dump(src)


def test_backup_call_does_not_wait_for_a_lock_on_the_destination(connect, src):
    """sqlite3_backup_init takes no lock: only step() may meet one."""
    build_file(connect.path("dest.db"), rows=5)
    dest = connect("dest.db")  # fresh: has not read the file yet
    dest.set_busy_timeout(1500)
    with exclusive_lock(connect.path("dest.db")) as other:
        start = time.monotonic()
        b = dest.backup("main", src, "main")
        assert time.monotonic() - start < 1.0
        other.execute("COMMIT").fetchall()
    assert b.step(-1) is True
    b.finish()
    assert dump(dest) == dump(src)


def test_base_exception_in_busy_handler_comes_out_of_step(sides):
    b = sides.start("source")

    def interrupt(count):
        raise KeyboardInterrupt

    sides.actions["source"] = interrupt
    with sides.lock("source"), pytest.raises(KeyboardInterrupt):
        b.step(5)
    b.close(True)


def test_source_and_backup_from_another_thread_during_step_are_threading_violation(
    sides,
):
    """The busy handler runs while step() is inside SQLite; another thread
    calling into the source, the destination or step() at that moment is
    refused."""
    b = sides.start("source")
    seen = {}

    def from_other_thread(count):
        seen["source"] = in_thread(lambda: sides.src.execute("SELECT 1").fetchall())
        seen["step"] = in_thread(lambda: b.step(1))
        seen["dest"] = in_thread(lambda: sides.dest.execute("SELECT 1"))
        seen["remaining"] = in_thread(lambda: b.remaining)
        return False

    sides.actions["source"] = from_other_thread
    with sides.lock("source"), pytest.raises(apsw_backup.BusyError):
        b.step(5)

    for name in ("source", "step"):
        assert type(seen[name]) is apsw_backup.InUseError, name
    # The destination is locked by the Backup whether or not it steps.
    assert type(seen["dest"]) is apsw_backup.DestinationLockedError
    assert seen["remaining"] is None
    assert b.step(-1) is True
    b.finish()
    assert sides.src.execute("SELECT count(*) FROM t").fetchall() == [(400,)]


def test_finish_from_another_thread_during_step_waits_for_the_step(sides):
    """docs/locking.md: finish() from another thread waits for the step in flight,
    then finishes (the partial copy rolled back, the destination unlocked)."""
    before = dump(sides.dest)
    b = sides.start("source")
    outcome = {}
    finisher = None

    def start_finisher(count):
        nonlocal finisher
        if finisher is None:

            def run():
                try:
                    b.finish()
                    outcome["finished"] = True
                except BaseException as exc:  # noqa: BLE001 - handed back
                    outcome["exc"] = exc

            finisher = threading.Thread(target=run, daemon=True)
            finisher.start()
            time.sleep(0.2)  # it is waiting for this step now
            outcome["during_step"] = dict(outcome)
        return False

    sides.actions["source"] = start_finisher
    with sides.lock("source"), pytest.raises(apsw_backup.BusyError):
        b.step(5)
    finisher.join(10)
    assert not finisher.is_alive(), "finish() in the other thread never returned"
    assert outcome["during_step"] == {}, "finish() did not wait for the step"
    # SQLite 3.40's finish answers BUSY after an abandoned BUSY step (the
    # SQLite versions in docs/testing.md); the backup is finished either way.
    if "exc" in outcome:
        assert type(outcome["exc"]) is apsw_backup.BusyError
        assert "rolled back" in str(outcome["exc"])
    else:
        assert outcome["finished"] is True
    assert not b
    assert dump(sides.dest) == before
    sides.dest.execute("SELECT 1").fetchall()  # unlocked


# -- item 11: the GIL is released during a large step ------------------------------


@pytest.mark.heavy
def test_gil_is_released_during_large_step(connect):
    src = connect("big.db")
    src.execute("PRAGMA journal_mode=off").fetchall()
    src.execute("PRAGMA synchronous=off").fetchall()
    src.execute("CREATE TABLE big(data BLOB)").fetchall()
    src.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 100) "
        "INSERT INTO big SELECT zeroblob(1048576) FROM c"
    ).fetchall()
    dest = connect("big-copy.db")
    dest.execute("PRAGMA synchronous=off").fetchall()

    ticks = []
    stop, ticking = threading.Event(), threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            if len(ticks) == 5:
                ticking.set()
            time.sleep(0.001)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        b = dest.backup("main", src, "main")
        assert ticking.wait(10), "the other thread never ticked"
        start = time.perf_counter()
        done = b.step(-1)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()

    assert done is True
    assert b.page_count * 4096 >= 100 * 1024 * 1024
    b.finish()
    # the other thread kept ticking all through the step: no gap anywhere
    # near the length of the step (holding the GIL would make one gap of it)
    during = [t for t in ticks if start < t < end]
    points = [start, *during, end]
    longest_gap = max(b - a for a, b in itertools.pairwise(points))
    assert len(during) >= 5, (end - start, len(during))
    assert longest_gap < 0.5 * (end - start), (end - start, longest_gap)
    assert dest.execute("SELECT count(*), sum(length(data)) FROM big").fetchall() == [
        (100, 100 * 1048576)
    ]


# -- item 12: four threads hammering one pair ----------------------------------------


def is_documented(exc):
    if isinstance(
        exc,
        (
            apsw_backup.ThreadingViolationError,
            apsw_backup.BusyError,
            apsw_backup.LockedError,
            apsw_backup.ConnectionClosedError,
        ),
    ):
        return True
    return type(exc) is apsw_backup.SQLError and "in use" in str(exc)


@pytest.mark.heavy
def test_four_threads_hammering_backups_raise_only_documented_errors(
    connect, src, dest
):
    # no fsync: more backups, steps and writes fit in the few seconds
    src.execute("PRAGMA synchronous=off").fetchall()
    dest.execute("PRAGMA synchronous=off").fetchall()
    shared = {"backup": None}
    unexpected = []
    done_count = []
    successes = []
    deadline = time.monotonic() + 3.0

    def current():
        b = shared["backup"]
        if b is None:
            raise apsw_backup.ConnectionClosedError("no backup yet")
        return b

    def start(rng):
        shared["backup"] = dest.backup("main", src, "main")

    def step(rng):
        if current().step(rng.choice([0, 1, 7, 50, -1])):
            done_count.append(1)

    def finish(rng):
        current().finish()

    def close(rng):
        current().close(rng.random() < 0.5)

    def with_block(rng):
        with dest.backup("main", src, "main") as b:
            while not b.done:
                b.step(rng.choice([5, 40]))
        done_count.append(1)

    def attributes(rng):
        b = current()
        values = (b.remaining, b.page_count, b.pagecount, b.done, b.restarts)
        assert all(isinstance(v, int) for v in values)
        assert repr(b) and bool(b) in (True, False)

    def write_source(rng):
        src.execute(
            "INSERT INTO t(name, data) VALUES ('hammer', randomblob(?))",
            (rng.randrange(2000),),
        ).fetchall()

    def read_source(rng):
        src.execute("SELECT count(*) FROM t").fetchall()

    def read_dest(rng):
        dest.execute("SELECT count(*) FROM sqlite_master").fetchall()

    actions = [
        start,
        step,
        step,
        step,
        finish,
        close,
        with_block,
        attributes,
        write_source,
        read_source,
        read_dest,
    ]

    def worker(seed):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            action = rng.choice(actions)
            try:
                action(rng)
                successes.append(action.__name__)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if not is_documented(exc):
                    unexpected.append((action.__name__, repr(exc)))

    threads = [
        threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "deadlock"

    assert unexpected == []
    assert len(successes) > 100
    assert done_count, "no copy completed in the whole run"

    # afterwards everything still works and a copy is exact
    if shared["backup"] is not None:
        shared["backup"].close(True)
    with dest.backup("main", src, "main") as b:
        assert b.step(-1) is True
    assert dump(dest) == dump(src)
    assert integrity(dest) == OK
    assert dump_path(connect.path("dest.db")) == (dump(src), OK)
