"""Files around a backup: the rules, OS causes, and the atomic new copy.

The one place the file rules live, shared by copy() and the command line:

- check_distinct() refuses a target that is the source's own file or one of
  its side files (SQLite owns those: it deletes or overwrites them), with
  folders compared by identity (device, inode), so another mount of the
  source's folder is seen through;
- check_no_stale_side_files() refuses a new target whose -journal or -wal is
  already there (the first open of the copy would apply it);
- os_cause() turns an OSError into words that name the cause and the cure;
- NewFile writes a new target under a temporary name in the target's folder
  and puts it in place only once it is complete, so the target's name never
  holds a partial file, whatever happens to the process;
- remove_stale() deletes the temporary files of runs that were killed;
- FolderLock, mark_source() and marked_source() are what rotation (the
  command's --keep) stands on: a lock on the folder, and each backup marked
  with the identity of the database it is a backup of.

Errors carry facts -- role ("source"/"target"/"target's folder"), path,
the OS's errno, the side file, what the target holds, a give-up's figures:
with_facts() -- so that each front end words them its own way (the
messages given here are copy()'s).

A temporary file is named ``<target name>.apsw-backup-<pid>-<token>.partial``
(SQLite may add ``-journal``, ``-wal``, ``-shm``), so a person sees what it
is, and no backup name pattern (``*.db``) matches it.  A live run holds a
flock() on it from the moment it exists (see NewFile.create): a file whose
lock can be taken belongs to a dead run, whatever the PID in its name says
-- runs in containers are all PID 1.  The PID is there for people only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from apsw_backup import _apsw_backup as _c

SIDE_FILES = ("-wal", "-shm", "-journal")
SQLITE_HEADER = b"SQLite format 3\x00"

_TEMPORARY = re.compile(
    r"\.apsw-backup-(?P<pid>[0-9]+)-[0-9a-f]{8}\.partial(?P<side>-wal|-shm|-journal)?\Z"
)
# Room for the marker within NAME_MAX (255 bytes) whatever the target's name.
_NAME_KEPT = 100

# The side files that SQLite applies to the database file it finds them
# beside: a stale one would be applied to a new copy of that name.  (A stale
# -shm is rebuilt from the -wal, harmless without one.)
APPLIED_SIDE_FILES = ("-journal", "-wal")

# The (device, inode) of this process's live temporary files: remove_stale()
# must never open() them -- closing that descriptor would drop the POSIX
# locks SQLite holds on them in this process.
_OURS: set[tuple[int, int]] = set()
_OURS_LOCK = threading.Lock()

# What each OS cause means for a database path, and what to do about it.
_CAUSES = {
    errno.ENOENT: ("does not exist (no such file or folder)", "check the path"),
    errno.ENOTDIR: ("has a part that is not a folder", "check the path"),
    errno.EISDIR: ("is a folder", "give the path of a database file"),
    errno.EACCES: ("is not accessible (permission denied)", "check its permissions"),
    errno.EPERM: (
        "is not accessible (operation not permitted)",
        "check its permissions",
    ),
    errno.EROFS: ("is on a read-only file system", "use a writable place"),
    errno.ENOSPC: ("is on a full file system (no space left)", "free some space"),
    errno.ENAMETOOLONG: ("has a name that is too long", "give a shorter name"),
    errno.ELOOP: ("has too many levels of symbolic links", "check the links"),
}


# SQLite's unix VFS names a database by its full path (absolute, symbolic
# links resolved) and opens none whose full path with "-journal" is longer
# than its MAX_PATHNAME, 512 bytes: "unable to open database file".
SQLITE_MAX_PATHNAME = 512
SQLITE_PATH_LIMIT = SQLITE_MAX_PATHNAME - len("-journal")


def sqlite_path_size(path: str) -> int:
    """The size in bytes of the full path SQLite opens the database at path
    by (absolute, symbolic links resolved): more than SQLITE_PATH_LIMIT and
    SQLite cannot open it."""
    return len(os.fsencode(os.path.realpath(path)))


# The bytes of a database file SQLite's unix VFS locks for SHARED: every
# connection to a WAL database holds a shared lock on them while it is
# open, so an exclusive lock on them means no other connection is there.
_SHARED_FIRST = 0x40000000 + 2  # PENDING_BYTE + 2
_SHARED_SIZE = 510


def remove_unused_shm(database: str) -> bool:
    """Delete the -shm of the WAL database at `database` if no connection
    uses it, as SQLite's last connection does: under an exclusive lock on
    the database file's SHARED bytes, which no other connection then holds
    nor can take while the -shm goes (a connection that opens the database
    after creates a new -shm and rebuilds it from the -wal, which is kept).
    True if it was deleted; False if another connection holds the database,
    this process may not write it (the lock needs a descriptor open for
    writing, nothing is written), or the -shm cannot be deleted.

    Opens the database file with a descriptor of its own, so it does nothing
    (False) while this process has the database or its -shm open at all --
    an SQLite connection of its own, say: the exclusive lock would not
    conflict with the process's own locks, and closing the descriptor would
    drop them -- and where that cannot be seen (no /proc/self/fd).
    """
    real = os.path.realpath(database)  # SQLite names the -shm after it
    if not os.path.isdir("/proc/self/fd"):
        return False
    for path in (real, real + "-shm"):
        info = _stat(path)
        if info is None or _open_descriptor_of((info.st_dev, info.st_ino)) >= 0:
            return False
    try:
        fd = os.open(real, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
        os.remove(real + "-shm")
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock
    return True


def read_header(path: str, size: int = 100) -> bytes:
    """The first `size` (<= 100) bytes of the file at path, fewer if it is
    shorter: b"" for an empty file.

    Read through an SQLite handle of its own (Connection.file_header), never
    a descriptor of ours: the file may be a database other connections of
    this process have open, and closing any descriptor of a file drops every
    POSIX lock the process holds on it, SQLite's included
    (sqlite.org/howtocorrupt.html, section 2.2).  SQLite's unix VFS keeps
    the descriptor of a closed connection open while other connections of
    the process hold locks on the file, so closing this one drops nothing.
    Opening it takes no lock and reads nothing but the header.

    Raises OSError (with its errno) when the file cannot be read: a folder
    or another kind of file that is not a regular one (EINVAL: a FIFO would
    block the open), or one SQLite cannot open.
    """
    path = os.path.abspath(path)  # never taken for a URI ("file:...")
    info = os.stat(path)  # raises FileNotFoundError, PermissionError, ...
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", path)
    try:
        conn = _c.Connection(path, _c.SQLITE_OPEN_READONLY)
    except _c.Error as exc:
        if not os.access(path, os.R_OK):
            raise PermissionError(
                errno.EACCES, os.strerror(errno.EACCES), path
            ) from exc
        raise OSError(errno.EIO, f"SQLite cannot open it: {exc}", path) from exc
    try:
        return conn.file_header("main")[:size]
    except _c.Error as exc:  # the read itself failed (an I/O error)
        raise OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({exc})", path) from exc
    finally:
        conn.close()


def close_as_last_connection(path: str, busy_ms: int = 0) -> None:
    """Open a read-write connection to the database at path, read its
    schema, and close it.  If it is the last connection to the database (of
    any process), SQLite checkpoints the -wal and removes -wal and -shm as
    it closes, under its own locks; otherwise nothing changes.  The one way
    this library leaves no side files it made beside a database: it never
    deletes them itself.  Any error is ignored (then the files stay)."""
    try:
        conn = _c.Connection(os.path.abspath(path), _c.SQLITE_OPEN_READWRITE)
    except _c.Error:
        return
    try:
        if busy_ms:
            conn.set_busy_timeout(busy_ms)
        conn.execute("PRAGMA schema_version").fetchall()
    except _c.Error:
        pass
    finally:
        try:
            conn.close(True)
        except _c.Error:
            pass


def roll_back_hot_journal(path: str, seconds: float = 5.0) -> bool:
    """After a failed write into the existing database at path: if it has
    a -journal, open it so that SQLite rolls a hot journal back now (a
    read of the schema takes a shared lock, and with it SQLite restores the
    pages the journal holds).  Waits up to `seconds` for another
    connection's lock: a -journal beside a database another connection
    holds locked is that connection's live transaction, not a leftover.

    Returns True when the database is still torn: its -journal, not empty,
    could not be rolled back (no write access, an I/O error); it restores
    the database on the next read-write open, and must not be deleted.
    False: nothing was left to roll back, or it was rolled back now, or
    another connection holds the database (its journal is its own)."""
    if not os.path.lexists(path + "-journal"):
        return False
    try:
        conn = _c.Connection(os.path.abspath(path), _c.SQLITE_OPEN_READWRITE)
    except _c.Error:
        return _journal_left(path)
    try:
        conn.set_busy_timeout(int(max(0.0, min(seconds, 60.0)) * 1000))
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except (_c.BusyError, _c.LockedError):
        return False
    except _c.Error:
        return _journal_left(path)
    finally:
        try:
            conn.close(True)
        except _c.Error:
            pass
    return False


def _journal_left(path: str) -> bool:
    """Whether the database at path has a -journal that is not empty."""
    try:
        return os.stat(path + "-journal").st_size > 0
    except OSError:
        return False


def header_is_wal(header: bytes) -> bool:
    """Whether a database header (read_header) says WAL mode."""
    return (
        len(header) >= 20
        and header.startswith(SQLITE_HEADER)
        and (header[18:20] == b"\x02\x02")
    )


def header_page_size(header: bytes) -> int:
    """The page size a database header (read_header) gives; 0: not a
    database header."""
    if len(header) < 18 or not header.startswith(SQLITE_HEADER):
        return 0
    size = int.from_bytes(header[16:18], "big")
    return 65536 if size == 1 else size


def os_cause(exc: OSError) -> str:
    """'is a folder (EISDIR): give the path of a database file' for exc."""
    code = exc.errno if exc.errno is not None else 0
    name = errno.errorcode.get(code, str(code))
    what, cure = _CAUSES.get(code, (exc.strerror or "cannot be used", "check it"))
    return f"{what} ({name}): {cure}"


# -- The facts an error carries ----------------------------------------------
#
# Every error this library raises about a file, and every give-up, carries
# the same attributes (None where they do not apply), set by with_facts()
# alone.  A front end words the error from them in its own terms (the
# command line: SOURCE, DEST, --timeout); the library's own message, str(),
# is its wording of the same facts.  Nothing reads the message back.

FACTS = ("role", "path", "os_errno", "side", "target_state", "gave_up")
ROLES = ("source", "target", "target's folder")
# What the target holds after the failure: "not created" (a new target: no
# copy at its name), "unchanged" (an existing one, never written), "rolled
# back" (written, then rolled back to its previous content), "complete"
# (it holds the complete copy: what failed came after), "incomplete" (an
# existing one, torn by a failed write, that SQLite could not roll back yet:
# its -journal restores it at the next read-write open; roll_back_hot_journal).
TARGET_STATES = ("not created", "unchanged", "rolled back", "complete", "incomplete")


@dataclass(frozen=True)
class GaveUp:
    """A give-up: the deadline (timeout, seconds) passed after elapsed
    seconds; pages_copied of page_count (None: not known); waits: steps that
    found the database locked; restarts: times the copy began again because
    another connection wrote to the source."""

    elapsed: float
    timeout: float
    pages_copied: int | None = None
    page_count: int | None = None
    waits: int = 0
    restarts: int = 0


_E = TypeVar("_E", bound=BaseException)


def with_facts(error: _E, **facts: Any) -> _E:
    """error, carrying the facts given and None for the others of FACTS:

    - role: what path is to the copy: "source", "target", "target's folder";
    - path: the file or folder concerned;
    - os_errno: the OS's errno of the cause (an int), if the OS gave one;
    - side: "-wal", "-shm" or "-journal" when the fact is about that side
      file of path;
    - target_state: what the target holds now (TARGET_STATES);
    - gave_up: a GaveUp, when the deadline passed.
    """
    unknown = set(facts) - set(FACTS)
    if unknown:
        raise TypeError(f"not facts of an error: {sorted(unknown)}")
    if facts.get("role") not in (None, *ROLES):
        raise ValueError(f"role must be one of {ROLES}, not {facts['role']!r}")
    if facts.get("target_state") not in (None, *TARGET_STATES):
        raise ValueError(f"target_state must be one of {TARGET_STATES}")
    for name in FACTS:
        setattr(error, name, facts.get(name))
    return error


class SameFileError(ValueError):
    """The target is the source's database file (side "") or one of its side
    files (side "-wal", "-shm", "-journal").

    Facts (with_facts): role "target", path (the target as given), side;
    and source: the source's file.
    """

    errno = None

    def __init__(self, source: str, path: str, side: str, role: str = "target") -> None:
        self.source, self.target = source, path
        if role == "source":
            # The mirror: the source is named as one of the target's side
            # files.  Opening the target, SQLite would take it for the
            # target's journal or WAL, and apply or delete it.
            with_facts(self, role="source", path=source, side=side)
            super().__init__(
                f"the source {source!r} is named as the target's {side[1:]} file "
                f"(target {path!r}): opening the target, SQLite would take the "
                "source for the target's own file and delete or apply it, so "
                "the source would be lost; rename or copy the source to "
                "another name first, or choose another target"
            )
            return
        with_facts(self, role="target", path=path, side=side)
        if side:
            message = (
                f"the target {path!r} is the source's {side[1:]} file "
                f"{source + side!r} (source {source!r}): SQLite owns that file "
                "and deletes or rewrites it, so a copy there would be lost; "
                "give the target another name"
            )
        else:
            message = (
                f"the target {path!r} is the source database {source!r} itself "
                "(the same database): copy it to another file"
            )
        super().__init__(message)


class StaleSideFileError(FileExistsError):
    """A new target's -journal or -wal is already there.

    Facts (with_facts): role "target", path (the target), side ("-journal"
    or "-wal"), target_state "not created"; filename: the stale file;
    errno: EEXIST.
    """

    def __init__(self, path: str, side: str) -> None:
        super().__init__(errno.EEXIST, os.strerror(errno.EEXIST), path + side)
        with_facts(
            self, role="target", path=path, side=side, target_state="not created"
        )
        self.message = (
            f"the new target {path!r} does not exist, but {path + side!r} is "
            "there (left by a crash, or by a deleted database of that name): "
            "SQLite would apply it to the copy when it is first opened and "
            "corrupt it.  Move it away once you know it is not needed, or "
            "choose another target"
        )

    def __str__(self) -> str:
        return self.message


def is_temporary_name(filename: str) -> bool:
    """Whether filename (a path or a base name) is a temporary file of ours,
    or one of its side files, live or left by a killed run."""
    return _TEMPORARY.search(os.path.basename(filename)) is not None


def temporary_path(final: str) -> str:
    """A fresh temporary name for final, in final's folder."""
    folder, name = os.path.split(final)
    token = os.urandom(4).hex()  # not secrets: importing it costs ~4 ms
    return os.path.join(
        folder, f"{_cut(name, _NAME_KEPT)}.apsw-backup-{os.getpid()}-{token}.partial"
    )


