"""Failures: what to report, in the command's terms, saying what DEST holds."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import apsw_backup
from apsw_backup import files
from apsw_backup.cli import output
from apsw_backup.cli.errors import (
    EXIT_ERROR,
    EXIT_VERIFY,
    PROG,
    Failure,
    _os_cause,
    _q,
    gave_up_words,
    in_our_words,
)
from apsw_backup.cli.open_problems import cause_of, path_too_long
from apsw_backup.cli.plan import Job, _check_folder, _check_source
from apsw_backup.cli.signals import Interrupted
from apsw_backup.cli.summary import _print_json
from apsw_backup.cli.verification import (
    VerificationFailed,
    VerificationIncomplete,
    failed_message,
    incomplete_message,
)


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
        job.verified = False
        message = failed_message(exc, "the copy", job.source)
        failure = Failure(EXIT_VERIFY, f"{message}. {job.says()}", exc)
        failure.fields["integrity"] = exc.problems
        failure.fields["verification"] = exc.verification.to_json()
        return failure
    if isinstance(exc, VerificationIncomplete) and exc.verification.timed_out:
        timeout = f" (--timeout {args.timeout:g})" if args.timeout is not None else ""
        failure = Failure(
            EXIT_ERROR,
            f"BusyError: gave up verifying: {exc.reason}{timeout}, so the copy "
            "was not verified. Retry later, or with a longer --timeout"
            + (
                ": end the other connection's long transaction on DEST first"
                if exc.verification.locked
                else ""
            )
            + f". {job.says()}",
            _busy(exc.reason),
        )
        failure.fields["verification"] = exc.verification.to_json()
        return failure
    if isinstance(exc, VerificationIncomplete):
        failure = Failure(
            EXIT_ERROR,
            f"{incomplete_message(exc, 'the copy')}. {job.says()}",
            exc.error or exc,
        )
        failure.fields["verification"] = exc.verification.to_json()
        return failure
    return Failure(EXIT_ERROR, f"{_explain(exc, job, args)}. {job.says()}", exc)


def _busy(message: str) -> apsw_backup.BusyError:
    error = apsw_backup.BusyError(message)
    error.result = error.extendedresult = apsw_backup.SQLITE_BUSY
    return error


def _explain(exc: BaseException, job: Job, args: argparse.Namespace) -> str:
    """exc in the command's terms: SOURCE and DEST, the OS cause, the cure."""
    elapsed = time.monotonic() - job.started
    if isinstance(exc, apsw_backup.BusyError) and (
        args.timeout is not None and elapsed >= args.timeout
    ):
        return f"BusyError: {_timeout_text(job, args.timeout, elapsed)}"
    if isinstance(exc, apsw_backup.FullError) or (
        isinstance(exc, (apsw_backup.IOError, OSError)) and _dest_is_full(job)
    ):
        return _full_text(job)
    if isinstance(
        exc,
        (apsw_backup.CantOpenError, apsw_backup.ReadOnlyError, apsw_backup.IOError),
    ):
        found = (
            cause_of(job.source, "SOURCE", exc)
            or _path_problem(job)
            or _dest_too_long(job)
        )
        if found:
            return found
    # The library's own errors, from their facts; SQLite's and the OS's as
    # they are.
    ours = in_our_words(exc, locked=_locked_side(job))
    if ours is not None:
        if isinstance(exc, FileExistsError):  # the file at DEST: as plan says it
            return ours
        return f"{type(exc).__name__}: {ours}"
    if isinstance(exc, OSError):
        return f"file system error on {_q(exc.filename or job.dest)}: {_os_cause(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _locked_side(job: Job) -> str:
    """What a lock wait of this job waited for."""
    return "SOURCE" if not job.existed else "SOURCE or DEST"


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


def _dest_too_long(job: Job) -> str | None:
    """Whether the file SQLite opens for DEST -- a new DEST's temporary
    file beside it, an existing DEST itself -- has too long a path."""
    if job.existed:
        return path_too_long(job.dest, "DEST")
    temporary = files.temporary_path(os.path.realpath(job.dest))
    return path_too_long(job.dest, "DEST", temporary)


def _timeout_text(job: Job, timeout: float, elapsed: float) -> str:
    """The deadline passed: the figures are the job's, as its progress line
    showed them."""
    return gave_up_words(
        elapsed,
        timeout,
        job.copied,
        job.total,
        job.waits,
        job.restarts,
        _locked_side(job),
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


def _headline(failure: Failure) -> str:
    """The first words of a failure's message, for the progress line."""
    if failure.code >= 128:
        return "interrupted"
    if failure.code == EXIT_VERIFY:
        return "verification failed"
    return type(failure.error).__name__ if failure.error is not None else "failed"


def _fail(failure: Failure, as_json: bool, verify: bool = False) -> int:
    output.err(f"{PROG}: {failure.message}")
    if as_json:
        obj = _verify_failure_object(failure) if verify else _failure_object(failure)
        _print_json(obj)
    return failure.code


def _error_object(error: BaseException | None, message: str) -> dict[str, Any]:
    code = getattr(error, "errno", None)
    return {
        "class": type(error).__name__ if error is not None else "Error",
        "message": message,
        "result": getattr(error, "result", None),
        "extendedresult": getattr(error, "extendedresult", None),
        "errno": code if isinstance(code, int) else None,
    }


def _failure_object(failure: Failure) -> dict[str, Any]:
    fields = dict(failure.fields)
    integrity = fields.pop("integrity", None)
    # A failure after the copy was in place (--keep) says it was verified.
    verified = fields.pop("verified", False if integrity else None)
    return output.backup_object(
        ok=False,
        exit_code=failure.code,
        error=_error_object(failure.error, failure.message),
        verified=verified,
        integrity=integrity,
        **fields,
    )


def _verify_failure_object(failure: Failure) -> dict[str, Any]:
    """`verify`'s --json object for a failure before any FILE was checked
    (its arguments)."""
    return {
        "ok": False,
        "exit_code": failure.code,
        "error": _error_object(failure.error, failure.message),
        # the verify verb's keys, whether its arguments were FILEs or
        # FOLDERs of restore points (docs/cli.md)
        "path": None,
        "files": [],
        "chains": [],
    }


def _job_fields(job: Job) -> dict[str, Any]:
    return {
        "source": job.source,
        "dest": job.dest,
        "dest_state": job.state(),
        "folder": job.folder,
        "pages_copied": job.copied,
        "page_count": job.total,
    }
