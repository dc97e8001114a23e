"""What the command writes on stdout and stderr, and the --json schema.

Writing is never allowed to change what happened to DEST nor the exit code
that says so: a reader that went away (``| head -c1``: EPIPE), a stream that
was closed (``>&-``), a file name that is not valid UTF-8 -- each is taken in
silently, and the run goes on to the same end and the same exit code.

The --json output of the backup command is one object with the keys of
BACKUP_KEYS, every one of them present in every outcome (null where it does
not apply); that of ``verify`` has VERIFY_KEYS, its "files" items FILE_KEYS.
docs/cli.md documents each key; check() is what the tests hold every exit
path to.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, TextIO

# dest_state: what DEST holds when the command ends.
DEST_STATES = (
    "not created",  # a new DEST: nothing at its name is ours
    "unchanged",  # an existing DEST: its content is as before the run
    "needs recovery",  # an existing DEST, torn: its -journal restores it
    "other file",  # another file appeared at DEST: left alone, not the copy
    "verified",  # DEST holds the complete copy, and it passed integrity_check
    "failed verification",  # DEST holds the copy that failed integrity_check
    "unverified",  # DEST holds the complete copy; a signal stopped the check
    "complete",  # DEST holds the complete copy (--no-verify)
)

# key: the types its value may have (None: JSON null).
ERROR_KEYS: dict[str, tuple[type | None, ...]] = {
    "class": (str,),
    "message": (str,),
    "result": (int, None),
    "extendedresult": (int, None),
    "errno": (int, None),
}
BACKUP_KEYS: dict[str, tuple[type | None, ...]] = {
    "ok": (bool,),
    "exit_code": (int,),
    "error": (dict, None),
    "source": (str, None),
    "dest": (str, None),
    "dest_state": (str,),
    "folder": (str, None),
    "schema": (str, None),
    "pages": (int, None),
    "page_size": (int, None),
    "bytes": (int, None),
    "steps": (int, None),
    "restarts": (int, None),
    "waits": (int, None),
    "snapshot": (bool, None),
    "elapsed": (float, int, None),
    "wal_growth": (int, None),
    "journal_mode": (str, None),
    "verified": (bool, None),
    "integrity": (list, None),
    "verification": (dict, None),  # the checks that ran, their seconds
    "deleted": (list,),
    "pages_copied": (int, None),
    "page_count": (int, None),
    # --keep (null without it): backups left because they are dated later
    # than now; files named like SOURCE's backups without its mark; why
    # rotation deleted nothing (an empty backup); backups it failed to delete;
    # backups that do not look whole (damaged: kept, not counted).
    "future_dated": (list, None),
    "damaged": (list, None),
    "unmarked": (list, None),
    "rotation_skipped": (str, None),
    "not_deleted": (list, None),
}
FILE_KEYS: dict[str, tuple[type | None, ...]] = {
    "file": (str,),
    "exit_code": (int,),
    "verified": (bool, None),
    "integrity": (list, None),
    "verification": (dict, None),  # the checks that ran, their seconds
    "error": (dict, None),
}
VERIFY_KEYS: dict[str, tuple[type | None, ...]] = {
    "ok": (bool,),
    "exit_code": (int,),
    "error": (dict, None),
    "path": (str, None),  # verify FOLDER's file at fault (docs/incremental.md)
    "files": (list,),
    "chains": (list,),  # verify FOLDER's chains ([] for FILEs)
}


def backup_object(**fields: Any) -> dict[str, Any]:
    """A backup --json object: every key of BACKUP_KEYS, null unless given."""
    unknown = set(fields) - set(BACKUP_KEYS)
    assert not unknown, f"not in the --json schema: {sorted(unknown)}"
    obj: dict[str, Any] = dict.fromkeys(BACKUP_KEYS)
    obj["deleted"] = []
    obj["dest_state"] = "not created"
    obj.update(fields)
    return obj


# --incremental, restore and list (docs/incremental.md): these keys in every
# outcome, with the result's fields on success (and path for exit 3).
VERB_KEYS: dict[str, tuple[type | None, ...]] = {
    "ok": (bool,),
    "exit_code": (int,),
    "error": (dict, None),
}


def verb_problems(obj: Any) -> list[str]:
    """What is wrong with obj as a --json object of --incremental, restore
    or list; [] when it follows the documented schema."""
    if not isinstance(obj, dict):
        return ["the output is not an object"]
    # the result's fields are the verb's own: only these keys are checked
    found = _against({k: v for k, v in obj.items() if k in VERB_KEYS}, VERB_KEYS, "")
    if isinstance(obj.get("error"), dict):
        found += _against(obj["error"], ERROR_KEYS, "error.")
    if (obj.get("error") is None) != (obj.get("exit_code") == 0):
        found.append("error must be null exactly when exit_code is 0")
    if obj.get("ok") is not (obj.get("exit_code") == 0):
        found.append("ok must be true exactly when exit_code is 0")
    return found


def problems(obj: Any, verify: bool = False) -> list[str]:
    """What is wrong with obj as a --json object of the backup command (or
    of verify); [] when it follows the schema."""
    found = _against(obj, VERIFY_KEYS if verify else BACKUP_KEYS, "")
    if not isinstance(obj, dict):
        return found
    if not verify and obj.get("dest_state") not in DEST_STATES:
        found.append(f"dest_state {obj.get('dest_state')!r} is not one of DEST_STATES")
    if isinstance(obj.get("error"), dict):
        found += _against(obj["error"], ERROR_KEYS, "error.")
    if (obj.get("error") is None) != (obj.get("exit_code") == 0):
        found.append("error must be null exactly when exit_code is 0")
    if obj.get("ok") is not (obj.get("exit_code") == 0):
        found.append("ok must be true exactly when exit_code is 0")
    for item in obj.get("files") or [] if verify else []:
        found += _against(item, FILE_KEYS, "files[].")
        if isinstance(item, dict) and isinstance(item.get("error"), dict):
            found += _against(item["error"], ERROR_KEYS, "files[].error.")
    return found


def _against(obj: Any, keys: dict[str, tuple[type | None, ...]], at: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{at or 'the output'} is not an object"]
    found = [f"{at}{key} is missing" for key in keys if key not in obj]
    found += [f"{at}{key} is not in the schema" for key in obj if key not in keys]
    for key, kinds in keys.items():
        if key not in obj:
            continue
        value = obj[key]
        if value is None:
            ok = None in kinds
        else:
            ok = any(
                kind is not None
                and isinstance(value, kind)
                and not (kind is int and isinstance(value, bool))
                for kind in kinds
            )
        if not ok:
            found.append(f"{at}{key} = {value!r} is not of the schema's type")
    return found


# --- writing -----------------------------------------------------------------


def prepare() -> None:
    """Make the standard streams safe to write to, for the command's process.

    A descriptor 0, 1 or 2 closed when the command started is opened on
    /dev/null: else the next file opened -- the copy's temporary file --
    would get that number, and anything written to stdout or stderr would
    land in the backup.  Then stdout and stderr write any file name as the
    bytes it has on disk: a name that is not valid UTF-8 reaches Python as
    surrogate escapes, which the default strict error handler would refuse
    (a traceback after a backup that succeeded).
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number: fd itself, normally
                os.dup2(null, fd)
                os.close(null)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="surrogateescape")  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            pass  # None (closed at start), or not a TextIOWrapper: as it is


