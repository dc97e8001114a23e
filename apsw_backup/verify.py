"""Verifying a database file: what each level proves, and how long it takes.

Two levels (``verify(path, level=...)``):

``"default"``
    Byte-exact on the disk: every page of the file, re-read from the disk
    (its cached pages dropped first), has the hash taken when SQLite wrote
    it -- which needs a :class:`~apsw_backup.PageRecorder` that recorded the
    writes (a backup into a connection opened with ``vfs=recorder.vfs``).
    Plus ``PRAGMA quick_check``: every b-tree, the freelist and the page
    accounting are sound, NOT NULL holds.  Both run at once, in two threads.
    Proves: the file holds exactly the bytes SQLite produced, and they form
    a sound database.  Through a handle of its own the re-read uses
    O_DIRECT, leaving the page cache warm for quick_check.  Misses: an index whose entries disagree with their
    table (quick_check does not compare them), CHECK constraints.
    Without a recorder only quick_check runs (the byte check is reported
    as skipped).

``"full"``
    The whole ``PRAGMA integrity_check``, split over several connections in
    threads (SQLite 3.33+; one connection before): one
    ``integrity_check(TABLE)`` per table -- its b-trees, its rows against
    every index, UNIQUE, NOT NULL, CHECK -- and one whole ``quick_check``
    for what only a whole-file pass sees (the freelist, pages no b-tree
    uses, a page two b-trees share).  Together they make every check plain
    ``integrity_check`` makes (tests/test_verify_levels.py shows it on
    damaged files).  The byte check too when a recorder is given.  SQLite
    accepts only table names in ``integrity_check(X)``, so a table and its
    indexes are its finest unit: a table too large for one thread's share
    is checked in pieces of our own instead (``_IndexSplit``: its rows,
    looked up in its indexes, one index and one range of rows a piece;
    the index entry counts; UNIQUE), when it can be mirrored exactly.  The
    pieces are handed out largest first to threads that take the next one
    as they finish, each thread on one connection of its own.

The result is a :class:`VerifyResult`: ``ok``, ``problems`` (each with the
page numbers where known) or ``unverified`` (the file could not be read,
was locked, or the deadline passed) -- exit codes 0, 3 and 1 of the command
line (``VerifyResult.exit_code``).  ``checks`` records which checks ran and
how long each took (``to_json()``).

``progress`` (optional) is called about five times a second from the
calling thread with a :class:`Progress`: the fraction done and an ETA,
estimated from each check's expected cost and the time spent so far.
``timeout`` (seconds) bounds the whole verification: at the deadline every
connection is interrupted and the result is ``unverified``.
"""

from __future__ import annotations

import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import apsw_backup
from apsw_backup import files

OK = "ok"
PROBLEMS = "problems"
UNVERIFIED = "unverified"
SKIPPED = "skipped"
LEVELS = ("default", "full")
EXIT_CODES = {OK: 0, PROBLEMS: 3, UNVERIFIED: 1}

# PRAGMA integrity_check(TABLE) exists from SQLite 3.33.0 on.
TABLE_CHECK_VERSION = 3033000
# Pages re-read per read_back() call: the progress step of the byte check.
READ_BACK_PAGES = 8192
# How often the waiting thread reports progress and looks at the deadline.
TICK = 0.2
# Test hook (never set it in production): flip a byte of this page on the
# disk between the sync and the re-read, as if the disk had changed it.
TAMPER_ENV = "APSW_BACKUP_TEST_TAMPER_PAGE"


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: which check found it, its words, its pages."""

    check: str
    message: str
    pages: tuple[int, ...] = ()


@dataclass
class CheckRecord:
    """One check that ran: its name, outcome and duration (``--json``)."""

    name: str
    outcome: str = SKIPPED
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """Where verification is: ``fraction`` in 0..1, ``eta`` in seconds."""

    phase: str
    fraction: float
    elapsed: float
    eta: float | None
    running: tuple[str, ...]


@dataclass
class VerifyResult:
    """The outcome of :func:`verify`."""

    status: str
    level: str
    problems: list[Problem]
    checks: list[CheckRecord]
    seconds: float
    reason: str | None = None  # why it could not verify
    error: BaseException | None = None
    timed_out: bool = False  # the deadline (timeout) passed
    locked: bool = False  # a check found the file locked by another connection

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def exit_code(self) -> int:
        """0 ok, 3 problems found, 1 could not verify."""
        return EXIT_CODES[self.status]

    @property
    def pages(self) -> list[int]:
        """Every page number the problems name, sorted."""
        return sorted({p for problem in self.problems for p in problem.pages})

    def summary(self) -> str:
        """What was shown, in a few words: "pages re-read from the disk match,
        quick_check ok" (the checks that ran and passed)."""
        words = []
        ran = {c.name: c.outcome for c in self.checks}
        if ran.get("read_back") == OK:
            words.append("pages re-read from the disk match")
        if ran.get("integrity_check") == OK or any(
            name.startswith("integrity_check(") for name in ran
        ):
            words.append("integrity_check ok")
        elif ran.get("quick_check") == OK:
            words.append("quick_check ok")
        return ", ".join(words) or self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "level": self.level,
            "seconds": round(self.seconds, 3),
            "reason": self.reason,
            "timed_out": self.timed_out,
            "locked": self.locked,
            "problems": [
                {"check": p.check, "message": p.message, "pages": list(p.pages)}
                for p in self.problems
            ],
            "pages": self.pages,
            "checks": [
                {
                    "name": c.name,
                    "outcome": c.outcome,
                    "seconds": round(c.seconds, 3),
                    **c.detail,
                }
                for c in self.checks
            ],
        }


