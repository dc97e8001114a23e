"""Running the backup: copy() with the command's callbacks, then rotation."""

from __future__ import annotations

import argparse
import errno
import time

import apsw_backup
from apsw_backup import files
from apsw_backup.cli import output
from apsw_backup.cli.dest_file import deadline_left, roll_back
from apsw_backup.cli.errors import EXIT_ERROR, EXIT_OK, PROG, Failure, _count
from apsw_backup.cli.failures import _failure, _headline, _job_fields
from apsw_backup.cli.folder import (
    FOLDER_LOCK_WAIT,
    Rotation,
    hold_folder,
    holds_a_table,
    rotate,
)
from apsw_backup.cli.plan import Job, _locked
from apsw_backup.cli.progress import ProgressLine, _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts, _pause_for_tests
from apsw_backup.cli.summary import _report, copy_fields
from apsw_backup.cli.verification import Ticker, VerificationError
from apsw_backup.copy import copy


class Runner:
    """copy()'s progress and verify callbacks for one job."""

    def __init__(
        self,
        job: Job,
        interrupts: Interrupts,
        line: ProgressLine | None,
        pause: float = 0.0,
        deadline: float | None = None,
    ) -> None:
        self.deadline = deadline  # time.monotonic() by which the run ends
        self.job = job
        self.interrupts = interrupts
        self.line = line
        self.pause = pause  # --demo: seconds to wait after each step
        self.keep: int | None = None  # --keep
        self.timeout: float | None = None  # --timeout

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

    def ticker(self) -> Ticker:
        """copy()'s verify_progress: the progress line, signals."""
        return Ticker(self.interrupts, self.line, pause=10 * self.pause)

    def before_publish(self, path: str) -> None:
        """copy()'s before_publish callback, given the finished copy's file
        once it passed verification, before it is put in place: for a DEST
        folder, see whether it holds a table, mark it as SOURCE's backup,
        and take the folder's lock (exclusive for --keep) for the rest of
        the run."""
        if self.job.verify:
            self.job.verified = True
        if self.job.folder is None:
            return
        try:
            self.job.has_table = holds_a_table(path, strict=True)
        except OSError as exc:
            self.job.has_table, self.job.table_unknown = False, exc
        try:
            files.mark_source(path, self.job.source)
        except OSError:
            self.job.marked = False  # --keep then deletes nothing (see rotate)
        else:
            self.job.marked = True
        rotating = self.keep is not None
        wait = self._lock_wait()
        try:
            held = hold_folder(self.job, rotating, self.interrupts, wait)
        except OSError:
            if rotating:  # checked in the plan: it worked a moment ago
                raise
            held = True  # a folder that cannot be locked: nothing is rotated
        if not held:
            raise Failure(
                EXIT_ERROR,
                f"another run held the lock on DEST folder {self.job.folder!r} "
                f"for {wait:.2g} s, so the new backup was not put in "
                f"place: run again once it is done. {self.job.says()}",
                BlockingIOError(errno.EWOULDBLOCK, "folder locked", self.job.folder),
            )

    def _lock_wait(self) -> float:
        """Seconds to wait for the folder's lock: FOLDER_LOCK_WAIT, or what is
        left of --timeout if that is less."""
        if self.timeout is None:
            return FOLDER_LOCK_WAIT
        left = self.timeout - (time.monotonic() - self.job.started)
        return max(0.0, min(FOLDER_LOCK_WAIT, left))

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
    deadline = None if args.timeout is None else job.started + args.timeout
    runner = Runner(job, interrupts, line, pause, deadline)
    runner.keep, runner.timeout = args.keep, args.timeout
    deleted: list[str] = []
    result = None
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
            timeout=deadline_left(job, args.timeout),
            keep_wal=args.keep_wal,
            verify=args.verify if job.verify else None,
            target_exists=job.existed,
            verify_progress=runner.ticker(),
            before_publish=runner.before_publish,
        )
        job.published = True
        _pause_for_tests("done", interrupts)
        interrupts.check()
        if args.keep is not None:
            deleted = _rotated(job, args.keep, interrupts)
    except (Interrupted, VerificationError, Failure) as exc:
        roll_back(job, deadline_left(job, args.timeout))
        failure = _failure(exc, job, args)
    except Exception as exc:  # noqa: BLE001 - reported, with what DEST holds
        if isinstance(exc, FileExistsError) and not job.existed and not job.published:
            job.other_file = True
        roll_back(job, deadline_left(job, args.timeout))
        failure = _failure(exc, job, args)
    else:
        if line is not None:
            line.end(line.done_parts(result))
        _report(job, args, result, deleted)
        return EXIT_OK
    if line is not None:
        line.end(line.stopped_parts(_headline(failure)))
    failure.fields.update(_job_fields(job))
    if result is not None and job.published:  # DEST is the copy (--keep failed)
        failure.fields.update(copy_fields(job, args, result))
    raise failure


