"""Threads (docs/api.md#connection): long SQLite calls release the GIL, a second thread
calling into a busy connection gets ThreadingViolationError, and interrupt()
from another thread stops the long call with InterruptError."""

import threading
import time

import pytest

import apsw_backup

# About 20 s uninterrupted on the reference machine; every test interrupts it
# well within a second, so the margin against it ending early is large.
LONG_SQL = (
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50000000)"
    " SELECT count(*) FROM c"
)
JOIN_TIMEOUT = 10.0
SETTLE = 0.2  # time for thread A to get from "started" into SQLite


class LongStatement:
    """Thread A: runs LONG_SQL on a connection and records how it ended."""

    def __init__(self, connection):
        self.connection = connection
        self.started = threading.Event()
        self.result = None
        self.error = None
        self.thread = threading.Thread(
            target=self._run, name="long-statement", daemon=True
        )

    def _run(self):
        self.started.set()
        try:
            self.result = self.connection.execute(LONG_SQL).fetchall()
        except BaseException as exc:  # recorded for the test to assert on
            self.error = exc

    def start(self):
        self.thread.start()
        assert self.started.wait(JOIN_TIMEOUT)
        time.sleep(SETTLE)
        assert self.thread.is_alive(), (
            "the long statement ended before the test could observe it"
            f" (result={self.result!r}, error={self.error!r});"
            " if this took seconds, the GIL was held during the statement"
        )

    def join(self):
        self.thread.join(JOIN_TIMEOUT)
        assert not self.thread.is_alive(), "the long statement did not stop"

    def stop(self):
        deadline = time.monotonic() + JOIN_TIMEOUT
        while self.thread.is_alive() and time.monotonic() < deadline:
            self.connection.interrupt()
            self.thread.join(0.1)


@pytest.fixture
def long_statement(memconn):
    statement = LongStatement(memconn)
    yield statement
    statement.stop()
    assert not statement.thread.is_alive(), "could not stop the long statement"


def run_in_thread(target):
    """Run ``target`` in a new thread; return (value, exception)."""
    outcome = {"value": None, "error": None}

    def wrapper():
        try:
            outcome["value"] = target()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=wrapper, name="intruder", daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), "the second thread hung"
    return outcome["value"], outcome["error"]


def test_long_statement_lets_other_python_threads_run(long_statement):
    stop = threading.Event()
    ticks = [0]

    def tick():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick, name="ticker", daemon=True)
    ticker.start()
    try:
        long_statement.start()
        before = ticks[0]
        time.sleep(0.3)
        after = ticks[0]
        still_running = long_statement.thread.is_alive()
    finally:
        stop.set()
        ticker.join(JOIN_TIMEOUT)
    assert not ticker.is_alive()
    assert still_running
    assert after - before >= 10


def test_second_thread_gets_threading_violation_and_its_interrupt_stops_the_call(
    long_statement,
):
    connection = long_statement.connection
    long_statement.start()

    def intrude():
        try:
            connection.execute("SELECT 1")
        except apsw_backup.ThreadingViolationError as exc:
            violation = exc
        else:
            violation = None
        connection.interrupt()
        return violation

    started = time.monotonic()
    violation, error = run_in_thread(intrude)
    assert error is None, f"unexpected exception in the second thread: {error!r}"
    assert isinstance(violation, apsw_backup.ThreadingViolationError)

    long_statement.join()
    assert time.monotonic() - started < 5.0
    assert isinstance(long_statement.error, apsw_backup.InterruptError), (
        long_statement.error
    )
    assert long_statement.error.result == apsw_backup.SQLITE_INTERRUPT
    assert long_statement.result is None
    assert connection.execute("SELECT 1").fetchone() == (1,)


BUSY_CALLS = {
    "execute": lambda c, cur: c.execute("SELECT 1"),
    "executemany": lambda c, cur: c.executemany("SELECT ?", [(1,)]),
    "other-cursor-execute": lambda c, cur: cur.execute("SELECT 1"),
    "set_busy_timeout": lambda c, cur: c.set_busy_timeout(10),
    "close": lambda c, cur: c.close(),
}


@pytest.mark.parametrize("call", BUSY_CALLS.values(), ids=BUSY_CALLS.keys())
def test_calls_into_a_busy_connection_get_threading_violation(long_statement, call):
    connection = long_statement.connection
    spare_cursor = connection.cursor()
    long_statement.start()
    _, error = run_in_thread(lambda: call(connection, spare_cursor))
    assert isinstance(error, apsw_backup.ThreadingViolationError), error
    assert long_statement.thread.is_alive()
    long_statement.stop()
    assert isinstance(long_statement.error, apsw_backup.InterruptError), (
        long_statement.error
    )
    assert connection.execute("SELECT 2").fetchone() == (2,)
