"""The apsw-backup command's first moments: SIGINT and SIGTERM are noted
from this module's first statements on, so that a signal at start-up is
reported like any other (one JSON object, exit 130 or 143), not a traceback
or a kill.  Only in the command's own process (the console script, or
``python -m apsw_backup``): a program that imports the package keeps its
signal handlers.

The package imports this module first, and it installs its handlers before
it defines anything else, with only modules the interpreter has loaded
already at start-up (sys, os) or that load in microseconds (signal): the
window before them is Python's own start-up and the launcher's imports
(docs/cli.md, "Signals", says what a signal does then).
"""

import signal  # the first statement (no __future__ import: that is a module)
import sys

# The first signal that arrived before the command installed its handlers.
early_signum = 0


def _note(signum: int, frame: object) -> None:
    global early_signum
    early_signum = early_signum or signum


def started_as_command() -> bool:
    """Whether this process is the apsw-backup command."""
    import os  # loaded by the interpreter's start-up: no time

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(spec, "name", None) == "apsw_backup.__main__":
        return True  # python -m apsw_backup, running __main__.py
    script = os.path.basename(str(getattr(main, "__file__", "") or ""))
    if script in ("apsw-backup", "apsw-backup.exe", "apsw-backup-script.py"):
        return True  # the console script
    # python -m apsw_backup, importing the package before __main__.py:
    # runpy leaves argv[0] as "-m" until it has found the module.
    argv = [str(word) for word in getattr(sys, "orig_argv", [])]
    if sys.argv[:1] != ["-m"]:
        return False
    for i, word in enumerate(argv):
        if word == "-m":
            return argv[i + 1 : i + 2] == ["apsw_backup"]
        if word.startswith("-m"):
            return word == "-mapsw_backup"
    return False


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listen() -> None:
    """Note SIGINT and SIGTERM from now on, in the command's process."""
    if not started_as_command():
        return
    for signum in SIGNALS:
        if signal.getsignal(signum) is not _note:
            try:
                signal.signal(signum, _note)
            except ValueError:  # not the main thread: handlers stay as they are
                return


listen()  # on import: the package imports this module first
