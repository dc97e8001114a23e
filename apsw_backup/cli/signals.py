"""SIGINT and SIGTERM, noted when they arrive and acted on at safe points."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from apsw_backup import _command_start

SIGNALS = (signal.SIGINT, signal.SIGTERM)  # exit code 128 + the signal's number


# A test-only hook, "PHASE:PATH": on reaching PHASE the command creates PATH,
# then waits (up to a minute) for a signal, or for PATH to be removed, so
# that tests can interrupt each phase, or change files in it,
# deterministically.  Phases: starting (before main() sets its handlers),
# opening, copying, waiting, copied, verifying, done, reported (after the
# outcome was printed).
TEST_PAUSE = "APSW_BACKUP_TEST_PAUSE"
TEST_PAUSE_LIMIT = 60.0


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised at a safe point (a BaseException, as
    KeyboardInterrupt is, so that nothing takes it for an error)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Interrupts:
    """SIGINT and SIGTERM: noted when they arrive, acted on at safe points.

    The handler never raises: an exception raised at an arbitrary point of
    copy() -- say between the last step committing an existing DEST and the
    progress callback learning of it -- would make the command's account of
    DEST wrong.  check() raises Interrupted where the command knows what DEST
    holds.  Verification sees it at its next progress report
    (cli.verification.Ticker), and apsw_backup.verify stops its checks.
    """

    def __init__(self) -> None:
        self.signum = 0

    def note(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler."""
        self.signum = self.signum or signum

    def check(self) -> None:
        """Raise Interrupted if a signal has arrived."""
        if self.signum:
            raise Interrupted(self.signum)


@contextmanager
def _signals(keep: bool = False) -> Iterator[Interrupts]:
    """SIGINT and SIGTERM noted by an Interrupts (with any signal that
    arrived since the package was imported: apsw_backup._command_start).  keep: the process is the command, and
    ends once this returns -- the handlers stay, so that a signal arriving
    after the outcome was printed cannot change the exit code (Python's
    own SIGINT handler would raise KeyboardInterrupt, SIGTERM's default
    would kill the process: an exit status that disagrees with the
    printed exit_code)."""
    interrupts = Interrupts()
    interrupts.signum = _command_start.early_signum
    if threading.current_thread() is not threading.main_thread():
        yield interrupts  # handlers can only be set in the main thread
        return
    previous = {signum: signal.signal(signum, interrupts.note) for signum in SIGNALS}
    try:
        yield interrupts
    finally:
        if not keep:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def hold_until_exit() -> None:
    """The outcome is printed: from now on SIGINT and SIGTERM wait, blocked,
    until the process has exited with the printed exit code.  (While Python
    shuts down it puts the default handlers back: a SIGTERM then would
    kill the process, a SIGINT raise KeyboardInterrupt.)"""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)


_paused: set[str] = set()


def _pause_for_tests(phase: str, interrupts: Interrupts | None) -> None:
    """The TEST_PAUSE hook (see its comment); does nothing unless it is set."""
    wanted, _, marker = os.environ.get(TEST_PAUSE, "").partition(":")
    if wanted != phase or phase in _paused:
        return
    _paused.add(phase)
    path = Path(marker)
    path.touch()
    deadline = time.monotonic() + TEST_PAUSE_LIMIT
    while time.monotonic() < deadline and path.exists():
        noted = interrupts.signum if interrupts is not None else 0
        if noted or _command_start.early_signum:
            break
        time.sleep(0.005)