class VerificationError(Exception):
    """The copy was not shown to be good; ``verification``: the VerifyResult.

    Raised by ``copy(..., verify="default" | "full")`` (see
    :func:`raise_for`) as one of its two subclasses."""

    def __init__(self, message: str, verification: VerifyResult) -> None:
        super().__init__(message)
        self.verification = verification

    @property
    def checks(self) -> list[CheckRecord]:
        """Which checks ran, their outcomes and durations."""
        return self.verification.checks


class VerificationFailed(VerificationError):
    """Verification found the copy damaged, or different from what SQLite
    wrote (exit code 3 of the command line).  ``pages``: every page number
    the problems name; ``problems``: their messages; ``check``: the first
    check that found one ("pages", "quick_check", "integrity_check")."""

    @property
    def pages(self) -> list[int]:
        return self.verification.pages

    @property
    def problems(self) -> list[str]:
        return [p.message for p in self.verification.problems]

    @property
    def check(self) -> str:
        return self.verification.problems[0].check


class VerificationIncomplete(VerificationError):
    """Verification could not finish (an I/O error, a file that stayed
    locked, the deadline): nothing is known to be wrong with the copy, but
    nothing was shown either (exit code 1).  ``reason`` says why; ``error``
    is the exception behind it, if any."""

    @property
    def reason(self) -> str:
        return self.verification.reason or "verification did not finish"

    @property
    def error(self) -> BaseException | None:
        return self.verification.error


def problems_text(problems: list[str], shown: int = 5) -> str:
    """ "2 problem(s): first; second" (at most `shown` of them)."""
    text = "; ".join(problems[:shown])
    if len(problems) > shown:
        text += f"; and {len(problems) - shown} more"
    return f"{len(problems)} problem(s): {text}"


def raise_for(result: VerifyResult) -> VerifyResult:
    """Return an ``ok`` result; raise VerificationFailed for ``problems``,
    VerificationIncomplete for ``unverified``."""
    if result.status == PROBLEMS:
        pages = result.pages
        where = f" (page {_listed(pages, len(pages))})" if pages else ""
        raise VerificationFailed(
            f"verification ({result.level}) failed{where}: "
            f"{problems_text([p.message for p in result.problems])}",
            result,
        )
    if result.status == UNVERIFIED:
        raise VerificationIncomplete(
            f"the copy could not be verified ({result.level}): {result.reason}",
            result,
        )
    return result


class _Unverified(Exception):
    """A check could not be made (I/O, lock, deadline): not a verdict."""


# -- what SQLite's answers mean ---------------------------------------------

_PAGE_NUMBER = re.compile(r"\bpage (\d+)", re.IGNORECASE)
# A page integrity_check could not read is reported as a problem of the file
# ("Page 3: unable to get the page. error code=266" before SQLite 3.46, "Tree
# 2 page 3: ..." after); an I/O error or lack of memory there says nothing
# about the content: it is a failure to check.
_UNREADABLE_PAGE = re.compile(
    r"((?:Tree \d+ page|Page) \d+): unable to get the page\. error code=(\d+)"
)
_READ_FAILURE_CODES = {apsw_backup.SQLITE_IOERR, apsw_backup.SQLITE_NOMEM}


def problem_lines(rows: Iterable[tuple[Any, ...]]) -> list[str]:
    """The problems in an integrity_check/quick_check answer ([] for "ok").

    Some SQLite versions put several problems in one row, a line each,
    headed by "*** in database main ***": count lines, not rows."""
    texts = [str(row[0]) for row in rows]
    if texts == ["ok"]:
        return []
    lines = [
        line
        for text in texts
        for line in text.splitlines()
        if line.strip() and not line.startswith("*** in database ")
    ]
    return lines or texts


def pages_named(message: str) -> tuple[int, ...]:
    """The page numbers a problem's message names ("Tree 2 page 7 ...")."""
    return tuple(sorted({int(n) for n in _PAGE_NUMBER.findall(message)}))


def _raise_if_unreadable(lines: list[str], check: str) -> None:
    for line in lines:
        for page, code in _UNREADABLE_PAGE.findall(line):
            if int(code) & 0xFF in _READ_FAILURE_CODES:
                raise _Unverified(
                    f"{check} could not read {page} (SQLite error code {code}): "
                    "this says nothing about the file's content; check the "
                    "disk and verify again"
                )


# -- the checks --------------------------------------------------------------


