"""Time limits, name limits, a verify that never writes, and messages that
name cause and cure (docs/cli.md).

Permission cases run the command without root's DAC capabilities
(setpriv); read-only file systems are a tmpfs in a private mount namespace
(unshare).  Each is skipped where the machine cannot do it.
"""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from cli_helpers import (
    TIMEOUT,
    can_mount,
    command,
    digest,
    in_mount,
    json_of,
    leftovers,
    marker_path,
    paused_env,
    run,
    wait_for,
    without_preload,
    without_privileges,
)
from copy_helpers import make_source, make_target, query


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "source.db")


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    if not can_mount(tmp_path_factory.mktemp("probe")):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory):
    probe = tmp_path_factory.mktemp("probe")
    probe.chmod(0o555)
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv(1)")
    if os.geteuid() != 0 and os.access(probe, os.W_OK):
        pytest.skip("file permissions do not apply here")


def locked(path):
    """A connection holding an exclusive lock on the database at path."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    return db


# --- 14: --timeout bounds the whole run ---------------------------------------


def test_timeout_bounds_the_verification_of_an_existing_dest(source, tmp_path):
    dest = make_target(tmp_path / "dest.db")
    marker = marker_path(tmp_path, "verifying")
    started = time.monotonic()
    proc = subprocess.Popen(
        command("--json", "--overwrite", "--timeout", "1", source, dest),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env("verifying", marker),
    )
    holder = None
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, "verifying")
        holder = locked(dest)  # another program takes DEST meanwhile
        marker.unlink()
        out, err = proc.communicate(timeout=TIMEOUT)
        took = time.monotonic() - started
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        if holder is not None:
            holder.execute("COMMIT")
            holder.close()
    assert proc.returncode == 1, err
    assert took < 1 + 3, took  # the limit, plus start-up and slack
    assert "--timeout 1" in err
    assert "locked by another connection" in err
    result = json_of(subprocess.CompletedProcess([], 1, out, err))
    assert result["dest_state"] == "unverified"
    assert result["error"]["class"] == "BusyError"


def test_verify_timeout_bounds_a_wait_for_a_lock(source):
    holder = locked(source)
    try:
        started = time.monotonic()
        proc = run("verify", "--json", "--timeout", "0.5", source)
        took = time.monotonic() - started
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert proc.returncode == 1, proc.stderr
    assert took < 4, took
    assert "locked by another connection" in proc.stderr
    assert json_of(proc)["files"][0]["error"]["class"] == "BusyError"


# --- 17: multi-byte names ------------------------------------------------------


def test_a_multibyte_dest_name_of_243_bytes_is_backed_up(source, tmp_path):
    name = "€" * 80 + ".db"  # 3 bytes a character
    assert len(name.encode()) == 243
    dest = tmp_path / name
    proc = run(source, dest)
    assert proc.returncode == 0, proc.stderr
    assert query(dest, "SELECT count(*) FROM t") == [(300,)]
    assert leftovers(tmp_path, keep=["source.db", name]) == []


def test_a_dest_name_too_long_blames_the_name(source, tmp_path):
    name = "é" * 150 + ".db"  # 153 characters, 303 bytes
    proc = run("--json", source, tmp_path / name)
    assert proc.returncode == 2, proc.stderr
    assert "ENAMETOOLONG" in proc.stderr
    assert "303 bytes" in proc.stderr
    assert "shorter name" in proc.stderr
    assert "folder" not in proc.stderr
    assert json_of(proc)["dest_state"] == "not created"
    assert leftovers(tmp_path, keep=["source.db"]) == []


# --- 18: verify never writes; an empty file is not a backup --------------------


def wal_backup_with_frames(folder):
    """A WAL database whose last commit is only in its -wal (as a backup
    taken with --keep-wal and copied with its -wal)."""
    live = folder / "live.db"
    db = sqlite3.connect(str(live), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t(x)")
    db.execute("INSERT INTO t VALUES (1)")
    backup = folder / "backup.db"
    shutil.copy(live, backup)
    shutil.copy(f"{live}-wal", f"{backup}-wal")
    db.close()
    return backup


def test_verify_does_not_checkpoint_nor_delete_the_wal(tmp_path):
    backup = wal_backup_with_frames(tmp_path)
    before = digest(backup), digest(f"{backup}-wal")
    proc = run("verify", backup)
    assert proc.returncode == 0, proc.stderr
    assert (digest(backup), digest(f"{backup}-wal")) == before


def test_verify_removes_the_shm_it_made_beside_a_wal(tmp_path):
    # A WAL file with its -wal but no -shm: the read-only connections must
    # create the -shm to read the -wal; verify removes it after, and leaves
    # the file and its -wal as they were.
    backup = wal_backup_with_frames(tmp_path)
    before = digest(backup), digest(f"{backup}-wal")
    assert not os.path.exists(f"{backup}-shm")
    proc = run("verify", backup)
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(f"{backup}-shm")
    assert (digest(backup), digest(f"{backup}-wal")) == before
    assert query(backup, "SELECT x FROM t") == [(1,)]  # the -wal still counts


HOLD = """
import sqlite3, sys, time
# Read-only: its close leaves the -wal and the -shm it made.
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
db.execute("SELECT count(*) FROM t").fetchall()  # maps the -shm, holds SHARED
print("open", flush=True)
sys.stdin.read()
"""


def test_a_shm_another_connection_uses_is_never_removed(tmp_path):
    # Removing a -shm another process is using would split the database's
    # connections between two wal-indexes: files.remove_unused_shm keeps it
    # while any connection is open, and removes it once none is.
    from apsw_backup import files

    backup = wal_backup_with_frames(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(backup)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "open\n"
        assert os.path.exists(f"{backup}-shm")
        assert files.remove_unused_shm(str(backup)) is False
        assert os.path.exists(f"{backup}-shm")
    finally:
        holder.communicate(timeout=TIMEOUT)
    assert holder.returncode == 0
    assert os.path.exists(f"{backup}-shm")
    assert files.remove_unused_shm(str(backup)) is True
    assert not os.path.exists(f"{backup}-shm")
    assert os.path.exists(f"{backup}-wal")


def test_verify_leaves_nothing_beside_a_wal_file(tmp_path):
    path = make_source(tmp_path / "w.db", journal="wal")
    before = digest(path)
    assert run("verify", path).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["w.db"]
    assert digest(path) == before


def test_verify_fails_an_empty_file(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = run("verify", "--json", empty)
    assert proc.returncode == 3, proc.stderr
    assert "empty (0 bytes)" in proc.stderr
    assert json_of(proc)["files"][0]["verified"] is False
    assert empty.stat().st_size == 0


# --- 19: messages with cause and cure ---------------------------------------------


HOT_JOURNAL = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=2")
db.execute("BEGIN")
db.execute("UPDATE t SET data = randomblob(400)")
os.kill(os.getpid(), signal.SIGKILL)
"""


