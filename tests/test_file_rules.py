"""The file rules copy() and the command line share
(docs/cli.md#leftovers-and-stale-side-files): a new target beside a stale
-journal/-wal, a side file of the source reached through another mount of its folder, leftovers of killed
runs that shared a PID with the run that cleans up, and the clean-up of a
run into an existing target.  Each rule lives once, in apsw_backup.files,
and its error carries the role, the path and the errno."""

import errno
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from cli_helpers import run
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import copy, files

BOUND = 30


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


def listing(folder):
    return sorted(os.listdir(folder))


# Item 4: a new target beside a stale -journal or -wal.


def stale_journal(path):
    """A hot journal of another database that was at `path` (its header says
    the database had 2 pages of 4096 bytes)."""
    with open(path, "wb") as file:
        file.write(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(4088))
    return path


@pytest.mark.parametrize("side", ["-journal", "-wal"])
def test_copy_refuses_a_new_target_beside_a_stale_side_file(tmp_path, source, side):
    target = tmp_path / "new.db"
    stale = stale_journal(tmp_path / ("new.db" + side))
    before = listing(tmp_path)

    with pytest.raises(files.StaleSideFileError) as caught:
        copy(source, target)

    error = caught.value
    assert isinstance(error, FileExistsError)
    assert (error.role, error.path, error.side) == ("target", str(target), side)
    assert (error.errno, error.filename) == (errno.EEXIST, str(stale))
    message = str(error)
    assert repr(str(stale)) in message and "move it away" in message.lower()
    assert listing(tmp_path) == before  # nothing created, the stale file kept


def test_copy_refuses_to_publish_beside_a_side_file_that_appeared_meanwhile(
    tmp_path, source
):
    target = tmp_path / "new.db"

    def progress(status, remaining, total):
        if not (tmp_path / "new.db-journal").exists():
            stale_journal(tmp_path / "new.db-journal")

    with pytest.raises(files.StaleSideFileError):
        copy(source, target, pages=1, progress=progress)
    assert not target.exists()
    assert listing(tmp_path) == ["new.db-journal", "source.db"]


def test_the_command_line_words_the_same_rule_for_dest(tmp_path, source):
    stale_journal(tmp_path / "new.db-journal")
    proc = run(source, tmp_path / "new.db")
    assert proc.returncode == 2
    assert "new.db-journal" in proc.stderr and "DEST" in proc.stderr
    assert "the target" not in proc.stderr  # the command's words, not copy()'s
    assert not (tmp_path / "new.db").exists()


def test_copy_into_an_existing_target_with_its_own_journal_is_not_refused(
    tmp_path, source
):
    # An existing database's -journal is its own (hot or not): SQLite deals
    # with it when it opens the target, as for any connection.
    target = make_target(tmp_path / "old.db")
    copy(source, target)
    assert query(target, "SELECT count(*) FROM t") == [(300,)]


# Item 5: side files compared by the folder's identity, not its path.

BIND_SCRIPT = r"""
import sys, apsw_backup
from apsw_backup import files
source, target = sys.argv[1], sys.argv[2]
try:
    apsw_backup.copy(source, target)
except files.SameFileError as exc:
    print("refused", exc.role, exc.side, flush=True)
else:
    print("copied", flush=True)
"""


