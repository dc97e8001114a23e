"""Verification in the command: the levels, the progress ticks, the words.

The checks themselves are apsw_backup.verify's; a backup asks copy() for
them (verify="default" or "full"), `apsw-backup verify` calls verify()
itself.  This module says what each level proves, draws the progress line
while they run, stops them on a signal, and words their outcome.
"""

from __future__ import annotations

import os
import shlex
import time

from apsw_backup import verify
from apsw_backup.cli.errors import PROG
from apsw_backup.cli.signals import Interrupts, _pause_for_tests
from apsw_backup.verify import (
    VerificationError,
    VerificationFailed,
    VerificationIncomplete,
    VerifyResult,
    problems_text,
)

__all__ = [
    "LEVELS_HELP",
    "Ticker",
    "VerificationError",
    "VerificationFailed",
    "VerificationIncomplete",
    "failed_message",
    "incomplete_message",
    "problems_text",
    "size_mb",
    "verified_words",
]

# What each level proves and misses: --help shows it (docs/verification.md
# has the same table, with the costs).
LEVELS_HELP = """\
verification levels (--verify LEVEL; a problem found exits 3, naming pages):
  level    runs                        proves                    misses
  default  page re-read + quick_check  DEST holds exactly the    an index that
           (every page of DEST read    bytes written; b-trees,   disagrees with
           from the disk, compared     freelist, page use and    its table;
           with its hash as written)   NOT NULL are sound        CHECK
  full     default + integrity_check   all that, and every       nothing that
           split by table, threads     index matches its table;  integrity_check
                                       UNIQUE, CHECK hold        sees
  none     nothing (= --no-verify)     nothing                   everything"""


class Ticker:
    """verify()'s progress callback for one verification: draws the phase
    on the progress line and stops the checks when a signal has arrived
    (raising Interrupted; verify() ends its threads first)."""

    def __init__(
        self,
        interrupts: Interrupts,
        line: object | None,
        label: str = "verifying",
        pause: float = 0.0,
    ) -> None:
        self.interrupts = interrupts
        self.line = line  # a ProgressLine, or None
        self.label = label
        self.pause = pause  # --demo: seconds to linger as the phase begins
        self.started = False

    def __call__(self, progress: verify.Progress) -> None:
        if not self.started:
            self.started = True
            if self.line is not None:
                self.line.verifying(self.label)  # type: ignore[attr-defined]
            _pause_for_tests("verifying", self.interrupts)
            self._linger()
        if self.line is not None:
            self.line.verify_tick(progress)  # type: ignore[attr-defined]
        self.interrupts.check()

    def _linger(self) -> None:
        deadline = time.monotonic() + self.pause
        while not self.interrupts.signum and time.monotonic() < deadline:
            time.sleep(0.01)
            if self.line is not None:
                self.line.tick()  # type: ignore[attr-defined]


def verified_words(result: VerifyResult | None) -> str:
    """The end of the summary line: what verification showed."""
    if result is None:
        return "not verified"
    return result.summary()


def failed_message(exc: VerificationFailed, what: str, source: str | None) -> str:
    """The message of a verification that found problems in `what` (the
    copy, or a FILE); `source`: the backup's SOURCE, if any."""
    problems = exc.verification.problems
    on_disk = [p.message for p in problems if p.check == "pages"]
    if on_disk:
        # Pages that differ from what SQLite wrote explain whatever else
        # was found: DEST's disk changed or lost them, not SOURCE.
        others = [p.message for p in problems if p.check != "pages"]
        also = f" (and so {problems_text(others, 3)})" if others else ""
        return (
            f"verification failed: in {what}, {'; '.join(on_disk)}{also}. "
            "SOURCE is not in question: the disk or file system under DEST "
            "changed the file or lost a write. Check that disk, then back up "
            "again"
        )
    check = exc.check
    name = {"pages": "the page check", "quick_check": "PRAGMA quick_check"}.get(
        check, "PRAGMA integrity_check"
    )
    text = (
        f"verification failed: {name} of {what} reported {problems_text(exc.problems)}"
    )
    if source is not None:
        text += (
            ". The copy holds SOURCE's pages as they were, so SOURCE is probably "
            f"damaged too: check it with {PROG} verify {shlex.quote(source)}"
        )
    return text


def incomplete_message(exc: VerificationIncomplete, what: str) -> str:
    error = exc.error
    cause = f"{type(error).__name__}: {error}" if error is not None else exc.reason
    return f"could not verify {what}: {cause}"


def size_mb(path: str) -> str:
    try:
        return f"{os.path.getsize(path) / 1e6:.1f} MB"
    except OSError:
        return "? MB"
