"""apsw-backup --demo: back up a sample database while it is written to."""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile
import threading
import time

import apsw_backup
from apsw_backup.cli import output
from apsw_backup.cli.errors import EXIT_USAGE, PROG, Failure
from apsw_backup.cli.plan import Job, _plan
from apsw_backup.cli.run import _backup_command
from apsw_backup.cli.signals import Interrupts

DEMO_PAUSE = 0.03  # seconds the demo waits after each step, so it can be watched


def _demo(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """Back up a sample database while another connection keeps writing to it.

    The files are made in a new folder under the one given (--demo FOLDER),
    else under the system's temporary folder (tempfile.gettempdir(): $TMPDIR,
    else /tmp), never in the current one, and left there; it says where.
    """
    folder = _demo_folder(None if args.demo is True else args.demo)
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


def _demo_folder(parent: str | None) -> str:
    """A new folder for the demo's files under parent (None: the temp folder)."""
    where = tempfile.gettempdir() if parent is None else parent
    try:
        return tempfile.mkdtemp(prefix="apsw-backup-demo-", dir=where)
    except OSError as error:
        reason = error.strerror or str(error)
        raise Failure(
            EXIT_USAGE,
            f"--demo cannot make its folder under {where!r}: {reason}. "
            "Give a folder you can write to: --demo FOLDER",
            error,
        ) from error


def _say(text: str) -> None:
    output.err(f"{PROG} --demo: {text}")


def _demo_epilogue(folder: str, job: Job) -> None:
    kept = [f"{folder}{os.sep}live.db (the sample)"]
    if os.path.exists(job.dest):
        kept.append(f"{job.dest} (its backup)")
    output.err(
        f"{PROG} --demo: the files are kept in {folder}: {', '.join(kept)}. "
        f"Check the backup again with: {PROG} verify {shlex.quote(job.dest)}; "
        f"delete the folder when done: rm -r {shlex.quote(folder)}"
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
