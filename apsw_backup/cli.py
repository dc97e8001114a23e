"""The apsw-backup command: back up a live SQLite database from the shell.

    apsw-backup [options] SOURCE DEST
    apsw-backup [options] SOURCE FOLDER/   (the copy is FOLDER/<stem>-<UTC time>.db)
    apsw-backup verify [--json] FILE...
    apsw-backup --demo
    python -m apsw_backup ...              (the same command)

The copy is made by copy() (online: other connections keep using SOURCE) and
checked with PRAGMA integrity_check.  A DEST that does not exist is written
to a temporary file beside it, verified, then renamed into place, so DEST
either does not exist or is the complete, verified copy; an existing DEST
(--overwrite) is written through SQLite's own transaction.

Exit codes (the message on stderr, and "dest_state" in --json, always say
what DEST holds):
  0    the backup is complete (and verified, unless --no-verify)
  1    SQLite, file system or backup error
  2    usage error or refusal: nothing was written
  3    verification failed: a new DEST was not created; an existing DEST
       holds the copy that failed verification
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, with one of:
       "DEST was not created", "DEST was left as it was" (nothing changed),
       "DEST holds the complete copy, but it was not verified" (the signal
       came after the copy was committed into an existing DEST),
       "DEST holds the complete, verified copy" (it came after that).
A signal is acted on at the next safe point: after the step in progress,
within --sleep seconds while waiting for a lock, at once while verifying.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

import apsw_backup
from apsw_backup import files
from apsw_backup._apsw_backup import __version__
from apsw_backup.copy import CopyResult, copy

PROG = "apsw-backup"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3
SIGNALS = (signal.SIGINT, signal.SIGTERM)  # exit code 128 + the signal's number
REDRAW_EVERY = 0.1  # seconds between two redraws of the progress line
SQLITE_HEADER = b"SQLite format 3\0"
# A test-only hook, "PHASE:PATH": on reaching PHASE the command creates PATH,
# then waits (up to a minute) for a signal, so that tests can interrupt each
# phase deterministically.  Phases: opening, copying, waiting, copied,
# verifying, done.
TEST_PAUSE = "APSW_BACKUP_TEST_PAUSE"
TEST_PAUSE_LIMIT = 60.0

EPILOG = """\
DEST may be an existing folder (or end with /): the copy is then named
<SOURCE stem>-<UTC timestamp>.db in it, and --keep N deletes the oldest
backups of that exact name pattern, only once the new one is verified.

exit codes (the message, and "dest_state" in --json, say what DEST holds):
  0    the backup is complete (and verified, unless --no-verify)
  1    SQLite, file system or backup error
  2    usage error or refusal: nothing was written
  3    verification failed: a new DEST was not created; an existing DEST
       holds the copy that failed verification
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM; then DEST holds what
       the message says:
       "DEST was not created" / "DEST was left as it was" (nothing changed),
       "DEST holds the complete copy, but it was not verified",
       "DEST holds the complete, verified copy"

