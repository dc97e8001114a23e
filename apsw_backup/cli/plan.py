"""The plan: every check of SOURCE and DEST before anything is written."""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import stat
import time
from dataclasses import dataclass, field

import apsw_backup
from apsw_backup import files
from apsw_backup.cli.errors import (
    CURES,
    EXIT_ERROR,
    EXIT_USAGE,
    PROG,
    Failure,
    UsageError,
    _os_cause,
    _q,
    in_our_words,
)
from apsw_backup.cli.folder import backup_name

SQLITE_HEADER = b"SQLite format 3\0"


@dataclass
class Job:
    """One backup: where it goes, and what DEST holds as it goes on."""

    source: str
    dest: str  # the file written (inside DEST when DEST is a folder)
    existed: bool  # DEST existed: written through SQLite's transaction
    verify: bool
    folder: str | None = None  # DEST, when it is a folder
    page_size: int = 0
    started: float = field(default_factory=time.monotonic)
    committed: bool = False  # the last step completed: the copy is in DEST
    published: bool = False  # copy() returned: a new DEST is our copy
    other_file: bool = False  # another file appeared at a new DEST's name
    torn: bool = False  # an existing DEST whose rollback did not happen
    verified: bool | None = None  # None: not verified (yet)
    copied: int = 0  # pages copied, as of the last step
    total: int = 0  # pages in SOURCE, as of the last step
    waits: int = 0  # steps that found the database locked
    restarts: int = 0  # times the copy was seen to start again
    written: int = 0  # pages written, restarts included
    has_table: bool = True  # the copy holds a table (read before publishing)
    table_unknown: OSError | None = None  # why that could not be read
    marked: bool = False  # the copy carries SOURCE's mark (folder DEST)
    report_fields: dict[str, object] = field(default_factory=dict)  # for --json

    def note_step(self, status: int, remaining: int, total: int) -> None:
        """Take in one progress call (before anything else can raise)."""
        if status == apsw_backup.SQLITE_DONE:
            self.committed = True
        copied = total - remaining
        if _locked(status):
            self.waits += 1
        elif 0 < copied <= self.copied and status != apsw_backup.SQLITE_DONE:
            # A step that copied pages but did not get further: SQLite began
            # again from page 1 because another connection wrote to SOURCE.
            self.restarts += 1
            self.written += copied
        else:
            self.written += copied - self.copied
        self.copied, self.total = copied, total

    def state(self) -> str:
        """What DEST holds now (the "dest_state" of --json)."""
        if self.torn:
            return "needs recovery"
        if self.other_file:
            return "other file"
        # A new DEST is ours once copy() put it in place, never because a
        # file is at its name (another run's may be).
        present = self.committed if self.existed else self.published
        if not present:
            return "unchanged" if self.existed else "not created"
        if self.verified is not None:
            return "verified" if self.verified else "failed verification"
        return "unverified" if self.verify else "complete"

    def says(self) -> str:
        """state() as a sentence."""
        return dest_says(self.dest, self.state())


def dest_says(dest: str, state: str) -> str:
    """What DEST holds, as a sentence, for a "dest_state" of --json."""
    q = _q(dest)
    return {
        "not created": f"DEST {q} was not created",
        "unchanged": f"DEST {q} was left as it was",
        "needs recovery": f"DEST {q} is incomplete: SQLite could not roll it "
        f"back yet; its rollback journal {_q(dest + '-journal')} restores the "
        "previous content the next time DEST is opened with write access "
        f"(e.g. sqlite3 {shlex.quote(dest)} 'PRAGMA quick_check'). Do not "
        "delete or move that file: DEST is damaged without it",
        "other file": f"DEST {q} holds another file, which appeared there "
        "while the copy was made: it was left alone and the copy was discarded",
        "verified": f"DEST {q} holds the complete, verified copy",
        "failed verification": f"DEST {q} holds the copy that failed verification",
        "unverified": f"DEST {q} holds the complete copy, but it was not "
        f"verified: check it with {PROG} verify {shlex.quote(dest)}",
        "complete": f"DEST {q} holds the complete copy (not verified: --no-verify)",
    }[state]


def _locked(status: int) -> bool:
    return status & 0xFF in (apsw_backup.SQLITE_BUSY, apsw_backup.SQLITE_LOCKED)


