"""SIGINT (and SIGTERM) tell the truth about DEST in every phase (docs/command-line.md).

Each phase is reached deterministically: the command's test-only pause hook
(APSW_BACKUP_TEST_PAUSE) makes it stop there and wait for the signal, or a
lock held by the test keeps it waiting.  The signal goes to a real process;
then DEST is checked against what the message says it holds.
"""

import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from cli_helpers import (
    TIMEOUT,
    command,
    digest,
    interrupt_in,
    json_of,
    leftovers,
    marker_path,
    paused_env,
    wait_for,
)
from copy_helpers import make_source, make_target, query

from apsw_backup import files

NOT_CREATED = "was not created"
AS_IT_WAS = "was left as it was"
UNVERIFIED = "holds the complete copy, but it was not verified"
VERIFIED = "holds the complete, verified copy"


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db", rows=400, blob=1000)


def same_content(a, b):
    sql = "SELECT * FROM t ORDER BY id"
    return query(a, sql) == query(b, sql)


def check_new(tmp_path, dest, code, stderr, says):
    assert code == 130, stderr
    assert f"interrupted: DEST '{dest}' {says}" in stderr
    assert "Traceback" not in stderr
    if says == NOT_CREATED:
        assert not dest.exists()
        assert leftovers(tmp_path, keep=["source.db"]) == []
    else:
        assert same_content(dest, tmp_path / "source.db")
        assert leftovers(tmp_path, keep=["source.db", dest.name]) == []


def check_existing(dest, before, code, stderr, says):
    assert code == 130, stderr
    assert f"interrupted: DEST '{dest}' {says}" in stderr
    assert "Traceback" not in stderr
    assert not os.path.exists(f"{dest}-journal")
    if says == AS_IT_WAS:
        assert digest(dest) == before
        assert query(dest, "SELECT note FROM old") == [("old content",)]
    else:
        assert same_content(dest, dest.parent / "source.db")
    if says == UNVERIFIED:
        assert f"apsw-backup verify {dest}" in stderr


# phase, extra options, what a new DEST then is, what an existing DEST holds
PHASES = [
    ("opening", [], NOT_CREATED, AS_IT_WAS),
    ("copying", ["--pages", "5"], NOT_CREATED, AS_IT_WAS),
    ("copied", ["--pages", "0"], NOT_CREATED, UNVERIFIED),  # the one step done
    ("verifying", [], NOT_CREATED, UNVERIFIED),
    ("done", [], VERIFIED, VERIFIED),
]


@pytest.mark.parametrize(("phase", "options", "says", "_"), PHASES)
def test_sigint_in_each_phase_of_a_new_dest(source, tmp_path, phase, options, says, _):
    dest = tmp_path / "dest.db"
    code, stdout, stderr = interrupt_in(phase, [*options, source, dest], tmp_path)
    check_new(tmp_path, dest, code, stderr, says)
    assert stdout == ""


@pytest.mark.parametrize(("phase", "options", "_", "says"), PHASES)
def test_sigint_in_each_phase_of_an_existing_dest(
    source, tmp_path, phase, options, _, says
):
    dest = make_target(tmp_path / "dest.db")
    before = digest(dest)
    args = ["--overwrite", *options, source, dest]
    code, stdout, stderr = interrupt_in(phase, args, tmp_path)
    check_existing(dest, before, code, stderr, says)


def test_sigint_while_waiting_for_a_lock_on_source(tmp_path):
    # The test holds SOURCE's exclusive lock for the whole run: the command
    # can only wait, whatever the timing.
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "dest.db"
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        code, stdout, stderr = interrupt_in("waiting", [source, dest], tmp_path)
    finally:
        locker.execute("COMMIT")
        locker.close()
    check_new(tmp_path, dest, code, stderr, NOT_CREATED)