def make_hot_journal(path):
    """SOURCE left by a writer killed in the middle of a transaction."""
    proc = subprocess.run(
        [shutil.which("python3") or "python3", "-c", HOT_JOURNAL, str(path)],
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL
    assert os.path.getsize(f"{path}-journal") > 0


def test_a_hot_journal_source_in_a_folder_the_user_cannot_write(unprivileged, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    source = make_source(folder / "source.db")
    make_hot_journal(source)
    folder.chmod(0o555)
    out = tmp_path / "out"
    out.mkdir()
    try:
        proc = without_privileges(["--json", source, out / "dest.db"])
    finally:
        folder.chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    assert "hot journal" in proc.stderr
    assert "(EACCES)" in proc.stderr
    assert "Open it once as a user who may write there" in proc.stderr
    assert "attempt to write a readonly database" not in proc.stderr
    assert os.path.getsize(f"{source}-journal") > 0  # still there


@pytest.mark.parametrize("what", [[], ["verify"]])
def test_a_hot_journal_source_the_user_may_write(tmp_path, what):
    # Folder and file writable: SQLite still cannot roll the journal back
    # through the read-only connection (SQLITE_READONLY_ROLLBACK).  The
    # message names the hot journal and the cure, not "attempt to write a
    # readonly database".
    source = make_source(tmp_path / "source.db")
    make_hot_journal(source)
    journal = (tmp_path / "source.db-journal").read_bytes()
    args = [*what, source] if what else [source, tmp_path / "dest.db"]
    proc = run(*args)
    assert proc.returncode == 1, proc.stderr
    assert "has a hot journal" in proc.stderr
    assert "interrupted in the middle of a transaction" in proc.stderr
    assert f"sqlite3 {source} 'PRAGMA quick_check'" in proc.stderr
    assert "attempt to write a readonly database" not in proc.stderr
    assert (tmp_path / "source.db-journal").read_bytes() == journal  # untouched
    # The cure works: opened once read-write, it is backed up and verified.
    db = sqlite3.connect(source)
    assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    db.close()
    assert run(*args).returncode == 0


def deep_folder(tmp_path, size):
    """A folder under tmp_path whose full path is `size` bytes long."""
    path = os.path.realpath(tmp_path / "deep")
    while len(path) < size:
        left = size - len(path) - 1  # for the next folder's name
        step = min(200, left)
        if 0 < left - step < 2:  # never leave room for a "/" alone
            step -= 2
        path = os.path.join(path, "d" * step)
    os.makedirs(path)
    assert len(os.fsencode(os.path.realpath(path))) == size
    return path


@pytest.mark.parametrize("what", ["backup", "verify", "dest"])
def test_a_path_longer_than_sqlite_accepts_is_named_with_its_cure(tmp_path, what):
    # SQLite's unix VFS opens no database whose full path is over 504
    # bytes (512 with "-journal"): not an I/O error, a missing file or a
    # permission, as the messages said.
    folder = deep_folder(tmp_path, 600)
    source = make_source(tmp_path / "source.db")
    if what == "dest":
        proc = run(source, os.path.join(folder, "dest.db"))
        assert not os.listdir(folder)
    else:
        deep = os.path.join(folder, "app.db")
        shutil.copy(source, deep)
        args = ["verify", "app.db"] if what == "verify" else ["app.db", source]
        proc = subprocess.run(
            command(*args),
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr
    assert "is too long for SQLite" in proc.stderr
    assert "mount --bind" in proc.stderr
    for lie in ("EIO", "missing file", "permissions", "unable to open"):
        assert lie not in proc.stderr


def test_a_path_sqlite_accepts_is_backed_up(tmp_path):
    # At the limit it works: the check blames no path SQLite can open.
    folder = deep_folder(tmp_path, 504 - len("/app.db"))
    source = make_source(os.path.join(folder, "app.db"))
    proc = run(source, tmp_path / "out.db")
    assert proc.returncode == 0, proc.stderr
    assert run("verify", source).returncode == 0


def test_a_wal_source_in_a_folder_the_user_cannot_write(unprivileged, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    source = make_source(folder / "source.db", journal="wal")
    folder.chmod(0o555)
    try:
        proc = without_privileges([source, tmp_path / "dest.db"])
        verified = without_privileges(["verify", source])
    finally:
        folder.chmod(0o755)
    for done in (proc, verified):
        assert done.returncode == 1, done.stderr
        assert "in WAL mode" in done.stderr
        assert "-shm" in done.stderr
        assert "(EACCES)" in done.stderr
        assert "attempt to write a readonly database" not in done.stderr


@pytest.mark.parametrize("what", [[], ["verify"]])
def test_a_wal_source_on_a_read_only_file_system(mounts, tmp_path, what):
    made = make_source(tmp_path / "made.db", journal="wal")
    folder = tmp_path / "ro"
    folder.mkdir()
    source = folder / "source.db"
    args = [*what, source] if what else [source, tmp_path / "dest.db"]
    proc = in_mount(folder, "size=1m", args, setup=f"cp {made} {source}", remount="ro")
    assert proc.returncode == 1, proc.stderr
    assert "in WAL mode" in proc.stderr
    assert "read-only file system (EROFS)" in proc.stderr
    assert "remount it read-write" in proc.stderr
    assert "ENOENT" not in proc.stderr
    assert "unable to open database file" not in proc.stderr


def test_verify_never_blames_enoent_for_a_file_that_exists(mounts, tmp_path):
    made = make_source(tmp_path / "made.db", journal="wal")
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "backup.db"
    proc = in_mount(
        folder,
        "size=1m",
        ["verify", "--json", path],
        setup=f"cp {made} {path}",
        remount="ro",
    )
    assert proc.returncode == 1, proc.stderr
    assert "ENOENT" not in proc.stderr
    assert "no such file" not in proc.stderr.lower()
    assert json_of(proc)["files"][0]["error"]["errno"] != 2


ROLL_BACK = """
import sys
from apsw_backup.cli.dest_file import roll_back
from apsw_backup.cli.plan import Job
job = Job(source="s.db", dest=sys.argv[1], existed=True, verify=True)
roll_back(job, 1.0)
print(job.state())
print(job.says())
"""


def test_dest_that_cannot_be_rolled_back_is_reported_as_needing_recovery(
    unprivileged, tmp_path
):
    # A copy into an existing DEST that failed mid-commit leaves it torn,
    # with a hot journal; when SQLite cannot roll it back now (here: no
    # write access), DEST is not "left as it was" and must not be called so.
    dest = make_source(tmp_path / "dest.db")
    make_hot_journal(dest)
    before = digest(f"{dest}-journal")
    dest.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        proc = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "sh",
             "-c", 'LD_PRELOAD=$CHILD_PRELOAD exec "$@"', "sh",
             sys.executable, "-c", ROLL_BACK, str(dest)],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
            env=without_preload(),
        )  # fmt: skip
    finally:
        tmp_path.chmod(0o755)
        dest.chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    state, says = proc.stdout.splitlines()
    assert state == "needs recovery"
    assert f"its rollback journal '{dest}-journal' restores" in says
    assert "Do not delete or move that file" in says
    assert digest(f"{dest}-journal") == before
    # and once it can be, the journal restores DEST
    assert query(dest, "PRAGMA integrity_check") == [("ok",)]
