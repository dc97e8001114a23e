"""Running the backup: copy() with the command's callbacks, then rotation."""

from __future__ import annotations

import argparse
import time

import apsw_backup
from apsw_backup.cli.errors import EXIT_OK, Failure
from apsw_backup.cli.failures import _failure, _headline, _job_fields
from apsw_backup.cli.folder import rotate
from apsw_backup.cli.plan import Job, _locked
from apsw_backup.cli.progress import ProgressLine, _progress_line
from apsw_backup.cli.signals import Interrupted, Interrupts, _pause_for_tests
from apsw_backup.cli.summary import _report
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

    def ticker(self) -> Ticker:
        """copy()'s verify_progress: the progress line, signals."""
        return Ticker(self.interrupts, self.line, pause=10 * self.pause)

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
            verify=args.verify if job.verify else None,
            verify_progress=runner.ticker(),
        )
        job.verified = True if job.verify else None
        _pause_for_tests("done", interrupts)
        interrupts.check()
        if args.keep is not None:
            deleted = rotate(job, args.keep, interrupts)
    except (Interrupted, VerificationError, Failure) as exc:
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
