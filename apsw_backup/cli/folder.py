"""DEST folders: backup names, the folder lock, and rotation (--keep).

The rules (docs/cli.md, "Folders and --keep"):

- a backup made into a folder is named <SOURCE stem>-<UTC time>.db and
  marked, before it is put in place, with SOURCE's identity (its real path,
  in the extended attribute files.SOURCE_MARK): rotation counts and deletes
  only files so named *and* so marked -- another database with the same
  stem, a file copied in by hand, a backup of an older version are never
  touched;
- every run that publishes into the folder holds the folder's flock() from
  just before its new backup is put in place until it has reported (shared;
  exclusive when it rotates), so a run never deletes a backup another run
  is still reporting, and two rotations never overlap;
- rotation keeps the `keep` newest backups of SOURCE, its own new one
  always among them, and deletes only backups older than its own new one:
  a newer one made by a run that overlapped is never touched;
- a backup dated later than now (a clock that ran ahead) is kept, not
  counted, and reported; so is one that does not look whole (looks_whole:
  its header's page count x page size is not its size); a backup with no table in its schema is
  not counted, and a new one with none rotates nothing;
- a backup's database file is deleted before its side files, and what
  could not be deleted is reported, with the new DEST said to be in place.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from apsw_backup import _apsw_backup as _c
from apsw_backup import files
from apsw_backup.cli.signals import Interrupts

if TYPE_CHECKING:
    from apsw_backup.cli.plan import Job


STAMP = "%Y%m%dT%H%M%S.%fZ"  # sortable: name order is time order
STAMP_PATTERN = r"[0-9]{8}T[0-9]{6}\.[0-9]{6}Z"  # ASCII digits only

# Seconds a run waits for another run's hold on the folder lock (a publish,
# a rotation and a report take milliseconds).
FOLDER_LOCK_WAIT = 60.0

# The folder locks this process holds: released once the run has reported
# (main() calls release_folder_locks), or by the process's end.
_HELD: list[files.FolderLock] = []


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


def _name_pattern(source: str) -> re.Pattern[str]:
    return re.compile(
        re.escape(Path(source).stem) + "-(?P<stamp>" + STAMP_PATTERN + r")\.db"
    )


def _stamp(name: str) -> datetime | None:
    match = re.search("(" + STAMP_PATTERN + r")\.db\Z", name)
    if match is None:
        return None
    try:
        return datetime.strptime(match[1], STAMP).replace(tzinfo=timezone.utc)
    except ValueError:  # 99999999T... matches the pattern, is no time
        return None


def _named_like_backups(
    folder: str, source: str, unreadable: dict[str, OSError] | None = None
) -> tuple[list[str], list[str]]:
    """(the backups of source in folder, the regular files named like them
    that carry no mark at all), each oldest first.  A file marked as another
    source's backup is in neither list; one whose mark could not be read
    goes into `unreadable` (path: the OSError), when given."""
    pattern = _name_pattern(source)
    identity = files.source_identity(source)
    ours, unmarked = [], []
    # By name (oldest stamp first): the same order on every run, whatever
    # order the directory lists them in.
    for entry in sorted(os.scandir(folder or "."), key=lambda e: e.name):
        if (
            pattern.fullmatch(entry.name)
            and not files.is_temporary_name(entry.name)
            and entry.is_file(follow_symlinks=False)
        ):
            try:
                mark = files.marked_source(entry.path, strict=unreadable is not None)
            except OSError as exc:
                assert unreadable is not None
                unreadable[entry.path] = exc
                continue
            if mark == identity:
                ours.append(entry.path)
            elif mark is None:
                unmarked.append(entry.path)
    return sorted(ours), sorted(unmarked)


def pages_in(path: str, strict: bool = False) -> int:
    """The page count in a database file's header (the file size over the
    page size when the header's count is not valid); 0 for an empty or
    unreadable file (strict: OSError if it cannot be read).  Read through
    SQLite (files.read_header), never a descriptor of ours."""
    try:
        header = files.read_header(path)
        size = os.stat(path).st_size
    except OSError:
        if strict:
            raise
        return 0
    page_size = files.header_page_size(header)
    if len(header) < 100 or not page_size:
        return 0
    if header[92:96] == header[24:28] and int.from_bytes(header[28:32], "big"):
        return int.from_bytes(header[28:32], "big")
    return size // page_size


def looks_whole(path: str, strict: bool = False) -> bool:
    """Whether a backup looks whole by a cheap check: an SQLite header whose
    page count x page size is the file's size (a truncated or overwritten
    file is not).  A header whose page count SQLite marks as not valid
    (written by a version before 3.7.0) needs a size that is a whole
    number of pages.  Read through SQLite (files.read_header), never a
    descriptor of ours; False if it cannot be read."""
    try:
        header = files.read_header(path)
        size = os.stat(path).st_size
    except OSError:
        if strict:  # strict: a file that cannot be read now is not "damaged"
            raise
        return False
    page_size = files.header_page_size(header)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return False
    if not page_size:
        return False
    count = int.from_bytes(header[28:32], "big")
    if header[92:96] == header[24:28] and count:
        return count * page_size == size
    return size > 0 and size % page_size == 0


def holds_a_table(path: str, strict: bool = False) -> bool:
    """Whether a backup has anything in it: a table in its schema.  A table
    needs a page of its own, so a database of one page (or none) holds none
    (the header says so); a bigger one is asked (its tables may all have
    been dropped, their pages left free).  Read through SQLite, read-only.
    strict: OSError if it cannot be read (it is not then said empty);
    otherwise a backup that cannot be read holds nothing, so it is never
    counted among the N kept."""
    if pages_in(path, strict) <= 1:
        return False
    try:
        conn = _c.Connection(os.path.abspath(path), _c.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(1000)
            rows = conn.execute(
                "SELECT 1 FROM main.sqlite_master WHERE type = 'table' LIMIT 1"
            ).fetchall()
        finally:
            conn.close()
    except _c.Error as exc:  # its cause says which: unreadable, or damaged
        if strict:
            raise OSError(
                errno.EIO, f"SQLite cannot read its schema: {exc}", path
            ) from exc
        return False
    return bool(rows)


def _holds_a_table_or_unreadable(path: str) -> bool:
    """holds_a_table() of an older backup: OSError when it cannot be read
    now (ours or SQLite's: CantOpenError, IOError, a lock), False when it
    is damaged or holds no table."""
    try:
        return holds_a_table(path, strict=True)
    except OSError as exc:
        cause = exc.__cause__
        if cause is None or isinstance(
            cause, (_c.CantOpenError, _c.IOError, _c.NoMemError, _c.BusyError)
        ):
            raise
        return False  # SQLite read it and found it damaged: holds nothing


def hold_folder(
    job: Job, exclusive: bool, interrupts: Interrupts, wait: float = FOLDER_LOCK_WAIT
) -> bool:
    """Take job.folder's lock (see files.FolderLock) for the rest of the
    run; False if another run held it for `wait` seconds.  OSError if the
    folder cannot be locked at all."""
    assert job.folder is not None
    lock = files.FolderLock(job.folder)
    if not lock.acquire(exclusive, wait, interrupts.check):
        return False
    _HELD.append(lock)
    return True


def release_folder_locks() -> None:
    """Release the folder locks this run holds (once it has reported)."""
    while _HELD:
        _HELD.pop().release()


@dataclass
class Rotation:
    """What --keep did: deleted (oldest first: backups whose database file
    was deleted), not_deleted (path, OSError: backups whose database file
    could not be deleted), sides_left (path, OSError: side files left of a
    backup whose database file was deleted), orphans_left (path, OSError:
    side files of a backup whose database file an earlier run deleted,
    that this run could not remove),
    future (backups dated later than now: kept, not counted), damaged
    (backups that do not look whole, looks_whole: kept, not counted, so
    that --keep N keeps N sound ones), skipped (why
    nothing was considered for deletion, or None), unmarked (files named
    like SOURCE's backups that carry no mark: never touched)."""

    deleted: list[str] = field(default_factory=list)
    not_deleted: list[tuple[str, OSError]] = field(default_factory=list)
    sides_left: list[tuple[str, OSError]] = field(default_factory=list)
    orphans_left: list[tuple[str, OSError]] = field(default_factory=list)
    future: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    skipped: str | None = None
    unmarked: list[str] = field(default_factory=list)


def rotate(
    job: Job, keep: int, interrupts: Interrupts, now: datetime | None = None
) -> Rotation:
    """Delete backups of job.source in job.folder so that `keep` remain,
    the new one (job.dest) always among them.  Call with the folder's lock
    held exclusive (hold_folder), the new backup in place and verified."""
    assert job.folder is not None
    rotation = Rotation()
    if job.table_unknown is not None:
        # Found by tests/fsfaults: an EIO reading the new backup's header
        # was reported as "the new backup holds no table".
        rotation.skipped = (
            "the new backup's header could not be read "
            f"({files.os_cause(job.table_unknown)})"
        )
        return rotation
    if not job.has_table:
        rotation.skipped = "the new backup holds no table"
        return rotation
    own = _stamp(os.path.basename(job.dest))
    now = now or datetime.now(timezone.utc)
    if own is None:  # not a name of ours: nothing to compare with
        rotation.skipped = "the new backup's name has no time"
        return rotation
    own_info = os.stat(job.dest)
    ours: list[tuple[datetime, str]] = []
    # Backups whose file could not be looked at (not ENOENT): counted, and
    # reported as not deleted where they would have been (found by
    # tests/fsfaults: an EIO from their lstat dropped them silently, exit 0
    # with more than --keep backups left).
    unreadable: dict[str, OSError] = {}
    unread_marks: dict[str, OSError] = {}
    backups, unmarked = _named_like_backups(job.folder, job.source, unread_marks)
    mine = os.path.basename(job.dest)
    for path, exc in unread_marks.items():
        stamp = _stamp(os.path.basename(path))
        if os.path.basename(path) != mine and stamp is not None and stamp <= now:
            unreadable[path] = exc
            ours.append((stamp, path))
    for path in unmarked:  # never touched; the future-dated ones said so
        stamp = _stamp(os.path.basename(path))
        listed = rotation.future if stamp is not None and stamp > now else None
        (rotation.unmarked if listed is None else listed).append(path)
    for path in backups:
        stamp = _stamp(os.path.basename(path))
        try:
            info = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if os.path.basename(path) != mine and stamp is not None and stamp <= now:
                unreadable[path] = exc
                ours.append((stamp, path))
            continue
        if stamp is None or _same(info, own_info):
            continue
        if stamp > now:
            rotation.future.append(path)
        else:
            ours.append((stamp, path))
    rotation.future.sort()
    # A backup that does not look whole (truncated, overwritten) is neither
    # counted among the N nor deleted: it is reported, so --keep N keeps N
    # sound backups and a damaged one is left for a person to look at.
    # Each older backup, once: unreadable now (a failed stat or read, ours
    # or SQLite's: counted, never deleted, reported -- found by
    # tests/fsfaults: an EIO there made it "damaged", so exit 0 with more
    # than N left), damaged, or holding a table (counted) or not.
    damaged: set[str] = set()
    counted_old: set[str] = set()
    for _, path in ours:
        if path in unreadable:
            continue
        try:
            if not looks_whole(path, strict=True):
                damaged.add(path)
            elif _holds_a_table_or_unreadable(path):
                counted_old.add(path)
        except OSError as exc:
            unreadable[path] = exc
    rotation.damaged = sorted(damaged)
    counted = sorted(
        [(own, job.dest)]
        + [b for b in ours if b[1] in unreadable or b[1] in counted_old]
    )
    kept = {path for _, path in counted[-keep:]}
    for stamp, path in sorted(ours):
        if path in kept or path in damaged or stamp >= own:
            continue
        if path in unreadable:
            rotation.not_deleted.append((path, unreadable[path]))
            continue
        interrupts.check()
        try:
            remove_backup(path)
        except OSError as exc:
            if os.path.lexists(path):
                rotation.not_deleted.append((path, exc))
            else:  # its database file went, a side file stayed
                rotation.deleted.append(path)
                rotation.sides_left += [
                    (side, exc)
                    for side in files.side_paths(path)
                    if os.path.lexists(side)
                ]
        else:
            rotation.deleted.append(path)
    left = {side for side, _ in rotation.sides_left}
    rotation.orphans_left = [
        (side, exc)
        for side, exc in _remove_orphan_side_files(job.folder, job.source)
        if side not in left
    ]
    rotation.sides_left = [s for s in rotation.sides_left if os.path.lexists(s[0])]
    return rotation


def remove_backup(path: str) -> None:
    """Delete a backup: its database file first, then its side files, so
    that a failure leaves it whole (OSError of the first failure)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    failed: OSError | None = None
    for side in files.side_paths(path):
        try:
            os.remove(side)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed


def _remove_orphan_side_files(folder: str, source: str) -> list[tuple[str, OSError]]:
    """Side files named after a backup of SOURCE's name whose database file
    is gone (a deletion that failed half way): nothing can use them, and a
    new file of that name would apply them.  Returns those it could not
    remove, with why (reported like any side file left)."""
    pattern = _name_pattern(source)
    failed = []
    for name in os.listdir(folder or "."):
        for side in files.SIDE_FILES:
            if name.endswith(side) and pattern.fullmatch(name[: -len(side)]):
                path = os.path.join(folder, name)
                if not os.path.lexists(path[: -len(side)]):
                    try:
                        os.remove(path)
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        failed.append((path, exc))
    return failed


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