def _cut(name: str, size: int) -> str:
    """name cut to at most size bytes as the file system counts them (a
    file name's limit is in bytes: 100 characters of a multi-byte name may
    be 400), never in the middle of a UTF-8 character."""
    data = os.fsencode(name)
    if len(data) <= size:
        return name
    end = size
    while end > 0 and data[end] & 0xC0 == 0x80:  # a continuation byte
        end -= 1
    return os.fsdecode(data[:end])


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _places(path: str) -> set[tuple[tuple[int, int] | None, str]]:
    """{(identity of the folder, file name)} a path names, through its own
    spelling and through symbolic links: a folder has one identity however
    it is reached (another name, a link, a bind mount of it)."""
    found = set()
    for spelled in {os.path.abspath(path), os.path.realpath(path)}:
        folder, name = os.path.split(spelled)
        info = _stat(folder or os.sep)
        found.add(((info.st_dev, info.st_ino) if info else None, name))
    return found


def side_file_of(source_path: str, target_path: str) -> str | None:
    """What target_path is to the source database file source_path: ""
    for the file itself (same device and inode: through links and other
    names), "-wal", "-shm" or "-journal" for one of its side files (the
    source's name plus that suffix in the same folder -- the folder
    compared by device and inode, so through links and other mounts of it
    -- existing or not, or by inode), None for neither.  source_path ""
    (in memory) is distinct from everything."""
    if not source_path:
        return None
    source_stat, target_stat = _stat(source_path), _stat(target_path)
    if source_stat is not None and target_stat is not None:
        if _same_file(source_stat, target_stat):
            return ""
    # SQLite names side files after the path it opened, which newer versions
    # resolve through symbolic links: either name may be in use.
    targets = _places(target_path)
    for folder, name in sorted(_places(source_path), key=repr):
        if folder is None:
            continue
        if (folder, name) in targets:
            return ""
        for suffix in SIDE_FILES:
            if (folder, name + suffix) in targets:
                return suffix
    target_real = os.path.realpath(target_path)
    for base in sorted({os.path.abspath(source_path), os.path.realpath(source_path)}):
        for suffix in SIDE_FILES:
            side = base + suffix
            if os.path.realpath(side) == target_real:
                return suffix  # a link named as the side file, to the target
            side_stat = _stat(side)
            if side_stat is not None and target_stat is not None:
                if _same_file(side_stat, target_stat):
                    return suffix
    return None


