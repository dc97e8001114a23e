"""The command line: options, their checks, and the help text."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from apsw_backup._apsw_backup import __version__
from apsw_backup.cli.errors import EXIT_USAGE, PROG, Failure, UsageError
from apsw_backup.cli.verification import LEVELS_HELP

LEVELS = ("default", "full", "none")

EPILOG = f"""\
DEST may be an existing folder (or end with /): the copy is then named
<SOURCE stem>-<UTC timestamp>.db in it, marked as SOURCE's backup (extended
attribute user.apsw_backup.source), and --keep N deletes SOURCE's backups
older than the new one so that N remain, once the new one is verified: only
files of that name pattern that carry SOURCE's mark, never a backup dated
later than now (kept and reported), under a lock on the folder so that runs
that overlap never delete each other's new backups.

exit codes (the message, and "dest_state" in --json, say what DEST holds):
  0    the backup is complete (and verified, unless --no-verify)
  1    SQLite, file system or backup error, or the copy could not be
       verified (a read error, a lock, --timeout)
  2    usage error or refusal: nothing was written
  3    verification failed (the message names the pages): a new DEST was
       not created; an existing DEST holds the copy that failed verification
  130  interrupted by Ctrl-C (SIGINT), 143 by SIGTERM; then DEST holds what
       the message says:
       "DEST was not created" / "DEST was left as it was" (nothing changed),
       "DEST holds the complete copy, but it was not verified",
       "DEST holds the complete, verified copy"
The exit status is always the printed exit code; with --json, one JSON
object says it, and what DEST holds ("dest_state"), for every outcome;
DEST may also be "incomplete" (its -journal restores it: keep that file)
or hold "another file" that appeared there meanwhile (left alone).
--timeout bounds the whole run, verification included.

{LEVELS_HELP}

apsw-backup verify [--level default|full] [--json] [--timeout S] FILE... checks
existing backups (exit 0, 1, 3); a stored file has no page hashes: default is
then quick_check alone, and full (integrity_check, in threads) is the default.

restore points (docs/incremental.md):
  apsw-backup --incremental SOURCE FOLDER/ [--keep N] [--max-chain N]
  apsw-backup restore BACKUP DEST [--at TIMESTAMP] [--overwrite]
  apsw-backup list FOLDER
  apsw-backup verify FOLDER..."""

VERIFY_EPILOG = """\
levels: full (the default) runs PRAGMA integrity_check split by table over
threads, one per CPU: it proves every b-tree, index, UNIQUE, CHECK and NOT
NULL constraint sound.  default runs PRAGMA quick_check only (a stored file
has no page hashes to compare): it misses an index that disagrees with its
table and CHECK constraints.

FILE is only read: it is opened read-only, so a -wal beside it is neither
applied to it nor deleted.  An empty (0-byte) file is not a backup: it fails.

exit codes: 0 every FILE passed, 1 a FILE could not be read (or --timeout
passed), 3 a FILE failed verification (the highest applies), 130 interrupted
(SIGINT), 143 SIGTERM."""

VERIFY_LOCK_WAIT = 60.0  # seconds verify waits for a lock without --timeout


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
        type=_pages,
        default=256,
        metavar="N",
        help="pages per step (256; <= 0: all at once)",
    )
    add(
        "--sleep",
        type=_sleep_seconds,
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
    add(
        "--verify",
        choices=LEVELS,
        default=None,
        metavar="LEVEL",
        help="default: re-read every page from the disk against its hash + "
        "PRAGMA quick_check; full: also PRAGMA integrity_check, by table in "
        "threads; none: no check (see the table below)",
    )
    add("--no-verify", action="store_true", help="--verify none")
    add("--json", action="store_true", help="print one JSON object on stdout")
    add(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    add(
        "--demo",
        nargs="?",
        const=True,
        default=None,
        metavar="FOLDER",
        help="back up a sample database that another connection keeps writing "
        "to, in a new folder under FOLDER (default: the system's temporary "
        "folder); says where",
    )
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser  # fmt: skip


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finite number of seconds >= 0"
        )
    return value


def _sleep_seconds(text: str) -> float:
    """--sleep: seconds from 0 to copy()'s SLEEP_MAX (an hour)."""
    from apsw_backup.copy import SLEEP_MAX

    value = _seconds(text)
    if value > SLEEP_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {SLEEP_MAX:g} seconds (the longest wait "
            "between retries)"
        )
    return value


PAGES_MAX = 2**31 - 1  # SQLite takes the pages per step as a C int


def _pages(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of pages"
        ) from None
    if value > PAGES_MAX:
        raise argparse.ArgumentTypeError(
            f"{text} pages per step is more than {PAGES_MAX}, the most SQLite "
            "takes: give a smaller number, or 0 to copy everything in one step"
        )
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
    if args.no_verify and args.verify not in (None, "none"):
        parser.error(f"--no-verify contradicts --verify {args.verify}: give one")
    args.verify = "none" if args.no_verify else args.verify or "default"
    args.no_verify = args.verify == "none"
    if args.keep is not None and args.no_verify:
        parser.error(
            "--keep deletes older backups only once the new one is verified: "
            "it cannot be used with --no-verify (--verify none)"
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
    parser.add_argument(
        "--level",
        "--verify",
        dest="level",
        choices=LEVELS[:2],
        default="full",
        help="full (default): PRAGMA integrity_check, by table in threads; "
        "default: PRAGMA quick_check only",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up after S seconds, all FILEs together (default: no limit "
        f"for the check itself; a lock is waited for {VERIFY_LOCK_WAIT:g} s at most)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress line on stderr (default: when stderr is a terminal)",
    )
    return parser.parse_args(argv)
