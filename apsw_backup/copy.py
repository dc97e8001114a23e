"""copy() and acopy(): a whole online backup, done right, on top of Backup.

`Connection.backup()` gives one `Backup` and leaves the loop to the caller.
This module is that loop, with the traps of a live database handled:

- progress is reported after every step exactly as the standard library's
  `sqlite3.Connection.backup(pages=N, progress=...)` reports it;
- a locked database (BUSY/LOCKED) is retried after short waits that grow
  (1 ms, doubling, at most `sleep`), and `timeout` bounds the whole copy;
- the source connection's own write transaction (SQLite answers BUSY forever)
  is reported at once;
- a copy that keeps restarting because other connections write to the source
  is made to finish by holding a read transaction (a snapshot) on the source,
  always on a read-only connection of copy()'s own, so no write of the
  application can ever be caught in it;
- a new target file is written under a temporary name and renamed into place
  only once complete (files.NewFile): its name never holds a partial copy;
- whatever goes wrong, the backup is finished before copy() returns, so the
  target holds either the complete copy or its previous content.
"""

from __future__ import annotations

import contextvars
import errno
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeGuard, TypeVar, Union

from apsw_backup import _apsw_backup as _c
from apsw_backup import files

if TYPE_CHECKING:
    from apsw_backup import verify as _verify

Database = _c.Connection | str | os.PathLike[str]

if TYPE_CHECKING:
    import asyncio
    import sqlite3

# sqlite3 is not imported here: importing the standard sqlite3 module
# initialises SQLite (and some Pythons are built without it).  An object can
# only be one of its connections once the program imported it.
Source = Union[Database, "sqlite3.Connection"]  # noqa: UP007 (forward ref)
Progress = Callable[[int, int, int], object]
Verify = Callable[[str], object]
Level = Literal["default"] | Literal["full"]  # a Union at runtime, for stubtest
VerifyProgress = Callable[["_verify.Progress"], object]
Snapshot = bool | Literal["auto"]
Outcome = int | _c.Error
T = TypeVar("T")

# With snapshot="auto", the number of restarts after which the source is
# held in a read transaction: a few restarts are cheap, more is a livelock.
AUTO_SNAPSHOT_AFTER = 3

# Seconds a connection may stay in use by another call (another thread's)
# before copy() gives up: it may be a call copy() runs inside, never ending.
IN_USE_LIMIT = 5.0
# The longest wait between retries (sleep=): an hour; time.sleep() cannot
# wait for much longer ones (OverflowError) and no lock is waited out so.
SLEEP_MAX = 3600.0
# After a failed copy into an existing file, seconds copy() waits for
# another connection's lock to roll a hot journal back (files.roll_back_hot_journal).
ROLLBACK_WAIT = 5.0

# The first wait after a locked step; each further locked step in a row
# doubles it, up to SHORT_WAIT_MAX, until the lock has lasted LONG_LOCK
# seconds; then the wait is `sleep` (see _Copy._pause).
FIRST_WAIT = 0.001
SHORT_WAIT_MAX = 0.016
LONG_LOCK = 1.0

# acopy() runs steps back to back in one executor call for up to this many
# seconds (a hop to a worker thread and back costs ~50 us, as much as a
# one-page step), then reports each of them in the loop's thread.
BATCH_SECONDS = 0.005

# copy()'s default flush_every: bytes the target may grow by before copy()
# has them written out to the disk (files.Flusher), and the target's page
# cache (KiB) meanwhile, so the copy's dirty data never piles up for one flush.
FLUSH_EVERY = 2 * 2**20
TARGET_CACHE_KIB = 1024