def in_bind_mount(tmp_path, *command):
    """Run command in a mount namespace of its own where tmp_path/bind is
    tmp_path/data mounted a second time; its stdout."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    (tmp_path / "bind").mkdir(exist_ok=True)
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh"]
        + [str(tmp_path / "data"), str(tmp_path / "bind"), *map(str, command)],
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    if "mount" in proc.stderr and proc.returncode != 0 and not proc.stdout:
        pytest.skip(f"cannot bind-mount here: {proc.stderr.strip()}")
    return proc


@pytest.mark.parametrize("side", ["-journal", "-wal", "-shm"])
def test_copy_refuses_a_side_file_of_the_source_through_a_bind_mount(tmp_path, side):
    (tmp_path / "data").mkdir()
    src = make_source(tmp_path / "data" / "app.db")
    proc = in_bind_mount(
        tmp_path,
        sys.executable,
        "-c",
        BIND_SCRIPT,
        src,
        tmp_path / "bind" / ("app.db" + side),
    )
    assert proc.stdout.split() == ["refused", "target", side], proc.stderr
    assert listing(tmp_path / "data") == ["app.db"]


def test_the_command_line_refuses_the_bind_mounted_side_file_too(tmp_path):
    (tmp_path / "data").mkdir()
    src = make_source(tmp_path / "data" / "app.db")
    dest = tmp_path / "bind" / "app.db-journal"
    proc = in_bind_mount(tmp_path, sys.executable, "-m", "apsw_backup", src, dest)
    assert proc.returncode == 2, proc.stderr
    assert "rollback journal" in proc.stderr
    assert listing(tmp_path / "data") == ["app.db"]


def test_side_file_of_compares_folders_by_identity(tmp_path, monkeypatch):
    # The same check without a mount: a path whose folder has another name
    # but the same device and inode is the same folder.
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").mkdir()
    real_stat = os.stat
    data = real_stat(tmp_path / "data")

    def stat(path, *args, **kwargs):
        if os.path.abspath(path) == str(tmp_path / "alias"):
            return data
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(files.os, "stat", stat)
    source_path = str(tmp_path / "data" / "app.db")
    assert files.side_file_of(source_path, str(tmp_path / "alias" / "app.db-wal")) == (
        "-wal"
    )
    assert files.side_file_of(source_path, str(tmp_path / "alias" / "app.db.bak")) is (
        None
    )


# Item 15: leftovers of runs that shared the PID of the run that cleans up.


def leftover(folder, pid, age=3600.0):
    """A killed run's temporary file and journal, named with `pid`."""
    base = folder / f"gone.db.apsw-backup-{pid}-0123abcd.partial"
    make_target(base)
    stale_journal(folder / (base.name + "-journal"))
    then = time.time() - age
    for path in (base, folder / (base.name + "-journal")):
        os.utime(path, (then, then))
    return [base.name, base.name + "-journal"]


@pytest.mark.parametrize("age", [3600.0, 0.0], ids=["old", "just now"])
def test_leftovers_named_with_this_process_pid_are_removed(tmp_path, source, age):
    # PID 1 in containers: every run has the same PID, so a dead run's files
    # carry the PID of the live one.  The flock tells them apart.
    leftover(tmp_path, os.getpid(), age)
    copy(source, tmp_path / "new.db")
    assert listing(tmp_path) == ["new.db", "source.db"]


def test_leftovers_of_a_pid_that_exists_are_removed_when_unlocked(tmp_path, source):
    leftover(tmp_path, 1, age=0.0)  # PID 1 always exists
    copy(source, tmp_path / "new.db")
    assert listing(tmp_path) == ["new.db", "source.db"]


def test_a_live_copy_in_another_thread_of_this_process_is_left_alone(tmp_path, source):
    reached, release = threading.Event(), threading.Event()
    errors = []

    def progress(status, remaining, total):
        reached.set()
        release.wait(BOUND)

    def slow():
        try:
            copy(source, tmp_path / "slow.db", pages=5, progress=progress)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        assert reached.wait(BOUND)
        live = [n for n in listing(tmp_path) if files.is_temporary_name(n)]
        for name in live:  # old: only the process's own record tells
            os.utime(tmp_path / name, (time.time() - 3600,) * 2)
        copy(source, tmp_path / "fast.db")
        assert set(live) <= set(listing(tmp_path))
    finally:
        release.set()
        worker.join(BOUND)
    assert not worker.is_alive() and not errors
    assert listing(tmp_path) == ["fast.db", "slow.db", "source.db"]
    assert query(tmp_path / "slow.db", "PRAGMA integrity_check") == [("ok",)]


PID_ONE = r"""
import os, sys, apsw_backup
assert os.getpid() == 1, os.getpid()
mode = sys.argv[3]
def progress(status, remaining, total):
    print("live", flush=True)
    if mode == "hold":
        sys.stdin.readline()
    elif mode == "die":
        os.kill(os.getpid(), 9)  # PID 1 ignores it: exit without clean-up
        os._exit(9)
apsw_backup.copy(sys.argv[1], sys.argv[2], pages=5, progress=progress)
print("done", flush=True)
"""


