"""What the command reports when it fails: exit codes, Failure, wording helpers.

in_our_words() words the library's errors in the command's terms (SOURCE,
DEST, --timeout) from the facts they carry (apsw_backup.files.with_facts),
never from their messages: a message is shown as it is, or not at all.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import apsw_backup
from apsw_backup import files

PROG = "apsw-backup"
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


class Failure(Exception):
    """What the command reports when it fails: exit code, message, cause."""

    def __init__(
        self, code: int, message: str, error: BaseException | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.error = error
        self.fields: dict[str, Any] = {}


class UsageError(Exception):
    """The command line is wrong (exit code 2)."""


def _q(path: str) -> str:
    return repr(path)


def _os_cause(exc: OSError) -> str:
    """ "no such file or directory (ENOENT)" for an OSError."""
    code = exc.errno or 0
    name = errno.errorcode.get(code, str(code))
    return f"{os.strerror(code).lower()} ({name})"


CURES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EACCES: "run as a user who may read it, or change its permissions",
    errno.ELOOP: "the path has a loop of symbolic links: check the path",
}


def _count(number: int, noun: str, plural: str | None = None) -> str:
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


# What the file layer's roles (files.ROLES) and target states
# (files.TARGET_STATES) are called here.
_ROLE_NAMES = {"target": "DEST", "target's folder": "DEST's folder"}
HOLDS = {
    "not created": "DEST was not created",
    "unchanged": "DEST is unchanged",
    "rolled back": "DEST was rolled back to its previous content",
    "complete": "DEST holds the complete copy",
    "incomplete": "DEST is incomplete: SQLite could not roll it back, and its "
    "rollback journal (DEST-journal) restores it the next time it is opened "
    "for writing. Do not delete or move that file",
}
_SIDE_FILE_NAMES = {
    "-wal": "write-ahead log",
    "-shm": "shared-memory index",
    "-journal": "rollback journal",
}


def in_our_words(
    exc: BaseException, source: str = "SOURCE", locked: str = "SOURCE"
) -> str | None:
    """An error of the library in the command's words, built from its facts
    (files.with_facts); None for an error that carries none -- SQLite's own
    or the OS's, whose messages hold none of the library's words.

    source: what the command calls copy()'s source (SOURCE; restore's
    BACKUP); locked: what a give-up's lock waits were waiting for."""
    gave_up = getattr(exc, "gave_up", None)
    if isinstance(gave_up, files.GaveUp):
        return gave_up_words(
            gave_up.elapsed,
            gave_up.timeout,
            gave_up.pages_copied,
            gave_up.page_count,
            gave_up.waits,
            gave_up.restarts,
            locked,
            source,
        )
    role = getattr(exc, "role", None)
    if role is None:
        sqlite_error = exc.__cause__
        if getattr(exc, "target_state", None) and isinstance(
            sqlite_error, apsw_backup.Error
        ):
            # copy()'s words of what the target holds added to SQLite's
            # error: SQLite's as it is (the command says what DEST holds).
            return str(sqlite_error)
        return None
    path = str(getattr(exc, "path", ""))
    side = getattr(exc, "side", None)
    who = f"{_ROLE_NAMES.get(role, source)} {_q(path)}"
    if isinstance(exc, files.SameFileError) and role == "source":
        return (
            f"{who} is named as DEST's {_SIDE_FILE_NAMES.get(str(side), 'side file')} "
            f"({side} file of DEST {_q(exc.target)}): opening DEST, SQLite would "
            f"take {source} for DEST's own file and delete or apply it, so "
            f"{source} would be lost. Rename or copy {source} to another name "
            "first, or choose another DEST"
        )
    if isinstance(exc, files.SameFileError):
        what = f"{source} itself"
        if side:
            what = (
                f"{source}'s {_SIDE_FILE_NAMES[side]} ({side} file), which "
                "SQLite deletes or rewrites"
            )
        return (
            f"{who} is {what}: a copy written there would be lost and could "
            f"damage {source} {_q(exc.source)}. Choose another DEST"
        )
    if isinstance(exc, files.StaleSideFileError):
        return (
            f"the new {who} does not exist, but {_q(path + str(side))} is there "
            "(left by a crash, or by another database of that name): SQLite "
            "would apply it to the new copy and corrupt it. Move it away once "
            "you know it is not needed, or choose another DEST"
        )
    if isinstance(exc, FileExistsError):
        return (
            f"another file appeared at {who} while the copy was made (another "
            "run, or another program, created it): the copy was not put in "
            "its place. Run again (with --overwrite to replace that file), or "
            "choose another DEST"
        )
    if isinstance(exc, (apsw_backup.CorruptError, apsw_backup.NotADBError)):
        damaged = isinstance(exc, apsw_backup.CorruptError)
        what = (
            "is damaged: SQLite cannot read its schema"
            if damaged
            else "is not an SQLite database"
        )
        sqlite_said = exc.__cause__ if exc.__cause__ is not None else exc
        if role == "source":
            cure = (
                f"restore {source} from a backup, or save what can be read "
                "with the sqlite3 shell's .recover"
                if damaged
                else f"name the database file as {source}"
            )
        else:
            cure = (
                "--overwrite replaces a database through its own "
                "transaction, which needs its schema: delete the file "
                "yourself (keep a copy if it matters), or choose another DEST"
            )
        return f"{who} {what} ({sqlite_said}): {cure}"
    code = getattr(exc, "os_errno", None)
    cause = None
    if isinstance(code, int):
        cause = files.os_cause(OSError(code, os.strerror(code)))
    if isinstance(exc, apsw_backup.FullError):
        return (
            f"the file system of {who} is full (ENOSPC), or DEST reached its "
            "max_page_count: free some space there, or choose a DEST elsewhere"
        )
    if cause is not None and isinstance(exc, apsw_backup.IOError):
        return f"writing the copy to {who} failed: it {cause}"
    if cause is not None:
        return f"cannot use {who}: it {cause}"
    # SQLite refused it: its own words, as they are.
    said = exc.__cause__ if exc.__cause__ is not None else "SQLite refused it"
    return f"cannot open {who}: {said}"


def gave_up_words(
    elapsed: float,
    timeout: float,
    copied: int | None,
    total: int | None,
    waits: int,
    restarts: int,
    locked: str = "SOURCE",
    source: str = "SOURCE",
) -> str:
    """The deadline passed: after how long, how far, why, and the cure."""
    causes = []
    if waits:
        causes.append(
            f"{locked} was locked by another connection "
            f"({_count(waits, 'retry', 'retries')})"
        )
    if restarts:
        causes.append(
            f"the copy started again {_count(restarts, 'time')} because other "
            f"connections wrote to {source}"
        )
    cause = "; ".join(causes) or "the time limit passed before the copy was complete"
    if total:
        done = f" with {copied} of {total} pages copied"
    else:
        done = " with no page copied yet" if total == 0 else ""
    cure = "Retry later, or with a longer --timeout"
    if waits:
        cure += " (end the other connection's long transaction first)"
    return (
        f"gave up after {elapsed:.2f} s (--timeout {timeout:g}){done}: {cause}. {cure}"
    )
