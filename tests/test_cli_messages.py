"""The command's failure messages name the OS cause and the cure, speak of
SOURCE and DEST (never copy(), finish() or "target"), and --json prints one
JSON object for failures too (docs/command-line.md).

Permission cases run the command without root's DAC capabilities
(setpriv); read-only and full file systems are a tmpfs in a private mount
namespace (unshare).  Each is skipped where the machine cannot do it.
"""

import os
import re
import shutil
import sqlite3

import pytest
from cli_helpers import (
    can_mount,
    in_mount,
    json_of,
    leftovers,
    run,
    without_privileges,
)
from copy_helpers import make_source, make_target, query

FORBIDDEN = re.compile(r"copy\(\)|finish\(\)|\btarget\b")


def assert_failed(proc, code, *phrases):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not FORBIDDEN.search(proc.stderr), proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    if not can_mount(probe):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    probe.chmod(0o555)
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv(1)")
    if os.geteuid() != 0 and os.access(probe, os.W_OK):
        pytest.skip("file permissions do not apply here")


def test_source_that_is_a_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    proc = run(folder, tmp_path / "dest.db")
    assert_failed(
        proc, 1, f"SOURCE '{folder}' is a folder (EISDIR)", "name the database file"
    )
    assert leftovers(tmp_path) == ["data"]