_C_INT_MAX = 2**31 - 1
_SQLITE_IOERR_WRITE = _c.SQLITE_IOERR | (3 << 8)
# A read-only connection found a hot journal it may not roll back.
_SQLITE_READONLY_ROLLBACK = _c.SQLITE_READONLY | (3 << 8)

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
    restarts: times the copy started again from the first page: the
    Backups' own restarts (another connection changed the source, or
    Backup.step() began afresh after an extended lock code such as
    SQLITE_BUSY_RECOVERY, which sqlite3_backup_step never retries) plus the
    times copy() began a fresh Backup to take its snapshot on a connection
    of its own after pages were copied;
    elapsed: seconds copy() took;
    page_size, bytes: the copy's page size and size in bytes;
    waits: steps that found the database locked (BUSY/LOCKED) and were retried;
    snapshot: whether copy() held a read transaction on the source;
    wal_growth: bytes the source's -wal file grew during the copy (0 when
    the source is not in WAL mode);
    path: the target's file when the target was a path, else None;
    verification: with verify="default" or "full", the VerifyResult (which
    checks ran, their outcomes and seconds: ``verification.to_json()``),
    else None.
    """

    pages: int
    steps: int
    restarts: int
    elapsed: float
    page_size: int = 0
    bytes: int = 0
    waits: int = 0
    snapshot: bool = False
    wal_growth: int = 0
    path: str | None = None
    verification: _verify.VerifyResult | None = None


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
    keep_wal: bool
    verify: Verify | Level | None
    flush_every: int | None = FLUSH_EVERY
    target_exists: bool | None = None
    verify_progress: VerifyProgress | None = None
    before_publish: Verify | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pages, int) or isinstance(self.pages, bool):
            raise TypeError(f"pages must be an int, not {type(self.pages).__name__}")
        if self.pages > _C_INT_MAX:
            raise OverflowError(
                f"pages must be at most {_C_INT_MAX} (pages per step; <= 0 copies "
                f"everything in one step), not {self.pages}"
            )
        if self.progress is not None and not callable(self.progress):
            raise TypeError("progress must be callable or None")
        for argument in ("name", "target_name"):
            _check_schema_name(argument, getattr(self, argument))
        if not _is_number(self.sleep) or not 0 <= self.sleep <= SLEEP_MAX:
            raise ValueError(
                f"sleep must be a number of seconds from 0 to {SLEEP_MAX:g}, "
                f"not {self.sleep!r}"
            )
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
        if not isinstance(self.keep_wal, bool):
            raise TypeError(
                f"keep_wal must be True or False, not {type(self.keep_wal).__name__}"
            )
        if isinstance(self.verify, str):
            if self.verify not in ("default", "full"):
                raise ValueError(
                    f"verify must be 'default', 'full', a callable or None, not "
                    f"{self.verify!r}"
                )
        elif self.verify is not None and not callable(self.verify):
            raise TypeError(
                "verify must be 'default', 'full', a callable (it is given the "
                f"copy's path) or None, not {type(self.verify).__name__}"
            )
        if self.target_exists is not None and not isinstance(self.target_exists, bool):
            raise TypeError(
                f"target_exists must be None, True or False, not {self.target_exists!r}"
            )
        if self.verify_progress is not None and not callable(self.verify_progress):
            raise TypeError("verify_progress must be callable or None")
        if self.before_publish is not None and not callable(self.before_publish):
            raise TypeError("before_publish must be callable or None")
        flush = self.flush_every
        if flush is not None and (
            not isinstance(flush, int) or isinstance(flush, bool)
        ):
            raise TypeError(
                f"flush_every must be an int (bytes) or None, not {type(flush).__name__}"
            )
        if flush is not None and flush < 0:
            raise ValueError(
                f"flush_every must be >= 0 bytes (0 or None: no flushing), not {flush}"
            )

    @property
    def step_pages(self) -> int:
        """Pages per step: like the standard library, <= 0 copies all at once."""
        return self.pages if self.pages > 0 else -1


def _check_schema_name(argument: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{argument} must be a str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"{argument} must not contain a NUL character")


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


def _with_codes(error: _c.Error, result: int, extended: int | None = None) -> _c.Error:
    error.result = result
    error.extendedresult = result if extended is None else extended
    return error


def _renamed(error: _c.Error, message: str) -> _c.Error:
    """An error of the same class and codes as `error`, with a better message."""
    better = type(error)(message)
    better.result, better.extendedresult = error.result, error.extendedresult
    return better


def _cannot(role: str, path: str, exc: OSError) -> _c.Error:
    """CantOpenError for a path the OS refused, naming the cause and cure.

    Its facts (files.with_facts): role ("source", "target", "target's
    folder"), path and os_errno; filename is the path too."""
    error = _c.CantOpenError(
        f"cannot use the {role} {path!r}: it {files.os_cause(exc)}"
    )
    files.with_facts(error, role=role, path=path, os_errno=exc.errno)
    error.filename = path  # type: ignore[attr-defined]
    return _with_codes(error, _c.SQLITE_CANTOPEN)


def _not_a_file(role: str, path: str) -> _c.Error:
    """CantOpenError for a path that is a FIFO, socket or device: SQLite
    would block opening a FIFO, or fail on it mid-copy."""
    error = _c.CantOpenError(
        f"cannot use the {role} {path!r}: it is not a regular file (a FIFO, "
        "socket or device): give the path of a database file"
    )
    files.with_facts(error, role=role, path=path)
    error.filename = path  # type: ignore[attr-defined]
    return _with_codes(error, _c.SQLITE_CANTOPEN)


def _is_stdlib_connection(obj: object) -> TypeGuard[sqlite3.Connection]:
    """Whether obj is a standard-library sqlite3.Connection."""
    module = sys.modules.get("sqlite3")
    return module is not None and isinstance(obj, module.Connection)


def _schema_files(conn: _c.Connection | sqlite3.Connection) -> dict[str, str]:
    """{schema name (case folded): file ("" in memory)} of a connection."""
    rows = conn.execute("PRAGMA database_list").fetchall()
    return {str(row[1]).casefold(): str(row[2] or "") for row in rows}


def _schema_file(conn: _c.Connection | sqlite3.Connection, name: str, role: str) -> str:
    """The file of schema `name` of conn; SQLError if it has no such schema."""
    if name.casefold() == "temp":
        return ""
    if isinstance(conn, _c.Connection) and name.casefold() == "main":
        # The attribute needs no call into the connection, which another
        # thread may be using right now.
        return conn.filename
    found = _schema_files(conn)
    if name.casefold() not in found:
        error = _c.SQLError(
            f"the {role} connection has no database named {name!r} (it has "
            f"{', '.join(sorted(found))}): give the schema name of an attached "
            "database"
        )
        raise _with_codes(error, _c.SQLITE_ERROR)
    return found[name.casefold()]


def _header_of(path: str) -> bytes:
    """A database file's header, read through SQLite (files.read_header);
    b"" when it cannot be read."""
    if not path:
        return b""  # a memory or temporary database: no file
    try:
        return files.read_header(path)
    except OSError:
        return b""


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _close_quietly(conn: _c.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close(True)
        except _c.Error:
            pass


class _SourceSide:
    """The connection the backup reads from, and the snapshot.

    A path (or a standard-library connection's file) is opened read-only
    here.  The snapshot -- a read transaction that stops the copy restarting
    -- is only ever begun on a read-only connection this object opened:
    the path's own, or, for a Connection the caller passed, a second one on
    the same file.  The caller's connection is never put into a transaction
    by copy(), so none of its writes can be caught in one and rolled back
    (or committed early): they go on as if copy() were another connection.
    """

    def __init__(self, source: Source, options: _Options) -> None:
        self.user: _c.Connection | None = None
        self.schema = options.name
        self.closed = False
        self.own: _c.Connection | None = None
        self.snapshot_conn: _c.Connection | None = None
        self.began = False
        self.side_existed = True
        if isinstance(source, _c.Connection):
            self.user = source
            self.file = _schema_file(source, options.name, "source")
            self.vfs: str | None = source.open_vfs
            return
        if _is_stdlib_connection(source):
            self.file = _schema_file(source, options.name, "source")
            if not self.file:
                raise TypeError(
                    "the source is a standard-library sqlite3.Connection of a "
                    "database in memory, which no other connection can open: "
                    "copy it with its own backup() method (source.backup(dest)), "
                    "or pass an apsw_backup.Connection or the path of a file"
                )
            self.schema = "main"
        elif isinstance(source, (str, os.PathLike)):
            self.file = os.fspath(source)
            if not isinstance(self.file, str):
                raise TypeError("a source path must be a str or os.PathLike of str")
            # A path is a file: never SQLite's ":memory:" nor a "file:" URI.
            self.file = os.path.abspath(self.file)
            if options.name.casefold() == "temp":
                # copy()'s own connection to the file: its temp schema is
                # always empty, and a backup of nothing must never pass for
                # a backup of the file.
                raise ValueError(
                    "name 'temp' is the temporary database of the connection "
                    "copy() opens on the source path, which is always empty: "
                    "copy name='main' (the file), or pass the Connection whose "
                    "temp database you mean"
                )
        else:
            raise TypeError(
                "source must be an apsw_backup.Connection, a sqlite3.Connection of "
                "a file database, or a path (str or os.PathLike), not "
                f"{type(source).__name__}"
            )
        self.vfs = None
        _check_source_file(self.file)

    def open(self) -> None:
        """Open what copy() reads from (no file is created by this)."""
        self.snapshot = False  # a read transaction holds the copy's view
        self.snapshot_done = False  # held, or not needed
        if self.user is not None:
            self.conn = self.user
            self.side_existed = True  # beside the caller's file: not ours
            return
        try:
            self.own = _c.Connection(self.file, _c.SQLITE_OPEN_READONLY)
        except _c.CantOpenError as exc:
            error = _renamed(
                exc, f"cannot open the source database {self.file!r}: {exc}"
            )
            raise files.with_facts(error, role="source", path=self.file) from exc
        self.conn = self.own
        _schema_file(self.own, self.schema, "source")
        # SQLite names side files after the full path it reports.
        self.file = self.own.filename or self.file
        self.side_existed = any(map(os.path.lexists, files.side_paths(self.file)))

    @property
    def wal_path(self) -> str:
        return self.file + "-wal" if self.file else ""

    def take_snapshot(self) -> None:
        """Begin the snapshot, switching self.conn to the connection it is on.

        A lock that stops the snapshot being read now leaves it to be tried
        again before the next step.  A transaction the backup's source
        connection already has is the snapshot, left as it is.
        """
        if self._in_transaction(self.conn):
            self.snapshot = self.snapshot_done = True
        elif self.conn is self.own:
            self.snapshot = self.snapshot_done = self._begin(self.conn, self.schema)
        elif not self.file:
            # In memory or temp: no other connection can change it, so the
            # copy cannot restart and needs no snapshot.
            self.snapshot_done = True
        else:
            if self.snapshot_conn is None:
                self.snapshot_conn = _c.Connection(
                    self.file, _c.SQLITE_OPEN_READONLY, self.vfs
                )
            if self._begin(self.snapshot_conn, "main"):
                self.conn, self.schema = self.snapshot_conn, "main"
                self.snapshot = self.snapshot_done = True

    def snapshot_moves(self) -> bool:
        """Whether take_snapshot() would move the copy off the caller's
        connection onto a snapshot connection of copy()'s own."""
        return (
            self.user is not None
            and self.conn is self.user
            and bool(self.file)
            and not self._in_transaction(self.user)
        )

    @staticmethod
    def _in_transaction(conn: _c.Connection) -> bool:
        try:
            return not conn.get_autocommit()
        except _c.ThreadingViolationError:
            # Another thread's call on the caller's connection: copy from a
            # snapshot of copy()'s own rather than wait for it.
            return False

    def _begin(self, conn: _c.Connection, schema: str) -> bool:
        conn.execute("BEGIN")
        self.began = True
        sql = f"SELECT count(*) FROM {_quoted(schema)}.sqlite_master"
        try:
            conn.execute(sql).fetchall()
        except (_c.BusyError, _c.LockedError):
            self.end_snapshot()
            return False
        return True

    def end_snapshot(self) -> None:
        """End the snapshot if copy() began it.

        Safe to ROLLBACK: it was begun on a connection opened read-only here,
        which nothing but copy() can use, so it holds no write.
        """
        if not self.began:
            return
        self.began = False
        for conn in (self.own, self.snapshot_conn):
            if conn is None:
                continue
            try:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
            except _c.ConnectionClosedError:
                pass  # closing it ended the transaction

    def close(self) -> None:
        """End the snapshot, close what was opened here, and leave nothing
        beside a source file that had no side files before."""
        if self.closed:
            return
        self.closed = True
        try:
            self.end_snapshot()
        finally:
            _close_quietly(self.snapshot_conn)
            _close_quietly(self.own)
            self.snapshot_conn = self.own = None
            self._leave_no_side_files()

    def _leave_no_side_files(self) -> None:
        """A read-only connection cannot checkpoint, so closing the last one
        on a WAL database leaves -wal and -shm beside it.  If they were not
        there before, a read-write connection opened and closed now removes
        them -- only when it is the last connection, as SQLite decides under
        its own locks; otherwise they belong to the connections still open."""
        if self.side_existed or not files.header_is_wal(_header_of(self.file)):
            return
        if not any(os.path.lexists(p) for p in files.side_paths(self.file)):
            return
        files.close_as_last_connection(self.file)


def _check_source_file(path: str) -> None:
    """A path source must be an existing, readable database file."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _cannot("source", path, exc) from exc
    if stat.S_ISDIR(info.st_mode):
        raise _cannot("source", path, IsADirectoryError(21, "", path))
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_file("source", path)
    if not os.access(path, os.R_OK):
        raise _cannot("source", path, PermissionError(13, "", path))


class _TargetSide:
    """Where the copy goes.

    kind "connection": the caller's Connection, used as it is.
    kind "existing": a file that exists, opened here and written through
    SQLite's own transaction (other connections may have it open; a rename
    would strand them on the old file).
    kind "new": a path that does not exist: the copy is written to a
    temporary file beside it (files.NewFile) and put in place when complete.
    """

    def __init__(self, target: Source, options: _Options) -> None:
        self.conn: _c.Connection | None = None
        self.user: _c.Connection | None = None
        self.new: files.NewFile | None = None
        self.flusher: files.Flusher | None = None
        self.flush_every = options.flush_every or 0
        self.keep_wal = options.keep_wal
        self.schema = options.target_name
        # verify="default"/"full": every page SQLite writes to a file opened
        # here is hashed (PageRecorder) for the byte check; no_hashes says
        # why the byte check cannot run when it cannot.
        self.level = options.verify if isinstance(options.verify, str) else None
        self.recorder: _c.PageRecorder | None = None
        self.no_hashes: str | None = None
        # connections this copy opened on the file through the recorder's
        # shim: any other one is another writer (verify._check_only_the_owner_wrote)
        self.own_opens = 0
        # An existing file target a failed write left torn, with the hot
        # -journal that restores it (see roll_back).
        self.torn = False
        if isinstance(target, _c.Connection):
            self.kind, self.user = "connection", target
            self.file = _schema_file(target, options.target_name, "target")
            self.given = self.file
            if options.verify is not None and not self.file:
                raise ValueError(
                    "verify needs the copy's file, but the target database "
                    f"{options.target_name!r} is in memory: verify it yourself, "
                    "or copy into a file"
                )
            return
        if _is_stdlib_connection(target):
            path = _schema_file(target, options.target_name, "target")
            if not path:
                raise TypeError(
                    "the target is a standard-library sqlite3.Connection of a "
                    "database in memory, which no other connection can open: use "
                    "the source's backup into it, or pass an apsw_backup.Connection "
                    "or the path of a file"
                )
            self.schema = "main"
        elif isinstance(target, (str, os.PathLike)):
            path = os.fspath(target)
            if not isinstance(path, str):
                raise TypeError("a target path must be a str or os.PathLike of str")
            if options.target_name.casefold() != "main":
                raise ValueError(
                    f"target_name must be 'main' when the target is a path (a file "
                    f"holds one database), not {options.target_name!r}"
                )
        else:
            raise TypeError(
                "target must be an apsw_backup.Connection or a path (str or "
                f"os.PathLike), not {type(target).__name__}"
            )
        self.user = None
        self.given = self.file = os.path.abspath(path)
        self.kind = _check_target_path(self.file)
        _check_expected(self.file, self.kind, options.target_exists)
        if self.kind == "new":
            self.file = os.path.realpath(self.file)  # a dangling link: its file
            for spelled in dict.fromkeys((self.given, self.file)):
                files.check_no_stale_side_files(spelled)

    def open(self) -> None:
        """Open the target; a new one is created under a temporary name."""
        if self.user is not None:
            self.conn = self.user
            return
        path = self.file
        # Dead runs' leftovers go, whether this copy is new or not.
        files.remove_stale(os.path.dirname(self.file))
        if self.kind == "new":
            self.new = files.NewFile(self.file)
            try:
                self.new.create()
            except OSError as exc:
                self.new = None
                if exc.errno == errno.ENAMETOOLONG:
                    raise _cannot("target", self.file, exc) from exc
                raise _cannot(
                    "target's folder", os.path.dirname(self.file), exc
                ) from exc
            path = self.new.path
            flags = _c.SQLITE_OPEN_READWRITE
        else:
            flags = _c.SQLITE_OPEN_READWRITE
        try:
            vfs = self._vfs(path)
            self.own_opens += self.recorder is not None
            self.conn = _c.Connection(path, flags, vfs)
        except _c.CantOpenError as exc:
            error = _renamed(exc, f"cannot open the target {self.file!r}: {exc}")
            state = "not created" if self.new is not None else "unchanged"
            raise files.with_facts(
                error, role="target", path=self.file, target_state=state
            ) from exc
        if self.flush_every:
            self._start_flushing()

    def _vfs(self, path: str) -> str | None:
        """The VFS to open the target with.

        A copy of a WAL source is a WAL database: the backup copies page 1
        with the source's header, whose bytes 18 and 19 say "WAL".  Unless
        keep_wal, the target is opened through the rollback shim
        (src/pageshim.c), which writes that page 1 saying "rollback
        journal" instead: the copy is committed in rollback-journal mode,
        in the one transaction that writes it, and never has to leave WAL
        mode (a switch afterwards is a second transaction, and a kill
        during it left the target in WAL mode beside a -journal).  A
        target in WAL mode when the copy commits (an existing WAL database,
        its users' choice) stays in WAL mode: the shim leaves alone the
        writes of a connection in WAL mode.  When verifying, a
        PageRecorder records what is written, through either shim.
        """
        if self.level is not None:
            try:
                self.recorder = _c.PageRecorder(path)
            except ValueError as exc:  # another copy records this file now
                self.no_hashes = str(exc)
        if not self.keep_wal:
            return _c._rollback_vfs()
        return self.recorder.vfs if self.recorder is not None else None

    def _start_flushing(self) -> None:
        """Write the copy out in slices as it goes (flush_every).

        A small page cache makes SQLite spill the copied pages to the file
        during each step instead of holding them all for the commit; after a
        step that grew the file by flush_every bytes, they are written out
        to the disk (files.Flusher: sync_file_range on Linux, keeping at most
        about two slices in flight; else fdatasync).  So no flush -- the
        copy's own or another process's on the same disk (a WAL writer's
        commit) -- ever queues behind more than that of the copy's dirty
        data.

        Safe for both kinds of file copy() opens: a new target's temporary
        file is nobody else's, and is renamed into place only after its
        final fsync.  In an existing target, SQLite writes a page into the
        database file mid-transaction only once the rollback journal holding
        its old content is synced (a cache spill), so making those writes
        durable early changes nothing a crash could leave: recovery rolls
        them back from the journal either way.  (An existing target in WAL
        mode spills into its -wal file: flushing the database file then
        finds nothing, harmless.)  A Connection target is the caller's: its
        cache is left alone and it is not flushed.
        """
        assert self.conn is not None
        try:
            # Needs the schema: an existing target another connection holds
            # locked answers BUSY.  Then the copy waits for that lock as any
            # step would, only with SQLite's default cache (fewer, larger
            # write-outs); it must not fail for it.
            self.conn.execute(f"PRAGMA main.cache_size=-{TARGET_CACHE_KIB}").fetchall()
        except (_c.BusyError, _c.LockedError):
            pass
        if self.new is not None:
            self.flusher = files.Flusher(self.new.fd, self.flush_every)
        else:
            self.flusher = files.Flusher.borrowing(self.file, self.flush_every)

    def flush(self) -> None:
        """After a step that copied: flush the target if it grew enough."""
        if self.flusher is not None:
            self.flusher.flush_if_grown()

    @property
    def path(self) -> str | None:
        return None if self.user is not None else self.file

    @property
    def work_file(self) -> str:
        """The file the copy is being written to."""
        return self.new.path if self.new is not None else self.file

    def settle(self) -> None:
        """Close the complete copy's connection; its journal mode is already
        its final one (see _vfs).

        Nothing more is asked of that connection: its cached page 1 is the
        one the backup copied, which may still say "WAL" where the file, as
        the rollback shim wrote it, says "rollback journal" -- and SQLite
        keeps that cache while the file's change counter is the same, so
        the next statement would open the target in WAL mode.  Whatever
        follows opens a connection of its own.  A copy in WAL mode (kept,
        or the existing target's mode) is checkpointed into the file by
        that close when nobody else has it open; if others keep its -wal,
        a fresh connection checkpoints it for the byte check (see
        _settle_for_read_back).
        """
        if self.user is not None or self.conn is None:
            return
        conn, self.conn = self.conn, None
        conn.close()
        if self.recorder is not None and os.path.lexists(self.work_file + "-wal"):
            self._settle_for_read_back()

    def _settle_for_read_back(self) -> None:
        """A copy left in WAL mode has pages in its -wal: checkpoint them into
        the file, which the byte check reads.  Other readers of an existing
        target can keep the checkpoint from finishing: then only the SQL
        checks run (the byte check is reported as skipped, and why)."""
        from apsw_backup import verify

        assert self.recorder is not None
        self.own_opens += 1
        conn = _c.Connection(
            self.work_file, _c.SQLITE_OPEN_READWRITE, self.recorder.vfs
        )
        try:
            verify.settle(conn, "main")
        except (_c.BusyError, _c.LockedError) as exc:
            self.no_hashes = str(exc)
        finally:
            conn.close()

    def publish(self) -> None:
        if self.new is not None:
            try:
                self.new.publish()
            except files.StaleSideFileError:
                raise
            except FileExistsError as exc:
                error = FileExistsError(
                    exc.errno,
                    f"the target {self.file!r} was created by someone else while "
                    "the copy was made: the copy was not put in its place (nothing "
                    "was overwritten); remove that file or choose another target",
                    self.file,
                )
                raise files.with_facts(
                    error,
                    role="target",
                    path=self.file,
                    os_errno=exc.errno,
                    target_state="not created",
                ) from exc

    def roll_back(self, wait: float) -> None:
        """After a failure, with the Backup finished: close an existing file
        target and have SQLite roll back the hot journal a failed write
        (ENOSPC, EIO) leaves -- SQLite cannot roll back on the connection
        that failed, only at the next open -- so that "left as it was" is
        true when copy() says it.  self.torn when that could not be done.
        A new target is removed instead (close); a Connection target is the
        caller's: SQLite rolls it back when that connection next reads."""
        if self.kind != "existing" or self.conn is None:
            return
        conn, self.conn = self.conn, None
        _close_quietly(conn)
        self.torn = files.roll_back_hot_journal(self.file, wait)

    def close(self) -> None:
        """Close what was opened here; an unpublished new copy is removed."""
        if self.user is None:
            _close_quietly(self.conn)
        self.conn = None
        if self.recorder is not None:
            self.recorder.close()
        if self.new is not None:
            self.new.discard()


def _check_target_path(path: str) -> str:
    """'existing' or 'new', or CantOpenError naming the OS cause and cure."""
    _check_journal_name(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _cannot("target", path, exc) from exc
    else:
        if stat.S_ISDIR(info.st_mode):
            raise _cannot("target", path, IsADirectoryError(21, "", path))
        if not stat.S_ISREG(info.st_mode):
            raise _not_a_file("target", path)
        _check_writable("target", path)
        _check_writable("target's folder", os.path.dirname(path))
        return "existing"
    folder = os.path.dirname(os.path.realpath(path))
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise _cannot("target's folder", folder, exc) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise _cannot("target's folder", folder, NotADirectoryError(20, "", folder))
    _check_writable("target's folder", folder)
    return "new"


def _check_journal_name(path: str) -> None:
    """A target whose -journal name would be longer than its folder allows
    (255 bytes on most file systems) is refused: SQLite could never write
    to it (the copy into it, and every later write, needs the -journal)."""
    folder = os.path.dirname(path)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(os.path.basename(path)))
    if size + len("-journal") <= limit:
        return
    exc = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    error = _c.CantOpenError(
        f"cannot use the target {path!r}: its name is {size} bytes, so the name "
        f"of its rollback journal (-journal) would be longer than the {limit} "
        "bytes its folder allows, and SQLite could never write to it: give "
        f"the target a name of at most {limit - len('-journal')} bytes"
    )
    files.with_facts(error, role="target", path=path, os_errno=errno.ENAMETOOLONG)
    error.filename = path  # type: ignore[attr-defined]
    error.__cause__ = exc
    raise _with_codes(error, _c.SQLITE_CANTOPEN)


def _check_expected(path: str, kind: str, target_exists: bool | None) -> None:
    """The caller's decision (target_exists) against what is at path now:
    a file that appeared is never written to, one that vanished never
    re-created, since the caller's account of it would be wrong."""
    if target_exists is None or target_exists == (kind == "existing"):
        return
    error: OSError
    if target_exists is False:
        error = FileExistsError(
            errno.EEXIST,
            f"the target {path!r} exists now, but the caller found no file "
            "there (target_exists=False): another file appeared at its name, "
            "and was left alone; remove it or choose another target",
            path,
        )
    else:
        error = FileNotFoundError(
            errno.ENOENT,
            f"the target {path!r} does not exist now, but the caller found a "
            "file there (target_exists=True): it was removed meanwhile; nothing "
            "was created",
            path,
        )
    raise files.with_facts(
        error,
        role="target",
        path=path,
        os_errno=error.errno,
        target_state="not created",
    )


def _check_writable(role: str, path: str) -> None:
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    if read_only:
        raise _cannot(role, path, OSError(30, "", path))
    if not os.access(path, os.W_OK):
        raise _cannot(role, path, PermissionError(13, "", path))


class _Copy:
    """One copy in progress: the state and decisions copy() and acopy() share.

    step() does the blocking work (acopy runs it in a worker thread); react()
    reports the step to the progress callback and decides what comes next;
    settle(), verify() and publish() complete it; close() finishes whatever
    is left (an incomplete copy is rolled back, a new one removed), ends the
    snapshot and closes the connections it opened.
    """

    def __init__(self, source: Source, target: Source, options: _Options) -> None:
        files.check_owned()  # not in a child forked during the caller's call
        self._opts = options
        self._start = time.monotonic()
        self._steps = self._waits = self._pages = self._page_size = 0
        self._committed = False  # the last step returned SQLITE_DONE
        self._wrote = (
            False  # a step ran: the target was written (in SQLite's transaction)
        )
        self._restarts = 0  # of Backups replaced before the current one
        self._locked_in_a_row = self._in_use_in_a_row = 0
        self._locked_since = 0.0  # when the current run of locked steps began
        self._in_use_since = 0.0
        self._backup: _c.Backup | None = None
        self._stopped_at = (0, 0)  # (pages copied, total) when it was given up
        self._verification: _verify.VerifyResult | None = None
        # Every argument and path is checked before anything is created.
        self._src = _SourceSide(source, options)
        self._dst = _TargetSide(target, options)
        files.check_distinct(self._src.file, self._dst.given)
        if self._dst.user is None:  # a path: not another database's side file
            files.check_not_named_as_side_file(self._dst.given)
        try:
            self._src.open()
            self._dst.open()
            self._wal_start = self._wal_max = _file_size(self._src.wal_path)
            self._step_pages, self._sliced = self._choose_step()
        except BaseException:
            self.close()
            raise

    def _choose_step(self) -> tuple[int, bool]:
        """(pages per step, whether a whole-copy step is cut into slices).

        pages <= 0 asks for the whole copy in one step: one read of the
        source, which cannot restart.  When the target is flushed as the
        copy goes, that one step would leave all of it for the final flush;
        so it is cut into slices of flush_every bytes, read under a snapshot
        held from the first slice to the last -- the same single read of the
        source, just written out in slices.  The slices are invisible: they
        are not reported to progress nor counted in CopyResult.steps, so
        pages <= 0 still reports as one step, as the standard library does.  With snapshot=False (no read
        transaction may be held) it stays one step.
        """
        pages = self._opts.step_pages
        if pages > 0 or self._dst.flusher is None or self._opts.snapshot is False:
            return pages, False
        page_size = files.header_page_size(_header_of(self._src.file)) or 4096
        # a slice is a step of SQLite's (a C int of pages): a flush_every
        # larger than that many pages is a slice of that many
        return min(_C_INT_MAX, max(1, self._dst.flush_every // page_size)), True

    def _new_backup(self) -> _c.Backup:
        assert self._dst.conn is not None
        backup = self._dst.conn.backup(
            self._dst.schema, self._src.conn, self._src.schema
        )
        return backup

    def _retire_backup(self, restart: bool) -> None:
        """Finish the Backup (the target rolled back); the next one begins
        from the source side's current connection; `restart`: count it."""
        old = self._backup
        assert old is not None
        self._restarts += old.restarts + (1 if restart else 0)
        self._backup = None
        old.close(True)

    def close(self) -> None:
        """Finish the backup, end the snapshot, close what was opened here."""
        try:
            self._give_up()
        finally:
            try:
                self._src.close()
            finally:
                self._dst.close()

    def _give_up(self, write_failed: bool = False) -> None:
        """Finish an unfinished Backup (SQLite rolls the target back) and,
        after a failed write (write_failed: only that leaves a target torn),
        roll back what it left in an existing file target, so that a message
        about the target says what it holds now (_left_as).  The roll-back
        waits for another connection's lock no longer than the timeout
        leaves.  Idempotent; after a complete copy there is nothing to do."""
        if self._backup is not None:
            backup, self._backup = self._backup, None
            committed = backup.done
            self._stopped_at = (backup.page_count - backup.remaining, backup.page_count)
            self._restarts += backup.restarts
            backup.close(True)
            if not committed and write_failed:
                wait = ROLLBACK_WAIT
                if self._opts.timeout is not None:
                    wait = min(wait, max(0.0, self._opts.timeout - self._elapsed()))
                self._dst.roll_back(wait)

    def say_if_committed(self, exc: BaseException) -> None:
        """exc ends the copy once SQLite has committed it into an existing
        target -- a KeyboardInterrupt raised as the last step returned, before
        react() saw it: the target holds the complete copy, and exc says so
        (target_state "complete"), unless it says what it holds already."""
        if self._dst.new is not None:
            return  # a new target is never put in place by then
        backup = self._backup
        try:
            committed = backup is not None and bool(backup.done)
        except _c.Error:  # closed by other code: its state is not known
            committed = False
        if committed or self._committed:
            _say_target_state(exc, self._dst.file, "complete")

    def step(self) -> Outcome:
        """Take the snapshot if it is due, then copy the next pages.

        Returns SQLITE_OK, SQLITE_DONE, the SQLite error the step raised, or
        the ThreadingViolationError of a source connection that another
        thread is using right now (the first step also begins the Backup).
        """
        try:
            if self._backup is not None and not self._backup:
                raise _c.ConnectionClosedError(FINISHED_OUTSIDE)
            if self._snapshot_due():
                if self._backup is not None and self._src.snapshot_moves():
                    # The Backup reading through the caller's connection is
                    # finished before the snapshot's read lock is taken:
                    # finishing it waits for another thread's call on that
                    # connection, which may be a write waiting for the very
                    # lock the snapshot holds (a deadlock until its busy
                    # timeout).  Its pages are copied again from the snapshot.
                    self._retire_backup(restart=self._backup.page_count > 0)
                self._src.take_snapshot()
            if self._backup is None:
                self._backup = self._new_backup()
        except _c.ThreadingViolationError as exc:
            return exc
        except _c.ReadOnlyError as exc:
            hot = self._hot_journal(exc)
            if hot is None:
                raise
            raise hot from exc
        self._steps += 1
        try:
            done = self._backup.step(self._step_pages)
        except _c.ThreadingViolationError as exc:
            return exc
        except _c.Error as exc:
            if exc.result is None:
                raise
            return exc
        finally:
            self._wal_max = max(self._wal_max, _file_size(self._src.wal_path))
        if self._sliced and not done:
            # A slice of the one whole-copy step pages <= 0 asked for: not
            # a step of the caller's (see _choose_step).
            self._steps -= 1
        if done:
            return _c.SQLITE_DONE
        try:
            self._dst.flush()
        except OSError as exc:
            return self._flush_failed(exc)
        return _c.SQLITE_OK

    def _flush_failed(self, exc: OSError) -> _c.Error:
        """The error of a failed flush, as a step's (_final adds what the
        target holds)."""
        error = _c.IOError(
            f"writing the copy to {self._dst.file or 'the target'!r} failed: "
            f"writing it out to the disk: {exc.strerror or exc}. Check the "
            "target's disk, or copy to another one"
        )
        error.__cause__ = exc
        files.with_facts(
            error,
            role="target",
            path=self._dst.file,
            os_errno=exc.errno,
            target_state=self._left_state(),
        )
        return _with_codes(error, _c.SQLITE_IOERR, _SQLITE_IOERR_WRITE)

    def steps(self, budget: float) -> list[tuple[Outcome, int, int]]:
        """Steps back to back for up to `budget` seconds (acopy's worker).

        Returns (outcome, remaining, total) of each, as react() would have
        read them right after it.  Stops after a step that did not return
        SQLITE_OK, and before a step that might be the last one: so a step
        that completes the copy is always the first of its batch, run only
        once every earlier step was reported -- a progress callback that
        raises, or a cancellation, finds the target as copy() would.
        """
        until = time.monotonic() + budget
        ran: list[tuple[Outcome, int, int]] = []
        while True:
            outcome = self.step()
            backup = self._backup
            remaining = backup.remaining if backup is not None else 0
            total = backup.page_count if backup is not None else 0
            ran.append((outcome, remaining, total))
            if (
                not (isinstance(outcome, int) and outcome == _c.SQLITE_OK)
                or not self._cannot_finish_next(remaining)
                or time.monotonic() >= until
            ):
                return ran

    def _cannot_finish_next(self, remaining: int) -> bool:
        """Whether the next step, copying _step_pages, leaves pages to copy.

        (The source growing only adds pages; shrinking needs a write through
        the backup's own source connection, which waits for the step.)"""
        pages = self._step_pages
        return pages > 0 and remaining > pages and bool(self._backup)

    def react(
        self, outcome: Outcome, counts: tuple[int, int] | None = None
    ) -> float | None:
        """Report a step; None once the copy is complete, else seconds to wait.

        counts: (remaining, total) right after the step, if it was not the
        last one run (a batch of steps); else they are read now.
        Raises when the copy must stop: a final error, the source's own write
        transaction, or the timeout.
        """
        if isinstance(outcome, _c.ThreadingViolationError):
            # Not a step SQLite ran: no progress call, a wait.
            self._check_in_use(outcome)
            self._check_deadline(outcome)
            return self._pause()
        self._in_use_in_a_row = 0
        backup = self._backup
        assert backup is not None
        status = outcome if isinstance(outcome, int) else _status(outcome)
        if not isinstance(outcome, (_c.BusyError, _c.LockedError)):
            # a step that ran (or failed writing): the target was written,
            # in SQLite's transaction; one that met a lock wrote nothing
            self._wrote = True
        if counts is None:
            counts = backup.remaining, backup.page_count
        remaining, total = counts
        if status == _c.SQLITE_DONE:
            # The last step committed the copy.  The backup and the snapshot
            # end before the callback, so whatever it does to the source (or
            # the target) is its own.
            self._committed = True
            self._pages = total
            backup.finish()
            self._src.end_snapshot()
            self._page_size = self._read_page_size()
            if self._opts.progress is not None:
                try:
                    self._opts.progress(status, remaining, total)
                except BaseException as exc:
                    # Too late to undo: SQLite has committed.  A new target is
                    # still not put in place; an existing one holds the copy,
                    # and the exception says so (docs/api.md).
                    if self._dst.new is None:
                        _say_target_state(exc, self._dst.file, "complete")
                    raise
            return None
        # The slices of a whole-copy step are not reported: pages <= 0 gets
        # the one call the standard library makes (plus any lock waits).
        sliced_ok = self._sliced and status == _c.SQLITE_OK
        if self._opts.progress is not None and not sliced_ok:
            self._opts.progress(status, remaining, total)
        if not backup:
            raise _c.ConnectionClosedError(FINISHED_OUTSIDE)
        if isinstance(outcome, _c.Error):
            self._check_retryable(outcome)
        else:
            self._locked_in_a_row = 0
        self._check_deadline(outcome)
        return self._pause()

    def _check_in_use(self, error: _c.ThreadingViolationError) -> None:
        """Another thread's call on the source (or target) connection is
        waited for like a lock, but for IN_USE_LIMIT seconds at most.  A
        connection that is the destination of an unfinished Backup, or one
        whose own call copy() runs inside (a callback), is never waited for:
        no wait can end either, so they are raised at once."""
        if isinstance(error, (_c.DestinationLockedError, _c.ReentrancyError)):
            raise _renamed(
                error, f"copy() cannot use that connection: {error}; {self._left_as()}"
            ) from error
        if not self._in_use_in_a_row:
            self._in_use_since = time.monotonic()
        self._in_use_in_a_row += 1
        if time.monotonic() - self._in_use_since > IN_USE_LIMIT:
            raise _c.ThreadingViolationError(
                f"copy() gave up: for {IN_USE_LIMIT:g} s the source or target "
                "connection was in use by a call that had not returned (another "
                "thread's, or one that copy() was called from, e.g. in a "
                f"callback); {self._left_as()}. Let that call finish first, or "
                f"give copy() a path so it uses a connection of its own. ({error})"
            ) from error
        self._waits += 1
        self._count_locked()

    def settle(self) -> None:
        """Close the complete copy (already in its final journal mode)."""
        try:
            self._dst.settle()
        except (_c.CorruptError, _c.NotADBError) as exc:
            self._explain_damage(exc)
        self._src.close()

    def _explain_damage(self, exc: _c.Error) -> None:
        """The copy, just committed, reads as damaged: when its pages were
        recorded, say which of them the disk changed or lost (raising
        VerificationFailed); else re-raise exc."""
        if self._dst.recorder is None or self._dst.no_hashes is not None:
            raise exc
        from apsw_backup import verify

        result = verify.verify(
            self._dst.work_file,
            "default",
            recorder=self._dst.recorder,
            _own_opens=self._dst.own_opens,
        )
        if not any(p.check == "pages" for p in result.problems):
            raise exc
        self._verification = result
        verify.raise_for(result)

    def verify(self) -> None:
        """Verify the finished copy at the level asked for, or hand its path
        to the verify callable; raises if it is not shown to be good."""
        wanted = self._opts.verify
        if wanted is None or not isinstance(wanted, str):
            if wanted is not None:
                wanted(self._dst.work_file)
            self._before_publish()
            return
        from apsw_backup import verify

        timeout = self._opts.timeout
        if timeout is not None:
            timeout = max(0.0, timeout - self._elapsed())
        recorder = self._dst.recorder if self._dst.no_hashes is None else None
        result = verify.verify(
            self._dst.work_file,
            wanted,
            recorder=recorder,
            progress=self._opts.verify_progress,
            timeout=timeout,
            _own_opens=self._dst.own_opens,
        )
        if self._dst.no_hashes is not None and result.checks:
            result.checks[0].detail["why"] = self._dst.no_hashes
        self._verification = result
        verify.raise_for(result)
        self._before_publish()

    def _before_publish(self) -> None:
        if self._opts.before_publish is not None:
            self._opts.before_publish(self._dst.work_file)

    def publish(self) -> None:
        """Put a new copy in place under the target's name."""
        self._dst.publish()

    def result(self) -> CopyResult:
        """The result of the completed copy."""
        return CopyResult(
            pages=self._pages,
            steps=self._steps,
            restarts=self._restarts_so_far(),
            elapsed=time.monotonic() - self._start,
            page_size=self._page_size,
            bytes=self._pages * self._page_size,
            waits=self._waits,
            snapshot=self._src.snapshot,
            wal_growth=max(0, self._wal_max - self._wal_start),
            path=self._dst.path,
            verification=self._verification,
        )

    def _read_page_size(self) -> int:
        conn = self._dst.conn
        if conn is None:
            return 0
        sql = f"PRAGMA {_quoted(self._dst.schema)}.page_size"
        return int(conn.execute(sql).fetchall()[0][0] or 0)

    def _restarts_so_far(self) -> int:
        current = self._backup.restarts if self._backup is not None else 0
        return self._restarts + current

    def _check_retryable(self, error: _c.Error) -> None:
        if not isinstance(error, (_c.BusyError, _c.LockedError)):
            raise self._final(error)
        # The step's message already names the transaction and the cure.
        try:
            own_write = self._src.conn.txn_state(self._src.schema)
        except _c.ThreadingViolationError:
            own_write = None  # another thread's call: asked again next time
        if own_write == _c.SQLITE_TXN_WRITE:
            raise error
        self._waits += 1
        self._count_locked()

    def _hot_journal(self, error: _c.Error) -> _c.Error | None:
        """The error of a source with a hot journal, with its cause and cure
        (None for another error): SQLite says only "attempt to write a
        readonly database" (SQLITE_READONLY_ROLLBACK)."""
        if error.extendedresult != _SQLITE_READONLY_ROLLBACK or not self._src.file:
            return None
        # Only the source is opened read-only: its hot journal.
        source = self._src.file
        return _renamed(
            error,
            f"the source database {source!r} has a hot journal "
            f"{source + '-journal'!r}: a writer was interrupted in the middle "
            "of a transaction (it crashed or was killed), and SQLite must roll "
            "that journal back before the source can be read; copy() opens a "
            "source path read-only, so it never does that itself. Open the "
            "database once read-write (start the application, or run PRAGMA "
            "quick_check on it in the sqlite3 shell), then copy again; never "
            f"delete the -journal: the database is damaged without it. ({error})",
        )

    def _final(self, error: _c.Error) -> _c.Error:
        """A final step error, in copy()'s terms where the OS cause is known."""
        hot = self._hot_journal(error)
        if hot is not None:
            return hot
        if isinstance(error, _c.FullError):
            self._give_up(write_failed=True)
            full = _renamed(
                error,
                f"the copy into {self._dst.file or 'the target'!r} ran out of space "
                "(the target's disk is full, ENOSPC, or it reached its "
                "max_page_count): free some space or copy to another disk; "
                f"{self._left_as()}. SQLite said: {error}",
            )
            return files.with_facts(
                full,
                role="target",
                path=self._dst.file,
                target_state=self._left_state(),
            )
        if isinstance(error, _c.IOError):
            self._give_up(write_failed=True)
            said = _renamed(error, f"{error}; {self._left_as()}")
            said.__cause__ = error  # SQLite's (or the flush's) error, as it was
            facts = {n: getattr(error, n, None) for n in files.FACTS}
            facts["target_state"] = self._left_state()
            return files.with_facts(said, **facts)
        return error

    def _left_state(self) -> str:
        """What the target holds once an unfinished copy is abandoned (true
        once _give_up ran): see _left_as."""
        if self._dst.new is not None:
            return "not created"
        if self._dst.torn:
            return "incomplete"
        return "rolled back" if self._wrote else "unchanged"

    def _left_as(self) -> str:
        """What the target holds after a failure: true once _give_up ran
        (close() runs it before copy() returns or raises)."""
        if self._dst.new is not None:
            return "the new target was not created"
        if self._dst.torn:
            journal = self._dst.file + "-journal"
            return (
                f"the target {self._dst.file!r} is left incomplete: SQLite could "
                f"not roll it back now, and its rollback journal {journal!r} "
                "restores its previous content the next time the database is "
                "opened for writing. Do not delete or move that file"
            )
        if not self._wrote:
            return "the target was not changed (the copy never wrote to it)"
        return "the target was rolled back to its previous content"

    def _elapsed(self) -> float:
        return time.monotonic() - self._start

    def _check_deadline(self, outcome: Outcome) -> None:
        timeout = self._opts.timeout
        if timeout is None or self._elapsed() < timeout:
            return
        last = outcome if isinstance(outcome, _c.Error) else None
        self._give_up()
        copied, total = self._stopped_at
        gave_up = files.GaveUp(
            elapsed=self._elapsed(),
            timeout=timeout,
            pages_copied=copied,
            page_count=total,
            waits=self._waits,
            restarts=self._restarts_so_far(),
        )
        error = _c.BusyError(self._timeout_message(gave_up))
        files.with_facts(error, gave_up=gave_up, target_state=self._left_state())
        raise _with_codes(error, _c.SQLITE_BUSY) from last

    def _timeout_message(self, gave_up: files.GaveUp) -> str:
        restarts = gave_up.restarts
        causes, cures = [], ["retry later or with a longer timeout (or None)"]
        if gave_up.waits:
            causes.append(
                f"the database was locked by another connection {_times(gave_up.waits)} "
                f"(retried after waits growing from {FIRST_WAIT * 1000:g} ms, every "
                f"{self._opts.sleep} s once a lock lasted {LONG_LOCK:g} s)"
            )
            cures.insert(0, "end the other connection's long transaction")
        if restarts:
            causes.append(
                f"the copy restarted {_times(restarts)} because other connections "
                "changed the source"
            )
            if self._opts.snapshot is False:
                cures.insert(0, "use snapshot='auto' or True so it cannot restart")
        if not causes:
            causes.append(
                "nothing was locked and the copy did not restart: it needed more "
                "time than the timeout gave it"
            )
        return (
            f"copy() gave up after {gave_up.elapsed:.2f} s: its deadline passed "
            f"(timeout={gave_up.timeout} s) with {gave_up.pages_copied} of "
            f"{gave_up.page_count} pages copied, and {self._left_as()}; "
            f"{'; '.join(causes)}. "
            f"To finish it: {', or '.join(cures)}"
        )

    def _count_locked(self) -> None:
        if not self._locked_in_a_row:
            self._locked_since = time.monotonic()
        self._locked_in_a_row += 1

    def _pause(self) -> float:
        """Seconds to wait before the next step, cut at the deadline.

        None after a step that copied.  After a locked step: 1 ms, doubling
        per locked step in a row up to SHORT_WAIT_MAX, for as long as the
        lock has lasted less than LONG_LOCK -- another connection's commit
        holds it for milliseconds, and a coarse wait would miss the moment
        it is free (a copy under a writer committing every 2 ms then takes
        seconds instead of milliseconds).  A lock that lasts longer is a long
        transaction: then the wait is `sleep`.  Never more than `sleep`.
        """
        if not self._locked_in_a_row:
            return 0.0
        if time.monotonic() - self._locked_since < LONG_LOCK:
            grown = FIRST_WAIT * 2.0 ** min(self._locked_in_a_row - 1, 30)
            wait = min(self._opts.sleep, grown, SHORT_WAIT_MAX)
        else:
            wait = self._opts.sleep
        if self._opts.timeout is not None:
            wait = min(wait, self._opts.timeout - self._elapsed())
        return max(0.0, wait)

    def _snapshot_due(self) -> bool:
        mode = self._opts.snapshot
        if mode is False or self._src.snapshot_done:
            return False
        if mode is True or self._sliced:
            return True
        return self._restarts_so_far() >= AUTO_SNAPSHOT_AFTER


def copy(
    source: Source,
    target: Source,
    *,
    pages: int = -1,
    progress: Progress | None = None,
    name: str = "main",
    target_name: str = "main",
    sleep: float = 0.25,
    timeout: float | None = None,
    snapshot: Snapshot = "auto",
    keep_wal: bool = False,
    verify: Verify | Level | None = None,
    flush_every: int | None = FLUSH_EVERY,
    target_exists: bool | None = None,
    verify_progress: VerifyProgress | None = None,
    before_publish: Verify | None = None,
) -> CopyResult:
    """Copy database `name` of `source` into `target_name` of `target`, online.

    source: an apsw_backup.Connection, a path, or a standard-library
    sqlite3.Connection of a file database (copied from its file through a
    connection of copy()'s own: its uncommitted changes are not in the copy,
    and its own open transaction locks the copy out as any other
    connection's would; one in memory raises TypeError).  A path source is
    opened read-only and must exist.
    target: an apsw_backup.Connection or a path (or a sqlite3.Connection of
    a file, taken as that file's path).  A path that does not exist is
    written to a temporary file beside it (``<name>.apsw-backup-<pid>-
    <token>.partial``) and renamed into place once complete, verified and
    fsynced (the folder too): the target either does not exist or is the
    complete copy, even if the process is killed; a killed run's temporary
    files are removed by the next copy into that folder.  A target that
    exists (a path or a Connection) is written through SQLite's own
    transaction: other connections may have it open.  Connections are left
    open; what copy() opened it closes.
    pages: pages per step; <= 0 copies everything in one read of the
    source: one step, or -- when the target is flushed as the copy goes
    (flush_every) and snapshot is not False -- slices of flush_every bytes
    read under a snapshot held from the first to the last, each reported to
    progress like a step.
    progress: called as progress(status, remaining, total) after every step,
    as sqlite3.Connection.backup calls it: status is SQLITE_OK (0), SQLITE_DONE
    (101) for the last step, or the code of a step that found the database
    locked (SQLITE_BUSY, SQLITE_LOCKED or an extended code of theirs) or
    failed.  If it raises, the backup is finished -- the target rolled back,
    unless the call was the last one (SQLITE_DONE): the copy is complete by
    then; a new target is removed in every case -- and the exception comes
    out unchanged.  By the SQLITE_DONE call the backup and the snapshot have
    ended, so the callback may use both connections.
    sleep: the longest wait before retrying a locked step.  Unlike the
    standard library (which sleeps `sleep` after every locked step), copy()
    waits 1 ms after the first locked step in a row and doubles the wait
    after each further one, up to `sleep`, so it takes the lock soon after
    it is free.
    timeout: seconds the whole copy may take (None: no limit).  Past it the
    copy gives up with BusyError, whose message says the deadline passed and
    why (a lock, restarts, or neither); the target is rolled back.
    snapshot: "auto" holds a read transaction on the source once the copy has
    restarted AUTO_SNAPSHOT_AFTER (3) times, True from the start, False never.
    The snapshot stops the copy restarting, so it finishes; in WAL mode other
    connections keep committing meanwhile, in rollback-journal mode their
    commits wait for it (give them a busy timeout; a write from the progress
    callback cannot wait and fails with BusyError).  The snapshot is always
    taken on a read-only connection of copy()'s own (for a Connection
    source, a second connection to its file, from which the copy then
    continues), never on the caller's connection: its writes are never
    caught in copy()'s transaction.  A read transaction the source
    connection already has is used as it is and left open.
    keep_wal: a copy of a WAL source is itself a WAL database; by default a
    target copy() opened itself is committed in rollback-journal mode (its
    page 1 written saying so, in the copy's own transaction: never a switch
    afterwards), so the copy is one self-contained file; an existing target
    in WAL mode stays in WAL mode.  keep_wal=True leaves the copy in WAL
    mode.  A Connection target is left as SQLite leaves it.
    verify: "default", "full", a callable, or None (no verification).
    "default": every page SQLite writes to the target is hashed as it is
    written (a private VFS over the default one); once the copy is complete
    and synced the file is re-read from the disk (its cached pages dropped
    first) and compared, while PRAGMA quick_check runs beside it.  Proves
    the file holds exactly the bytes the backup produced and that they form
    a sound database; misses an index that disagrees with its table and
    CHECK constraints.  "full": the whole PRAGMA integrity_check as well,
    split by table over read-only connections in threads (see
    docs/verification.md).  A Connection target cannot be hashed: its
    levels run the SQL checks only (``verification.checks`` says so).  A
    copy that fails raises apsw_backup.verify.VerificationFailed (``pages``,
    ``problems``, ``check``); one that could not be verified (an I/O error,
    a lock, the timeout) VerificationIncomplete (``reason``).  Both carry
    the VerifyResult as ``verification``; on success it is
    ``CopyResult.verification``.  The timeout covers verification too.
    A callable is called as verify(path) with the finished copy's file --
    for a new target the temporary file, before it is renamed into place --
    with no connection of copy()'s open on it.  Its return value is
    ignored.  Whatever raises, the exception comes out unchanged (a new
    target is removed first and never appears; an existing target keeps
    the complete copy).
    before_publish: called as before_publish(path) with the finished copy's
    file once it passed verification (or, without verify, once complete),
    just before a new target is renamed into place, with no connection of
    copy()'s open on it; if it raises, as verify.
    verify_progress: with a level, called about five times a second (from
    the thread that runs the verification) with an
    apsw_backup.verify.Progress: ``phase``, ``fraction`` 0..1, ``elapsed``,
    ``eta`` (seconds or None), ``running`` (the checks running).  If it
    raises, verification stops and the exception comes out.
    flush_every: bytes (default 2 MiB) the target file may grow by before
    copy() has them written out to the disk (on Linux sync_file_range,
    waiting for the slice before; elsewhere fdatasync), with a 1 MiB page
    cache on the target so the copied pages reach the file as it goes: a
    copy then never queues more than about two slices of dirty data in
    front of other processes' fsyncs on the same disk (a live database's
    commits keep their latency).  Durability is still the final commit's
    fsync (and, for a new target, its own and its folder's).  For path targets
    (new or existing); a Connection target is left alone.  None or 0: no
    flushing, the copy is written out by its final commit.  A failed flush
    is an IOError (SQLITE_IOERR_WRITE); the target is left as on any error.
    target_exists: what the caller found at a path target, when it has
    already decided (a command line that refuses to overwrite without
    --overwrite).  False: the target must still not exist -- a file that
    appeared at its name meanwhile raises FileExistsError and is left alone,
    as one that appears before the copy is put in place does (the new copy
    is linked to its name, which fails if the name is taken: the decision
    "new" holds from the check to the publishing, O_EXCL-like).  True: it
    must still exist (FileNotFoundError otherwise).  None (the default):
    copy() decides when it starts.

    Before anything is created, every argument is checked, and a target
    that is the source's own file or one of its side files (-wal, -shm,
    -journal) is refused with files.SameFileError, a ValueError (folders
    are compared by device and inode, so another mount of the source's
    folder is seen through); a new target whose -journal or -wal is already
    there (SQLite would apply it to the copy) with files.StaleSideFileError,
    a FileExistsError -- checked again just before the copy is put in
    place.  A path the OS refuses raises CantOpenError naming the cause and
    the cure.  A path source with name='temp' is a ValueError (the
    temporary database of copy()'s own connection is always empty).  Dead
    runs' temporary files in the target's folder are removed (files.remove_stale).

    Raises BusyError at once, naming the transaction and the cure, if the
    source connection has its own open write transaction.  Every BUSY or
    LOCKED answer, extended codes included (SQLITE_BUSY_RECOVERY: Backup.step
    itself begins afresh), is retried after the growing waits; other errors
    of Backup.step() are final.  In every case the backup is finished first.  A successful copy leaves
    nothing beside the target or a path source (no -wal, -shm, -journal, no
    temporary files).
    """
    options = _Options(
        pages,
        progress,
        name,
        target_name,
        sleep,
        timeout,
        snapshot,
        keep_wal,
        verify,
        flush_every,
        target_exists,
        verify_progress,
        before_publish,
    )
    _refuse_waiting_for_itself(source, target)
    existed = _target_existed(target)
    try:
        with files.owned_call():
            return _run_copy(_Copy(source, target, options))
    except (_c.NotADBError, _c.CorruptError) as exc:
        raise _name_the_non_database(exc, source, target, existed) from exc


# The copies under way in this context (a thread, or an asyncio task): a
# copy started from one of their callbacks into or from the file one of
# them writes is refused (_refuse_waiting_for_itself).
_UNDER_WAY: contextvars.ContextVar[tuple[_Copy, ...]] = contextvars.ContextVar(
    "apsw_backup_copies_under_way", default=()
)


def _file_id(path: str | None) -> tuple[int, int] | None:
    if not path:
        return None
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino)


def _refuse_waiting_for_itself(source: object, target: object) -> None:
    """A copy started from a callback of a copy in this same thread or task
    (its progress, verify_progress, verify or before_publish), into or from
    the file that copy writes: during the copy it would wait for ever for
    the lock its caller holds until the callback returns; after it, it
    would change the file under the caller's verification.  Refused at
    once, as the same mistake with the target's Connection is."""
    under_way = _UNDER_WAY.get()
    if not under_way:
        return
    ours = {_file_id(_path_of(side)) for side in (source, target)} - {None}
    for job in under_way:
        written = job._dst.work_file if job._dst.user is None else job._dst.file
        if _file_id(written) in ours:
            raise _c.ReentrancyError(
                f"copy() into or from {job._dst.file!r}, called from a callback "
                "of the copy that is writing that file (same thread or task): "
                "that copy holds the file until its callback returns, so this "
                "one would wait for it for ever. Make this copy after that "
                "one has returned"
            )


def _say_target_state(exc: BaseException, path: str | None, state: str) -> None:
    """Give exc (the caller's own, from a callback) the facts role, path and
    target_state, where it takes attributes and has none of its own."""
    if getattr(exc, "target_state", None) is not None:
        return
    try:
        files.with_facts(exc, role="target", path=path, target_state=state)
    except (AttributeError, TypeError):
        pass  # an exception that takes no attributes: the docs say it


def _run_copy(job: _Copy) -> CopyResult:
    """copy()'s run of the job (closed at the end, whatever happens)."""
    token = _UNDER_WAY.set(_UNDER_WAY.get() + (job,))
    try:
        while (wait := job.react(job.step())) is not None:
            if wait:
                time.sleep(wait)
        job.settle()
        job.verify()
        job.publish()
        return job.result()
    except BaseException as exc:
        job.say_if_committed(exc)
        raise
    finally:
        _UNDER_WAY.reset(token)
        job.close()


def _path_of(side: object) -> str | None:
    """The main file of a copy() argument, None when it has none (memory)."""
    if isinstance(side, (str, bytes, os.PathLike)):
        return os.fsdecode(side)
    if isinstance(side, _c.Connection):
        return side.filename or None
    if _is_stdlib_connection(side):
        return _schema_files(side).get("main") or None
    return None


def _target_existed(target: object) -> bool:
    path = _path_of(target)
    return not isinstance(target, (str, bytes, os.PathLike)) or (
        path is not None and os.path.lexists(path)
    )


def _name_the_non_database(
    exc: _c.Error, source: object, target: object, existed: bool
) -> _c.Error:
    """SQLite's bare "file is not a database" or "database disk image is
    malformed", naming the side to blame and the cure; exc itself when it
    already names its side or neither side is found to blame.  Not a
    database: its header, read through an SQLite handle of its own.
    Malformed: its schema cannot be read (a read-only connection of its
    own).  Nothing was written into the target by then: SQLite stops when
    it first reads what is wrong, and the backup copies pages without
    reading them."""
    if getattr(exc, "role", None) is not None:
        return exc
    for role, side in (("source", source), ("target", target)):
        path = _path_of(side)
        if path is None or (role == "target" and not existed):
            continue
        if isinstance(exc, _c.NotADBError):
            try:
                header = files.read_header(path, 16)
            except OSError:
                continue
            if not header or header == b"SQLite format 3\x00":
                continue
            what = (
                "is not an SQLite database (it does not begin with the SQLite header)"
            )
            cure = (
                "name the database file to copy"
                if role == "source"
                else "copy() writes an existing target in place and never over "
                "a file that is not a database: remove it, or name another target"
            )
        else:
            if not _schema_is_damaged(path):
                continue
            what = f"is damaged: SQLite cannot read its schema ({exc})"
            cure = (
                "restore it from a backup, or save what can be read with the "
                "sqlite3 shell's .recover"
                if role == "source"
                else "remove it, or name another target (copy() writes an "
                "existing target in place, through its schema)"
            )
        error = _renamed(
            exc,
            f"the {role} {path!r} {what}: {cure}. The target "
            + ("was left as it was" if existed else "was not created"),
        )
        return files.with_facts(
            error,
            role=role,
            path=path,
            target_state="unchanged" if existed else "not created",
        )
    return exc


def _schema_is_damaged(path: str) -> bool:
    """Whether reading the schema of the database at path fails as damaged
    (a read-only connection of its own; any other failure: not known)."""
    try:
        conn = _c.Connection(path, _c.SQLITE_OPEN_READONLY)
    except _c.Error:
        return False
    try:
        conn.execute("SELECT count(*) FROM main.sqlite_master").fetchall()
    except (_c.CorruptError, _c.NotADBError):
        return True
    except _c.Error:
        return False
    finally:
        conn.close(True)
    return False


async def acopy(
    source: Source,
    target: Source,
    *,
    pages: int = -1,
    progress: Progress | None = None,
    name: str = "main",
    target_name: str = "main",
    sleep: float = 0.25,
    timeout: float | None = None,
    snapshot: Snapshot = "auto",
    keep_wal: bool = False,
    verify: Verify | Level | None = None,
    flush_every: int | None = FLUSH_EVERY,
    target_exists: bool | None = None,
    verify_progress: VerifyProgress | None = None,
    before_publish: Verify | None = None,
) -> CopyResult:
    """copy() as a coroutine: the same arguments, behaviour and result.

    Steps, verify and the final fsync and rename run in the event loop's
    default executor, so the loop stays free; progress is called in the
    loop's thread.  A cancelled task waits for the call in flight (a step,
    verify, or the rename), then finishes the backup and re-raises
    CancelledError.  The target then holds its old content (a new target
    does not exist), or the complete copy when the cancellation arrived
    while or after the last step completed and the target existed (or, for
    a new target, while it was being renamed into place).  Never a partial
    copy.
    """
    options = _Options(
        pages,
        progress,
        name,
        target_name,
        sleep,
        timeout,
        snapshot,
        keep_wal,
        verify,
        flush_every,
        target_exists,
        verify_progress,
        before_publish,
    )
    _refuse_waiting_for_itself(source, target)
    existed = _target_existed(target)
    try:
        with files.owned_call():
            return await _acopy_job(_Copy(source, target, options))
    except (_c.NotADBError, _c.CorruptError) as exc:
        raise _name_the_non_database(exc, source, target, existed) from exc


async def _acopy_job(job: _Copy) -> CopyResult:
    """acopy()'s run of the job (closed at the end, whatever happens)."""
    import asyncio  # here: importing it costs a CLI run ~25 ms

    token = _UNDER_WAY.set(_UNDER_WAY.get() + (job,))
    try:
        while True:
            # Steps run in batches of a few ms in the worker (see
            # _Copy.steps); each is reported here, in order, as copy() would.
            batch = await _off_loop(lambda: job.steps(BATCH_SECONDS))
            for i, (outcome, remaining, total) in enumerate(batch):
                if i and _cancel_requested():
                    # Met here, as unbatched it would be met before the
                    # next step: the steps after it are never reported.
                    await asyncio.sleep(0)
                wait = job.react(outcome, (remaining, total))
                if wait is None:
                    break
            if wait is None:
                break
            await asyncio.sleep(wait)
        job.settle()
        await _off_loop(job.verify)
        await _off_loop(job.publish)
        return job.result()
    finally:
        _UNDER_WAY.reset(token)
        job.close()


def _cancel_requested() -> bool:
    """Whether the current task may have a cancellation waiting (True when
    unsure: the caller then yields once to let it arrive)."""
    import asyncio

    task = asyncio.current_task()
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    if cancelling is not None:
        return bool(cancelling())
    return bool(getattr(task, "_must_cancel", True))  # 3.10's Task


async def _off_loop(func: Callable[[], T]) -> T:
    """func() in the default executor; cancelled, it lets func end first."""
    import asyncio

    future = asyncio.get_running_loop().run_in_executor(None, func)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _wait_out(future)
        raise


async def _wait_out(future: asyncio.Future[T]) -> None:
    """Wait until future is done, whatever further cancellations arrive."""
    import asyncio

    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: the cancellation is what comes out