def check_distinct(source_path: str, target_path: str) -> None:
    """Raise SameFileError (a ValueError), naming both, if target_path is the
    source's database file or one of its side files (see side_file_of), or
    source_path one of the target's (role "source": SQLite, opening the
    target, would delete or apply it)."""
    found = side_file_of(source_path, target_path)
    if found is not None:
        raise SameFileError(source_path, target_path, found)
    found = side_file_of(target_path, source_path)
    if found:  # the source is named as one of the target's side files
        raise SameFileError(source_path, target_path, found, role="source")


def check_no_stale_side_files(path: str) -> None:
    """Raise StaleSideFileError if a new database file at path would find a
    -journal or -wal already beside it (see APPLIED_SIDE_FILES)."""
    for side in APPLIED_SIDE_FILES:
        if os.path.lexists(path + side):
            raise StaleSideFileError(path, side)


def check_not_named_as_side_file(path: str) -> None:
    """Refuse a target named as another database's side file (other.db-wal,
    other.db-journal, other.db-shm, that database beside it): the first
    time that database is opened, SQLite would apply the copy to it as its
    journal or WAL, or delete it.  A ValueError with facts role "target",
    path (the database it belongs to) and side."""
    for spelled in dict.fromkeys((os.path.abspath(path), os.path.realpath(path))):
        for suffix in SIDE_FILES:
            owner = spelled[: -len(suffix)]
            if spelled.endswith(suffix) and os.path.isfile(owner):
                raise with_facts(
                    ValueError(
                        f"the target {path!r} is the {suffix} file name of the "
                        f"database {owner!r}: SQLite would take the copy for "
                        "part of that database (apply it, or delete it) the "
                        "next time it is opened. Choose another target"
                    ),
                    role="target",
                    path=owner,
                    side=suffix,
                )