def _planned(args: argparse.Namespace) -> Job:
    """_plan(args); a refusal reports SOURCE, DEST and that DEST is as it was."""
    try:
        return _plan(args)
    except Failure as failure:
        state = "unchanged" if os.path.lexists(args.dest) else "not created"
        failure.fields.update(source=args.source, dest=args.dest, dest_state=state)
        # Nothing was written: the message ends by saying so, as every
        # failure's does.
        failure.message = (
            f"{failure.message.rstrip('.')}. {dest_says(args.dest, state)}"
        )
        raise


def _plan(args: argparse.Namespace) -> Job:
    """Check SOURCE and DEST; the job.  Raises Failure; writes nothing."""
    source, dest = args.source, args.dest
    _check_schema(args.schema)
    try:
        files.check_distinct(source, dest)
    except files.SameFileError as exc:
        # --json's error class stays "ValueError", as copy() documents it.
        error = ValueError(str(exc))
        raise Failure(EXIT_USAGE, _refused(exc), error) from exc
    _check_source(source)
    _check_source_header(source)
    folder = None
    if os.path.isdir(dest) or dest.endswith(("/", os.sep)):
        folder = dest
        _check_folder(folder, "DEST folder")
        if args.keep is not None:
            _check_rotation(folder)
        dest = backup_name(folder, source)
        existed = False
    elif args.keep is not None:
        raise Failure(
            EXIT_USAGE,
            f"--keep needs DEST to be a folder, and {_q(dest)} is not one: "
            "give the folder the backups go to",
            UsageError("--keep"),
        )
    else:
        _check_side_file_name(dest)
        existed = _dest_exists(dest)
        if existed:
            _check_existing_dest(dest, args.overwrite)
            _check_wal_page_size(source, dest)
        else:
            _check_stale_side_files(dest)
        _check_folder(os.path.dirname(os.path.abspath(dest)), "DEST's folder")
    _check_name_length(dest, folder is not None)
    return Job(
        source=source,
        dest=dest,
        existed=existed,
        verify=not args.no_verify,
        folder=folder,
        page_size=header_page_size(source),
    )


def _dest_exists(dest: str) -> bool:
    """Whether DEST exists: new or existing, decided once.  An error other
    than "no such file" fails the run with its cause: os.path.lexists()
    took an EIO for "absent", and the copy then found DEST at its name and
    said "another file appeared at DEST" (found by tests/fsfaults)."""
    try:
        os.lstat(dest)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            _check_name_length(dest, False)  # the name's fault: said as such
        raise Failure(
            EXIT_ERROR,
            f"cannot tell whether DEST {_q(dest)} exists: it {files.os_cause(exc)}",
            exc,
        ) from exc
    return True


def _check_name_length(dest: str, named_here: bool) -> None:
    """Refuse a DEST whose file name is longer than its file system allows:
    the name is at fault, not its folder (a limit counted in bytes: a name
    of 100 characters may be 400 bytes)."""
    folder, name = os.path.split(os.path.abspath(dest))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(name))
    if size <= limit:
        return
    cure = (
        "give SOURCE a shorter name, or name DEST as a file"
        if named_here
        else "choose a shorter name"
    )
    error = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), dest)
    raise Failure(
        EXIT_USAGE,
        f"DEST's file name {name!r} is {size} bytes long, more than the {limit} "
        "bytes a file name may have on its file system (ENAMETOOLONG): " + cure,
        error,
    )


def _check_schema(schema: str) -> None:
    """Refuse --schema temp: the temporary database of the command's own
    connection to SOURCE is always empty, so the "backup" would hold
    nothing -- and --keep would rotate real backups away for it.  Any other
    name but main: SOURCE is a file, which holds one database, main."""
    if schema.casefold() not in ("main", "temp"):
        raise Failure(
            EXIT_USAGE,
            f"--schema {schema!r} is not a database of SOURCE: SOURCE is a "
            "database file, which holds one database, main (attached databases "
            "are files of their own: back them up by their path)",
            UsageError("--schema"),
        )
    if schema.casefold() == "temp":
        raise Failure(
            EXIT_USAGE,
            "--schema temp names the temporary database of the connection this "
            "command opens on SOURCE, which is always empty: a backup of it "
            "would hold nothing. Back up main (the default), the database file",
            UsageError("--schema"),
        )


