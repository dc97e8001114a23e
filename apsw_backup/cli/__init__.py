"""The apsw-backup command: back up a live SQLite database from the shell.

    apsw-backup [options] SOURCE DEST
    apsw-backup [options] SOURCE FOLDER/   (the copy is FOLDER/<stem>-<UTC time>.db)
    apsw-backup verify [--level default|full] [--json] [--timeout S] FILE...
    apsw-backup --incremental SOURCE FOLDER/, restore, list, verify FOLDER
                                           (cli/incremental.py)
    apsw-backup --demo
    python -m apsw_backup ...              (the same command)

The copy is made by copy() (online: other connections keep using SOURCE) and
verified (--verify default|full|none: docs/verification.md).  A DEST that does not exist is written
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
The exit status is always the exit code printed; with --json, one object of
one schema says it for every outcome (docs/cli.md: "JSON output", "Exit
codes"; apsw_backup.cli.output).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# apsw_backup is re-exported: tests patch apsw_backup.Connection through it.
import apsw_backup as apsw_backup
from apsw_backup.cli import incremental as _incremental
from apsw_backup.cli import output
from apsw_backup.cli.arguments import _Exit, _parse, _parse_verify
from apsw_backup.cli.demo import _demo
from apsw_backup.cli.errors import EXIT_ERROR, Failure
from apsw_backup.cli.failures import _fail
from apsw_backup.cli.folder import backup_name, release_folder_locks
from apsw_backup.cli.plan import _planned, dest_says
from apsw_backup.cli.run import _backup_command
from apsw_backup.cli.signals import (
    Interrupted,
    Interrupts,
    _pause_for_tests,
    _signals,
    hold_until_exit,
)
from apsw_backup.cli.verify_command import _verify_command

__all__ = [
    "Failure",
    "Interrupts",
    "apsw_backup",
    "backup_name",
    "main",
]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with argv (default: sys.argv[1:]); the exit code.

    Without argv this process is the command: its signal handlers stay
    until it exits, so that the exit status is the exit code it printed.
    """
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if program:
        output.prepare()
    _pause_for_tests("starting", None)
    with _signals(keep=program) as interrupts:
        try:
            code = _command(argv, interrupts)
        finally:
            # Once the run has reported: another run cannot rotate its DEST
            # away before it has said what DEST holds.
            release_folder_locks()
    output.finish()
    if program:
        _pause_for_tests("reported", interrupts)
        hold_until_exit()
    return code


def _command(argv: list[str], interrupts: Interrupts) -> int:
    as_json = "--json" in argv  # known before parsing: usage errors too
    if _incremental.wants(argv):  # --incremental, restore, list, verify FOLDER
        return _incremental.run(argv, interrupts)
    verify = argv[:1] == ["verify"]
    try:
        if verify:
            args = _parse_verify(argv[1:])
            interrupts.check()
            return _verify_command(args, interrupts)
        args = _parse(argv)
        interrupts.check()
        if args.demo:
            return _demo(args, interrupts)
        return _backup_command(_planned(args), args, interrupts)
    except _Exit as done:  # --help, --version
        return done.code
    except Failure as refused:
        failure = refused
    except Interrupted as stop:  # before anything was started
        failure = Failure(128 + stop.signum, "interrupted: nothing was written", stop)
    except Exception as exc:  # noqa: BLE001 - a bug: still one report
        # (The backup itself reports its own errors: this is before it.)
        message = f"unexpected {type(exc).__name__}: {exc}: please report it"
        failure = Failure(EXIT_ERROR, message, exc)
    _nothing_written(failure, argv, verify)
    return _fail(failure, as_json, verify)


def _nothing_written(failure: Failure, argv: list[str], verify: bool) -> None:
    """A failure before the backup began (arguments, a signal): the --json
    fields that say where DEST is and that nothing was written to it."""
    if verify or "dest_state" in failure.fields:
        return
    source, dest = _positionals(argv)
    state = "unchanged" if dest and os.path.lexists(dest) else "not created"
    failure.fields.setdefault("source", source)
    failure.fields.setdefault("dest", dest)
    failure.fields["dest_state"] = state
    if dest is not None:  # every failure's message ends saying so
        failure.message = f"{failure.message.rstrip('.')}. {dest_says(dest, state)}"


def _positionals(argv: list[str]) -> tuple[str | None, str | None]:
    """SOURCE and DEST as far as they can be told from arguments that did
    parse, or did (the words that are not options nor their values)."""
    from apsw_backup.cli.arguments import _parser

    words: list[str | None] = []
    # the options that take a value, from the parser itself (a list kept
    # here missed --verify: its value was taken for SOURCE); "?": optional
    takes_value: dict[str, bool] = {}
    for action in _parser()._actions:
        if action.option_strings and action.nargs != 0:
            for option in action.option_strings:
                takes_value[option] = action.nargs == "?"
    skip = optional = False
    for word in argv:
        positional = word == "-" or not word.startswith("-")
        if skip and (positional or not optional):
            skip = False
        elif word.split("=", 1)[0] in takes_value and "=" not in word:
            # an optional value (--demo's FOLDER): the next word, unless an option
            skip, optional = True, takes_value[word]
            continue
        elif positional:
            words.append(word)
        skip = False
    words += [None, None]
    return words[0], words[1]