def side_paths(path: str) -> list[str]:
    return [path + suffix for suffix in SIDE_FILES]


def remove_quietly(path: str) -> None:
    """Remove path if it exists; never raises (used while failing)."""
    try:
        os.remove(path)
    except OSError:
        pass


def fsync_folder(folder: str) -> None:
    """Make a rename or a removal in folder durable."""
    fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dead_runs_file(path: str) -> bool:
    """Remove path (a temporary file) and its side files if no run holds its
    lock; whether it did.  Never opens a live file of this process."""
    info = _stat(path)
    if info is None:
        return False
    with _OURS_LOCK:
        if (info.st_dev, info.st_ino) in _OURS:
            return False
    if _open_descriptor_of((info.st_dev, info.st_ino)) >= 0:
        # This process has it open (SQLite, or a run in another thread):
        # a descriptor of ours, once closed, would drop its POSIX locks.
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False  # gone, or not ours to judge: leave it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live run's (or a lock we cannot take: leave it)
        if _identity(fd) != _identity_of(path):
            return False  # replaced meanwhile
        # Removed while locked: a run that has just created this file and
        # waits for its lock finds it gone once it has it, and starts again
        # (NewFile.create), so no live run ever loses its file here.
        for side in side_paths(path):
            remove_quietly(side)
        try:
            os.remove(path)
        except OSError:
            return False
        return True
    finally:
        # Nothing of this process had it open (checked above): closing
        # this descriptor drops no lock of ours.
        os.close(fd)


