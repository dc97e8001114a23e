"""What the command reports when it fails: exit codes, Failure, wording helpers."""

from __future__ import annotations

import errno
import os
from typing import Any

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