class _Run:
    """State shared by the worker threads of one verification."""

    def __init__(
        self, path: str, deadline: float | None, lock_wait: float | None = None
    ) -> None:
        self.path = path
        self.deadline = deadline
        self.lock_wait = lock_wait  # seconds a lock is waited for at most
        self.locked_since: float | None = None  # a check found the file locked
        self.cancelled = threading.Event()
        self.timed_out = False
        self._lock = threading.Lock()
        self._connections: set[apsw_backup.Connection] = set()
        # Read-only: verifying never writes to the file (a -wal is neither
        # checkpointed into it nor deleted); see _remove_what_reading_made.
        self.flags = apsw_backup.SQLITE_OPEN_READONLY
        self.cache_kib = LOOKUP_CACHE_KIB
        self._local = threading.local()  # .conn: this thread's lookup connection
        # how many files its owner opened through the recorder's shim (None:
        # not known); more means another connection had the file (below)
        self.own_opens: int | None = None

    def share_cache(self, threads: int) -> None:
        """LOOKUP_CACHE_KIB a connection, LOOKUP_CACHE_TOTAL_KIB in all."""
        self.cache_kib = max(
            2000, min(LOOKUP_CACHE_KIB, LOOKUP_CACHE_TOTAL_KIB // max(threads, 1))
        )

    def open(self, lookups: bool = False) -> apsw_backup.Connection:
        """A connection for one check; `lookups`: it looks rows up in
        indexes all over the file (integrity_check(T), the pieces), so it
        gets a larger page cache (LOOKUP_CACHE)."""
        conn = apsw_backup.Connection(self.path, self.flags)

        def wait_for_lock(count: int) -> bool:
            now = time.monotonic()
            if self.locked_since is None:
                self.locked_since = now
            if self.lock_wait is not None and now - self.locked_since >= self.lock_wait:
                return False
            time.sleep(0.01)
            if self.cancelled.is_set():
                return False
            return self.deadline is None or time.monotonic() < self.deadline

        conn.set_busy_handler(wait_for_lock)
        with self._lock:
            self._connections.add(conn)
        try:
            conn.execute("PRAGMA query_only=ON").fetchall()
            if lookups:
                conn.execute(f"PRAGMA cache_size=-{self.cache_kib}").fetchall()
        except BaseException:
            self.close(conn)
            raise
        return conn

    def close(self, conn: apsw_backup.Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        conn.close(force=True)

    def lookup_connection(self) -> apsw_backup.Connection:
        """This thread's connection for the checks that look rows up in
        indexes (open(lookups=True)), kept from one check to the next: its
        page cache stays filled, instead of every check allocating and
        filling a large cache of its own (the allocations take SQLite's
        global memory mutexes, which the threads then wait for)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.open(lookups=True)
        return conn

    def done_with(self, conn: apsw_backup.Connection, failed: bool) -> None:
        """After a check on lookup_connection(): one that failed closes it
        (the thread's next check opens another), else it is kept."""
        if failed:
            if conn is getattr(self._local, "conn", None):
                self._local.conn = None
            self.close(conn)

    def close_lookup_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            self.close(conn)

    def interrupt_all(self) -> None:
        with self._lock:
            live = list(self._connections)
        for conn in live:
            try:
                conn.interrupt()
            except apsw_backup.Error:
                pass  # closed meanwhile

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise _Unverified("verification stopped")


@dataclass
class _Task:
    """A unit of work for a worker thread; `weight` is its expected cost in
    seconds (used to order the work and to estimate progress)."""

    record: CheckRecord
    weight: float
    run: Callable[[_Run, _Task], list[Problem]]
    done_fraction: float = 0.0  # for tasks that know their own progress
    started: float | None = None
    finished: bool = False


def _sql_check(
    sql: str, check: str, lookups: bool = False
) -> Callable[[_Run, _Task], list[Problem]]:
    def run(ctx: _Run, task: _Task) -> list[Problem]:
        ctx.check_cancelled()
        conn = ctx.lookup_connection() if lookups else ctx.open()
        rows: list[tuple[Any, ...]] = []
        stopped: apsw_backup.Error | None = None
        failed = True
        try:
            # Row by row: on a damaged file SQLite may report some problems
            # and then stop the statement with SQLITE_CORRUPT; keep both.
            for row in conn.execute(sql):
                rows.append(row)
        except (apsw_backup.CorruptError, apsw_backup.NotADBError) as exc:
            stopped = exc
        except apsw_backup.SQLError as exc:
            if "no such module" in str(exc):
                # plain integrity_check skips a virtual table whose module
                # is not loaded; so do we
                task.record.detail["skipped"] = str(exc)
                failed = False
                return []
            raise
        else:
            failed = False
        finally:
            if lookups:
                ctx.done_with(conn, failed or stopped is not None)
            else:
                ctx.close(conn)
        lines = problem_lines(rows) if rows else []
        _raise_if_unreadable(lines, check)
        if stopped is not None:
            lines.append(f"{check} stopped: {stopped}")
        return [Problem(check, line, pages_named(line)) for line in lines]

    return run


def _read_back_task(
    recorder: apsw_backup.PageRecorder,
) -> Callable[[_Run, _Task], list[Problem]]:
    def run(ctx: _Run, task: _Task) -> list[Problem]:
        tamper = os.environ.get(TAMPER_ENV)
        if tamper:
            recorder._tamper_on_read_back(int(tamper))
        total = {"checked": 0, "mismatched": 0, "unrecorded": 0, "missing": 0}
        lists: dict[str, list[int]] = {
            "mismatched_pages": [],
            "unrecorded_pages": [],
            "missing_pages": [],
        }
        first, end = 1, None
        info: dict[str, Any] = {}
        while end is None or first <= end:
            ctx.check_cancelled()
            if ctx.deadline is not None and time.monotonic() >= ctx.deadline:
                ctx.timed_out = True
                raise _Unverified("the deadline passed")
            try:
                part = recorder.read_back(first, first + READ_BACK_PAGES - 1)
            except ValueError as exc:  # nothing was recorded
                raise _Unverified(str(exc)) from exc
            if first == 1:
                info = dict(part)
                end = max(part["file_pages"], recorder.stats()["pages"])
            for key in total:
                total[key] += part[key]  # type: ignore[literal-required]
            for key, pages in lists.items():
                pages.extend(part[key])  # type: ignore[literal-required]
            first += READ_BACK_PAGES
            task.done_fraction = min(1.0, (first - 1) / max(end or 1, 1))
        task.record.detail.update(
            pages=info.get("file_pages", 0),
            page_size=info.get("page_size", 0),
            checked=total["checked"],
            cache_dropped=info.get("cache_dropped", False),
            through_connection=info.get("through_connection", False),
        )
        _check_only_the_owner_wrote(ctx, recorder)
        return _read_back_problems(info, total, lists)

    return run


def _check_only_the_owner_wrote(ctx: _Run, recorder: apsw_backup.PageRecorder) -> None:
    """A recording keeps the writes of every connection of this process that
    opens the file through its shim (a second copy into the same file,
    started meanwhile): they cannot be told from the copy's own, so the
    byte check would prove another writer's bytes.  Checked after the read
    (a connection opened during it counts too)."""
    if ctx.own_opens is None:
        return
    others = recorder.stats()["attached"] - ctx.own_opens
    if others > 0:
        raise _Unverified(
            f"{others} other connection(s) of this process opened the file "
            "while the copy was recorded (another copy into it?): their "
            "writes cannot be told from the copy's, so its bytes cannot be "
            "checked; verify again once nothing else writes it"
        )


def _listed(pages: list[int], count: int) -> str:
    shown = ", ".join(str(p) for p in pages[:10])
    return shown + (f" and {count - 10} more" if count > 10 else "")


def _read_back_problems(
    info: dict[str, Any], total: dict[str, int], lists: dict[str, list[int]]
) -> list[Problem]:
    found = []
    if total["mismatched"]:
        pages = lists["mismatched_pages"]
        found.append(
            Problem(
                "pages",
                f"{total['mismatched']} page(s) on the disk differ from what "
                f"SQLite wrote: page {_listed(pages, total['mismatched'])} "
                "(the disk or file system lost the writes, or another "
                "connection wrote the file since)",
                tuple(pages),
            )
        )
    if total["missing"]:
        pages = lists["missing_pages"]
        found.append(
            Problem(
                "pages",
                f"the file is shorter than what SQLite wrote: "
                f"{total['missing']} page(s) missing (page "
                f"{_listed(pages, total['missing'])})",
                tuple(pages),
            )
        )
    if info.get("partial_tail"):
        found.append(
            Problem(
                "pages",
                "the file's size is not a whole number of pages "
                f"({info.get('page_size')} bytes each)",
            )
        )
    if total["unrecorded"] and not found:
        pages = lists["unrecorded_pages"]
        raise _Unverified(
            f"{total['unrecorded']} page(s) of the file were not written while "
            f"recording (page {_listed(pages, total['unrecorded'])}): their "
            "bytes cannot be checked"
        )
    return found


# -- planning ----------------------------------------------------------------

# Expected costs (seconds), measured on this project's benchmark database
# (benchmarks/verify_speed.py): they only order the work and shape the
# progress estimate.
_SEC_PER_PAGE_QUICK = 9e-6
_SEC_PER_ROW = 0.4e-6
_SEC_PER_ROW_INDEX = 2.0e-6
_SEC_PER_BYTE_READ_BACK = 1 / 1.5e9


@dataclass
class _Table:
    name: str
    rows: int | None  # an estimate; None when unknown
    indexes: int


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _plan_tables(conn: apsw_backup.Connection) -> list[_Table] | None:
    """The tables to check one by one, with a cheap size estimate; None when
    one of them cannot be named in integrity_check(X) (a name SQLite would
    read as the error limit), so the check must run whole."""
    rows = conn.execute(
        "SELECT name, type, tbl_name, sql FROM sqlite_master "
        "WHERE type IN ('table', 'index')"
    ).fetchall()
    tables: dict[str, _Table] = {"sqlite_master": _Table("sqlite_master", 0, 0)}
    virtual = set()
    for name, kind, _, sql in rows:
        if kind == "table":
            tables[str(name)] = _Table(str(name), None, 0)
            if str(sql or "").upper().startswith("CREATE VIRTUAL"):
                virtual.add(str(name))  # counting its rows could scan it all
    for _, kind, tbl, _ in rows:
        if kind == "index" and str(tbl) in tables:
            tables[str(tbl)].indexes += 1
    for table in tables.values():
        if re.fullmatch(r"\s*[-+]?\d+\s*", table.name):
            return None
        if table.name == "sqlite_master" or table.name in virtual:
            continue
        try:
            (top,) = conn.execute(
                f"SELECT max(rowid) FROM {_quote(table.name)}"
            ).fetchone() or (None,)
            table.rows = int(top) if isinstance(top, int) else 0
        except apsw_backup.Error:
            table.rows = None  # WITHOUT ROWID, or a virtual table
    return list(tables.values())


def _table_weight(table: _Table, default_rows: int) -> float:
    rows = table.rows if table.rows is not None else default_rows
    return rows * (_SEC_PER_ROW + _SEC_PER_ROW_INDEX * table.indexes) + 1e-3


def _plan(
    ctx: _Run,
    level: str,
    recorder: apsw_backup.PageRecorder | None,
    threads: int = 1,
) -> list[_Task]:
    path = ctx.path
    size = os.stat(path).st_size
    tasks = []
    if recorder is not None:
        tasks.append(
            _Task(
                CheckRecord("read_back"),
                size * _SEC_PER_BYTE_READ_BACK,
                _read_back_task(recorder),
            )
        )
    quick = _Task(
        CheckRecord("quick_check"),
        size / 4096 * _SEC_PER_PAGE_QUICK,
        _sql_check("PRAGMA quick_check", "quick_check"),
    )
    tasks.append(quick)
    if level == "default":
        return tasks
    conn = ctx.open()
    try:
        tables = None
        if apsw_backup.SQLITE_VERSION_NUMBER and _runtime_version() >= (
            TABLE_CHECK_VERSION
        ):
            tables = _plan_tables(conn)
        if tables is not None:
            tasks += _table_tasks(conn, tables, threads, quick.weight)
    finally:
        ctx.close(conn)
    if tables is None:
        # SQLite before 3.33, or a table it cannot name: the whole check on
        # one connection (it includes everything quick_check does).
        tasks.remove(quick)
        weight = size / 4096 * _SEC_PER_PAGE_QUICK * 15
        tasks.append(
            _Task(
                CheckRecord("integrity_check"),
                weight,
                _sql_check("PRAGMA integrity_check", "integrity_check", lookups=True),
            )
        )
        return tasks
    return tasks


def _table_tasks(
    conn: apsw_backup.Connection, tables: list[_Table], threads: int, quick: float
) -> list[_Task]:
    """integrity_check(T) for each table; a table too large to leave the
    other threads enough work (SQLite checks a table and all its indexes
    as one unit) is checked in pieces instead, when it can be (see
    _IndexSplit)."""
    known = [t.rows for t in tables if t.rows]
    default_rows = int(sum(known) / len(known)) if known else 1000
    weights = {t.name: _table_weight(t, default_rows) for t in tables}
    share = (sum(weights.values()) + quick) / max(threads, 1)
    tasks = []
    for table in tables:
        weight = weights[table.name]
        split = None
        if threads > 1 and table.indexes and weight > SPLIT_SHARE * share:
            split = _IndexSplit.plan(conn, table.name)
        if split is not None:
            tasks += split.tasks(weight, max(2, math.ceil(weight / share * PIECES)))
            continue
        tasks.append(
            _Task(
                CheckRecord(
                    f"integrity_check({table.name})", detail={"table": table.name}
                ),
                weight,
                _sql_check(
                    f"PRAGMA integrity_check({_quote(table.name)})",
                    "integrity_check",
                    lookups=True,
                ),
            )
        )
    return tasks


# The page cache (KiB) of a connection that looks rows up in indexes all
# over the file: SQLite's default 2 MB makes each lookup read its leaf page
# again (integrity_check(orders) of the benchmark: 1.6 s, 1.0-1.2 s with
# 64 MiB); bounded in all, whatever the number of threads.  (Memory-mapped
# I/O would be faster still, but turns an I/O error of the disk into a
# SIGBUS: not for a tool that checks disks.)
LOOKUP_CACHE_KIB = 64 * 1024
LOOKUP_CACHE_TOTAL_KIB = 256 * 1024

# A table whose expected check takes more than this part of one thread's
# share of the work is split (when it can be), into about PIECES pieces
# per share: small enough that the threads, taking the next piece as they
# finish one, end close together whatever the estimates got wrong.
SPLIT_SHARE = 0.6
PIECES = 4


@dataclass
class _Index:
    name: str
    columns: list[tuple[str, str]]  # (column, collation) of each key column
    unique: bool


class _IndexSplit:
    """What integrity_check(T) checks beyond quick_check, for a rowid table
    T, in pieces that threads can share: each piece scans a range of
    rowids and looks every row up in one index of T, as integrity_check
    does in each ("row N missing from index I", N the row's position in
    the table); one more piece compares the number of entries of each index
    with the table's ("wrong # of entries in index I") and looks for
    duplicates in UNIQUE indexes ("non-unique entry in index I").  The
    b-trees themselves, NOT NULL and the page accounting are quick_check's,
    which the full level runs whole.  A table this cannot mirror exactly --
    WITHOUT ROWID, STRICT, CHECK constraints, generated columns, a partial
    or expression index, or a query plan that would not look each entry up
    by its key -- is not split (plan() returns None)."""

    def __init__(
        self, table: str, indexes: list[_Index], lo: int, hi: int, rid: str = "rowid"
    ) -> None:
        self.table = table
        self.indexes = indexes
        self.lo, self.hi = lo, hi
        # the name that reaches the real rowid: a column of the table may be
        # called rowid (or oid, or _rowid_), and then that name is the column
        self.rid = rid

    @classmethod
    def plan(cls, conn: apsw_backup.Connection, table: str) -> _IndexSplit | None:
        q = _quote(table)
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)
        ).fetchone() or ("",)
        text = str(sql or "").upper()
        if re.search(r"\b(CHECK|STRICT|VIRTUAL)\b|WITHOUT\s+ROWID", text):
            return None
        columns_of_t = list(conn.execute(f"PRAGMA table_xinfo({q})"))
        if any(row[6] not in (0, 1) for row in columns_of_t):
            return None  # generated columns
        names = {str(row[1]).lower() for row in columns_of_t}
        rid = next((n for n in ("rowid", "_rowid_", "oid") if n not in names), None)
        if rid is None:
            return None  # every name of the rowid is a column's: not split
        indexes = []
        for _, name, unique, _origin, partial in conn.execute(
            f"PRAGMA index_list({q})"
        ):
            if partial:
                return None
            columns = []
            for row in conn.execute(f"PRAGMA index_xinfo({_quote(str(name))})"):
                _, cid, column, _desc, coll, key = row
                if not key:
                    continue
                if not isinstance(cid, int) or cid < 0 or column is None:
                    return None  # an expression (or the rowid) as a key
                columns.append((str(column), str(coll or "BINARY")))
            indexes.append(_Index(str(name), columns, bool(unique)))
        if not indexes:
            return None
        lo = _scalar(conn, f"SELECT min({rid}) FROM {q}")
        hi = _scalar(conn, f"SELECT max({rid}) FROM {q}")
        split = cls(table, indexes, int(lo or 0), int(hi or 0), rid)
        for index in indexes:
            plan = " ".join(
                str(row[-1])
                for row in conn.execute(
                    "EXPLAIN QUERY PLAN " + split.lookup_sql([index]), (0, 0)
                )
            )
            if f"COVERING INDEX {index.name} (" not in plan or "rowid=?" not in plan:
                return None
        return split

    def lookup_sql(self, indexes: list[_Index] | None = None) -> str:
        """Rows of a rowid range missing from an index: one column per index
        of `indexes` (default: all of them), 1 when missing."""
        q = _quote(self.table)
        joins, missing = [], []
        for k, index in enumerate(self.indexes if indexes is None else indexes):
            alias = f"i{k}"
            on = " AND ".join(
                f"{alias}.{_quote(c)} IS t.{_quote(c)} COLLATE {_quote(coll)}"
                for c, coll in index.columns
            )
            r = self.rid
            joins.append(
                f"LEFT JOIN {q} AS {alias} INDEXED BY {_quote(index.name)} "
                f"ON {on} AND {alias}.{r} = t.{r}"
            )
            missing.append(f"{alias}.{r} IS NULL")
        r = self.rid
        return (
            f"SELECT t.{r}, {', '.join(missing)} FROM {q} AS t NOT INDEXED "
            f"{' '.join(joins)} WHERE t.{r} BETWEEN ? AND ? AND "
            f"({' OR '.join(missing)})"
        )

    def tasks(self, weight: float, pieces: int) -> list[_Task]:
        """About `pieces` lookup pieces, each one index and one rowid range
        (one index per piece: a connection then caches that index alone,
        and two threads do not each read every index into a cache of
        their own), and the piece of the counts."""
        span = self.hi - self.lo + 1
        ranges = max(1, -(-pieces // len(self.indexes)))
        step = max(1, -(-span // ranges))
        share = weight / len(self.indexes)
        tasks = []
        for index in self.indexes:
            for first in range(self.lo, self.hi + 1, step):
                last = min(first + step - 1, self.hi)
                tasks.append(
                    _Task(
                        CheckRecord(
                            f"integrity_check({self.table} rows {first}-{last} "
                            f"in {index.name})",
                            detail={
                                "table": self.table,
                                "index": index.name,
                                "rowids": [first, last],
                            },
                        ),
                        share * (last - first + 1) / span,
                        self._lookups(index, first, last),
                    )
                )
        tasks.append(
            _Task(
                CheckRecord(
                    f"integrity_check({self.table} index counts)",
                    detail={"table": self.table},
                ),
                weight * 0.1,
                self._counts,
            )
        )
        return tasks

    def _lookups(
        self, index: _Index, first: int, last: int
    ) -> Callable[[_Run, _Task], list[Problem]]:
        def run(ctx: _Run, task: _Task) -> list[Problem]:
            ctx.check_cancelled()
            conn = ctx.lookup_connection()
            failed = True
            try:
                missing = conn.execute(
                    self.lookup_sql([index]), (first, last)
                ).fetchall()
                found = []
                for row in missing[:_MAX_REPORTED]:
                    # integrity_check numbers a row by its place in the table
                    place = _scalar(
                        conn,
                        f"SELECT count(*) FROM {_quote(self.table)} NOT INDEXED "
                        f"WHERE {self.rid} <= ?",
                        (row[0],),
                    )
                    found.append(f"row {place} missing from index {index.name}")
                failed = False
            finally:
                ctx.done_with(conn, failed)
            return [Problem("integrity_check", line) for line in found]

        return run

    def _counts(self, ctx: _Run, task: _Task) -> list[Problem]:
        ctx.check_cancelled()
        q = _quote(self.table)
        conn = ctx.open()
        found = []
        try:
            rows = _scalar(conn, f"SELECT count(*) FROM {q} NOT INDEXED")
            for index in self.indexes:
                # (count(*) would count the smallest index instead)
                entries = _scalar(
                    conn,
                    f"SELECT coalesce(sum(1), 0) FROM {q} INDEXED BY "
                    f"{_quote(index.name)}",
                )
                if entries != rows:
                    found.append(f"wrong # of entries in index {index.name}")
                if index.unique and self._duplicates(conn, index):
                    found.append(f"non-unique entry in index {index.name}")
        finally:
            ctx.close(conn)
        return [Problem("integrity_check", line) for line in found]

    def _duplicates(self, conn: apsw_backup.Connection, index: _Index) -> bool:
        cols = [f"{_quote(c)} COLLATE {_quote(coll)}" for c, coll in index.columns]
        not_null = " AND ".join(f"{_quote(c)} IS NOT NULL" for c, _ in index.columns)
        row = conn.execute(
            f"SELECT 1 FROM {_quote(self.table)} INDEXED BY {_quote(index.name)} "
            f"WHERE {not_null} GROUP BY {', '.join(cols)} HAVING count(*) > 1 "
            "LIMIT 1"
        ).fetchone()
        return row is not None


def _scalar(conn: apsw_backup.Connection, sql: str, args: tuple[Any, ...] = ()) -> Any:
    """The first column of the first row of sql (None without a row)."""
    row = conn.execute(sql, args).fetchone()
    return None if row is None else row[0]


# integrity_check stops at 100 problems; so do the pieces, each.
_MAX_REPORTED = 100


def _runtime_version() -> int:
    major, minor, patch = (
        int(x) for x in apsw_backup.sqlite_lib_version().split(".")[:3]
    )
    return major * 1000000 + minor * 1000 + patch


# -- running -----------------------------------------------------------------


def _worker(ctx: _Run, work: queue.Queue[_Task | None], results: list[Any]) -> None:
    try:
        _work(ctx, work, results)
    finally:
        ctx.close_lookup_connection()


def _work(ctx: _Run, work: queue.Queue[_Task | None], results: list[Any]) -> None:
    while True:
        task = work.get()
        if task is None:
            return
        task.started = time.monotonic()
        try:
            found = task.run(ctx, task)
            task.record.outcome = PROBLEMS if found else OK
            results.append((task, found, None))
        except _Unverified as exc:
            task.record.outcome = UNVERIFIED
            results.append((task, [], exc))
        except (apsw_backup.CorruptError, apsw_backup.NotADBError) as exc:
            # SQLite refused to read the file at all: a damaged file
            task.record.outcome = PROBLEMS
            check = task.record.name.split("(")[0]
            results.append((task, [Problem(check, str(exc))], None))
        except (apsw_backup.Error, OSError) as exc:
            task.record.outcome = UNVERIFIED
            results.append((task, [], exc))
        except BaseException as exc:  # a bug: re-raised by the caller
            task.record.outcome = UNVERIFIED
            results.append((task, [], exc))
            ctx.cancelled.set()
        finally:
            task.record.seconds = time.monotonic() - task.started
            task.finished = True


def _estimate(
    tasks: list[_Task], now: float, begun: float
) -> tuple[float, float | None]:
    total = sum(t.weight for t in tasks) or 1.0
    done = 0.0
    for t in tasks:
        if t.finished:
            done += t.weight
        elif t.started is not None:
            own = t.done_fraction * t.weight
            guess = min(now - t.started, 0.95 * t.weight)
            done += max(own, guess)
    fraction = min(done / total, 1.0)
    elapsed = now - begun
    eta = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
    return fraction, eta


def _wait_for(
    ctx: _Run,
    threads: list[threading.Thread],
    report: Callable[[float], Progress] | None,
    progress: Callable[[Progress], object] | None,
) -> None:
    """Wait for threads, reporting progress every TICK and enforcing the
    deadline; on any exception here (a progress callback's, a signal's)
    stop every check and wait for the threads before re-raising."""
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(TICK / len(threads))
            now = time.monotonic()
            if ctx.deadline is not None and now >= ctx.deadline:
                ctx.timed_out = True
                ctx.cancelled.set()
            if ctx.cancelled.is_set():
                ctx.interrupt_all()
            elif progress is not None and report is not None:
                progress(report(now))
    except BaseException:
        ctx.cancelled.set()
        while any(t.is_alive() for t in threads):
            ctx.interrupt_all()
            for t in threads:
                t.join(0.05)
        raise


def _run_tasks(
    ctx: _Run,
    tasks: list[_Task],
    threads: int,
    phase: str,
    begun: float,
    progress: Callable[[Progress], object] | None,
) -> list[Any]:
    work: queue.Queue[_Task | None] = queue.Queue()
    # The byte check first: it re-reads the file from the disk range by
    # range, and the SQL checks beside it find the pages cached again soon
    # (from a cold cache a quick_check takes ten times as long).  Then the
    # largest checks first, so that no large one starts last.
    for task in sorted(tasks, key=lambda t: (t.record.name != "read_back", -t.weight)):
        work.put(task)
    n = max(1, min(threads, len(tasks)))
    for _ in range(n):
        work.put(None)
    results: list[Any] = []
    workers = [
        threading.Thread(
            target=_worker, args=(ctx, work, results), name=f"verify-{i}", daemon=True
        )
        for i in range(n)
    ]
    for w in workers:
        w.start()
    started = time.monotonic()

    def report(now: float) -> Progress:
        fraction, _ = _estimate(tasks, now, started)
        elapsed = now - begun
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
        running = tuple(t.record.name for t in tasks if t.started and not t.finished)
        return Progress(phase, fraction, elapsed, eta, running)

    _wait_for(ctx, workers, report, progress)
    if progress is not None and not ctx.cancelled.is_set():
        progress(report(time.monotonic()))
    return results


def verify(
    path: str | os.PathLike[str],
    level: str = "default",
    *,
    recorder: apsw_backup.PageRecorder | None = None,
    progress: Callable[[Progress], object] | None = None,
    timeout: float | None = None,
    threads: int | None = None,
    lock_wait: float | None = None,
    _own_opens: int | None = None,
) -> VerifyResult:
    """Verify the database file at `path` (see the module's docstring).

    `recorder`: the PageRecorder that recorded the writes of the file (the
    byte check); the file must be settled first -- its last transaction
    committed and, for a WAL database, checkpointed (:func:`settle`) or its
    connection closed.  `threads`: how many checks run at once (default:
    the number of CPUs this process may use).  `timeout`: seconds; at the
    deadline the checks are interrupted and the result is "unverified".
    `lock_wait`: seconds a check waits for another connection's lock at
    most (None: until the deadline).  The file is opened read-only; the
    -wal and -shm SQLite makes to read a WAL database are removed after,
    when they were not there before (and the -wal is empty).
    """
    if level not in LEVELS:
        raise ValueError(
            f"unknown verification level {level!r}: use one of {', '.join(LEVELS)}"
        )
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be >= 0 seconds (None: no limit)")
    begun = time.monotonic()
    path = os.fspath(path)
    ctx = _Run(path, None if timeout is None else begun + timeout, lock_wait)
    ctx.own_opens = _own_opens  # copy()'s: the files it opened while recording
    try:
        result = _verify(ctx, level, recorder, progress, timeout, threads, begun)
    finally:
        _remove_what_reading_made(path)
    result.timed_out = ctx.timed_out
    result.locked = ctx.locked_since is not None
    if result.status == UNVERIFIED and ctx.timed_out and result.locked:
        result.reason = f"{result.reason}: the file was locked by another connection"
    return result


def _verify(
    ctx: _Run,
    level: str,
    recorder: apsw_backup.PageRecorder | None,
    progress: Callable[[Progress], object] | None,
    timeout: float | None,
    threads: int | None,
    begun: float,
) -> VerifyResult:
    if threads is None:
        threads = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
    ctx.share_cache(threads)
    phase = f"verifying ({level})"
    if progress is not None:
        # Once before any work: a caller learns at once that the phase began
        # (and may stop it here, before a thread is started).
        progress(Progress(phase, 0.0, 0.0, None, ()))
    planned: dict[str, Any] = {}

    def plan() -> None:
        try:
            planned["tasks"] = _plan(ctx, level, recorder, threads)
        except BaseException as exc:
            planned["error"] = exc

    planner = threading.Thread(target=plan, name="verify-plan", daemon=True)
    planner.start()
    _wait_for(
        ctx,
        [planner],
        lambda now: Progress(phase, 0.0, now - begun, None, ("planning",)),
        progress,
    )
    error = planned.get("error")
    if isinstance(error, (apsw_backup.CorruptError, apsw_backup.NotADBError)):
        found = [Problem("integrity_check", str(error))]
        return VerifyResult(PROBLEMS, level, found, [], time.monotonic() - begun)
    if isinstance(error, (apsw_backup.Error, OSError)):
        reason = (
            f"verification did not finish within {timeout:g} s"
            if ctx.timed_out
            else _reason(error)
        )
        return VerifyResult(
            UNVERIFIED, level, [], [], time.monotonic() - begun, reason, error
        )
    if error is not None:
        raise error
    tasks: list[_Task] = planned["tasks"]
    checks = [t.record for t in tasks]
    if recorder is None:
        checks.insert(
            0, CheckRecord("read_back", SKIPPED, detail={"why": "no page hashes"})
        )
    results = _run_tasks(ctx, tasks, threads, phase, begun, progress)
    problems: list[Problem] = []
    failures: list[BaseException] = []
    for _task, found, error in results:
        for problem in found:
            if problem not in problems:
                problems.append(problem)
        if error is not None:
            failures.append(error)
    for error in failures:
        if not isinstance(error, (_Unverified, apsw_backup.Error, OSError)):
            raise error
    seconds = time.monotonic() - begun
    if problems:
        return VerifyResult(PROBLEMS, level, problems, checks, seconds)
    if ctx.timed_out:
        return VerifyResult(
            UNVERIFIED,
            level,
            [],
            checks,
            seconds,
            f"verification did not finish within {timeout:g} s",
        )
    if failures:
        first = failures[0]
        return VerifyResult(
            UNVERIFIED,
            level,
            [],
            checks,
            seconds,
            _reason(first),
            None if isinstance(first, _Unverified) else first,
        )
    return VerifyResult(OK, level, [], checks, seconds)


def _remove_what_reading_made(path: str) -> None:
    """A read-only connection to a WAL database creates an empty -wal and a
    -shm, and cannot remove them.  While the -wal is empty, the last
    connection's close removes them (files.close_as_last_connection: SQLite
    decides, under its locks; with nothing in the -wal, closing writes
    nothing to the file).  Whether they were there before does not matter:
    a verify killed while reading leaves them, and the next one must not
    keep them for ever.  A -wal holding frames, or one another connection
    has open, stays."""
    try:
        if os.stat(path + "-wal").st_size:
            return
    except OSError:
        return
    files.close_as_last_connection(path, busy_ms=100)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, (apsw_backup.BusyError, apsw_backup.LockedError)):
        return f"the file stayed locked by another connection: {exc}"
    if isinstance(exc, apsw_backup.InterruptError):
        return "verification was interrupted"
    return str(exc)


def settle(connection: apsw_backup.Connection, schema: str = "main") -> None:
    """Make the database file hold everything committed, so that the byte
    check can read it: for a WAL database, a TRUNCATE checkpoint that must
    copy every frame (raises BusyError if readers keep it from finishing).
    Call it on the destination connection after the backup finished."""
    (mode,) = connection.execute(
        f"PRAGMA {_quote(schema)}.journal_mode"
    ).fetchone() or ("",)
    if str(mode).lower() != "wal":
        return
    row = connection.execute(
        f"PRAGMA {_quote(schema)}.wal_checkpoint(TRUNCATE)"
    ).fetchone()
    if row is None or row[0] != 0 or row[1] not in (0, -1) and row[1] != row[2]:
        raise apsw_backup.BusyError(
            "the WAL could not be checkpointed into the database file (other "
            "connections are reading it), so the file does not hold every "
            "page yet; verify again when they are done"
        )