def remove_stale(folder: str) -> list[str]:
    """Remove the temporary files (and their side files) that killed runs
    left in folder; returns the paths removed.

    A file is a dead run's when its flock() can be taken: a live run holds
    it from the moment the file exists to its end (see NewFile.create).
    Neither the PID in the name nor the file's age is trusted: runs in
    containers share PIDs, and clocks move.  A live temporary file of this
    process (another thread's copy) is recognised by its identity and never
    opened.  A side file whose temporary file is gone is a leftover too."""
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = _TEMPORARY.search(name)
        if match is None:
            continue
        path = os.path.join(folder, name)
        if match["side"]:
            base = path[: len(path) - len(match["side"])]
            if os.path.lexists(base):
                continue  # removed with its temporary file, or live
            if os.path.lexists(path):
                remove_quietly(path)
                removed.append(path)
            continue
        sides = [p for p in side_paths(path) if os.path.lexists(p)]
        if _dead_runs_file(path):
            removed.extend([path, *sides])
    return sorted(removed)


class NewFile:
    """A new target written under a temporary name and put in place at once.

    create() makes the temporary file (exclusively) and holds a flock() on it
    for as long as this object lives, so remove_stale() of another run leaves
    it alone.  publish() fsyncs it, links it to the final name (failing if
    that name appeared meanwhile: never overwrites), removes the temporary
    name and fsyncs the folder.  discard() removes it and its side files.
    Until publish() returns, the final name does not exist.

    The file belongs to the process that created it: in a child forked
    meanwhile (from a progress callback, say), publish() refuses and
    discard() removes nothing -- the parent's copy is still being written.
    """

    def __init__(self, final: str) -> None:
        self.final = final
        self.path = temporary_path(final)
        self._fd = -1
        self._ident: tuple[int, int] | None = None
        self._pid = os.getpid()

    def create(self) -> None:
        """Create the temporary file, locked from the moment it has a name.

        Between the creation and the flock(), another run's remove_stale()
        may take the unlocked file for a dead run's and remove it (it does
        so under the lock): once the lock is ours, the name is checked to
        still be this file, and a new name is made if not."""
        check_owned()
        for _ in range(100):
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666
            )
            ident = _identity(fd)
            with _OURS_LOCK:
                if ident is not None:
                    _OURS.add(ident)
            self._fd, self._ident = fd, ident
            try:
                # Blocking: a remover holds it only while it removes the file.
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                self.discard()
                raise
            if _identity_of(self.path) == ident:
                return
            self._close()
            self.path = temporary_path(self.final)
        raise FileExistsError(
            errno.EEXIST, "temporary files keep being removed", self.path
        )

    @property
    def fd(self) -> int:
        """The temporary file's descriptor (-1 once closed)."""
        return self._fd

    def publish(self) -> None:
        """Put the file in place; FileExistsError if the final name appeared,
        StaleSideFileError if a -journal or -wal appeared beside it."""
        check_owned()  # a child forked during the call: its words
        if os.getpid() != self._pid:
            raise _c.ForkingViolationError(
                f"this new file was started by process {self._pid}, and this "
                "process is a child forked from it: the child leaves it to "
                "the parent, which puts it in place"
            )
        check_no_stale_side_files(self.final)
        os.fsync(self._fd)
        try:
            os.link(self.path, self.final)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            # No hard links here (some network or FAT file systems): a rename,
            # after a last look so an existing file is not replaced.
            if os.path.lexists(self.final):
                raise FileExistsError(
                    errno.EEXIST, os.strerror(errno.EEXIST), self.final
                ) from exc
            os.rename(self.path, self.final)
            self._settle(renamed=True)
        else:
            self._settle(renamed=False)
        self._close()

    def _settle(self, renamed: bool) -> None:
        """After the link (or rename) to the final name: remove the
        temporary name, fsync the folder.  If either fails, the final name
        is taken back (it is this file: nobody else writes a name that did
        not exist), so that "not created" stays true, and the error raised;
        if that fails too, the copy stays in place and publishing succeeded
        (the final name holds the complete copy).  Found by tests/fsfaults:
        an EIO from the folder's fsync was reported as "DEST was not
        created" with DEST in place."""
        try:
            if not renamed:
                os.remove(self.path)
            fsync_folder(os.path.dirname(self.final))
        except OSError:
            if _identity_of(self.final) != self._ident:
                raise
            try:
                os.remove(self.final)
            except OSError:
                return
            raise

    def discard(self) -> None:
        if os.getpid() == self._pid:  # a forked child leaves the parent's file
            for path in (self.path, *side_paths(self.path)):
                remove_quietly(path)
        self._close()

    def _close(self) -> None:
        # Only once SQLite has closed the file: closing any descriptor of a
        # file drops the process's POSIX locks on it, SQLite's included.
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        with _OURS_LOCK:
            _OURS.discard(self._ident)
        self._ident = None


