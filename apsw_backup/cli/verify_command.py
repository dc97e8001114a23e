"""apsw-backup verify FILE...: check existing backups."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time
from typing import Any

import apsw_backup
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
from apsw_backup.cli.progress import ProgressLine, _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts
from apsw_backup.cli.summary import _print_json
from apsw_backup.cli.verification import (
    VerificationFailed,
    VerificationTimeout,
    _problems_text,
    integrity_problems,
)


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
                "files": results,
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
    if line is not None:
        line.verifying(f"verifying {path}")
    code, message, error, problems = _outcome_of_check(path, interrupts, line, deadline)
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
        "error": _error_object(error, message) if code else None,
    }
    return item, code


def _outcome_of_check(
    path: str,
    interrupts: Interrupts,
    line: ProgressLine | None,
    deadline: float | None = None,
) -> tuple[int, str, BaseException | None, list[str] | None]:
    """(exit code, message, error, problems found or None if not checked)."""
    try:
        size = _check_file(path)
        if not size:
            empty = ["the file is empty (0 bytes): it is not a backup"]
            message = (
                f"verification failed: FILE {_q(path)} is empty (0 bytes): SQLite "
                "would take it for an empty database, but it holds no backup"
            )
            return EXIT_VERIFY, message, VerificationFailed(empty), empty
        problems = integrity_problems(
            path,
            interrupts,
            line.tick if line else None,
            deadline,
            lock_wait=VERIFY_LOCK_WAIT,
        )
    except Failure as failure:
        return failure.code, failure.message, failure.error, None
    except Interrupted as stop:
        return 128 + stop.signum, f"interrupted while verifying {_q(path)}", stop, None
    except VerificationTimeout as exc:
        cure = (
            "end the other connection's long transaction, or retry later"
            if exc.locked
            else "retry with a longer --timeout"
        )
        message = f"cannot verify FILE {_q(path)}: {exc}: {cure}"
        return EXIT_ERROR, message, _busy(str(exc)), None
    except apsw_backup.Error as exc:
        message = f"cannot verify FILE {_q(path)}: {open_problem(path, exc, 'FILE')}"
        return EXIT_ERROR, message, exc, None
    if problems:
        message = (
            f"verification failed: PRAGMA integrity_check of {_q(path)} reported "
            f"{_problems_text(problems)}"
        )
        return EXIT_VERIFY, message, VerificationFailed(problems), problems
    return EXIT_OK, f"{path}: integrity_check ok ({size / 1e6:.1f} MB)", None, []


def _check_file(path: str) -> int:
    """FILE's size; Failure if it is not a regular file that can be read."""
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
    return info.st_size
