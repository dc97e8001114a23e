"""copy() and acopy(): a whole online backup, done right, on top of Backup.

`Connection.backup()` gives one `Backup` and leaves the loop to the caller.
This module is that loop, with the traps of a live database handled:

- progress is reported after every step exactly as the standard library's
  `sqlite3.Connection.backup(pages=N, progress=...)` reports it;
- a locked database (BUSY/LOCKED) is retried every `sleep` seconds, and
  `timeout` bounds the whole copy, so it never hangs;
- the source connection's own write transaction (SQLite answers BUSY forever)
  is reported at once;
- a copy that keeps restarting because other connections write to the source
  is made to finish by holding a read transaction (a snapshot) on the source;
- whatever goes wrong, the backup is finished before copy() returns, so the
  target holds either the complete copy or its previous content.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from typing import Literal, TypeVar

from apsw_backup import _apsw_backup as _c

Database = _c.Connection | str | os.PathLike[str]
Progress = Callable[[int, int, int], object]
Snapshot = bool | Literal["auto"]
Outcome = int | _c.Error
T = TypeVar("T")

# With snapshot="auto", the number of restarts after which the source is
# held in a read transaction: a few restarts are cheap, more is a livelock.
AUTO_SNAPSHOT_AFTER = 3

FINISHED_OUTSIDE = (
    "the backup was finished outside copy(): the progress callback or another "
    "thread closed the source or the target connection, so the target was "
    "rolled back to its previous content"
)


@dataclass(frozen=True)
class CopyResult:
    """What a completed copy did.

    pages: pages in the copy (the source's page count when it completed);
    steps: Backup.step() calls, including the ones that found a lock;
    restarts: times SQLite started the copy again from the first page because
    another connection changed the source;
    elapsed: seconds copy() took;
    page_size, bytes: the copy's page size and size in bytes;
    waits: steps that found the database locked (BUSY/LOCKED) and were retried;
    snapshot: whether copy() held a read transaction on the source.
    """

    pages: int
    steps: int
    restarts: int
    elapsed: float
    page_size: int = 0
    bytes: int = 0
    waits: int = 0
    snapshot: bool = False


@dataclass(frozen=True)
class _Options:
    """copy()'s keyword arguments, checked before anything is opened."""

    pages: int
    progress: Progress | None
    name: str
    target_name: str
    sleep: float
    timeout: float | None
    snapshot: Snapshot

    def __post_init__(self) -> None:
        if not isinstance(self.pages, int) or isinstance(self.pages, bool):
            raise TypeError(f"pages must be an int, not {type(self.pages).__name__}")
        if self.progress is not None and not callable(self.progress):
            raise TypeError("progress must be callable or None")
        if not _is_number(self.sleep) or not self.sleep >= 0:
            raise ValueError(f"sleep must be a number >= 0, not {self.sleep!r}")
        if self.timeout is not None and (
            not _is_number(self.timeout) or not self.timeout >= 0
        ):
            raise ValueError(
                f"timeout must be None or a number >= 0, not {self.timeout!r}"
            )
        if not (
            self.snapshot is True or self.snapshot is False or self.snapshot == "auto"
        ):
            raise ValueError(
                f"snapshot must be True, False or 'auto', not {self.snapshot!r}"
            )

    @property
    def step_pages(self) -> int:
        """Pages per step: like the standard library, <= 0 copies all at once."""
        return self.pages if self.pages > 0 else -1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _status(error: _c.Error) -> int:
    """The step's result code, as the standard library passes it to progress."""
    if error.extendedresult is not None:
        return error.extendedresult
    return error.result if error.result is not None else _c.SQLITE_ERROR


def _renamed(error: _c.Error, message: str) -> _c.Error:
    """An error of the same class and codes as `error`, with a better message."""
    better = type(error)(message)
    better.result, better.extendedresult = error.result, error.extendedresult
    return better


def _open(database: Database, flags: int, role: str) -> _c.Connection:
    """`database` itself if it is a Connection, else the file opened with flags."""
    if isinstance(database, _c.Connection):
        return database
    path = os.fspath(database)
    try:
        return _c.Connection(path, flags)
    except _c.CantOpenError as exc:
        missing = " (no such file)" if not os.path.exists(path) else ""
        raise _renamed(
            exc, f"cannot open the {role} database {path!r}{missing}: {exc}"
        ) from exc


class _Copy:
    """One copy in progress: the state and decisions copy() and acopy() share.

    step() does the blocking work (acopy runs it in a worker thread); react()
    reports the step to the progress callback and decides what comes next;
    close() finishes the backup (an incomplete copy is rolled back), ends the
    snapshot if this copy began it and closes the connections it opened.
    """

    def __init__(self, source: Database, target: Database, options: _Options) -> None:
        self._opts = options
        self._start = time.monotonic()
        self._steps = self._waits = self._pages = 0
        self._began = False  # this copy began the source's read transaction
        self._held = False  # the source is in a read transaction for the copy
        self._stack = ExitStack()
        with self._stack:
            self._source = self._own(source, _c.SQLITE_OPEN_READONLY, "source")
            flags = _c.SQLITE_OPEN_READWRITE | _c.SQLITE_OPEN_CREATE
            self._target = self._own(target, flags, "target")
            self._stack.callback(self._end_snapshot)
            self._backup = self._target.backup(
                options.target_name, self._source, options.name
            )
            self._stack.callback(self._backup.close, True)
            self._stack = self._stack.pop_all()

    def _own(self, database: Database, flags: int, role: str) -> _c.Connection:
        conn = _open(database, flags, role)
        if conn is not database:
            self._stack.callback(conn.close)
        return conn

    def close(self) -> None:
        """Finish the backup, end the snapshot, close what was opened here."""
        self._stack.close()

    def step(self) -> Outcome:
        """Take the snapshot if it is due, then copy the next pages.

        Returns SQLITE_OK, SQLITE_DONE, or the SQLite error the step raised.
        """
        if not self._backup:
            raise _c.ConnectionClosedError(FINISHED_OUTSIDE)
        if self._snapshot_due():
            self._take_snapshot()
        self._steps += 1
        try:
            done = self._backup.step(self._opts.step_pages)
        except _c.Error as exc:
            if exc.result is None:
                raise
            return exc
        return _c.SQLITE_DONE if done else _c.SQLITE_OK

    def react(self, outcome: Outcome) -> float | None:
        """Report a step; None once the copy is complete, else seconds to wait.

        Raises when the copy must stop: a final error, the source's own write
        transaction, or the timeout.
        """
        status = outcome if isinstance(outcome, int) else _status(outcome)
        remaining, total = self._backup.remaining, self._backup.page_count
        if self._opts.progress is not None:
            self._opts.progress(status, remaining, total)
        if status == _c.SQLITE_DONE:
            self._pages = total
            self._backup.finish()
            return None
        if not self._backup:
            raise _c.ConnectionClosedError(FINISHED_OUTSIDE)
        if isinstance(outcome, _c.Error):
            self._check_retryable(outcome)
        self._check_deadline(outcome)
        return 0.0 if isinstance(outcome, int) else self._pause()

    def result(self) -> CopyResult:
        """The result of the completed copy."""
        sql = f"PRAGMA {_quoted(self._opts.target_name)}.page_size"
        page_size = int(self._target.execute(sql).fetchall()[0][0] or 0)
        return CopyResult(
            pages=self._pages,
            steps=self._steps,
            restarts=self._backup.restarts,
            elapsed=time.monotonic() - self._start,
            page_size=page_size,
            bytes=self._pages * page_size,
            waits=self._waits,
            snapshot=self._held,
        )

    def _check_retryable(self, error: _c.Error) -> None:
        if not isinstance(error, (_c.BusyError, _c.LockedError)):
            raise error
        # The step's message already names the transaction and the cure.
        if self._source.txn_state(self._opts.name) == _c.SQLITE_TXN_WRITE:
            raise error
        self._waits += 1

    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def _check_deadline(self, outcome: Outcome) -> None:
        timeout = self._opts.timeout
        if timeout is None or self._elapsed() < timeout:
            return
        last = outcome if isinstance(outcome, _c.Error) else None
        error = _c.BusyError(self._timeout_message())
        error.result = error.extendedresult = _c.SQLITE_BUSY
        raise error from last

    def _timeout_message(self) -> str:
        total, restarts = self._backup.page_count, self._backup.restarts
        copied = total - self._backup.remaining
        causes, cures = [], ["retry later or with a longer timeout"]
        if self._waits:
            causes.append(
                f"the database was locked by another connection {_times(self._waits)} "
                f"(retried every {self._opts.sleep} s)"
            )
            cures.insert(0, "end the other connection's long transaction")
        if restarts:
            causes.append(
                f"the copy restarted {_times(restarts)} because other connections "
                "changed the source"
            )
            if self._opts.snapshot is False:
                cures.insert(0, "use snapshot='auto' or True so it cannot restart")
        return (
            f"copy() gave up after {self._elapsed():.2f} s (timeout="
            f"{self._opts.timeout} s) with {copied} of {total} pages copied, and "
            f"rolled the target back: {'; '.join(causes) or 'it was not finished'}. "
            f"To finish it: {', or '.join(cures)}"
        )

    def _pause(self) -> float:
        """Seconds to sleep after a locked step: `sleep`, cut at the deadline."""
        if self._opts.timeout is None:
            return self._opts.sleep
        return max(0.0, min(self._opts.sleep, self._opts.timeout - self._elapsed()))

    def _snapshot_due(self) -> bool:
        mode = self._opts.snapshot
        if self._held or mode is False:
            return False
        return mode is True or self._backup.restarts >= AUTO_SNAPSHOT_AFTER

    def _take_snapshot(self) -> None:
        """Hold a read transaction on the source so the copy cannot restart.

        A transaction the source already has is left alone.  A lock that stops
        the snapshot being read now is retried before the next step.
        """
        if not self._source.get_autocommit():
            self._held = True
            return
        self._source.execute("BEGIN")
        self._began = True
        sql = f"SELECT count(*) FROM {_quoted(self._opts.name)}.sqlite_master"
        try:
            self._source.execute(sql).fetchall()
        except (_c.BusyError, _c.LockedError):
            self._end_snapshot()
            return
        self._held = True

    def _end_snapshot(self) -> None:
        if not self._began:
            return
        self._began = self._held = False
        try:
            if not self._source.get_autocommit():
                self._source.execute("ROLLBACK")
        except _c.ConnectionClosedError:
            pass  # closing the source ended the transaction


def copy(
    source: Database,
    target: Database,
    *,
    pages: int = -1,
    progress: Progress | None = None,
    name: str = "main",
    target_name: str = "main",
    sleep: float = 0.25,
    timeout: float | None = None,
    snapshot: Snapshot = "auto",
) -> CopyResult:
    """Copy database `name` of `source` into `target_name` of `target`, online.

    source, target: a Connection, or a path; a path source is opened read-only
    and must exist, a path target is created if need be; paths are opened and
    closed here, Connections are left open.
    pages: pages per step; <= 0 copies everything in one step.
    progress: called as progress(status, remaining, total) after every step,
    as sqlite3.Connection.backup calls it: status is SQLITE_OK (0), SQLITE_DONE
    (101) for the last step, or the code of a step that found the database
    locked (SQLITE_BUSY, SQLITE_LOCKED) or failed.  If it raises, the backup is
    finished -- the target rolled back, unless the call was the last one
    (SQLITE_DONE): the copy is complete by then -- and the exception comes out
    unchanged.
    sleep: seconds to wait before retrying a locked step.
    timeout: seconds the whole copy may take (None: no limit).  Past it the
    copy gives up with BusyError, whose message says why (a lock, restarts);
    the target is rolled back.
    snapshot: "auto" holds a read transaction on the source once the copy has
    restarted AUTO_SNAPSHOT_AFTER (3) times, True from the start, False never.
    The snapshot stops the copy restarting, so it finishes; in WAL mode other
    connections keep committing meanwhile, in rollback-journal mode their
    commits wait for it (give them a busy timeout).  A transaction the source
    connection already has is used as it is and left open.

    Raises BusyError at once, naming the transaction and the cure, if the
    source connection has its own open write transaction.  Other errors of
    Backup.step() are final.  In every case the backup is finished first.
    """
    options = _Options(pages, progress, name, target_name, sleep, timeout, snapshot)
    with closing(_Copy(source, target, options)) as job:
        while (wait := job.react(job.step())) is not None:
            if wait:
                time.sleep(wait)
        return job.result()


async def acopy(
    source: Database,
    target: Database,
    *,
    pages: int = -1,
    progress: Progress | None = None,
    name: str = "main",
    target_name: str = "main",
    sleep: float = 0.25,
    timeout: float | None = None,
    snapshot: Snapshot = "auto",
) -> CopyResult:
    """copy() as a coroutine: the same arguments, behaviour and result.

    Steps run in the event loop's default executor, so the loop stays free;
    progress is called in the loop's thread.  A cancelled task waits for the
    step in flight (it holds the backup), finishes the backup -- the target
    rolled back -- and re-raises CancelledError.
    """
    options = _Options(pages, progress, name, target_name, sleep, timeout, snapshot)
    with closing(_Copy(source, target, options)) as job:
        while (wait := job.react(await _off_loop(job.step))) is not None:
            await asyncio.sleep(wait)
        return job.result()


async def _off_loop(func: Callable[[], T]) -> T:
    """func() in the default executor; cancelled, it lets func end first."""
    future = asyncio.get_running_loop().run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _wait_out(future)
        raise


async def _wait_out(future: asyncio.Future[T]) -> None:
    """Wait until future is done, whatever further cancellations arrive."""
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: the cancellation is what comes out