def _identity_of(path: str) -> tuple[int, int] | None:
    info = _stat(path)
    return (info.st_dev, info.st_ino) if info is not None else None


# The extended attribute that marks a backup with the database it is a
# backup of: the source's real path (symbolic links resolved), as bytes.
SOURCE_MARK = "user.apsw_backup.source"

# errno values that say a file system has no (user) extended attributes.
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, getattr(errno, "ENOSYS", -1)}


def source_identity(source: str) -> bytes:
    """What a backup of source is marked with (see mark_source)."""
    return os.fsencode(os.path.realpath(source))


def mark_source(path: str, source: str) -> None:
    """Mark the file path as a backup of source (SOURCE_MARK); OSError
    (ENOTSUP where the file system has no extended attributes)."""
    setxattr = getattr(os, "setxattr", None)
    if setxattr is None:
        raise OSError(errno.ENOTSUP, "no extended attributes here", path)
    setxattr(path, SOURCE_MARK, source_identity(source), follow_symlinks=False)


def marked_source(path: str, strict: bool = False) -> bytes | None:
    """The source a file is marked as a backup of; None when it carries no
    mark (or its mark cannot be read: then it is nobody's).  strict: an
    OSError other than "no such attribute" (ENODATA, ENOTSUP) is raised, so
    that a mark that exists but could not be read (EIO) is not taken for
    no mark (found by tests/fsfaults)."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return None
    try:
        return bytes(getxattr(path, SOURCE_MARK, follow_symlinks=False))
    except OSError as exc:
        if strict and exc.errno not in (errno.ENODATA, *_NO_XATTRS):
            raise
        return None


def marks_supported(folder: str) -> OSError | None:
    """None if files in folder can carry SOURCE_MARK, else the OSError that
    says why not (ENOTSUP: the file system has no user extended
    attributes).  Reads only: the folder's own attribute is looked up."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:
        return OSError(errno.ENOTSUP, "no extended attributes here", folder)
    try:
        getxattr(folder or ".", SOURCE_MARK)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return exc
    return None


