"""SIGINT and SIGTERM, noted when they arrive and acted on at safe points."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import apsw_backup

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
    holds.  A connection being verified is interrupted at once.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._watched: list[apsw_backup.Connection] = []

    def note(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler."""
        self.signum = self.signum or signum
        for conn in list(self._watched):
            try:
                conn.interrupt()
            except apsw_backup.Error:
                pass  # closed meanwhile: nothing to stop

    def check(self) -> None:
        """Raise Interrupted if a signal has arrived."""
        if self.signum:
            raise Interrupted(self.signum)

    @contextmanager
    def watching(self, conn: apsw_backup.Connection) -> Iterator[None]:
        """Interrupt conn's statement when a signal arrives."""
        self._watched.append(conn)
        try:
            if self.signum:
                conn.interrupt()
            yield
        finally:
            self._watched.remove(conn)


@contextmanager
def _signals(keep: bool = False) -> Iterator[Interrupts]:
    """SIGINT and SIGTERM noted by an Interrupts (with any signal that
    arrived since listen_early()).  keep: the process is the command, and
    ends once this returns -- the handlers stay, so that a signal arriving
    after the outcome was printed cannot change the exit code (Python's
    own SIGINT handler would raise KeyboardInterrupt, SIGTERM's default
    would kill the process: an exit status that disagrees with the
    printed exit_code)."""
    interrupts = Interrupts()
    interrupts.signum = _early_signum
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


# The first signal that arrived before main() installed its handlers.
_early_signum = 0


def _note_early(signum: int, frame: FrameType | None) -> None:
    global _early_signum
    _early_signum = _early_signum or signum


def started_as_command() -> bool:
    """Whether this process is the apsw-backup command (the console script
    or python -m apsw_backup), as opposed to a program importing the CLI."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == "apsw_backup.__main__":
        return True
    script = os.path.basename(str(getattr(main, "__file__", "") or ""))
    return script in ("apsw-backup", "apsw-backup.exe", "apsw-backup-script.py")


def listen_early() -> None:
    """In the command's process only: note SIGINT and SIGTERM from the first
    import of the CLI on, so that a signal at start-up is reported as any
    other (one JSON object, exit 130 or 143) instead of a traceback or a
    kill.  (Before Python runs any of this package, the signal's default
    action applies: that moment cannot be handled from Python.)"""
    if not started_as_command():
        return
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _note_early)


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
        if interrupts.signum if interrupts is not None else _early_signum:
            break
        time.sleep(0.005)