def _check_rotation(folder: str) -> None:
    """Refuse --keep where rotation cannot be safe: backups must be marked
    with their SOURCE (an extended attribute) and the folder lockable."""
    problem = files.marks_supported(folder)
    if problem is not None:
        raise Failure(
            EXIT_USAGE,
            f"--keep recognises SOURCE's backups by a mark on each file (the "
            f"extended attribute {files.SOURCE_MARK}), and the file system of "
            f"DEST folder {_q(folder)} has no user extended attributes "
            f"({_os_cause(problem)}): without it, another database's backups "
            "of the same name could be deleted. Run without --keep (and delete "
            "old backups yourself), or use a folder on a file system that has "
            "them (ext4, XFS, Btrfs, tmpfs)",
            problem,
        )
    problem = files.folder_lock_problem(folder)
    if problem is not None:
        raise Failure(
            EXIT_USAGE,
            f"--keep locks DEST folder {_q(folder)} (flock) while it rotates, so "
            "that runs that overlap cannot delete each other's backups, and its "
            f"file system refuses that lock ({_os_cause(problem)}). Run without "
            "--keep, or use a folder on a local file system",
            problem,
        )


def _check_side_file_name(dest: str) -> None:
    """Refuse DEST named as another database's side file (other.db-wal):
    opening that database would apply the copy to it, or delete it (the
    rule: files.check_not_named_as_side_file; the words: the command's)."""
    try:
        files.check_not_named_as_side_file(dest)
    except ValueError as exc:
        owner, suffix = exc.path, exc.side  # type: ignore[attr-defined]
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} is the {suffix} file name of the database "
            f"{_q(owner)}: SQLite would take the copy for part of that "
            "database. Choose another DEST",
            UsageError("DEST"),
        ) from None


def _check_stale_side_files(dest: str) -> None:
    """The file layer's rule (files.check_no_stale_side_files), in the
    command's words."""
    try:
        files.check_no_stale_side_files(dest)
    except files.StaleSideFileError as exc:
        raise Failure(EXIT_USAGE, _refused(exc), UsageError("DEST")) from exc


def _refused(error: files.SameFileError | files.StaleSideFileError) -> str:
    """A refusal of the file layer, worded from its facts."""
    words = in_our_words(error)
    assert words is not None  # both carry their facts
    return words


def check_source(source: str) -> None:
    """Failure (exit 1) for a SOURCE that is not a readable database file,
    in the words of the plain backup (--incremental's SOURCE too)."""
    _check_source(source)
    _check_source_header(source)


def _check_source(source: str) -> None:
    try:
        info = os.stat(source)
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the path")
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: {_os_cause(exc)}: {cure}",
            exc,
        ) from exc
    if stat.S_ISDIR(info.st_mode):
        error = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), source)
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is a folder (EISDIR), not a database file: "
            "name the database file itself",
            error,
        )
    if not stat.S_ISREG(info.st_mode):
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is not a regular file: name the database file",
            OSError(errno.EINVAL, "not a regular file", source),
        )
    if not os.access(source, os.R_OK):
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), source)
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: permission denied (EACCES): "
            f"{CURES[errno.EACCES]}",
            denied,
        )


def _check_source_header(source: str) -> None:
    # Through SQLite, never open(): main() may run inside an application
    # whose own connection to SOURCE holds locks that a close() would drop.
    try:
        header = files.read_header(source, len(SQLITE_HEADER))
    except OSError as exc:
        from apsw_backup.cli.open_problems import path_too_long  # no cycle

        too_long = path_too_long(source, "SOURCE")
        if too_long:
            cause = OSError(errno.ENAMETOOLONG, "too long for SQLite", source)
            raise Failure(EXIT_ERROR, too_long, cause) from exc
        cure = CURES.get(exc.errno or 0, "check the file")
        raise Failure(
            EXIT_ERROR,
            f"cannot read SOURCE {_q(source)}: {_os_cause(exc)}: {cure}",
            exc,
        ) from exc
    if header and header != SQLITE_HEADER:
        error = apsw_backup.NotADBError("file is not a database")
        error.result = error.extendedresult = apsw_backup.SQLITE_NOTADB
        raise Failure(
            EXIT_ERROR,
            f"SOURCE {_q(source)} is not an SQLite database (it does not begin "
            "with the SQLite header): name the database file",
            error,
        )