class FolderLock:
    """A flock() on a folder's own descriptor: the runs that publish into a
    folder and rotate its backups take turns with it.

    A run holds it shared from just before its new file is put in place
    until it has reported; one that rotates holds it exclusive instead, from
    before its new file is put in place, through deciding and deleting,
    until it has reported.  So no run deletes a backup that another is
    still reporting, and rotations never overlap.  It is released by
    release() or by the process's end, whatever ends it.

    A flock() belongs to the open descriptor, which a fork() shares: a
    child (a multiprocessing worker, say) would hold the parent's lock for
    as long as it lives.  So a child closes its copies at once: the lock
    stays the parent's alone, and the child holds none.
    """

    _held: weakref.WeakSet[FolderLock] = weakref.WeakSet()

    def __init__(self, folder: str) -> None:
        self.folder = folder or "."
        self.exclusive = False
        self._fd = -1

    @classmethod
    def _after_fork_in_child(cls) -> None:
        for lock in list(cls._held):
            if lock._fd >= 0:
                fd, lock._fd = lock._fd, -1
                try:
                    os.close(fd)  # the child's copy: the parent keeps its lock
                except OSError:
                    pass

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(
        self,
        exclusive: bool,
        wait: float,
        check: Callable[[], object] | None = None,
    ) -> bool:
        """Take the lock within `wait` seconds (False if another run held it
        all that time), calling check() between tries (it may raise to
        stop).  OSError if the folder cannot be opened or locked at all."""
        fd = os.open(
            self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC
        )
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait
        pause = 0.001
        try:
            while True:
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                    if check is not None:
                        check()
                    time.sleep(pause)
                    pause = min(2 * pause, 0.02)
                    continue
                break
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.exclusive = fd, exclusive
        FolderLock._held.add(self)
        return True

    def release(self) -> None:
        FolderLock._held.discard(self)
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # a folder: no SQLite lock of this process on it


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FolderLock._after_fork_in_child)


def folder_lock_problem(folder: str) -> OSError | None:
    """None if folder can be locked exclusively (see FolderLock), else the
    OSError that says why not (some network file systems refuse an
    exclusive flock() of a folder opened for reading)."""
    lock = FolderLock(folder)
    try:
        lock.acquire(True, 0.0)  # held by another run: lockable all the same
    except OSError as exc:
        return exc
    lock.release()
    return None


