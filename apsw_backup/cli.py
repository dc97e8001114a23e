"""The apsw-backup command: back up a live SQLite database from the shell.

    apsw-backup [options] SOURCE DEST
    python -m apsw_backup [options] SOURCE DEST
    apsw-backup --demo

The copy is made by copy() (online: other connections keep using SOURCE),
then checked with PRAGMA integrity_check.  Exit codes: 0 ok, 1 SQLite or
backup error, 2 usage error or refusal, 3 verification failed, 130
interrupted (DEST left as it was).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

import apsw_backup
from apsw_backup._apsw_backup import __version__
from apsw_backup.copy import CopyResult, copy

PROG = "apsw-backup"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
REDRAW_EVERY = 0.1  # seconds between two redraws of the progress line
SIDE_FILES = ("-journal", "-wal", "-shm")

EPILOG = """\
exit codes: 0 ok, 1 SQLite or backup error, 2 usage error or refusal,
3 verification failed, 130 interrupted (DEST left as it was)"""


class Refusal(Exception):
    """A request the command refuses to carry out (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with argv (default: sys.argv[1:]); the exit code."""
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _demo(args) if args.demo else _backup(args.source, args.dest, args)
    except Refusal as exc:
        return _fail(EXIT_USAGE, str(exc))
    except (apsw_backup.Error, OSError) as exc:
        return _fail(EXIT_ERROR, f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted: DEST was left as it was")


def _fail(code: int, message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Online backup of a live SQLite database, verified.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("source", nargs="?", metavar="SOURCE", help="database to back up")
    add("dest", nargs="?", metavar="DEST", help="file to write the copy to")
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
        help="seconds between retries while the database is locked (0.25)",
    )
    add(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up after S seconds (default: no limit)",
    )
    add("--schema", default="main", metavar="NAME", help="schema of SOURCE (main)")
    add("--overwrite", action="store_true", help="replace a non-empty DEST")
    add("--no-verify", action="store_true", help="skip PRAGMA integrity_check")
    add("--json", action="store_true", help="print a JSON summary on stdout")
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
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.demo and (args.source or args.dest):
        parser.error("--demo takes no SOURCE or DEST")
    if not args.demo and not (args.source and args.dest):
        parser.error("SOURCE and DEST are required (or try --demo)")
    return args


def _backup(source: str, dest: str, args: argparse.Namespace) -> int:
    """Copy source to dest, verify, report; a new dest is removed on failure."""
    existed = _check_dest(source, dest, args.overwrite)
    try:
        result = _copy(source, dest, args)
        problems = None if args.no_verify else _verify(dest)
    except BaseException:
        if not existed:
            _remove(dest)
        raise
    _report(source, dest, args, result, problems)
    if problems:
        return _fail(EXIT_VERIFY, _verify_message(dest, problems))
    return EXIT_OK


def _check_dest(source: str, dest: str, overwrite: bool) -> bool:
    """Refuse a dest that must not be written; whether dest exists."""
    if os.path.isdir(dest):
        raise Refusal(f"DEST {dest!r} is a directory: give the copy a file name")
    if not os.path.exists(dest):
        return False
    if os.path.exists(source) and os.path.samefile(source, dest):
        raise Refusal(f"SOURCE and DEST are the same file ({dest!r})")
    if os.path.getsize(dest) and not overwrite:
        raise Refusal(
            f"DEST {dest!r} exists and is not empty: pass --overwrite to replace "
            "it (it is replaced only once the copy is complete)"
        )
    return True


def _remove(dest: str) -> None:
    for path in (dest, *(dest + suffix for suffix in SIDE_FILES)):
        if os.path.exists(path):
            os.remove(path)


def _copy(source: str, dest: str, args: argparse.Namespace) -> CopyResult:
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    line = ProgressLine(sys.stderr, header_page_size(source)) if show else None
    try:
        return copy(
            source,
            dest,
            pages=args.pages,
            progress=line,
            name=args.schema,
            sleep=args.sleep,
            timeout=args.timeout,
        )
    finally:
        if line is not None:
            line.end()


def _verify(dest: str) -> list[str]:
    """What PRAGMA integrity_check finds wrong with dest ([]: nothing)."""
    conn = apsw_backup.Connection(dest, apsw_backup.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except (apsw_backup.CorruptError, apsw_backup.NotADBError) as exc:
        return [str(exc)]
    finally:
        conn.close()
    found = [str(row[0]) for row in rows]
    return [] if found == ["ok"] else found


def _verify_message(dest: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:5])
    if len(problems) > 5:
        shown += f"; and {len(problems) - 5} more"
    return (
        f"verification failed: PRAGMA integrity_check on {dest!r} reported "
        f"{len(problems)} problem(s): {shown}. The copy is page for page the "
        "same as SOURCE, so SOURCE is damaged too; DEST was kept for inspection"
    )


def _report(
    source: str,
    dest: str,
    args: argparse.Namespace,
    result: CopyResult,
    problems: list[str] | None,
) -> None:
    if args.json:
        print(json.dumps(_summary(source, dest, args.schema, result, problems)))
        return
    verified = {None: "not verified", True: "integrity_check ok"}
    print(
        f"{PROG}: copied {source} -> {dest}: {result.pages} pages "
        f"({result.bytes / 1e6:.1f} MB) in {result.elapsed:.2f} s, "
        f"{_count(result.steps, 'step')}, {_count(result.restarts, 'restart')}"
        f"{', snapshot' if result.snapshot else ''}; "
        f"{verified.get(_verified(problems), 'integrity_check FAILED')}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _verified(problems: list[str] | None) -> bool | None:
    return None if problems is None else not problems


def _summary(
    source: str,
    dest: str,
    schema: str,
    result: CopyResult,
    problems: list[str] | None,
) -> dict[str, Any]:
    return {
        "source": source,
        "dest": dest,
        "schema": schema,
        "pages": result.pages,
        "page_size": result.page_size,
        "bytes": result.bytes,
        "steps": result.steps,
        "restarts": result.restarts,
        "waits": result.waits,
        "snapshot": result.snapshot,
        "elapsed": round(result.elapsed, 6),
        "verified": _verified(problems),
        "integrity": problems if problems else (None if problems is None else ["ok"]),
    }


def header_page_size(path: str) -> int:
    """The page size in a database file's header (0 when it cannot be read).

    Read from the file, because asking SQLite needs a lock that a busy
    database may not give.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except OSError:
        return 0
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return 0
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


class ProgressLine:
    """The progress line: percent, pages, MB/s, ETA, redrawn in place.

    Called as copy()'s progress callback; draws at most once every
    REDRAW_EVERY seconds, and always after the last step.
    """

    def __init__(self, stream: TextIO, page_size: int) -> None:
        self._stream = stream
        self._page_size = page_size
        self._start = time.monotonic()
        self._drawn_at = -math.inf
        self._width = 0
        self._copied = 0  # pages copied as of the last step
        self._written = 0  # pages written so far, restarts included

    def __call__(self, status: int, remaining: int, total: int) -> None:
        copied = total - remaining
        self._written += max(0, copied - self._copied)
        self._copied = copied
        now = time.monotonic()
        if status != apsw_backup.SQLITE_DONE and now - self._drawn_at < REDRAW_EVERY:
            return
        self._drawn_at = now
        self._draw(self.text(status, remaining, total, now - self._start))

    def text(self, status: int, remaining: int, total: int, elapsed: float) -> str:
        """The line for a step's (status, remaining, total) after elapsed s."""
        done = status == apsw_backup.SQLITE_DONE
        percent = (
            100.0 if done else 100.0 * (total - remaining) / total if total else 0.0
        )
        rate = self._written / elapsed if elapsed > 0 else 0.0
        parts = [f"{percent:5.1f}%", f"{total - remaining}/{total} pages"]
        if self._page_size:
            parts.append(f"{rate * self._page_size / 1e6:.1f} MB/s")
        parts.append(f"ETA {_duration(remaining / rate) if rate else '--'}")
        if status & 0xFF in (apsw_backup.SQLITE_BUSY, apsw_backup.SQLITE_LOCKED):
            parts.append("(database locked: waiting)")
        return "  ".join(parts)

    def _draw(self, text: str) -> None:
        self._stream.write("\r" + text.ljust(self._width))
        self._stream.flush()
        self._width = len(text)

    def end(self) -> None:
        """End the line, if anything was drawn."""
        if self._width:
            self._stream.write("\n")
            self._stream.flush()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _demo(args: argparse.Namespace) -> int:
    """Back up a sample database while another connection keeps writing to it."""
    with tempfile.TemporaryDirectory(prefix="apsw-backup-demo-") as folder:
        source = os.path.join(folder, "live.db")
        make_sample(source)
        print(
            f"{PROG} --demo: backing up {source} (WAL mode) while another "
            "connection commits a small write every few milliseconds",
            file=sys.stderr,
        )
        writer = Writer(source)
        writer.start()
        try:
            code = _backup(source, os.path.join(folder, "copy.db"), args)
        finally:
            writer.stop()
        print(
            f"{PROG} --demo: the writer committed {writer.commits} times while the "
            "copy was made and checked",
            file=sys.stderr,
        )
    return code


def make_sample(path: str, rows: int = 40_000) -> None:
    """A WAL database of about 20 MB: table events(id, at, payload)."""
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
