"""Why SQLite could not open or read a database file, with the cure.

SQLite's own words for these ("attempt to write a readonly database",
"unable to open database file") name neither the cause nor the cure, and
the errno it records may be that of a side file it tried to create
(ENOENT for a -shm that is not there).  The cases, found from the files:

- a hot -journal (a writer interrupted mid-transaction): reading needs the
  rollback first, and that needs write access to the file and its folder --
  and a read-write connection: this command opens SOURCE and FILE read-only,
  so SQLite says SQLITE_READONLY_ROLLBACK even where it could write;
- a WAL database: reading needs its -wal and -shm, which SQLite creates in
  the folder when they are not there -- impossible in a folder this user may
  not write to, or on a read-only file system;
- the file itself missing or unreadable (only then is ENOENT the cause).
"""

from __future__ import annotations

import os
import shlex

import apsw_backup
from apsw_backup import files
from apsw_backup.cli.dest_file import header_facts
from apsw_backup.cli.errors import PROG, _os_cause, _q


def open_problem(path: str, exc: apsw_backup.Error, role: str) -> str:
    """exc (raised opening or reading the database at path, which plays
    `role`: SOURCE, DEST, FILE) in words that name the cause and the cure."""
    found = cause_of(path, role, exc)
    if found:
        return found
    text = f"{type(exc).__name__}: {exc}"
    if "No such file or directory" in text and os.path.lexists(path):
        # SQLite's errno is that of the last file it tried, which may be a
        # side file; the file itself is there.
        text += (
            f" -- {role} {_q(path)} itself exists: the missing file is one SQLite "
            "needed beside it (its -wal, -shm or -journal), which it could not "
            "create there: check the folder's permissions and file system"
        )
    return text


# SQLITE_READONLY_ROLLBACK: a read-only connection found a hot journal,
# which only a connection that may write can roll back.
READONLY_ROLLBACK = apsw_backup.SQLITE_READONLY | (3 << 8)


def cause_of(path: str, role: str, error: BaseException | None = None) -> str | None:
    """The cause and cure of a failure (error, if known) to read the database
    at path, from the files; None when none of the known causes is there."""
    try:
        os.stat(path)
    except OSError as exc:
        return f"{role} {_q(path)} {_os_cause(exc)}: check the path"
    if not os.access(path, os.R_OK):
        return (
            f"cannot read {role} {_q(path)}: permission denied (EACCES): run as "
            "a user who may read it, or change its permissions"
        )
    too_long = path_too_long(path, role)
    if too_long:
        return too_long
    folder = os.path.dirname(os.path.abspath(path))
    denied = _cannot_write(folder)
    if _is_hot(path + "-journal"):
        blocked = denied or _cannot_write(path)
        if blocked:
            return (
                f"{role} {_q(path)} has a hot journal {_q(path + '-journal')}: a "
                "writer was interrupted in the middle of a transaction, and SQLite "
                f"must roll that journal back before {role} can be read, which needs "
                f"write access to {role} and its folder {_q(folder)}, and {blocked}. "
                "Open it once as a user who may write there (the application's, "
                f"which does so by itself), then run this again; never delete "
                f"the -journal: {role} is damaged without it"
            )
        if getattr(error, "extendedresult", None) == READONLY_ROLLBACK:
            return (
                f"{role} {_q(path)} has a hot journal {_q(path + '-journal')}: a "
                "writer was interrupted in the middle of a transaction (it "
                f"crashed or was killed), and SQLite must roll that journal back "
                f"before {role} can be read; {PROG} opens {role} read-only, so it "
                "never does that itself. Open it once read-write as its owner "
                f"(sqlite3 {shlex.quote(path)} 'PRAGMA quick_check', or start the "
                "application, which does so by itself), then run this again; "
                f"never delete the -journal: {role} is damaged without it"
            )
    if header_facts(path).get("journal_mode") == "wal" and denied:
        missing = [
            side for side in ("-wal", "-shm") if not os.path.lexists(path + side)
        ]
        if missing:
            what = " and ".join(path + side for side in missing)
            if "read-only file system" in denied:
                cure = (
                    "remount it read-write, or copy the database file (with its "
                    "-wal, if there is one) to a writable place and use that copy"
                )
            else:
                cure = (
                    "run as a user who may create files in that folder (the "
                    "database's owner), or let the application keep the database "
                    "open meanwhile (its -wal and -shm then exist)"
                )
            return (
                f"{role} {_q(path)} is in WAL mode, and reading it needs its "
                f"{' and '.join(missing)} file{'s' if len(missing) > 1 else ''} "
                f"({what}), which SQLite must create in {_q(folder)}, and "
                f"{denied}: {cure}"
            )
    return None


def path_too_long(path: str, role: str, opened: str | None = None) -> str | None:
    """Why SQLite cannot open the database at path (`role`): its full path
    is longer than SQLite accepts; None if it is not.  opened: the file
    SQLite opens for it, if another (DEST's temporary file)."""
    size = files.sqlite_path_size(opened or path)
    if size <= files.SQLITE_PATH_LIMIT:
        return None
    what = f"{role} {_q(path)}"
    if opened:
        what += f" (written first as {_q(os.path.basename(opened))} beside it)"
    return (
        f"the path of {what} is too long for SQLite: made absolute, with "
        f"symbolic links resolved, it is {size} bytes, and SQLite opens no "
        f"database whose path is over {files.SQLITE_PATH_LIMIT} bytes (its "
        f"limit of {files.SQLITE_MAX_PATHNAME}, less 8 for the '-journal' it "
        "names beside it). Give it a shorter path: a folder nearer the root, "
        "or its folder bind-mounted at a short path (mount --bind); a "
        "symbolic link or cd does not help, SQLite resolves both"
    )


def _is_hot(journal: str) -> bool:
    try:
        return os.stat(journal).st_size > 0
    except OSError:
        return False


def _cannot_write(path: str) -> str | None:
    """Why this process may not write path (a file or folder), or None."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system (EROFS)"
    except OSError:
        pass
    mode = os.W_OK | (os.X_OK if os.path.isdir(path) else 0)
    if not os.access(path, mode):
        return f"this user may not write to {_q(path)} (EACCES)"
    return None