apsw-backup verify [--json] FILE... checks existing backups (exit 0, 1, 3)."""

VERIFY_EPILOG = """\
exit codes: 0 every FILE passed, 1 a FILE could not be read, 3 a FILE failed
verification (the highest applies), 130 interrupted (SIGINT), 143 SIGTERM."""


class Failure(Exception):
    """What the command reports when it fails: exit code, message, cause."""

    def __init__(
        self, code: int, message: str, error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error = error
        self.fields: dict[str, Any] = {}


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised at a safe point (a BaseException, as
    KeyboardInterrupt is, so that nothing takes it for an error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with argv (default: sys.argv[1:]); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv  # known before parsing: usage errors too
    with _signals() as interrupts:
        try:
            if argv[:1] == ["verify"]:
                return _verify_command(_parse_verify(argv[1:]), interrupts)
            args = _parse(argv)
            if args.demo:
                return _demo(args, interrupts)
            return _backup_command(_planned(args), args, interrupts)
        except _Exit as done:  # --help, --version
            return done.code
        except Failure as failure:
            return _fail(failure, as_json)
        except Interrupted as stop:  # before anything was started
            return _fail(
                Failure(128 + stop.signum, "interrupted: nothing was written", stop),
                as_json,
            )


# -- signals ---------------------------------------------------------------


class Interrupts:
    """SIGINT and SIGTERM: noted when they arrive, acted on at safe points.

    The handler never raises: an exception raised at an arbitrary point of
    copy() -- say between the last step committing an existing DEST and the
    progress callback learning of it -- would make the command's account of
    DEST wrong.  check() raises Interrupted where the command knows what DEST
    holds.  A connection being verified is interrupted at once.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._watched: list[apsw_backup.Connection] = []

    def note(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler."""
        self.signum = self.signum or signum
        for conn in list(self._watched):
            try:
                conn.interrupt()
            except apsw_backup.Error:
                pass  # closed meanwhile: nothing to stop

    def check(self) -> None:
        """Raise Interrupted if a signal has arrived."""
        if self.signum:
            raise Interrupted(self.signum)

    @contextmanager
    def watching(self, conn: apsw_backup.Connection) -> Iterator[None]:
        """Interrupt conn's statement when a signal arrives."""
        self._watched.append(conn)
        try:
            if self.signum:
                conn.interrupt()
            yield
        finally:
            self._watched.remove(conn)


@contextmanager
def _signals() -> Iterator[Interrupts]:
    interrupts = Interrupts()
    if threading.current_thread() is not threading.main_thread():
        yield interrupts  # handlers can only be set in the main thread
        return
    previous = {signum: signal.signal(signum, interrupts.note) for signum in SIGNALS}
    try:
        yield interrupts
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_paused: set[str] = set()


def _pause_for_tests(phase: str, interrupts: Interrupts) -> None:
    """The TEST_PAUSE hook (see its comment); does nothing unless it is set."""
    wanted, _, marker = os.environ.get(TEST_PAUSE, "").partition(":")
    if wanted != phase or phase in _paused:
        return
    _paused.add(phase)
    Path(marker).touch()
    deadline = time.monotonic() + TEST_PAUSE_LIMIT
    while not interrupts.signum and time.monotonic() < deadline:
        time.sleep(0.005)


# -- command line ----------------------------------------------------------


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise Failure(EXIT_USAGE, message, UsageError(message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Online backup of a live SQLite database, verified.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("source", nargs="?", metavar="SOURCE", help="database to back up")
    add("dest", nargs="?", metavar="DEST", help="file (or folder) to write the copy to")
    add(
        "--pages",
        type=int,
        default=256,
        metavar="N",
        help="pages per step (256; <= 0: all at once)",
    )
    add(
        "--sleep",
        type=_seconds,
        default=0.25,
        metavar="S",
        help="longest wait between retries while the database is locked (0.25)",
    )
    add(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up after S seconds (default: no limit)",
    )
    add("--schema", default="main", metavar="NAME", help="schema of SOURCE (main)")
    add("--overwrite", action="store_true", help="replace a non-empty DEST file")
    add(
        "--keep",
        type=_count_arg,
        default=None,
        metavar="N",
        help="DEST folder: keep the N newest backups of SOURCE, delete older ones",
    )
    add(
        "--keep-wal",
        action="store_true",
        help="leave the copy of a WAL database in WAL mode (default: one "
        "self-contained rollback-journal file)",
    )
    add("--no-verify", action="store_true", help="skip PRAGMA integrity_check")
    add("--json", action="store_true", help="print one JSON object on stdout")
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    add(
        "--demo",
        action="store_true",
        help="back up a sample database that another connection keeps writing to",
    )
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser  # fmt: skip


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _count_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.demo and (args.source or args.dest):
        parser.error("--demo takes no SOURCE or DEST")
    if not args.demo and not (args.source and args.dest):
        parser.error("SOURCE and DEST are required (or try --demo)")
    if args.keep is not None and args.no_verify:
        parser.error(
            "--keep deletes older backups only once the new one is verified: "
            "it cannot be used with --no-verify"
        )
    return args


def _parse_verify(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(
        prog=f"{PROG} verify",
        description="Check existing backups with PRAGMA integrity_check.",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="backup to check")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)


# -- the plan: every check before anything is written -----------------------


@dataclass
class Job:
    """One backup: where it goes, and what DEST holds as it goes on."""

    source: str
    dest: str  # the file written (inside DEST when DEST is a folder)
    existed: bool  # DEST existed: written through SQLite's transaction
    verify: bool
    folder: str | None = None  # DEST, when it is a folder
    page_size: int = 0
    started: float = field(default_factory=time.monotonic)
    committed: bool = False  # the last step completed: the copy is in DEST
    verified: bool | None = None  # None: not verified (yet)
    copied: int = 0  # pages copied, as of the last step
    total: int = 0  # pages in SOURCE, as of the last step
    waits: int = 0  # steps that found the database locked
    restarts: int = 0  # times the copy was seen to start again
    written: int = 0  # pages written, restarts included

    def note_step(self, status: int, remaining: int, total: int) -> None:
        """Take in one progress call (before anything else can raise)."""
        if status == apsw_backup.SQLITE_DONE:
            self.committed = True
        copied = total - remaining
        if _locked(status):
            self.waits += 1
        elif 0 < copied <= self.copied and status != apsw_backup.SQLITE_DONE:
            # A step that copied pages but did not get further: SQLite began
            # again from page 1 because another connection wrote to SOURCE.
            self.restarts += 1
            self.written += copied
        else:
            self.written += copied - self.copied
        self.copied, self.total = copied, total

    def state(self) -> str:
        """What DEST holds now (the "dest_state" of --json)."""
        present = self.committed if self.existed else os.path.lexists(self.dest)
        if not present:
            return "unchanged" if self.existed else "not created"
        if self.verified is not None:
            return "verified" if self.verified else "failed verification"
        return "unverified" if self.verify else "complete"

    def says(self) -> str:
        """state() as a sentence."""
        return dest_says(self.dest, self.state())


def dest_says(dest: str, state: str) -> str:
    """What DEST holds, as a sentence, for a "dest_state" of --json."""
    q = _q(dest)
    return {
        "not created": f"DEST {q} was not created",
        "unchanged": f"DEST {q} was left as it was",
        "verified": f"DEST {q} holds the complete, verified copy",
        "failed verification": f"DEST {q} holds the copy that failed verification",
        "unverified": f"DEST {q} holds the complete copy, but it was not "
        f"verified: check it with {PROG} verify {shlex.quote(dest)}",
        "complete": f"DEST {q} holds the complete copy (not verified: --no-verify)",
    }[state]


def _q(path: str) -> str:
    return repr(path)


def _locked(status: int) -> bool:
    return status & 0xFF in (apsw_backup.SQLITE_BUSY, apsw_backup.SQLITE_LOCKED)


def _planned(args: argparse.Namespace) -> Job:
    """_plan(args); a refusal reports SOURCE, DEST and that DEST is as it was."""
    try:
        return _plan(args)
    except Failure as failure:
        state = "unchanged" if os.path.lexists(args.dest) else "not created"
        failure.fields.update(source=args.source, dest=args.dest, dest_state=state)
        # Nothing was written: the message ends by saying so, as every
        # failure's does.
        failure.message = (
            f"{failure.message.rstrip('.')}. {dest_says(args.dest, state)}"
        )
        raise


def _plan(args: argparse.Namespace) -> Job:
    """Check SOURCE and DEST; the job.  Raises Failure; writes nothing."""
    source, dest = args.source, args.dest
    try:
        files.check_distinct(source, dest)
    except ValueError as exc:
        raise Failure(EXIT_USAGE, _same_file_message(source, dest), exc) from exc
    _check_source(source)
    _check_source_header(source)
    folder = None
    if os.path.isdir(dest) or dest.endswith(("/", os.sep)):
        folder = dest
        _check_folder(folder, "DEST folder")
        dest = backup_name(folder, source)
        existed = False
    elif args.keep is not None:
        raise Failure(
            EXIT_USAGE,
            f"--keep needs DEST to be a folder, and {_q(dest)} is not one: "
            "give the folder the backups go to",
            UsageError("--keep"),
        )
    else:
        _check_side_file_name(dest)
        existed = os.path.lexists(dest)
        if existed:
            _check_existing_dest(dest, args.overwrite)
        else:
            _check_stale_side_files(dest)
        _check_folder(os.path.dirname(os.path.abspath(dest)), "DEST's folder")
    return Job(
        source=source,
        dest=dest,
        existed=existed,
        verify=not args.no_verify,
        folder=folder,
        page_size=header_page_size(source),
    )


def _same_file_message(source: str, dest: str) -> str:
    what = "SOURCE itself"
    for suffix, name in (
        ("-wal", "write-ahead log"),
        ("-shm", "shared-memory index"),
        ("-journal", "rollback journal"),
    ):
        if _same_path(source + suffix, dest):
            what = f"SOURCE's {name} ({suffix} file), which SQLite deletes or rewrites"
    return (
        f"DEST {_q(dest)} is {what}: a copy written there would be lost and "
        f"could damage SOURCE {_q(source)}. Choose another DEST"
    )


def _check_side_file_name(dest: str) -> None:
    """Refuse DEST named as another database's side file (other.db-wal):
    opening that database would apply the copy to it, or delete it."""
    for suffix in files.SIDE_FILES:
        owner = dest[: -len(suffix)]
        if dest.endswith(suffix) and os.path.isfile(owner):
            raise Failure(
                EXIT_USAGE,
                f"DEST {_q(dest)} is the {suffix} file name of the database "
                f"{_q(owner)}: SQLite would take the copy for part of that "
                "database. Choose another DEST",
                UsageError("DEST"),
            )


def _check_stale_side_files(dest: str) -> None:
    """Refuse a new DEST whose -journal or -wal is already there: the next
    open of the copy would apply it (a hot journal or a WAL of another
    database) and corrupt the copy."""
    for suffix in ("-journal", "-wal"):
        if os.path.lexists(dest + suffix):
            raise Failure(
                EXIT_USAGE,
                f"DEST {_q(dest)} does not exist, but {_q(dest + suffix)} is "
                "there (left by a crash, or by another database of that name): "
                "SQLite would apply it to the new copy and corrupt it. Move it "
                "away once you know it is not needed, or choose another DEST",
                UsageError("DEST"),
            )


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _os_cause(exc: OSError) -> str:
    """ "no such file or directory (ENOENT)" for an OSError."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code).lower()} ({name})"


CURES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EACCES: "run as a user who may read it, or change its permissions",
    errno.ELOOP: "the path has a loop of symbolic links: check the path",
}


def _check_source(source: str) -> None:
    try:
        info = os.stat(source)
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the path")
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: {_os_cause(exc)}: {cure}",
            exc,
        ) from exc
    if stat.S_ISDIR(info.st_mode):
        error = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), source)
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is a folder (EISDIR), not a database file: "
            "name the database file itself",
            error,
        )
    if not stat.S_ISREG(info.st_mode):
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is not a regular file: name the database file",
            OSError(errno.EINVAL, "not a regular file", source),
        )
    if not os.access(source, os.R_OK):
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), source)
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: permission denied (EACCES): "
            f"{CURES[errno.EACCES]}",
            denied,
        )


def _check_source_header(source: str) -> None:
    # Reading the header with open() is safe here: this process has no
    # SQLite connection to SOURCE yet, whose POSIX locks close() would drop.
    try:
        with open(source, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the file")
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: {_os_cause(exc)}: {cure}",
            exc,
        ) from exc
    if header and header != SQLITE_HEADER:
        error = apsw_backup.NotADBError("file is not a database")
        error.result = error.extendedresult = apsw_backup.SQLITE_NOTADB
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is not an SQLite database (it does not begin "
            "with the SQLite header): name the database file",
            error,
        )


def _check_folder(folder: str, role: str) -> None:
    """Refuse (exit 1) a folder the copy cannot be created in, naming why."""
    path = folder or "."
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} does not exist (ENOENT): create it first "
            f"(mkdir -p {shlex.quote(path)})",
            exc,
        ) from exc
    except NotADirectoryError as exc:
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is not a folder: a part of the path is a file "
            "(ENOTDIR): check the path",
            exc,
        ) from exc
    except OSError as exc:
        raise Failure(EXIT_ERROR, f"{role} {_q(path)}: {_os_cause(exc)}", exc) from exc
    if not stat.S_ISDIR(info.st_mode):
        error = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is a file, not a folder (ENOTDIR): check the path",
            error,
        )
    _check_writable(path, role)


def _check_writable(path: str, role: str) -> None:
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        error = OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is on a read-only file system (EROFS): choose a "
            "DEST on a writable one, or remount it read-write",
            error,
        )
    mode = os.W_OK | (os.X_OK if os.path.isdir(path) else 0)
    if not os.access(path, mode):
        error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        what = "create files in" if os.path.isdir(path) else "write"
        raise Failure(
            EXIT_ERROR,
            f"cannot {what} {role} {_q(path)}: permission denied (EACCES): "
            "choose a DEST you may write to, or change its permissions",
            error,
        )


def _check_existing_dest(dest: str, overwrite: bool) -> None:
    info = os.stat(dest) if os.path.exists(dest) else None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} is not a regular file: name a database file or a folder",
            UsageError("DEST"),
        )
    if not info.st_size:
        return  # an empty file is an empty database: nothing to lose
    if not overwrite:
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} exists and is not empty: pass --overwrite to replace "
            "it (it is replaced only once the copy is complete)",
            UsageError("DEST"),
        )
    # No SQLite connection of this process has DEST open (see _check_source).
    with open(dest, "rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise Failure(
                EXIT_USAGE,
                f"DEST {_q(dest)} is not an SQLite database: --overwrite replaces "
                "a database only; delete the file yourself, or choose another DEST",
                UsageError("DEST"),
            )
    _check_writable(dest, "DEST")


def header_page_size(path: str) -> int:
    """The page size in a database file's header (0 when it cannot be read).

    Read from the file, because asking SQLite needs a lock that a busy
    database may not give.  Only call it while this process has no SQLite
    connection to the file (closing a descriptor drops its POSIX locks).
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError:
        return 0
    if len(header) < 100 or not header.startswith(SQLITE_HEADER):
        return 0
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


# -- DEST folders: names and rotation --------------------------------------

STAMP = "%Y%m%dT%H%M%S.%fZ"  # sortable: name order is time order
STAMP_PATTERN = r"\d{8}T\d{6}\.\d{6}Z"


def backup_name(folder: str, source: str, now: datetime | None = None) -> str:
    """folder/<SOURCE stem>-<UTC time, to the microsecond>.db, a name that
    no file (or side file) has: two runs in one second get two names."""
    stem = Path(source).stem
    moment = now or datetime.now(timezone.utc)
    while True:
        path = os.path.join(folder, f"{stem}-{moment.strftime(STAMP)}.db")
        if not any(os.path.lexists(path + end) for end in ("", *files.SIDE_FILES)):
            return path
        moment += timedelta(microseconds=1)


def backups_of(folder: str, source: str) -> list[str]:
    """The backups of source in folder, oldest first: regular files named
    exactly <stem>-<timestamp>.db, never a temporary file or anything else."""
    pattern = re.compile(re.escape(Path(source).stem) + "-" + STAMP_PATTERN + r"\.db")
    found = []
    for entry in os.scandir(folder):
        if (
            pattern.fullmatch(entry.name)
            and not files.is_temporary_name(entry.name)
            and entry.is_file(follow_symlinks=False)
        ):
            found.append(entry.path)
    return sorted(found)


def rotate(job: Job, keep: int, interrupts: Interrupts) -> list[str]:
    """Delete the oldest backups of job.source in job.folder so that `keep`
    remain, the new one always among them; the paths deleted."""
    assert job.folder is not None
    older = [
        path
        for path in backups_of(job.folder, job.source)
        if not _same_path(path, job.dest) and not _same_path(path, job.source)
    ]
    deleted = []
    for path in older[: max(0, len(older) - (keep - 1))]:
        interrupts.check()
        for end in (*files.SIDE_FILES, ""):  # the database file last
            try:
                os.remove(path + end)
            except FileNotFoundError:
                pass
        deleted.append(path)
    return deleted


# -- running the backup ----------------------------------------------------


class Runner:
    """copy()'s progress and verify callbacks for one job."""

    def __init__(
        self,
        job: Job,
        interrupts: Interrupts,
        line: ProgressLine | None,
        pause: float = 0.0,
    ) -> None:
        self.job = job
        self.interrupts = interrupts
        self.line = line
        self.pause = pause  # --demo: seconds to wait after each step

    def progress(self, status: int, remaining: int, total: int) -> None:
        """copy()'s progress callback."""
        self.job.note_step(status, remaining, total)
        if self.line is not None:
            self.line.step(status)
        if status == apsw_backup.SQLITE_DONE:
            _pause_for_tests("copied", self.interrupts)
        elif _locked(status):
            _pause_for_tests("waiting", self.interrupts)
        else:
            _pause_for_tests("copying", self.interrupts)
        if self.pause and status != apsw_backup.SQLITE_DONE:
            self._wait(self.pause)
        self.interrupts.check()

    def verify(self, path: str) -> None:
        """copy()'s verify callback: raises VerificationFailed/-Error."""
        if self.line is not None:
            self.line.verifying()
        if self.pause:
            self._wait(10 * self.pause)
        tick = self.line.tick if self.line is not None else None
        try:
            problems = integrity_problems(path, self.interrupts, tick)
        except apsw_backup.Error as exc:
            raise VerificationError(exc) from exc
        self.job.verified = not problems
        if problems:
            raise VerificationFailed(problems)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.interrupts.signum and time.monotonic() < deadline:
            time.sleep(min(0.01, seconds))
            if self.line is not None:
                self.line.tick()


def _backup_command(
    job: Job, args: argparse.Namespace, interrupts: Interrupts, pause: float = 0.0
) -> int:
    line = _progress_line(args.progress, job)
    runner = Runner(job, interrupts, line, pause)
    deleted: list[str] = []
    try:
        _pause_for_tests("opening", interrupts)
        interrupts.check()
        result = copy(
            job.source,
            job.dest,
            pages=args.pages,
            progress=runner.progress,
            name=args.schema,
            sleep=args.sleep,
            timeout=args.timeout,
            keep_wal=args.keep_wal,
            verify=runner.verify if job.verify else None,
        )
        _pause_for_tests("done", interrupts)
        interrupts.check()
        if args.keep is not None:
            deleted = rotate(job, args.keep, interrupts)
    except (Interrupted, VerificationFailed, VerificationError, Failure) as exc:
        failure = _failure(exc, job, args)
    except (apsw_backup.Error, OSError) as exc:
        failure = _failure(exc, job, args)
    else:
        if line is not None:
            line.end(line.done_parts(result))
        _report(job, args, result, deleted)
        return EXIT_OK
    if line is not None:
        line.end(line.stopped_parts(_headline(failure)))
    failure.fields.update(_job_fields(job))
    raise failure


def _progress_line(wanted: bool | None, job: Job) -> ProgressLine | None:
    show = wanted if wanted is not None else sys.stderr.isatty()
    return ProgressLine(sys.stderr, job) if show else None


# -- verification ------------------------------------------------------------


def integrity_problems(
    path: str, interrupts: Interrupts, tick: Callable[[], object] | None = None
) -> list[str]:
    """What PRAGMA integrity_check finds wrong with path ([]: nothing).

    The check runs in a worker thread so that a signal interrupts it at once
    (Connection.interrupt); this thread waits, redrawing the progress line.
    The file is opened read-write when it may be, so that SQLite removes the
    -wal/-shm files it makes for a WAL database when the check closes it;
    nothing is written to it.  Raises apsw_backup.Error if it cannot be
    read, Interrupted on a signal.
    """
    writable = os.access(path, os.W_OK) and os.access(
        os.path.dirname(os.path.abspath(path)), os.W_OK
    )
    flags = (
        apsw_backup.SQLITE_OPEN_READWRITE
        if writable
        else apsw_backup.SQLITE_OPEN_READONLY
    )
    conn = apsw_backup.Connection(path, flags)
    outcome: dict[str, Any] = {}

    def wait_for_lock(count: int) -> bool:
        time.sleep(0.01)
        return not interrupts.signum

    def check() -> None:
        _pause_for_tests("verifying", interrupts)
        try:
            outcome["rows"] = conn.execute("PRAGMA integrity_check").fetchall()
        except apsw_backup.Error as exc:
            outcome["error"] = exc

    try:
        conn.set_busy_handler(wait_for_lock)
        worker = threading.Thread(target=check, name=f"{PROG} verify", daemon=True)
        with interrupts.watching(conn):
            worker.start()
            while worker.is_alive():
                worker.join(REDRAW_EVERY)
                if tick is not None:
                    tick()
    finally:
        conn.close(force=True)
    interrupts.check()
    error = outcome.get("error")
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


# -- failures ----------------------------------------------------------------


def _failure(exc: BaseException, job: Job, args: argparse.Namespace) -> Failure:
    """The Failure to report for exc, saying what DEST holds."""
    if isinstance(exc, Failure):
        return exc
    if isinstance(exc, Interrupted):
        state = job.says()
        if job.state() in ("verified", "complete") and job.folder and args.keep:
            state += "; older backups may not all have been deleted (--keep)"
        return Failure(128 + exc.signum, f"interrupted: {state}", exc)
    if isinstance(exc, VerificationFailed):
        failure = Failure(
            EXIT_VERIFY,
            f"verification failed: PRAGMA integrity_check of the copy reported "
            f"{_problems_text(exc.problems)}. The copy holds SOURCE's pages as "
            "they were, so SOURCE is probably damaged too: check it with "
            f"{PROG} verify {shlex.quote(job.source)}. {job.says()}",
            exc,
        )
        failure.fields["integrity"] = exc.problems
        return failure
    if isinstance(exc, VerificationError):
        return Failure(
            EXIT_ERROR,
            f"could not verify the copy: {type(exc.error).__name__}: {exc.error}. "
            f"{job.says()}",
            exc.error,
        )
    return Failure(EXIT_ERROR, f"{_explain(exc, job, args)}. {job.says()}", exc)


def _explain(exc: BaseException, job: Job, args: argparse.Namespace) -> str:
    """exc in the command's terms: SOURCE and DEST, the OS cause, the cure."""
    elapsed = time.monotonic() - job.started
    if isinstance(exc, apsw_backup.BusyError) and (
        args.timeout is not None and elapsed >= args.timeout
    ):
        return _timeout_text(job, args.timeout, elapsed)
    if isinstance(exc, apsw_backup.FullError) or (
        isinstance(exc, (apsw_backup.IOError, OSError)) and _dest_is_full(job)
    ):
        return _full_text(job)
    if isinstance(exc, (apsw_backup.CantOpenError, apsw_backup.ReadOnlyError)):
        found = _path_problem(job)
        if found:
            return found
    if isinstance(exc, FileExistsError):
        return (
            f"another file appeared at DEST {_q(job.dest)} while the copy was "
            "made, and was left alone: run the backup again"
        )
    if isinstance(exc, OSError):
        return f"file system error on {_q(exc.filename or job.dest)}: {_os_cause(exc)}"
    return f"{type(exc).__name__}: {in_cli_terms(str(exc))}"


# copy()'s words for what the command calls SOURCE and DEST, longest first.
CLI_TERMS = [
    ("copy()", "the backup"),
    ("finish()", "finishing the backup"),
    ("the new target", "DEST"),
    ("the target", "DEST"),
    ("the source", "SOURCE"),
    ("target", "DEST"),
]


def in_cli_terms(text: str) -> str:
    """A message of copy() or SQLite in the command's terms (SOURCE, DEST)."""
    for words, ours in CLI_TERMS:
        text = text.replace(words, ours)
    return text


def _path_problem(job: Job) -> str | None:
    """What is wrong with SOURCE or DEST's folder now, if anything is.

    (SOURCE's header is not read: this process may have SQLite connections
    to it by now, e.g. the demo's writer.)
    """
    try:
        _check_source(job.source)
        _check_folder(os.path.dirname(os.path.abspath(job.dest)), "DEST's folder")
    except Failure as found:
        return found.message
    return None


def _timeout_text(job: Job, timeout: float, elapsed: float) -> str:
    causes = []
    if job.waits:
        where = "SOURCE" if not job.existed else "SOURCE or DEST"
        causes.append(
            f"{where} was locked by another connection ({_count(job.waits, 'retry', 'retries')})"
        )
    if job.restarts:
        causes.append(
            f"the copy started again {_count(job.restarts, 'time')} because other "
            "connections wrote to SOURCE"
        )
    cause = "; ".join(causes) or "the time limit passed before the copy was complete"
    copied = (
        f"{job.copied} of {job.total} pages copied"
        if job.total
        else "no page copied yet"
    )
    return (
        f"BusyError: gave up after {elapsed:.2f} s (--timeout {timeout:g}) with "
        f"{copied}: {cause}. Retry later, or with a longer --timeout"
    )


def _dest_is_full(job: Job) -> bool:
    try:
        info = os.statvfs(os.path.dirname(os.path.abspath(job.dest)))
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < max(1, job.total) * max(job.page_size, 512)


def _full_text(job: Job) -> str:
    folder = os.path.dirname(os.path.abspath(job.dest))
    need = job.total * job.page_size
    try:
        info = os.statvfs(folder)
        free = f", {info.f_bavail * info.f_frsize / 1e6:.1f} MB are free"
    except OSError:
        free = ""
    size = f"the copy needs about {need / 1e6:.1f} MB{free}: " if need else ""
    return (
        f"FullError: the file system of DEST's folder {_q(folder)} is full "
        f"(ENOSPC): {size}free some space there, or choose a DEST elsewhere"
    )


def _count(number: int, noun: str, plural: str | None = None) -> str:
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def _headline(failure: Failure) -> str:
    """The first words of a failure's message, for the progress line."""
    if failure.code >= 128:
        return "interrupted"
    if failure.code == EXIT_VERIFY:
        return "verification failed"
    return type(failure.error).__name__ if failure.error is not None else "failed"


def _fail(failure: Failure, as_json: bool) -> int:
    print(f"{PROG}: {failure.message}", file=sys.stderr)
    if as_json:
        _print_json(_failure_object(failure))
    return failure.code


def _error_object(error: BaseException | None, message: str) -> dict[str, Any]:
    return {
        "class": type(error).__name__ if error is not None else "Error",
        "message": message,
        "result": getattr(error, "result", None),
        "extendedresult": getattr(error, "extendedresult", None),
        "errno": getattr(error, "errno", None),
    }


def _failure_object(failure: Failure) -> dict[str, Any]:
    return {
        "ok": False,
        "exit_code": failure.code,
        "error": _error_object(failure.error, failure.message),
        **failure.fields,
    }


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))
    sys.stdout.flush()


def _job_fields(job: Job) -> dict[str, Any]:
    return {
        "source": job.source,
        "dest": job.dest,
        "dest_state": job.state(),
        "pages_copied": job.copied,
        "page_count": job.total,
    }


# -- reporting success -------------------------------------------------------


def _report(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> None:
    if args.json:
        _print_json(_summary(job, args, result, deleted))
        return
    verified = "integrity_check ok" if job.verify else "not verified"
    rotated = f"; deleted {_count(len(deleted), 'older backup')}" if deleted else ""
    print(
        f"{PROG}: copied {job.source} -> {job.dest}: {result.pages} pages "
        f"({result.bytes / 1e6:.1f} MB) in {result.elapsed:.2f} s, "
        f"{_count(result.steps, 'step')}, {_count(result.restarts, 'restart')}"
        f"{', snapshot' if result.snapshot else ''}; {verified}{rotated}"
    )


def _summary(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> dict[str, Any]:
    return {
        "ok": True,
        "exit_code": EXIT_OK,
        "source": job.source,
        "dest": job.dest,
        "dest_state": job.state(),
        "folder": job.folder,
        "schema": args.schema,
        "pages": result.pages,
        "page_size": result.page_size,
        "bytes": result.bytes,
        "steps": result.steps,
        "restarts": result.restarts,
        "waits": result.waits,
        "snapshot": result.snapshot,
        "elapsed": round(result.elapsed, 6),
        "wal_growth": getattr(result, "wal_growth", 0),
        "journal_mode": "wal" if args.keep_wal and _is_wal(job.dest) else "delete",
        "verified": True if job.verify else None,
        "integrity": ["ok"] if job.verify else None,
        "deleted": deleted,
    }


def _is_wal(path: str) -> bool:
    """Whether the file's header says WAL mode (read and write version 2)."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header[18:20] == b"\x02\x02"


# -- the verify command ------------------------------------------------------


def _verify_command(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """apsw-backup verify FILE...: check each; the highest exit code."""
    results = []
    code = EXIT_OK
    for path in args.files:
        item, item_code = _verify_one(path, args, interrupts)
        results.append(item)
        code = max(code, item_code)
        if item_code >= 128:
            break
    if args.json:
        first = next((r for r in results if r["exit_code"] == code), None)
        _print_json(
            {
                "ok": code == EXIT_OK,
                "exit_code": code,
                "error": first["error"] if first and code else None,
                "files": results,
            }
        )
    return code


def _verify_one(
    path: str, args: argparse.Namespace, interrupts: Interrupts
) -> tuple[dict[str, Any], int]:
    """Check one FILE, report it; (its --json item, its exit code)."""
    line = _progress_line(args.progress, Job(path, path, True, True))
    if line is not None:
        line.verifying(f"verifying {path}")
    code, message, error, problems = _outcome_of_check(path, interrupts, line)
    if line is not None:
        line.end([f"verified {path}: ok"] if not code else [f"stopped: {path}"])
    if code:
        print(f"{PROG}: {message}", file=sys.stderr)
    elif not args.json:
        print(f"{PROG}: {message}")
    item = {
        "file": path,
        "exit_code": code,
        "verified": None if problems is None else not problems,
        "integrity": None if problems is None else problems or ["ok"],
        "error": _error_object(error, message) if code else None,
    }
    return item, code


def _outcome_of_check(
    path: str, interrupts: Interrupts, line: ProgressLine | None
) -> tuple[int, str, BaseException | None, list[str] | None]:
    """(exit code, message, error, problems found or None if not checked)."""
    try:
        _check_file(path)
        problems = integrity_problems(path, interrupts, line.tick if line else None)
    except Failure as failure:
        return failure.code, failure.message, failure.error, None
    except Interrupted as stop:
        return 128 + stop.signum, f"interrupted while verifying {_q(path)}", stop, None
    except apsw_backup.Error as exc:
        message = f"cannot verify FILE {_q(path)}: {type(exc).__name__}: {exc}"
        return EXIT_ERROR, message, exc, None
    if problems:
        message = (
            f"verification failed: PRAGMA integrity_check of {_q(path)} reported "
            f"{_problems_text(problems)}"
        )
        return EXIT_VERIFY, message, VerificationFailed(problems), problems
    size = os.path.getsize(path) / 1e6
    return EXIT_OK, f"{path}: integrity_check ok ({size:.1f} MB)", None, []


def _check_file(path: str) -> None:
    try:
        info = os.stat(path)
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the path")
        raise Failure(
            EXIT_ERROR, f"cannot read FILE {_q(path)}: {_os_cause(exc)}: {cure}", exc
        ) from exc
    if not stat.S_ISREG(info.st_mode):
        error = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        raise Failure(
            EXIT_ERROR,
            f"FILE {_q(path)} is not a regular file: name a backup file",
            error,
        )


# -- the progress line -------------------------------------------------------


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal stream writes to, asked afresh each time
    (the user may resize it): $COLUMNS if set, else the terminal's, else
    shutil's answer (80 when there is no terminal)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    if columns <= 0:
        columns = shutil.get_terminal_size().columns
    return max(columns, 1)


def fit(forms: list[list[str]], width: int) -> str:
    """The first of forms (the same parts, each form terser than the one
    before) whose parts, joined by two spaces, make a line shorter than
    width (a line as long as the terminal may wrap); else the tersest form
    with its last parts left out, cut at the width at worst."""
    for parts in forms:
        text = "  ".join(parts)
        if len(text) < width:
            return text
    parts = forms[-1]
    while len(parts) > 1 and len("  ".join(parts)) >= width:
        parts = parts[:-1]
    text = "  ".join(parts)
    return text if len(text) < width else text[: max(0, width - 1)]


class ProgressLine:
    """The progress line on stderr: the phase (copying, waiting for a lock,
    restarted N times, verifying), percent, pages, MB/s, ETA.

    Redrawn in place at most every REDRAW_EVERY seconds, and at once when the
    phase changes; fitted to the terminal's width at every redraw, so that it
    never wraps (a wrapped line cannot be redrawn in place: each redraw would
    leave a stale line above).  end() draws the final line and ends it.
    """

    def __init__(
        self, stream: TextIO, job: Job, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._job = job
        self._clock = clock
        self._start = clock()
        self._drawn_at = -math.inf
        self._width = 0  # characters drawn by the last redraw
        self._phase = "starting"
        self._since = self._start  # when the phase began
        self._label = "verifying"
        self._copying_since = 0.0  # when the first pages were copied

    def step(self, status: int) -> None:
        """After a step: redraw (the job has taken the step in)."""
        if not self._copying_since and self._job.copied:
            self._copying_since = self._clock()
        if status == apsw_backup.SQLITE_DONE:
            self._set("copied")
        elif _locked(status):
            self._set("waiting")
        else:
            self._set("copying")

    def verifying(self, label: str = "verifying") -> None:
        """The verify phase begins."""
        self._label = label
        self._set("verifying")

    def tick(self) -> None:
        """Redraw if it is time (the clocks in the line move on)."""
        if self._clock() - self._drawn_at >= REDRAW_EVERY:
            self._draw(self.parts())

    def _set(self, phase: str) -> None:
        if phase == self._phase:
            self.tick()
            return
        self._phase, self._since = phase, self._clock()
        self._draw(self.parts())

    def parts(self) -> list[str]:
        """The line as it stands, most important part first."""
        job, now = self._job, self._clock()
        in_phase = now - self._since
        if self._phase == "verifying":
            return [f"{self._label} {in_phase:.1f} s"]
        done = self._phase == "copied"
        percent = 100.0 if done else 100.0 * job.copied / job.total if job.total else 0
        phase = {
            "waiting": f"waiting for a lock {in_phase:.1f} s",
            "copied": "copied",
        }.get(self._phase, "copying")
        if job.restarts:
            phase += f" (restarted {_count(job.restarts, 'time')})"
        if not job.total and not done:
            return [phase]  # no step has got far enough to count the pages
        parts = [phase, f"{percent:.1f}%", f"{job.copied}/{job.total} pages"]
        if self._phase != "waiting":
            parts += self._speed(now)
        return parts

    def terse(self, parts: list[str]) -> list[str]:
        """parts in fewer words, for a narrow terminal."""
        words = {" (restarted ": ", ", " times)": " restarts", " time)": " restart"}
        terse = []
        for part in parts:
            for long, short in words.items():
                part = part.replace(long, short)
            terse.append(part.removesuffix(" pages"))
        if terse and terse[0].startswith("waiting for a lock "):
            terse[0] = "lock wait " + terse[0].removeprefix("waiting for a lock ")
        return terse

    def _speed(self, now: float) -> list[str]:
        job = self._job
        done = self._phase == "copied"
        parts = []
        # The rate since the first pages were copied (a lock wait before
        # them would make it look slow); too early to tell from one step.
        elapsed = now - (self._copying_since or now)
        rate = job.written / elapsed if elapsed >= REDRAW_EVERY else 0.0
        if job.page_size and rate:
            parts.append(f"{rate * job.page_size / 1e6:.1f} MB/s")
        if not done:
            left = job.total - job.copied
            parts.append(f"ETA {_duration(left / rate) if rate else '--'}")
        return parts

    def done_parts(self, result: CopyResult) -> list[str]:
        """The final line of a backup that succeeded."""
        return [
            f"done: {result.pages} pages ({result.bytes / 1e6:.1f} MB)",
            "verified" if self._job.verify else "not verified",
            f"{result.elapsed:.2f} s",
            _count(result.restarts, "restart"),
        ]

    def stopped_parts(self, why: str) -> list[str]:
        """The final line of a backup that failed or was interrupted."""
        job = self._job
        if not job.total:
            return [f"stopped: {why}"]
        return [f"stopped: {why}", f"{job.copied}/{job.total} pages"]

    def _draw(self, parts: list[str]) -> None:
        self._drawn_at = self._clock()
        width = terminal_columns(self._stream)
        line = fit([parts, self.terse(parts)], width)
        # Blank out what is left of a longer previous line, within the width,
        # and the two columns after it, where the terminal echoes "^C".
        self._stream.write("\r" + line.ljust(min(self._width + 2, width - 1)))
        self._stream.flush()
        self._width = len(line)

    def end(self, parts: list[str]) -> None:
        """Draw the final line and end it."""
        self._draw(parts)
        self._stream.write("\n")
        self._stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


# -- the demo ------------------------------------------------------------------

DEMO_PAUSE = 0.03  # seconds the demo waits after each step, so it can be watched


def _demo(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Back up a sample database while another connection keeps writing to it.

    The files are made in a new folder in the current one (or the temporary
    folder, if the current one is not writable) and left there.
    """
    if os.access(".", os.W_OK):
        folder = os.path.relpath(tempfile.mkdtemp(prefix="apsw-backup-demo-", dir="."))
    else:
        folder = tempfile.mkdtemp(prefix="apsw-backup-demo-")
    source = os.path.join(folder, "live.db")
    make_sample(source)
    args.source, args.dest = source, os.path.join(folder, "backups") + os.sep
    os.mkdir(args.dest)
    if args.pages == 256:
        args.pages = 48  # small steps, so that the copy is seen to move
    job = _plan(args)
    _say(
        f"backing up {source} (WAL, {os.path.getsize(source) / 1e6:.1f} MB) into "
        f"{args.dest} while another connection commits every 2 ms; it pauses "
        f"{DEMO_PAUSE * 1000:.0f} ms after each step of {args.pages} pages so "
        "that you can watch"
    )
    writer = Writer(source)
    writer.start()
    try:
        return _backup_command(job, args, interrupts, pause=DEMO_PAUSE)
    finally:
        writer.stop()
        _say(f"the writer committed {writer.commits} times meanwhile")
        _demo_epilogue(folder, job)


def _say(text: str) -> None:
    print(f"{PROG} --demo: {text}", file=sys.stderr)


def _demo_epilogue(folder: str, job: Job) -> None:
    kept = [f"{folder}{os.sep}live.db (the sample)"]
    if os.path.exists(job.dest):
        kept.append(f"{job.dest} (its backup)")
    print(
        f"{PROG} --demo: the files are kept in {folder}: {', '.join(kept)}. "
        f"Check the backup again with: {PROG} verify {shlex.quote(job.dest)}; "
        f"delete the folder when done: rm -r {shlex.quote(folder)}",
        file=sys.stderr,
    )


def make_sample(path: str, rows: int = 30_000) -> None:
    """A WAL database of about 15 MB: table events(id, at, payload)."""
    conn = apsw_backup.Connection(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        conn.execute(
            "CREATE TABLE events(id INTEGER PRIMARY KEY, at REAL, payload BLOB)"
        )
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
            "WHERE i < ?) INSERT INTO events(at, payload) "
            "SELECT i, randomblob(400) FROM n",
            (rows,),
        )
    finally:
        conn.close()


class Writer:
    """A thread committing a small write every few ms, as a live app would."""

    def __init__(self, path: str, every: float = 0.002) -> None:
        self.commits = 0
        self._path = path
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer", daemon=True)

    def start(self) -> None:
        """Start writing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop writing, and wait (a bounded time) for the last commit."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = apsw_backup.Connection(self._path)
        conn.set_busy_timeout(5000)
        try:
            while not self._stop.wait(self._every):
                conn.execute(
                    "INSERT INTO events(at, payload) VALUES (?, randomblob(64))",
                    (time.time(),),
                )
                self.commits += 1
        finally:
            conn.close()