def test_source_that_is_not_a_database(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    proc = run("--json", text, tmp_path / "dest.db")
    assert_failed(proc, 1, f"SOURCE '{text}' is not an SQLite database")
    error = json_of(proc)["error"]
    assert error["class"] == "NotADBError"
    assert error["result"] == error["extendedresult"] == 26
    assert leftovers(tmp_path) == ["notes.txt"]


def test_source_in_a_path_through_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    missing = tmp_path / "file" / "source.db"
    proc = run(missing, tmp_path / "dest.db")
    assert_failed(proc, 1, f"cannot read SOURCE '{missing}'", "(ENOTDIR)")


def test_dest_in_a_missing_folder(source, tmp_path):
    dest = tmp_path / "no" / "such" / "dest.db"
    proc = run(source, dest)
    assert_failed(
        proc,
        1,
        f"DEST's folder '{dest.parent}' does not exist (ENOENT)",
        f"mkdir -p {dest.parent}",
    )
    assert not (tmp_path / "no").exists()


def test_dest_folder_that_does_not_exist(source, tmp_path):
    folder = f"{tmp_path}/backups/"
    proc = run(source, folder)
    assert_failed(proc, 1, f"DEST folder '{folder}' does not exist (ENOENT)")


def test_dest_below_a_file(source, tmp_path):
    (tmp_path / "file").write_text("x")
    dest = tmp_path / "file" / "dest.db"
    proc = run(source, dest)
    assert_failed(
        proc, 1, f"DEST's folder '{dest.parent}' is a file, not a folder (ENOTDIR)"
    )


def test_dest_that_is_not_a_database_is_not_overwritten(source, tmp_path):
    dest = tmp_path / "notes.txt"
    dest.write_text("precious\n")
    proc = run("--overwrite", source, dest)
    assert_failed(proc, 2, f"DEST '{dest}' is not an SQLite database")
    assert dest.read_text() == "precious\n"


def test_dest_folder_not_writable(unprivileged, source, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    proc = without_privileges([source, folder / "dest.db"])
    assert_failed(
        proc, 1, f"cannot create files in DEST's folder '{folder}'", "(EACCES)"
    )
    assert os.listdir(folder) == []


def test_source_not_readable(unprivileged, source, tmp_path):
    source.chmod(0o200)
    proc = without_privileges([source, tmp_path / "dest.db"])
    assert_failed(proc, 1, f"cannot read SOURCE '{source}'", "(EACCES)")
    assert leftovers(tmp_path) == ["source.db"]


def test_dest_on_a_read_only_file_system(mounts, source, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    proc = in_mount(folder, "size=1m", [source, folder / "dest.db"], remount="ro")
    assert_failed(proc, 1, "read-only file system (EROFS)", "writable")


def test_existing_dest_on_a_read_only_file_system(mounts, source, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    dest = folder / "dest.db"
    proc = in_mount(
        folder,
        "size=1m",
        ["--overwrite", source, dest],
        setup=f"cp {tmp_path / 'source.db'} {dest}",
        remount="ro",
    )
    assert_failed(proc, 1, "(EROFS)")


def test_dest_on_a_full_file_system(mounts, tmp_path):
    big = make_source(tmp_path / "big.db", rows=4000, blob=1000)
    folder = tmp_path / "small"
    folder.mkdir()
    proc = in_mount(folder, "size=600k", ["--json", big, folder / "dest.db"])
    assert_failed(
        proc,
        1,
        f"the file system of DEST's folder '{folder}' is full (ENOSPC)",
        "the copy needs about 4.",
        "free some space there",
        f"DEST '{folder / 'dest.db'}' was not created",
    )
    result = json_of(proc)
    assert result["exit_code"] == 1
    assert result["dest_state"] == "not created"
    assert result["error"]["class"] in ("FullError", "IOError")
    assert result["error"]["result"] in (13, 10)


def test_existing_dest_on_a_full_file_system_is_left_as_it_was(mounts, tmp_path):
    big = make_source(tmp_path / "big.db", rows=4000, blob=1000)
    folder = tmp_path / "small"
    folder.mkdir()
    old = make_target(tmp_path / "old.db")
    dest = folder / "dest.db"
    proc = in_mount(
        folder,
        "size=600k",
        ["--overwrite", big, dest],
        setup=f"cp {old} {dest}; cp {dest} {folder}/check.db",
    )
    assert_failed(proc, 1, "(ENOSPC)", f"DEST '{dest}' was left as it was")


def test_timeout_with_json_prints_one_object_with_the_sqlite_codes(source, tmp_path):
    dest = tmp_path / "dest.db"
    locker = sqlite3.connect(str(source), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        proc = run("--json", "--sleep", "0.01", "--timeout", "0.2", source, dest)
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert_failed(proc, 1, "gave up after")
    result = json_of(proc)
    assert result == {
        **result,
        "ok": False,
        "exit_code": 1,
        "source": str(source),
        "dest": str(dest),
        "dest_state": "not created",
    }
    assert result["error"]["class"] == "BusyError"
    assert result["error"]["result"] == 5
    assert result["error"]["extendedresult"] == 5
    assert "SOURCE was locked by another connection" in result["error"]["message"]


def test_timeout_0_with_nothing_locked_does_not_blame_a_lock(source, tmp_path):
    proc = run("--timeout", "0", "--pages", "1", source, tmp_path / "dest.db")
    assert proc.returncode == 1, proc.stderr
    assert "the time limit passed before the copy was complete" in proc.stderr
    assert "locked" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [["--json"], ["--json", "a.db"], ["--json", "--pages", "x", "a.db", "b.db"]],
)
def test_usage_error_with_json_prints_one_object(tmp_path, args):
    proc = run(*args, cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: apsw-backup" in proc.stderr
    result = json_of(proc)
    assert result["ok"] is False
    assert result["exit_code"] == 2
    assert result["error"]["class"] == "UsageError"
    assert result["error"]["result"] is None


def test_non_empty_dest_refusal_with_json(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    proc = run("--json", source, dest)
    assert_failed(proc, 2, "pass --overwrite")
    assert json_of(proc)["exit_code"] == 2
    assert query(dest, "SELECT note FROM old") == [("old content",)]


@pytest.mark.parametrize(
    "case",
    [
        "source missing",
        "source a folder",
        "source not a database",
        "dest folder missing",
    ],
)
def test_a_failed_check_before_anything_is_written_ends_saying_dest_was_not_created(
    tmp_path, case
):
    source = tmp_path / "source.db"
    dest = tmp_path / "dest.db"
    if case == "source a folder":
        source.mkdir()
    elif case == "source not a database":
        source.write_bytes(os.urandom(8192))
    elif case == "dest folder missing":
        make_source(source)
        dest = tmp_path / "nowhere" / "dest.db"
    proc = run("--json", source, dest)
    assert proc.returncode in (1, 2), proc.stderr
    assert proc.stderr.rstrip().endswith(f"DEST '{dest}' was not created"), proc.stderr
    assert json_of(proc)["error"]["message"].endswith("was not created")
    assert json_of(proc)["dest_state"] == "not created"
    assert not dest.exists()


def test_a_refusal_of_an_existing_dest_ends_saying_it_was_left_as_it_was(
    source, tmp_path
):
    dest = make_target(tmp_path / "dest.db")
    proc = run(source, dest)
    assert_failed(proc, 2, "pass --overwrite")
    assert proc.stderr.rstrip().endswith(f"DEST '{dest}' was left as it was")
    assert query(dest, "SELECT note FROM old") == [("old content",)]
