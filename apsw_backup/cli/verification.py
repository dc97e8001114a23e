"""Verification of a copy: PRAGMA integrity_check, interruptible."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import apsw_backup
from apsw_backup.cli.errors import PROG
from apsw_backup.cli.progress import REDRAW_EVERY
from apsw_backup.cli.signals import Interrupts, _pause_for_tests


class VerificationFailed(Exception):
    """PRAGMA integrity_check found problems in the copy."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s)")
        self.problems = problems


class VerificationError(Exception):
    """The copy could not be verified (it could not be opened or read)."""

    def __init__(self, error: apsw_backup.Error) -> None:
        super().__init__(str(error))
        self.error = error


class VerificationTimeout(Exception):
    """The check did not finish before the deadline (--timeout)."""

    def __init__(self, seconds: float, locked: bool) -> None:
        why = (
            "the file was locked by another connection"
            if locked
            else ("the check needed more time")
        )
        super().__init__(f"gave up verifying after {seconds:.2f} s: {why}")
        self.seconds = seconds
        self.locked = locked


def integrity_problems(
    path: str,
    interrupts: Interrupts,
    tick: Callable[[], object] | None = None,
    deadline: float | None = None,
    lock_wait: float | None = None,
) -> list[str]:
    """What PRAGMA integrity_check finds wrong with path ([]: nothing).

    The file is opened read-only: verifying never writes to it (a -wal is
    not checkpointed into it nor deleted).  The -wal and -shm that SQLite
    creates to read a WAL database are removed afterwards while the -wal is
    empty (nothing is written to the file), also when a verify that was
    killed left them.
    The check runs in a worker thread so that a signal interrupts it at once
    (Connection.interrupt); this thread waits, redrawing the progress line.
    deadline (time.monotonic()): a lock is waited for, and the check runs,
    until then at most; past it VerificationTimeout, as when a lock lasts
    longer than lock_wait seconds.  Raises
    apsw_backup.Error if it cannot be read, Interrupted on a signal.
    """
    conn = apsw_backup.Connection(path, apsw_backup.SQLITE_OPEN_READONLY)
    outcome: dict[str, Any] = {}
    locked: list[float] = []  # when the lock being waited for was found

    def wait_for_lock(count: int) -> bool:
        now = time.monotonic()
        if count == 0 or not locked:
            locked[:] = [now]
        if deadline is not None and now >= deadline:
            return False
        if lock_wait is not None and now - locked[0] >= lock_wait:
            outcome["lock_wait"] = True
            return False
        time.sleep(0.01)
        return not interrupts.signum

    def check() -> None:
        _pause_for_tests("verifying", interrupts)
        try:
            outcome["rows"] = conn.execute("PRAGMA integrity_check").fetchall()
        except apsw_backup.Error as exc:
            outcome["error"] = exc

    started = time.monotonic()
    timed_out = False
    try:
        conn.set_busy_handler(wait_for_lock)
        worker = threading.Thread(target=check, name=f"{PROG} verify", daemon=True)
        with interrupts.watching(conn):
            worker.start()
            while worker.is_alive():
                wait = REDRAW_EVERY
                if deadline is not None:
                    wait = max(0.0, min(wait, deadline - time.monotonic()))
                worker.join(wait)
                if tick is not None:
                    tick()
                if (
                    worker.is_alive()
                    and deadline is not None
                    and time.monotonic() >= deadline
                    and not timed_out
                ):
                    timed_out = True
                    conn.interrupt()
    finally:
        conn.close(force=True)
        _remove_what_reading_made(path)
    interrupts.check()
    error = outcome.get("error")
    if timed_out or (
        isinstance(error, apsw_backup.BusyError)
        and (
            outcome.get("lock_wait")
            or (deadline is not None and time.monotonic() >= deadline)
        )
    ):
        raise VerificationTimeout(time.monotonic() - started, bool(locked))
    if isinstance(error, (apsw_backup.CorruptError, apsw_backup.NotADBError)):
        return [str(error)]
    if error is not None:
        raise error
    # Some SQLite versions answer the whole list as one row, one problem a
    # line ("*** in database main ***" heads it): count problems, not rows.
    rows = [str(row[0]) for row in outcome["rows"]]
    if rows == ["ok"]:
        return []
    found = [
        line
        for row in rows
        for line in row.splitlines()
        if line.strip() and not line.startswith("*** in database ")
    ]
    _raise_read_failure(found or rows)
    return found or rows


def _remove_what_reading_made(path: str) -> None:
    """A read-only connection to a WAL database creates an empty -wal and a
    -shm, and cannot remove them.  While the -wal is empty, a read-write
    connection opened and closed removes them -- SQLite does so only as the
    last connection, under its locks (another program's open connection
    keeps them); with nothing in the -wal, closing writes nothing to the
    file.  Whether they were there before does not matter: a verify killed
    while reading leaves them (found by tests/fsfaults), and the next one
    must not keep them for ever."""
    try:
        if os.stat(path + "-wal").st_size:
            return
    except OSError:
        return
    try:
        conn = apsw_backup.Connection(path, apsw_backup.SQLITE_OPEN_READWRITE)
    except apsw_backup.Error:
        return
    try:
        conn.set_busy_timeout(100)
        conn.execute("PRAGMA schema_version").fetchall()
    except apsw_backup.Error:
        pass
    finally:
        conn.close(force=True)


# integrity_check reports a page it could not read as a problem of the file
# ("Page 3: unable to get the page. error code=266" before SQLite 3.46, "Tree 2
# page 3: ..." from 3.46 on), and the pages or index entries only it led to
# as "never used" or "wrong # of entries".  An I/O error or out-of-memory
# there says nothing about the file's content: it is a failure to check, not
# a damaged copy.
_UNREADABLE_PAGE = re.compile(
    r"((?:Tree \d+ page|Page) \d+): unable to get the page\. error code=(\d+)"
)
_READ_FAILURES = {
    apsw_backup.SQLITE_IOERR: apsw_backup.IOError,
    apsw_backup.SQLITE_NOMEM: apsw_backup.NoMemError,
}


def _raise_read_failure(found: list[str]) -> None:
    """Raise IOError/NoMemError if integrity_check could not read a page."""
    for problem in found:
        for page, code in _UNREADABLE_PAGE.findall(problem):
            extended = int(code)
            cls = _READ_FAILURES.get(extended & 0xFF)
            if cls is None:
                continue
            what = "ran out of memory" if cls is apsw_backup.NoMemError else "failed"
            error = cls(
                f"reading the file {what} during PRAGMA integrity_check ({page}: "
                f"SQLite error code {extended}), so the check could not finish; this "
                "says nothing about the file's content: check the disk and "
                "verify it again"
            )
            error.result = extended & 0xFF
            error.extendedresult = extended
            raise error


def _problems_text(problems: list[str]) -> str:
    shown = "; ".join(problems[:5])
    if len(problems) > 5:
        shown += f"; and {len(problems) - 5} more"
    return f"{len(problems)} problem(s): {shown}"