class Flusher:
    """Write a file out to the disk each time it has grown by `every` bytes.

    On Linux, sync_file_range(): start writing the newest slice, then wait
    for the one before it to be written -- the disk keeps writing while the
    copy goes on, and at most about two slices of the copy's dirty data are
    ever queued in front of another process's fsync.  It issues no journal
    commit and no device cache flush (fdatasync() issues both: ~5 ms each,
    doubling a 300 MB copy's time): the durability of the copy is still the
    final commit's fsync, this only keeps the dirty data small.  Elsewhere
    (or if the call is refused), fdatasync() of the whole file.

    Given the descriptor to write out, or -- for a file other connections of
    this process may have open -- borrowing() one that is already open on
    it: closing a descriptor of our own would drop every POSIX lock this
    process holds on the file, SQLite's included.  A borrowed descriptor is
    checked (device and inode) before each use; one closed and reused
    meanwhile by an unrelated file is looked up again (at worst that other
    file was written out early, harmless).  Without /proc/self/fd (not
    Linux), nothing to borrow: flush_if_grown() does nothing.

    An error raises OSError: waiting for writeback reports a write error
    once per open file, so it must fail the copy here, or SQLite's own fsync
    of the same file could succeed on data that never reached the disk.
    """

    def __init__(self, fd: int, every: int, ident: tuple[int, int] | None = None):
        self._fd, self._every, self._ident = fd, every, ident
        self.flushed = self._size() if fd >= 0 else 0
        self._started = self.flushed  # slice [flushed, started) in flight
        self.flushes = 0

    @classmethod
    def borrowing(cls, path: str, every: int) -> Flusher:
        try:
            info = os.stat(path)
        except OSError:
            return cls(-1, every)
        ident = (info.st_dev, info.st_ino)
        return cls(_open_descriptor_of(ident), every, ident)

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def _still_ours(self) -> bool:
        if self._ident is None:
            return self._fd >= 0
        if self._fd >= 0 and _identity(self._fd) == self._ident:
            return True
        self._fd = _open_descriptor_of(self._ident)
        return self._fd >= 0

    def flush_if_grown(self) -> None:
        """Write out what the file grew by, once that is `every` bytes or
        more; raises the OSError of a failed write."""
        if not self._still_ours():
            return
        size = self._size()
        if size - self._started < self._every:
            return
        self.flushes += 1
        if not _write_range(self._fd, self._started, size - self._started, start=True):
            os.fdatasync(self._fd)
            self.flushed = self._started = size
            return
        if self._started > self.flushed:
            _write_range(self._fd, self.flushed, self._started - self.flushed)
        self.flushed, self._started = self._started, size


_SYNC_FILE_RANGE: Any = None  # the libc function, False where there is none
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _write_range(fd: int, offset: int, length: int, start: bool = False) -> bool:
    """sync_file_range(2): start writing the range (start=True) or write it
    and wait until written; False where there is no such call."""
    global _SYNC_FILE_RANGE
    if _SYNC_FILE_RANGE is None:
        _SYNC_FILE_RANGE = _load_sync_file_range()
    if _SYNC_FILE_RANGE is False:
        return False
    flags = _WRITE if start else _WAIT_BEFORE | _WRITE | _WAIT_AFTER
    if _SYNC_FILE_RANGE(fd, offset, length, flags) == 0:
        return True
    import ctypes

    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP):
        _SYNC_FILE_RANGE = False  # refused here: fdatasync from now on
        return False
    raise OSError(code, os.strerror(code))


def _load_sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _open_descriptor_of(ident: tuple[int, int]) -> int:
    """A descriptor this process already has open on the file, or -1."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return -1
    for name in names:
        if name.isdigit() and _identity(int(name)) == ident:
            return int(name)
    return -1


# -- a call and the process it was started in ----------------------------
#
# A public call (copy(), restore(), incremental()) may be forked in the
# middle -- by its progress callback, or by a destructor the garbage
# collector runs anywhere.  The child carries on the parent's call from
# that point; what the C core made before the fork is inert there
# (ForkingViolationError), but what the call would do next (open new
# connections, write or remove files) would act on the parent's files.  So
# the outermost call of a thread notes its process, and every place that
# writes, truncates or removes a file, or starts the next stage, first
# calls check_owned(): in a child it raises, touching nothing.

_owner = threading.local()

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def owned_call() -> Any:
    """The outermost call of this thread notes the process it runs in."""
    outer = getattr(_owner, "pid", None)
    if outer is None:
        _owner.pid = os.getpid()
    try:
        yield
    finally:
        if outer is None:
            _owner.pid = None


def owned(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """func as a call that a forked child does not carry on (check_owned)."""

    @functools.wraps(func)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with owned_call():
            return func(*args, **kwargs)

    return call


def check_owned() -> None:
    """ForkingViolationError in a child forked during this thread's call."""
    pid = getattr(_owner, "pid", None)
    if pid is not None and pid != os.getpid():
        raise _c.ForkingViolationError(
            f"this call was started by process {pid}, and this process is a "
            "child forked during it (by a callback or a destructor): the "
            "child stops it here, touching nothing of the parent's files. "
            "Call it again in the child if the child needs its own"
        )
