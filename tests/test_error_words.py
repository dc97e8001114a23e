"""The library's errors carry facts, and the command words them from the
facts, never by rewriting the library's message (the file layer).

For every library error the command reports that a test can provoke, the
library's message says the library's words (target, copy(), timeout=),
the command's says its own (SOURCE, DEST, --timeout) and none of the
library's -- and stays the same when the library's message is replaced by
another: so it cannot be the library's text, rewritten.
(docs/api.md#the-facts-an-error-carries)
"""

import argparse
import errno
import os
import re
import subprocess
import sys
import time

import pytest
from copy_helpers import make_source

import apsw_backup
from apsw_backup import copy, files
from apsw_backup import incremental as inc
from apsw_backup.cli import incremental as cli_inc
from apsw_backup.cli.failures import _explain
from apsw_backup.cli.plan import Job

BOUND = 30
LIBRARY_WORDS = ("target", "copy()", "timeout=", "None")
GARBLED = "GARBLED target copy() timeout=9 s (or None)"


def locked(path):
    """A process holding an exclusive lock on path (stop it with unlock)."""
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True)\n"
            "sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout.readline().strip() == "locked"
    return locker


def unlock(locker):
    locker.kill()
    locker.wait(timeout=BOUND)


def raised(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the error under test
        return exc
    raise AssertionError("no error was raised")


def garble(exc):
    """Replace what str(exc) says, leaving the facts (attributes) alone."""
    exc.args = (GARBLED,)
    if isinstance(exc, OSError):
        exc.strerror = GARBLED
    if isinstance(exc, files.StaleSideFileError):
        exc.message = GARBLED
    assert GARBLED in str(exc)


def numbers_out(text):
    return re.sub(r"[0-9]+(\.[0-9]+)?", "N", text)


# -- the situations: (error, the command's words for it) --------------------


def main_words(exc, source, dest, existed=False, timeout=None):
    """The backup command's message (cli/failures.py), as it reports exc."""
    job = Job(source=str(source), dest=str(dest), existed=existed, verify=True)
    return _explain(exc, job, argparse.Namespace(timeout=timeout))


def timeout_of_a_copy(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "dest.db"
    locker = locked(source)
    try:
        exc = raised(lambda: copy(source, dest, timeout=0.3, sleep=0.05))
    finally:
        unlock(locker)
    assert isinstance(exc, apsw_backup.BusyError)
    assert exc.gave_up.timeout == 0.3 and exc.gave_up.waits > 0
    assert exc.target_state == "not created"
    return exc, lambda: main_words(exc, source, dest), ("copy() gave up", "timeout=")


def missing_target_folder(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "missing" / "new.db"
    exc = raised(lambda: copy(source, dest))
    assert isinstance(exc, apsw_backup.CantOpenError)
    assert (exc.role, exc.path, exc.os_errno) == (
        "target's folder",
        str(tmp_path / "missing"),
        errno.ENOENT,
    )
    return exc, lambda: main_words(exc, source, dest), ("the target's folder",)


def stale_side_file(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "new.db"
    (tmp_path / "new.db-journal").write_bytes(b"x" * 512)
    exc = raised(lambda: copy(source, dest))
    assert isinstance(exc, files.StaleSideFileError)
    assert (exc.role, exc.side) == ("target", "-journal")
    return exc, lambda: main_words(exc, source, dest), ("the new target",)


def file_at_dest_before_the_copy(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "new.db"
    dest.write_text("someone else's\n")
    exc = raised(lambda: copy(source, dest, target_exists=False))
    assert isinstance(exc, FileExistsError)
    assert (exc.role, exc.target_state) == ("target", "not created")
    return exc, lambda: main_words(exc, source, dest), ("the target",)


def file_at_dest_before_publishing(tmp_path):
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "new.db"

    def appear(path):
        dest.write_text("someone else's\n")

    exc = raised(lambda: copy(source, dest, before_publish=appear))
    assert isinstance(exc, FileExistsError)
    assert (exc.role, exc.os_errno, exc.path) == ("target", errno.EEXIST, str(dest))
    assert dest.read_text() == "someone else's\n"
    return exc, lambda: main_words(exc, source, dest), ("created by someone else",)


def read_only_folder(tmp_path, monkeypatch):
    source = make_source(tmp_path / "source.db")
    folder = tmp_path / "ro"
    folder.mkdir()
    dest = folder / "new.db"
    access = os.access

    def no_writing(path, mode, **kwargs):  # as for a user who may not write
        if os.fspath(path) == str(folder) and mode & os.W_OK:
            return False
        return access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", no_writing)
    exc = raised(lambda: copy(source, dest))
    assert (exc.role, exc.os_errno) == ("target's folder", errno.EACCES)
    return exc, lambda: main_words(exc, source, dest), ("the target's folder",)


def same_file(tmp_path):
    source = make_source(tmp_path / "source.db")
    exc = raised(lambda: copy(source, str(source) + "-wal"))
    assert isinstance(exc, files.SameFileError)
    return (
        exc,
        lambda: cli_inc._words(exc),
        ("the target", "the source's"),
    )


def a_folder_of_points(tmp_path):
    source = make_source(tmp_path / "app.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(source, folder)
    return source, folder


def timeout_of_a_restore(tmp_path):
    _, folder = a_folder_of_points(tmp_path)
    live = make_source(tmp_path / "live.db", rows=3)
    locker = locked(live)
    try:
        exc = raised(lambda: inc.restore(folder, live, overwrite=True, timeout=0.3))
    finally:
        unlock(locker)
    assert isinstance(exc, apsw_backup.BusyError)
    # locked out from the start: never written (attack round 2: it said
    # "rolled back")
    assert exc.target_state == "unchanged" and exc.gave_up.waits > 0
    return (
        exc,
        lambda: cli_inc._restore_failed(str(live), exc),
        ("copy() gave up", "timeout="),
    )


def stale_side_file_of_a_restore(tmp_path):
    _, folder = a_folder_of_points(tmp_path)
    (tmp_path / "r.db-wal").write_bytes(b"x" * 512)
    exc = raised(lambda: inc.restore(folder, tmp_path / "r.db"))
    assert isinstance(exc, files.StaleSideFileError)
    return exc, lambda: cli_inc._words(exc), ("the new target",)


def timeout_of_an_incremental_backup(tmp_path):
    source, folder = a_folder_of_points(tmp_path)
    locker = locked(source)
    try:
        exc = raised(lambda: inc.incremental(source, folder, timeout=0.3))
    finally:
        unlock(locker)
    assert isinstance(exc, inc.DeadlineError)
    assert exc.gave_up.timeout == 0.3 and exc.gave_up.waits > 0
    return exc, lambda: cli_inc._words(exc), ("timeout (0.3 s)", "copy() gave up")


SITUATIONS = {
    "timeout": (timeout_of_a_copy, ("SOURCE", "--timeout", "locked")),
    "missing folder": (missing_target_folder, ("DEST's folder", "ENOENT")),
    "stale side file": (stale_side_file, ("the new DEST", "new.db-journal")),
    "file appeared": (file_at_dest_before_the_copy, ("appeared at DEST",)),
    "file appeared at publish": (file_at_dest_before_publishing, ("at DEST",)),
    "read-only folder": (read_only_folder, ("DEST's folder", "EACCES")),
    "same file": (same_file, ("DEST", "SOURCE's write-ahead log")),
    "restore timeout": (
        timeout_of_a_restore,
        ("DEST", "--timeout", "DEST is unchanged"),
    ),
    "restore stale side file": (stale_side_file_of_a_restore, ("the new DEST",)),
    "incremental timeout": (timeout_of_an_incremental_backup, ("SOURCE", "--timeout")),
}


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_the_command_words_library_errors_from_their_facts(name, tmp_path, monkeypatch):
    provoke, ours = SITUATIONS[name]
    if provoke is read_only_folder:
        exc, words, library = provoke(tmp_path, monkeypatch)
    else:
        exc, words, library = provoke(tmp_path)
    said = str(exc)
    for word in library:  # the library speaks its own terms
        assert word in said, (word, said)
    text = words()
    for word in ours:  # the command speaks its own
        assert word in text, (word, text)
    for word in LIBRARY_WORDS:  # and none of the library's
        assert word not in text, (word, text)
    # Built from the facts: another library message changes nothing.
    garble(exc)
    again = words()
    assert GARBLED not in again
    assert numbers_out(again) == numbers_out(text)


def test_facts_are_the_documented_set_and_default_to_none():
    error = files.with_facts(apsw_backup.IOError("x"), role="target", path="/p")
    assert {name: getattr(error, name) for name in files.FACTS} == {
        "role": "target",
        "path": "/p",
        "os_errno": None,
        "side": None,
        "target_state": None,
        "gave_up": None,
    }
    with pytest.raises(TypeError):
        files.with_facts(apsw_backup.IOError("x"), filename="/p")
    with pytest.raises(ValueError):
        files.with_facts(apsw_backup.IOError("x"), role="DEST")


def test_sqlite_messages_are_passed_through_unchanged(tmp_path):
    """An error SQLite raised (no facts) is shown as SQLite said it."""
    error = apsw_backup.CorruptError("database disk image is malformed")
    assert cli_inc._words(error) == "database disk image is malformed"
    dest = tmp_path / "dest.db"
    text = main_words(error, tmp_path / "source.db", dest)
    assert text == "CorruptError: database disk image is malformed"


def test_a_timeout_in_the_command_names_its_option_end_to_end(tmp_path):
    source, folder = a_folder_of_points(tmp_path)
    locker = locked(source)
    try:
        began = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "apsw_backup", "--incremental", "--timeout",
             "0.3", str(source), str(folder)],
            capture_output=True, text=True, timeout=BOUND, check=False,
        )  # fmt: skip
    finally:
        unlock(locker)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - began < BOUND
    assert "gave up after" in proc.stderr and "(--timeout 0.3)" in proc.stderr
    assert "SOURCE was locked by another connection" in proc.stderr
    assert "Nothing was kept" in proc.stderr
    for word in LIBRARY_WORDS:
        assert word not in proc.stderr, (word, proc.stderr)


@pytest.mark.parametrize("schema", ["aux", "other"])
def test_a_schema_source_does_not_have_is_refused_in_the_commands_words(
    tmp_path, schema
):
    """It reached copy(), whose SQLError spoke of "the source connection"
    (the command rewrote "the source" as "SOURCE"); a file holds one
    database, main: the command refuses any other name itself (exit 2)."""
    source = make_source(tmp_path / "source.db")
    dest = tmp_path / "dest.db"
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "--schema", schema, str(source),
         str(dest)],
        capture_output=True, text=True, timeout=BOUND, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"--schema {schema!r}" in proc.stderr and "main" in proc.stderr
    assert "connection" not in proc.stderr and "SQLError" not in proc.stderr
    assert not dest.exists()


# Where the command may call replace()/re.sub(): never on an error's text.
REPLACING_ALLOWED = {
    ("folder.py", "_stamp", "replace"),  # datetime.replace(tzinfo=...)
    ("incremental.py", "_list", "replace"),  # an ISO time's "+00:00" as "Z"
    ("progress.py", "terse", "replace"),  # its own progress line, shortened
}


def replacing_calls(source):
    """{(function, method)} of every replace/sub/subn/translate call in
    the Python source text."""
    import ast

    found = set()

    def walk(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Attribute)
                and child.func.attr in ("replace", "sub", "subn", "translate")
            ):
                found.add((function, child.func.attr))
            walk(child, inner)

    walk(ast.parse(source), None)
    return found


def test_the_command_rewrites_no_message_by_string_replacement():
    """Every replace(), sub(), subn() or translate() call in the command's
    package is one of the few above, none of them on an error's text: a
    new one must be a deliberate, reviewed addition here (the words of an
    error come from its facts, errors.in_our_words)."""
    from pathlib import Path

    import apsw_backup.cli

    found = set()
    for path in sorted(Path(apsw_backup.cli.__file__).parent.glob("*.py")):
        for function, method in replacing_calls(path.read_text()):
            found.add((path.name, function, method))
    assert found <= REPLACING_ALLOWED, sorted(found - REPLACING_ALLOWED)
    # It would have seen the rewriting there was (in_cli_terms, until
    # the file layer).
    before = "def in_cli_terms(text):\n    return text.replace('copy()', 'x')\n"
    assert ("in_cli_terms", "replace") in replacing_calls(before)


def test_a_sqlite_io_error_copy_added_words_to_is_worded_from_sqlites_own():
    # copy() adds what the target holds to SQLite's I/O error ("the new
    # target was not created"); the command showed those library words.
    from apsw_backup import files
    from apsw_backup.cli.errors import in_our_words

    sqlite_said = apsw_backup.IOError("disk I/O error (OS error: Input/output error)")
    said = apsw_backup.IOError(f"{sqlite_said}; the new target was not created")
    said.__cause__ = sqlite_said
    files.with_facts(said, target_state="not created")
    assert in_our_words(said) == str(sqlite_said)


@pytest.mark.parametrize("run", ["copy", "acopy"])
@pytest.mark.parametrize("bad", ["source", "target"])
def test_a_file_that_is_not_a_database_is_named_with_its_side(tmp_path, run, bad):
    """SQLite says only "file is not a database": copy() names which file,
    and the cure; the file is left as it was."""
    import asyncio
    import sqlite3

    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"just some text, not a database\n" * 200)
    good = tmp_path / "good.db"
    with sqlite3.connect(good) as c:
        c.execute("CREATE TABLE t(x)")
    c.close()
    source, target = (junk, tmp_path / "new.db") if bad == "source" else (good, junk)
    before = junk.read_bytes()
    with pytest.raises(apsw_backup.NotADBError) as info:
        if run == "copy":
            apsw_backup.copy(source, target)
        else:
            asyncio.run(apsw_backup.acopy(source, target))
    said = str(info.value)
    assert f"the {bad} {str(junk)!r} is not an SQLite database" in said, said
    assert info.value.role == bad
    assert info.value.path == str(junk)
    if bad == "source":
        assert "name the database file" in said
        assert info.value.target_state == "not created"
        assert not (tmp_path / "new.db").exists()
    else:
        assert "remove it, or name another target" in said
        assert info.value.target_state == "unchanged"
    assert junk.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"notes.txt", "good.db"}
    )


