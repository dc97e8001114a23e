"""The progress line names its phase, fits the terminal at every redraw and
ends with a clean final line (docs/command-line.md).

The command runs with stderr on a pseudo-terminal of a set width; the test
reads what it draws there.  Each \\r begins a redraw.
"""

import json
import sqlite3
import subprocess
import sys

import pytest
from cli_helpers import TIMEOUT, Terminal, redraws, resize, wait_for
from copy_helpers import make_source, query

WRITER = r"""
import sqlite3, sys, time, pathlib
path, started, stop = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
db = sqlite3.connect(path, timeout=30, isolation_level=None)
deadline = time.monotonic() + 60
n = 0
while not stop.exists() and time.monotonic() < deadline:
    n += 1
    db.execute("INSERT INTO w(n) VALUES (?)", (n,))
    if n == 1:
        started.touch()
    time.sleep(0.002)
db.close()
"""


def assert_fits(states, columns):
    for state in states:
        assert len(state) < columns, (len(state), state)


def test_waiting_for_a_lock_is_named_and_the_line_fits_after_a_resize(tmp_path):
    source = make_source(tmp_path / "source.db")
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    terminal = Terminal(["--sleep", "0.02", source, tmp_path / "dest.db"], columns=120)
    try:
        terminal.read_until(lambda t: "waiting for a lock" in t, "the lock wait")
        seen = len(redraws(terminal.text()))
        resize(terminal, 30)
        terminal.read_until(
            lambda t: len(redraws(t)) > seen + 2, "redraws after the resize"
        )
        narrow_from = len(redraws(terminal.text())) - 2
    finally:
        locker.execute("COMMIT")
        locker.close()
    code, screen = terminal.read_until_exit()

    assert code == 0
    states = redraws(screen)
    assert states[0].startswith("waiting for a lock ")
    assert_fits(states[:narrow_from], 120)
    assert_fits(states[narrow_from:], 30)
    assert screen.endswith("\r\n")  # ends the line it drew
    assert screen.count("\n") == 1


@pytest.mark.parametrize("columns", [50, 120])
def test_restarts_are_named_and_every_redraw_fits(tmp_path, columns):
    # A writer commits every 2 ms while the copy goes 2 pages a step: the
    # copy restarts, then copy() holds a snapshot and it finishes.
    source = make_source(tmp_path / "live.db", rows=1000, blob=1000, journal="wal")
    started, stop = tmp_path / "started", tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(source), str(started), str(stop)]
    )
    try:
        wait_for(started.exists, "the writer's first commit")
        args = ["--json", "--pages", "2", "--sleep", "0.01", source, tmp_path / "d.db"]
        terminal = Terminal(args, columns=columns)
        code, screen = terminal.read_until_exit()
        summary = json.loads(terminal.stdout)
    finally:
        stop.touch()
        writer.wait(TIMEOUT)

    assert code == 0, screen
    states = redraws(screen)
    assert_fits(states, columns)
    if summary["restarts"]:
        named = [s for s in states if "(restarted " in s]
        assert named, states
        if columns == 120:
            assert f"(restarted {summary['restarts']} times)" in named[-1] or (
                summary["restarts"] == 1 and "(restarted 1 time)" in named[-1]
            )
    assert any(s.startswith("verifying ") for s in states)
    assert states[-1].strip().startswith("done: ")
    assert screen.count("\n") == 1
    assert query(tmp_path / "d.db", "PRAGMA integrity_check") == [("ok",)]


def test_a_50_column_line_leaves_no_stale_line(tmp_path):
    # Every redraw fits, so \r always returns to the start of the one line:
    # nothing the terminal shows is left of an earlier redraw.
    source = make_source(tmp_path / "source.db", rows=600, blob=1000)
    code, screen = Terminal(
        ["--pages", "3", source, tmp_path / "dest.db"], columns=50
    ).read_until_exit()
    assert code == 0
    states = redraws(screen)
    assert len(states) > 3
    assert_fits(states, 50)
    assert screen.count("\n") == 1
    assert states[-1].strip().startswith("done: ")


def test_progress_line_ends_with_the_failure(tmp_path):
    source = make_source(tmp_path / "source.db")
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        code, screen = Terminal(
            ["--sleep", "0.01", "--timeout", "0.2", source, tmp_path / "dest.db"],
            columns=80,
        ).read_until_exit()
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert code == 1
    line, message = screen.split("\r\n")[:2]
    states = [s.strip() for s in redraws(line)]
    assert states[:-1] and all(s.startswith("waiting for a lock ") for s in states[:-1])
    assert states[-1] == "stopped: BusyError"
    assert "with no page copied yet: SOURCE was locked" in message