def _rotated(job: Job, keep: int, interrupts: Interrupts) -> list[str]:
    """Rotate (the folder's lock is held since before the new backup was put
    in place); the paths deleted.  Raises Failure, saying that DEST is in
    place, if a backup could not be deleted."""
    if not job.marked:
        raise Failure(
            EXIT_ERROR,
            f"the new backup could not be marked as SOURCE's ({files.SOURCE_MARK}), "
            "so --keep deleted nothing: it could not tell SOURCE's backups "
            f"apart. {job.says()}",
            OSError(errno.ENOTSUP, "cannot mark the backup", job.dest),
        )
    rotation = rotate(job, keep, interrupts)
    job.report_fields["future_dated"] = rotation.future
    for path in rotation.future:
        _warn(
            f"kept {path!r}: it is dated later than now (a clock that ran "
            "ahead?), so --keep neither counts nor deletes it; delete it "
            "yourself if it is not wanted"
        )
    job.report_fields["damaged"] = rotation.damaged
    for path in rotation.damaged:
        _warn(
            f"kept {path!r}: it does not look whole (its header's page count "
            "x page size is not its size: truncated or overwritten?), so "
            "--keep neither counts nor deletes it; check it with "
            f"`{PROG} verify`, and delete it yourself if it is damaged"
        )
    job.report_fields["unmarked"] = rotation.unmarked
    if rotation.unmarked:
        _warn(
            f"left {_count(len(rotation.unmarked), 'file')} named like SOURCE's "
            f"backups that carry no mark ({files.SOURCE_MARK}: made by hand, by "
            "a version before marks, or another database's): --keep never "
            f"deletes those, e.g. {rotation.unmarked[0]!r}"
        )
    if rotation.skipped and job.table_unknown is not None:
        failure = Failure(
            EXIT_ERROR,
            f"the new backup is in place, but {rotation.skipped}, so --keep "
            f"deleted nothing. {job.says()}",
            job.table_unknown,
        )
        failure.fields["rotation_skipped"] = rotation.skipped
        failure.fields["future_dated"] = rotation.future
        failure.fields["damaged"] = rotation.damaged
        failure.fields["unmarked"] = rotation.unmarked
        raise failure
    if rotation.skipped:
        job.report_fields["rotation_skipped"] = rotation.skipped
        _warn(
            f"{rotation.skipped}: --keep deleted nothing (an empty backup never rotates real ones away)"
        )
    left = rotation.not_deleted + rotation.sides_left + rotation.orphans_left
    if left:
        failure = Failure(
            EXIT_ERROR,
            f"the new backup is in place, but {_not_deleted_text(rotation)}. "
            f"{job.says()}",
            left[0][1],
        )
        failure.fields["deleted"] = rotation.deleted
        failure.fields["not_deleted"] = [p for p, _ in left]
        failure.fields["future_dated"] = rotation.future
        failure.fields["damaged"] = rotation.damaged
        failure.fields["unmarked"] = rotation.unmarked
        raise failure
    return rotation.deleted


def _not_deleted_text(rotation: Rotation) -> str:
    """What --keep could not delete: whole backups, and the side files left
    of backups whose database file it deleted (those backups are gone)."""
    parts = []
    if rotation.not_deleted:
        failed = "; ".join(
            f"{path!r} {files.os_cause(exc)}" for path, exc in rotation.not_deleted
        )
        others = len(rotation.deleted) - len({_db(p) for p, _ in rotation.sides_left})
        done = f" (deleted {_count(others, 'other')})" if others else ""
        parts.append(
            f"--keep could not delete "
            f"{_count(len(rotation.not_deleted), 'older backup')}{done}: {failed}"
        )
    if rotation.sides_left:
        gone = sorted({_db(p) for p, _ in rotation.sides_left})
        failed = "; ".join(
            f"{path!r} {files.os_cause(exc)}" for path, exc in rotation.sides_left
        )
        parts.append(
            f"--keep deleted the database file of {_count(len(gone), 'older backup')} "
            f"({', '.join(map(repr, gone))}), yet not "
            f"{'its' if len(gone) == 1 else 'their'} side "
            f"file{'s' if len(rotation.sides_left) > 1 else ''}: {failed} (with "
            "the database file gone, what is left is of no use: delete it "
            "once it can be)"
        )
    if rotation.orphans_left:
        failed = "; ".join(
            f"{path!r} {files.os_cause(exc)}" for path, exc in rotation.orphans_left
        )
        parts.append(
            "--keep could not remove what an earlier deletion left of an older "
            f"backup whose database file is gone: {failed} (of no use: delete "
            "it once it can be)"
        )
    return "; and ".join(parts)


def _db(side: str) -> str:
    """The database file of a side file's path."""
    for end in files.SIDE_FILES:
        if side.endswith(end):
            return side[: -len(end)]
    return side


def _warn(text: str) -> None:
    output.err(f"{PROG}: warning: {text}")
