"""DEST folders: backup names and rotation (--keep)."""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from apsw_backup import files
from apsw_backup.cli.signals import Interrupts

if TYPE_CHECKING:
    from apsw_backup.cli.plan import Job


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


STAMP = "%Y%m%dT%H%M%S.%fZ"  # sortable: name order is time order
STAMP_PATTERN = r"\d{8}T\d{6}\.\d{6}Z"


def backup_name(folder: str, source: str, now: datetime | None = None) -> str:
    """folder/<SOURCE stem>-<UTC time, to the microsecond>.db, a name that
    no file (or side file) has: two runs in one second get two names."""
    stem = Path(source).stem
    moment = now or datetime.now(timezone.utc)
    while True:
        path = os.path.join(folder, f"{stem}-{moment.strftime(STAMP)}.db")
        if not any(os.path.lexists(path + end) for end in ("", *files.SIDE_FILES)):
            return path
        moment += timedelta(microseconds=1)


def backups_of(folder: str, source: str) -> list[str]:
    """The backups of source in folder, oldest first: regular files named
    exactly <stem>-<timestamp>.db, never a temporary file or anything else."""
    pattern = re.compile(re.escape(Path(source).stem) + "-" + STAMP_PATTERN + r"\.db")
    found = []
    for entry in os.scandir(folder):
        if (
            pattern.fullmatch(entry.name)
            and not files.is_temporary_name(entry.name)
            and entry.is_file(follow_symlinks=False)
        ):
            found.append(entry.path)
    return sorted(found)


def rotate(job: Job, keep: int, interrupts: Interrupts) -> list[str]:
    """Delete the oldest backups of job.source in job.folder so that `keep`
    remain, the new one always among them; the paths deleted."""
    assert job.folder is not None
    older = [
        path
        for path in backups_of(job.folder, job.source)
        if not _same_path(path, job.dest) and not _same_path(path, job.source)
    ]
    deleted = []
    for path in older[: max(0, len(older) - (keep - 1))]:
        interrupts.check()
        for end in (*files.SIDE_FILES, ""):  # the database file last
            try:
                os.remove(path + end)
            except FileNotFoundError:
                pass
        deleted.append(path)
    return deleted