def _check_folder(folder: str, role: str) -> None:
    """Refuse (exit 1) a folder the copy cannot be created in, naming why."""
    path = folder or "."
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} does not exist (ENOENT): create it first "
            f"(mkdir -p {shlex.quote(path)})",
            exc,
        ) from exc
    except NotADirectoryError as exc:
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is not a folder: a part of the path is a file "
            "(ENOTDIR): check the path",
            exc,
        ) from exc
    except OSError as exc:
        raise Failure(EXIT_ERROR, f"{role} {_q(path)}: {_os_cause(exc)}", exc) from exc
    if not stat.S_ISDIR(info.st_mode):
        error = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is a file, not a folder (ENOTDIR): check the path",
            error,
        )
    _check_writable(path, role)


def _check_writable(path: str, role: str) -> None:
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        error = OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        raise Failure(
            EXIT_ERROR,
            f"{role} {_q(path)} is on a read-only file system (EROFS): choose a "
            "DEST on a writable one, or remount it read-write",
            error,
        )
    mode = os.W_OK | (os.X_OK if os.path.isdir(path) else 0)
    if not os.access(path, mode):
        error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        what = "create files in" if os.path.isdir(path) else "write"
        raise Failure(
            EXIT_ERROR,
            f"cannot {what} {role} {_q(path)}: permission denied (EACCES): "
            "choose a DEST you may write to, or change its permissions",
            error,
        )


def _check_existing_dest(dest: str, overwrite: bool) -> None:
    info = os.stat(dest) if os.path.exists(dest) else None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} is not a regular file: name a database file or a folder",
            UsageError("DEST"),
        )
    if not info.st_size:
        return  # an empty file is an empty database: nothing to lose
    if not overwrite:
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} exists and is not empty: pass --overwrite to replace "
            "it (it is replaced only once the copy is complete)",
            UsageError("DEST"),
        )
    try:
        header = files.read_header(dest, len(SQLITE_HEADER))
    except OSError as exc:
        cure = CURES.get(exc.errno or 0, "check the file")
        raise Failure(
            EXIT_ERROR, f"cannot read DEST {_q(dest)}: {_os_cause(exc)}: {cure}", exc
        ) from exc
    if header != SQLITE_HEADER:
        raise Failure(
            EXIT_USAGE,
            f"DEST {_q(dest)} is not an SQLite database: --overwrite replaces "
            "a database only; delete the file yourself, or choose another DEST",
            UsageError("DEST"),
        )
    _check_writable(dest, "DEST")


def _check_wal_page_size(source: str, dest: str) -> None:
    """Refuse, before anything is written, an existing DEST in WAL mode whose
    page size is not SOURCE's: SQLite cannot change the page size of a WAL
    database, so the backup's first step would fail (the library's
    ReadOnlyError).  Headers read through SQLite (files.read_header)."""
    try:
        header = files.read_header(dest)
    except OSError:
        return  # _check_existing_dest read it; the copy reports a new error
    wal = len(header) >= 20 and header[18] == 2 and header[19] == 2
    dest_size = files.header_page_size(header)
    source_size = header_page_size(source)
    if not wal or not dest_size or not source_size or dest_size == source_size:
        return
    raise Failure(
        EXIT_USAGE,
        f"DEST {_q(dest)} is in WAL mode and its page size ({dest_size}) is not "
        f"SOURCE's ({source_size}): SQLite cannot change the page size of a "
        "database in WAL mode, so the copy cannot be written into it. Nothing "
        f"was written. Give DEST the page size {source_size} first (PRAGMA "
        f"journal_mode=DELETE, PRAGMA page_size={source_size}, VACUUM), or "
        "choose another DEST",
        UsageError("DEST"),
    )


def header_page_size(path: str) -> int:
    """The page size in a database file's header (0 when it cannot be read),
    read through SQLite (files.read_header): it takes no lock, so a busy
    database answers too."""
    try:
        return files.header_page_size(files.read_header(path))
    except OSError:
        return 0