def as_pid_one(*args, **kwargs):
    """Popen of PID_ONE as PID 1 of a new PID namespace."""
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", PID_ONE]
        + [str(a) for a in args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def needs_pid_namespaces():
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=BOUND
    )
    if probe.returncode != 0:
        pytest.skip("cannot make a PID namespace here")


def test_runs_that_are_all_pid_one_clean_up_each_other_and_spare_the_live(tmp_path):
    needs_pid_namespaces()
    src = make_source(tmp_path / "source.db", rows=500)
    # A run killed as PID 1 leaves its files, named with PID 1.
    dead = as_pid_one(src, tmp_path / "dead.db", "die")
    dead.communicate(timeout=BOUND)
    left = [n for n in listing(tmp_path) if files.is_temporary_name(n)]
    assert left and all("-1-" in n for n in left)
    # A live run as PID 1 in a namespace of its own.
    live = as_pid_one(src, tmp_path / "slow.db", "hold", stdin=subprocess.PIPE)
    try:
        assert live.stdout.readline().strip() == "live"
        mine = [
            n for n in listing(tmp_path) if files.is_temporary_name(n) and n not in left
        ]
        # A third run, PID 1 too, cleans up the dead one's files only.
        third = as_pid_one(src, tmp_path / "fast.db", "run")
        out, err = third.communicate(timeout=BOUND)
        assert third.returncode == 0, err
        now = listing(tmp_path)
        assert not set(left) & set(now)
        assert set(mine) <= set(now)
        live.stdin.write("\n" * 1000)
        live.stdin.close()
        assert live.stdout.read().strip().endswith("done")
        live.wait(BOUND)
    finally:
        live.kill()
        live.wait(BOUND)
    assert live.returncode == 0
    assert listing(tmp_path) == ["fast.db", "slow.db", "source.db"]


# Item 16: a copy into an existing target cleans its folder too.


def test_copy_into_an_existing_target_removes_dead_runs_leftovers(tmp_path, source):
    target = make_target(tmp_path / "old.db")
    leftover(tmp_path, 999999999)
    copy(source, target)
    assert listing(tmp_path) == ["old.db", "source.db"]


def test_the_command_line_into_an_existing_dest_removes_them_too(tmp_path, source):
    target = make_target(tmp_path / "old.db")
    leftover(tmp_path, 999999999)
    proc = run("--overwrite", source, target)
    assert proc.returncode == 0, proc.stderr
    assert listing(tmp_path) == ["old.db", "source.db"]


# The layer's errors carry structure for each front end to word.


def test_same_file_error_carries_role_path_and_side(tmp_path, source):
    with pytest.raises(files.SameFileError) as caught:
        copy(source, str(source) + "-wal")
    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.role, error.path, error.source, error.side) == (
        "target",
        str(source) + "-wal",
        str(source),
        "-wal",
    )


def test_cli_words_a_side_file_refusal_from_the_structure(tmp_path, source):
    proc = run(source, str(source) + "-wal")
    assert proc.returncode == 2
    assert "write-ahead log" in proc.stderr and "DEST" in proc.stderr


def test_copy_path_errors_carry_role_path_errno_and_the_cli_words_them(
    tmp_path, source
):
    import argparse

    from apsw_backup.cli.failures import _explain
    from apsw_backup.cli.plan import Job

    with pytest.raises(apsw_backup.CantOpenError) as caught:
        copy(source, tmp_path / "missing" / "new.db")
    error = caught.value
    assert error.role == "target's folder"
    assert error.filename == str(tmp_path / "missing")
    assert error.os_errno == errno.ENOENT
    # The command words the same fields in its terms, with no text rewriting.
    (tmp_path / "missing").mkdir()  # so the re-check of the paths finds nothing
    job = Job(
        source=str(source), dest=str(tmp_path / "new.db"), existed=False, verify=True
    )
    text = _explain(error, job, argparse.Namespace(timeout=None))
    assert text == (
        f"CantOpenError: cannot use DEST's folder {str(tmp_path / 'missing')!r}: "
        "it does not exist (no such file or folder) (ENOENT): check the path"
    )
