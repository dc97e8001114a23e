"""apsw-backup verify FILE...: check existing backups."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import Any

import apsw_backup
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
from apsw_backup.cli.failures import _error_object
from apsw_backup.cli.plan import Job
from apsw_backup.cli.progress import _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts
from apsw_backup.cli.summary import _print_json
from apsw_backup.cli.verification import (
    Ticker,
    VerificationError,
    VerificationFailed,
    VerificationIncomplete,
    failed_message,
    incomplete_message,
    size_mb,
)
from apsw_backup.verify import raise_for, verify


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
    ticker = Ticker(interrupts, line, f"verifying {path}")
    code, message, error, problems, result = _outcome_of_check(path, args.level, ticker)
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
        "verification": result,
        "error": _error_object(error, message) if code else None,
    }
    return item, code


def _outcome_of_check(
    path: str, level: str, ticker: Ticker
) -> tuple[int, str, BaseException | None, list[str] | None, Any]:
    """(exit code, message, error, problems found or None if not checked,
    the checks' JSON or None)."""
    try:
        _check_file(path)
        result = raise_for(verify(path, level, progress=ticker))
    except Failure as failure:
        return failure.code, failure.message, failure.error, None, None
    except Interrupted as stop:
        message = f"interrupted while verifying {_q(path)}"
        return 128 + stop.signum, message, stop, None, None
    except VerificationFailed as exc:
        message = failed_message(exc, f"FILE {_q(path)}", None)
        return EXIT_VERIFY, message, exc, exc.problems, exc.verification.to_json()
    except VerificationIncomplete as exc:
        message = incomplete_message(exc, f"FILE {_q(path)}")
        return EXIT_ERROR, message, exc.error or exc, None, exc.verification.to_json()
    except (apsw_backup.Error, VerificationError) as exc:
        message = f"cannot verify FILE {_q(path)}: {type(exc).__name__}: {exc}"
        return EXIT_ERROR, message, exc, None, None
    message = f"{path}: {result.summary()} ({level}, {size_mb(path)})"
    return EXIT_OK, message, None, [], result.to_json()


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