def out(text: str) -> None:
    """A line on stdout (the summary, or the JSON object)."""
    _write("stdout", text + "\n")


def err(text: str) -> None:
    """A line on stderr."""
    _write("stderr", text + "\n")


def print_json(obj: dict[str, Any]) -> None:
    """obj as one line of JSON on stdout (ASCII: a file name that is not
    valid UTF-8 keeps its bytes as \\udcXX escapes, os.fsencode() undoes)."""
    out(json.dumps(obj))


def write_to(stream: TextIO, text: str) -> bool:
    """Write and flush text to stream; False (and nothing raised) if the
    stream is gone."""
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:  # a character the stream cannot encode
            encoding = getattr(stream, "encoding", None) or "utf-8"
            stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
        stream.flush()
    except (OSError, ValueError, AttributeError, UnicodeError):
        _forget(stream)
        return False
    return True


def _write(name: str, text: str) -> None:
    stream = getattr(sys, name)
    if stream is not None:
        write_to(stream, text)


def _forget(stream: TextIO) -> None:
    """A stream that failed: point its descriptor at /dev/null, so that what
    is left in its buffer does not fail again at exit ("Exception ignored
    ... BrokenPipeError" and exit status 120)."""
    try:
        fd = stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        return
    try:
        os.dup2(null, fd)
    except OSError as exc:  # pragma: no cover - dup2 onto our own fd
        if exc.errno != errno.EBADF:
            raise
    finally:
        os.close(null)


def finish() -> None:
    """Flush both streams before the exit code is returned, taking in any
    failure (see _forget)."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            write_to(stream, "")
