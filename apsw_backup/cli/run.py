"""Running the backup: copy() with the command's callbacks, then rotation."""

from __future__ import annotations

import argparse
import time

import apsw_backup
from apsw_backup.cli.dest_file import deadline_left, roll_back
from apsw_backup.cli.errors import EXIT_OK, Failure
from apsw_backup.cli.failures import _failure, _headline, _job_fields
from apsw_backup.cli.folder import rotate
from apsw_backup.cli.plan import Job, _locked
from apsw_backup.cli.progress import ProgressLine, _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts, _pause_for_tests
from apsw_backup.cli.summary import _report
from apsw_backup.cli.verification import (
    VerificationError,
    VerificationFailed,
    VerificationTimeout,
    integrity_problems,
)
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
            problems = integrity_problems(path, self.interrupts, tick, self.deadline)
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
    deadline = None if args.timeout is None else job.started + args.timeout
    runner = Runner(job, interrupts, line, pause, deadline)
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
            timeout=deadline_left(job, args.timeout),
            keep_wal=args.keep_wal,
            verify=runner.verify if job.verify else None,
            target_exists=job.existed,
        )
        job.published = True
        _pause_for_tests("done", interrupts)
        interrupts.check()
        if args.keep is not None:
            deleted = rotate(job, args.keep, interrupts)
    except (
        Interrupted,
        VerificationFailed,
        VerificationError,
        VerificationTimeout,
        Failure,
    ) as exc:
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
    raise failure
