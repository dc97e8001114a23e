"""apsw-backup verify FILE...: check existing backups."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time
from typing import Any

import apsw_backup
from apsw_backup import files
from apsw_backup.cli import output
from apsw_backup.cli.arguments import VERIFY_LOCK_WAIT
from apsw_backup.cli.errors import (
    CURES,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_VERIFY,
    PROG,
    Failure,
    _os_cause,
    _q,
)
from apsw_backup.cli.failures import _busy, _error_object
from apsw_backup.cli.open_problems import open_problem
from apsw_backup.cli.plan import Job
from apsw_backup.cli.progress import _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts
from apsw_backup.cli.summary import _print_json
from apsw_backup.cli.verification import (
    Ticker,
    VerificationFailed,
    VerificationIncomplete,
    failed_message,
    incomplete_message,
)
from apsw_backup.verify import VerifyResult, raise_for, verify


def _verify_command(args: argparse.Namespace, interrupts: Interrupts) -> int:
    """apsw-backup verify FILE...: check each; the highest exit code."""
    results = []
    code = EXIT_OK
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    for path in args.files:
        item, item_code = _verify_one(path, args, interrupts, deadline)
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
                # the keys of verify FOLDER too (docs/incremental.md): one
                # shape for the verb; FILEs are plain backups, no chains
                "path": None,
                "files": results,
                "chains": [],
            }
        )
    return code


def _verify_one(
    path: str,
    args: argparse.Namespace,
    interrupts: Interrupts,
    deadline: float | None = None,
) -> tuple[dict[str, Any], int]:
    """Check one FILE, report it; (its --json item, its exit code)."""
    line = _progress_line(args.progress, Job(path, path, True, True))
    ticker = Ticker(interrupts, line, f"verifying {path}")
    shm = os.path.realpath(path) + "-shm"
    had_shm = os.path.lexists(shm)
    code, message, error, problems, result = _outcome_of_check(
        path, args.level, ticker, deadline
    )
    if not had_shm and os.path.lexists(shm):
        # The read-only connections made it to read FILE's -wal, and the
        # library leaves it when the -wal was there: remove it unless a
        # connection (of another process) now uses it.
        files.remove_unused_shm(path)
    if line is not None:
        line.end([f"verified {path}: ok"] if not code else [f"stopped: {path}"])
    if code:
        output.err(f"{PROG}: {message}")
    elif not args.json:
        output.out(f"{PROG}: {message}")
    item = {
        "file": path,
        "exit_code": code,
        "verified": None if problems is None else not problems,
        "integrity": None if problems is None else problems or ["ok"],
        "verification": result.to_json() if result is not None else None,
        "error": _error_object(error, message) if code else None,
    }
    return item, code


def _outcome_of_check(
    path: str,
    level: str,
    ticker: Ticker,
    deadline: float | None = None,
) -> tuple[int, str, BaseException | None, list[str] | None, VerifyResult | None]:
    """(exit code, message, error, problems found or None if not checked,
    the verification's result or None)."""
    try:
        size = _check_file(path)
        if not size:
            empty = ["the file is empty (0 bytes): it is not a backup"]
            message = (
                f"verification failed: FILE {_q(path)} is empty (0 bytes): SQLite "
                "would take it for an empty database, but it holds no backup"
            )
            return EXIT_VERIFY, message, _empty(empty), empty, None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = raise_for(
            verify(
                path,
                level,
                progress=ticker,
                timeout=timeout,
                lock_wait=VERIFY_LOCK_WAIT,
            )
        )
    except Failure as failure:
        return failure.code, failure.message, failure.error, None, None
    except Interrupted as stop:
        message = f"interrupted while verifying {_q(path)}"
        return 128 + stop.signum, message, stop, None, None
    except VerificationFailed as exc:
        message = failed_message(exc, f"FILE {_q(path)}", None)
        return EXIT_VERIFY, message, exc, exc.problems, exc.verification
    except VerificationIncomplete as exc:
        outcome = exc.verification
        if outcome.timed_out or outcome.locked:
            cure = (
                "end the other connection's long transaction, or retry later"
                if outcome.locked
                else "retry with a longer --timeout"
            )
            message = f"cannot verify FILE {_q(path)}: {exc.reason}: {cure}"
            return EXIT_ERROR, message, _busy(exc.reason), None, outcome
        error = exc.error
        if isinstance(error, apsw_backup.Error):
            message = (
                f"cannot verify FILE {_q(path)}: {open_problem(path, error, 'FILE')}"
            )
        else:
            message = incomplete_message(exc, f"FILE {_q(path)}")
        return EXIT_ERROR, message, error or exc, None, outcome
    message = f"{path}: {result.summary()} ({level}, {size / 1e6:.1f} MB)"
    return EXIT_OK, message, None, [], result


def _empty(problems: list[str]) -> VerificationFailed:
    """The VerificationFailed of an empty FILE (no check ran)."""
    from apsw_backup.verify import PROBLEMS, Problem

    found = [Problem("file", p) for p in problems]
    return VerificationFailed(
        problems[0], VerifyResult(PROBLEMS, "none", found, [], 0.0)
    )


def _check_file(path: str) -> int:
    """FILE's size; Failure if it is not a regular file that can be read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the path")
        raise Failure(
            EXIT_ERROR, f"cannot read FILE {_q(path)}: {_os_cause(exc)}: {cure}", exc
        ) from exc
    if stat.S_ISDIR(info.st_mode):
        error: OSError = IsADirectoryError(
            errno.EISDIR, os.strerror(errno.EISDIR), path
        )
        what = "a folder"
    elif not stat.S_ISREG(info.st_mode):
        # a FIFO, a device, a socket: the words and errno the backup's
        # SOURCE has for it (files.py), not a folder's
        error = OSError(errno.EINVAL, "not a regular file", path)
        what = "not a regular file (a FIFO, a device or a socket)"
    if not stat.S_ISREG(info.st_mode):
        raise Failure(
            EXIT_ERROR,
            f"FILE {_q(path)} is {what}: name a backup file",
            error,
        )
    return info.st_size