def test_sigint_while_waiting_for_a_lock_on_an_existing_dest(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    before = digest(dest)
    locker = sqlite3.connect(str(dest), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        args = ["--overwrite", "--sleep", "0.01", source, dest]
        code, stdout, stderr = interrupt_in("waiting", args, tmp_path)
    finally:
        locker.execute("COMMIT")
        locker.close()
    check_existing(dest, before, code, stderr, AS_IT_WAS)


def test_sigint_while_verifying_a_locked_existing_dest_stops_at_once(source, tmp_path):
    # Another connection locks DEST as the check begins: the check waits for
    # the lock, and the signal ends the wait (no --timeout is given).
    dest = make_target(tmp_path / "dest.db")
    marker = marker_path(tmp_path, "verifying")
    proc = subprocess.Popen(
        command("--overwrite", source, dest),
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env("verifying", marker),
    )
    try:
        wait_for(marker.exists, "the verify phase")
        locker = sqlite3.connect(str(dest), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            proc.send_signal(signal.SIGINT)
            stderr = proc.communicate(timeout=TIMEOUT)[1]
        finally:
            locker.execute("COMMIT")
            locker.close()
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    assert proc.returncode == 130
    assert f"interrupted: DEST '{dest}' {UNVERIFIED}" in stderr


def test_sigterm_is_handled_as_sigint_with_exit_143(source, tmp_path):
    dest = tmp_path / "dest.db"
    code, _, stderr = interrupt_in(
        "copying", ["--pages", "5", source, dest], tmp_path, signal.SIGTERM
    )
    assert code == 143
    assert f"interrupted: DEST '{dest}' {NOT_CREATED}" in stderr
    assert not dest.exists()


@pytest.mark.parametrize(
    ("phase", "state"), [("copying", "not created"), ("done", "verified")]
)
def test_sigint_with_json_prints_one_object_with_the_dest_state(
    source, tmp_path, phase, state
):
    dest = tmp_path / "dest.db"
    args = ["--json", "--pages", "5", source, dest]
    marker = marker_path(tmp_path, phase)
    proc = subprocess.Popen(
        command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env(phase, marker),
    )
    try:
        wait_for(marker.exists, phase)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    result = json_of(subprocess.CompletedProcess([], proc.returncode, stdout, ""))
    assert result["ok"] is False
    assert result["exit_code"] == 130 == proc.returncode
    assert result["dest_state"] == state
    assert result["error"]["class"] == "Interrupted"
    assert "interrupted" in result["error"]["message"]


def test_sigint_after_a_folder_backup_leaves_every_older_backup(source, tmp_path):
    folder = tmp_path / "backups"
    folder.mkdir()
    older = [folder / f"source-2020010{i}T000000.000000Z.db" for i in range(1, 4)]
    for path in older:
        make_target(path)
    args = ["--keep", "1", source, folder]
    code, _, stderr = interrupt_in("done", args, tmp_path)
    assert code == 130
    assert VERIFIED in stderr
    assert "older backups may not all have been deleted" in stderr
    assert all(path.exists() for path in older)
    assert len(os.listdir(folder)) == 4


# -- without the hook: real signals at real moments --------------------------


def full_pipe():
    """A pipe whose buffer is already full: the first write to it blocks."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    return read_end, write_end


def interrupt_and_drain(proc, read_end):
    """SIGINT proc, then drain its stderr (read_end) until it exits."""
    proc.send_signal(signal.SIGINT)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    proc.wait(TIMEOUT)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("dest_exists", [True, False])
def test_sigint_mid_copy_while_the_progress_line_is_blocked(
    source, tmp_path, dest_exists
):
    # The progress line goes to a pipe that is already full, so the command
    # blocks in its first progress call: after the first step has copied
    # pages into DEST's transaction (or the temporary file), before the copy
    # is complete.
    dest = tmp_path / "dest.db"
    if dest_exists:
        make_target(dest)
        before = digest(dest)
    read_end, write_end = full_pipe()
    try:
        proc = subprocess.Popen(
            command("--progress", "--overwrite", "--pages", "10", source, dest),
            stdout=subprocess.DEVNULL,
            stderr=write_end,
        )
        os.close(write_end)
        try:
            if dest_exists:
                journal = tmp_path / "dest.db-journal"
                wait_for(journal.exists, "the first step to open DEST's transaction")
            else:
                wait_for(
                    lambda: any(map(files.is_temporary_name, os.listdir(tmp_path))),
                    "the temporary file",
                )
            stderr = interrupt_and_drain(proc, read_end)
        finally:
            proc.kill()
            proc.wait(TIMEOUT)
    finally:
        os.close(read_end)
    if dest_exists:
        check_existing(dest, before, proc.returncode, stderr, AS_IT_WAS)
    else:
        check_new(tmp_path, dest, proc.returncode, stderr, NOT_CREATED)


def test_sigint_during_one_long_step_reports_what_dest_holds(tmp_path):
    # --pages 0: a single step copies everything.  The signal arrives while
    # it runs (DEST's journal exists only then), and is acted on when it
    # returns, committed: DEST holds the copy, not verified.
    source = make_source(tmp_path / "source.db", rows=20_000, blob=2000)
    dest = make_target(tmp_path / "dest.db")
    journal = tmp_path / "dest.db-journal"
    proc = subprocess.Popen(
        command("--overwrite", "--pages", "0", source, dest),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: journal.exists() or proc.poll() is not None, "the step")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    if proc.returncode == 0:
        pytest.skip("the step ended before the signal arrived")
    assert proc.returncode == 130
    # Whatever the moment, what the message says is what DEST holds.
    holds_copy = query(dest, "SELECT count(*) FROM sqlite_master WHERE name='t'")
    if AS_IT_WAS in stderr:
        assert holds_copy == [(0,)]
    else:
        assert UNVERIFIED in stderr
        assert holds_copy == [(1,)]


# Attack finding 08: a SIGINT in the command's first moments printed a
# KeyboardInterrupt traceback from inside the package (_command_start's
# `import threading`, before its handlers).  The handlers are now installed
# before the package imports any module of its own but signal.

EARLY = r"""
import signal, sys
before = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            before.append(name)
        return None
sys.meta_path.insert(0, Watch())
import apsw_backup
print(" ".join(before))
print(signal.getsignal(signal.SIGINT) is apsw_backup._command_start._note)
"""


def test_signal_handlers_come_before_any_import_of_the_package(tmp_path):
    script = tmp_path / "apsw-backup"  # the console script's name: the command
    script.write_text(EARLY)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    imported, installed = proc.stdout.split("\n")[:2]
    assert installed == "True"
    # Imported with Python's own SIGINT handler (KeyboardInterrupt): the
    # package, this module, and signal (if not loaded yet) -- nothing else.
    assert set(imported.split()) <= {
        "apsw_backup",
        "apsw_backup._command_start",
        "signal",
    }, imported
