"""The apsw-backup command: back up a live SQLite database from the shell.

    apsw-backup [options] SOURCE DEST
    apsw-backup [options] SOURCE FOLDER/   (the copy is FOLDER/<stem>-<UTC time>.db)
    apsw-backup verify [--level default|full] [--json] FILE...
    apsw-backup --demo
    python -m apsw_backup ...              (the same command)

The copy is made by copy() (online: other connections keep using SOURCE) and
verified (--verify: default, full, none; see cli/verification.py).  A DEST that does not exist is written
to a temporary file beside it, verified, then renamed into place, so DEST
either does not exist or is the complete, verified copy; an existing DEST
(--overwrite) is written through SQLite's own transaction.

Exit codes (the message on stderr, and "dest_state" in --json, always say
what DEST holds):
  0    the backup is complete (and verified, unless --no-verify)
  1    SQLite, file system or backup error
  2    usage error or refusal: nothing was written
  3    verification failed: a new DEST was not created; an existing DEST
       holds the copy that failed verification
  130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM, with one of:
       "DEST was not created", "DEST was left as it was" (nothing changed),
       "DEST holds the complete copy, but it was not verified" (the signal
       came after the copy was committed into an existing DEST),
       "DEST holds the complete, verified copy" (it came after that).
A signal is acted on at the next safe point: after the step in progress,
within --sleep seconds while waiting for a lock, at once while verifying.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# apsw_backup is re-exported: tests patch apsw_backup.Connection through it.
import apsw_backup as apsw_backup
from apsw_backup.cli.arguments import _Exit, _parse, _parse_verify
from apsw_backup.cli.demo import _demo
from apsw_backup.cli.errors import Failure
from apsw_backup.cli.failures import _fail
from apsw_backup.cli.folder import backup_name
from apsw_backup.cli.plan import _planned
from apsw_backup.cli.run import _backup_command
from apsw_backup.cli.signals import Interrupted, Interrupts, _signals
from apsw_backup.cli.verify_command import _verify_command

__all__ = [
    "Failure",
    "Interrupts",
    "apsw_backup",
    "backup_name",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with argv (default: sys.argv[1:]); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv  # known before parsing: usage errors too
    with _signals() as interrupts:
        try:
            if argv[:1] == ["verify"]:
                return _verify_command(_parse_verify(argv[1:]), interrupts)
            args = _parse(argv)
            if args.demo:
                return _demo(args, interrupts)
            return _backup_command(_planned(args), args, interrupts)
        except _Exit as done:  # --help, --version
            return done.code
        except Failure as failure:
            return _fail(failure, as_json)
        except Interrupted as stop:  # before anything was started
            return _fail(
                Failure(128 + stop.signum, "interrupted: nothing was written", stop),
                as_json,
            )