def _damaged_copy_of(good, bad):
    """bad: good with its schema page's b-tree header made invalid."""
    data = bytearray(good.read_bytes())
    data[100] = 0x77  # not a b-tree page type
    bad.write_bytes(bytes(data))


@pytest.mark.parametrize("bad", ["source", "target"])
def test_a_damaged_database_is_named_with_its_side(tmp_path, bad):
    """SQLite says only "database disk image is malformed": copy() names the
    side whose schema cannot be read, and the cure; the command says it in
    its words.  The damaged file is left as it was."""
    import sqlite3

    good = tmp_path / "good.db"
    with sqlite3.connect(good) as c:
        c.execute("CREATE TABLE t(x)")
        c.executemany(
            "INSERT INTO t VALUES (?)", [(os.urandom(300),) for _ in range(50)]
        )
    c.close()
    damaged = tmp_path / "damaged.db"
    _damaged_copy_of(good, damaged)
    before = damaged.read_bytes()
    source, target = (
        (damaged, tmp_path / "new.db") if bad == "source" else (good, damaged)
    )
    with pytest.raises(apsw_backup.CorruptError) as info:
        apsw_backup.copy(source, target)
    said = str(info.value)
    assert f"the {bad} {str(damaged)!r} is damaged" in said, said
    assert info.value.role == bad and info.value.path == str(damaged)
    assert damaged.read_bytes() == before
    if bad == "target":
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "apsw_backup",
                str(good),
                str(damaged),
                "--overwrite",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert f"DEST {str(damaged)!r} is damaged" in proc.stderr, proc.stderr
        assert "delete the file yourself" in proc.stderr
        assert damaged.read_bytes() == before
