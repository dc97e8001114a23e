"""Folders and --keep (docs/cli.md#folders-and---keep): runs that overlap, backups recognised by SOURCE's mark rather
than by the stem of their name, empty backups, a backup that cannot be
deleted, and backups dated later than now."""

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from datetime import datetime, timezone

import pytest
from cli_helpers import (
    TIMEOUT,
    command,
    json_of,
    marker_path,
    paused_env,
    run,
    wait_for,
    without_preload,
)
from copy_helpers import make_source, make_target, query

from apsw_backup import copy, files
from apsw_backup.cli import output

MARK = "user.apsw_backup.source"


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "live.db", journal="wal")


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "backups"
    path.mkdir()
    return path


def names(folder):
    return sorted(os.listdir(folder))


def old_backup(folder, stamp, source, stem="live"):
    """A backup of `source` dated `stamp`, marked as --keep marks them."""
    path = folder / f"{stem}-{stamp}.db"
    make_target(path)
    os.setxattr(path, MARK, os.fsencode(os.path.realpath(source)))
    return path


def verified(path):
    return query(path, "PRAGMA integrity_check") == [("ok",)]


# Item 2: --keep rotates this SOURCE's backups only, by identity.


def test_keep_never_deletes_the_backup_of_another_database_with_the_same_stem(
    tmp_path, folder
):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = make_source(tmp_path / "a" / "app.db")
    b = make_source(tmp_path / "b" / "app.sqlite", rows=10)
    first = run("--json", a, folder)
    assert first.returncode == 0, first.stderr
    a_backup = json_of(first)["dest"]

    second = run("--json", "--keep", "1", b, folder)

    assert second.returncode == 0, second.stderr
    assert json_of(second)["deleted"] == []
    assert os.path.exists(a_backup) and verified(a_backup)
    assert query(a_backup, "SELECT count(*) FROM t") == [(300,)]
    # And each one's --keep rotates its own.
    third = run("--json", "--keep", "1", b, folder)
    assert json_of(third)["deleted"] == [json_of(second)["dest"]]
    assert os.path.exists(a_backup)


def test_the_new_backup_is_marked_with_the_source_real_path(tmp_path, source, folder):
    link = tmp_path / "link.db"
    link.symlink_to(source)
    proc = run("--json", link, folder)
    assert proc.returncode == 0, proc.stderr
    dest = json_of(proc)["dest"]
    assert os.getxattr(dest, MARK) == os.fsencode(os.path.realpath(source))


def test_files_named_like_backups_but_not_marked_are_never_deleted(source, folder):
    by_hand = folder / "live-20200101T000000.000000Z.db"
    make_target(by_hand)  # copied in by hand, or made by an older version
    foreign = old_backup(folder, "20200102T000000.000000Z", "/elsewhere/live.db")
    ours = old_backup(folder, "20200103T000000.000000Z", source)

    proc = run("--json", "--keep", "1", source, folder)

    assert proc.returncode == 0, proc.stderr
    assert json_of(proc)["deleted"] == [str(ours)]
    assert by_hand.exists() and foreign.exists() and not ours.exists()
    # The file with no mark is reported (once an operator upgraded, the old
    # backups stay until deleted by hand); the other source's is not.
    assert json_of(proc)["unmarked"] == [str(by_hand)]
    assert "carry no mark" in proc.stderr and str(foreign) not in proc.stderr


def test_a_name_with_digits_that_are_not_ascii_is_not_a_backup(source, folder):
    # A stamp is ASCII digits: full-width ones (U+FF10..) read as digits to
    # \d and to strptime, but the name is not <stem>-<timestamp>.db -- even
    # marked (a backup copied by hand with its mark), --keep leaves it.
    look_alike = old_backup(
        folder, "\uff12\uff10\uff12\uff100101T000000.000000Z", source
    )
    ours = old_backup(folder, "20200102T000000.000000Z", source)

    proc = run("--json", "--keep", "1", source, folder)

    assert proc.returncode == 0, proc.stderr
    assert json_of(proc)["deleted"] == [str(ours)]
    assert look_alike.exists()


MOUNT_RAMFS = r"""
set -e
mount -t ramfs ramfs "$1"
shift
LD_PRELOAD=$CHILD_PRELOAD exec "$@"
"""


def test_keep_is_refused_on_a_file_system_without_extended_attributes(tmp_path, source):
    folder = tmp_path / "ramfs"
    folder.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", MOUNT_RAMFS]
        + ["sh", str(folder), *command("--keep", "1", source, folder)],
        capture_output=True,
        text=True,
        env=without_preload(),
        timeout=TIMEOUT,
        check=False,
    )
    if "mount" in proc.stderr and "apsw-backup" not in proc.stderr:
        pytest.skip(f"cannot mount a ramfs here: {proc.stderr.strip()}")
    assert proc.returncode == 2, proc.stderr
    assert MARK in proc.stderr and "extended attributes" in proc.stderr
    assert "without --keep" in proc.stderr


# Item 3: a backup with nothing in it never rotates real ones away.


def test_schema_temp_is_refused_and_nothing_is_rotated(source, folder):
    old = old_backup(folder, "20200101T000000.000000Z", source)
    proc = run("--json", "--keep", "1", "--schema", "temp", source, folder)
    assert proc.returncode == 2
    assert "--schema temp" in proc.stderr and "always empty" in proc.stderr
    assert names(folder) == [old.name]
    assert json_of(proc)["ok"] is False


def test_copy_refuses_name_temp_of_a_source_path(tmp_path, source):
    with pytest.raises(ValueError, match="always empty"):
        copy(source, tmp_path / "x.db", name="temp")
    assert not (tmp_path / "x.db").exists()


def test_an_empty_new_backup_is_kept_and_rotates_nothing(tmp_path, folder):
    empty = tmp_path / "live.db"
    sqlite3.connect(str(empty)).close()  # 0 bytes: a database with nothing
    old = old_backup(folder, "20200101T000000.000000Z", empty)

    proc = run("--json", "--keep", "1", empty, folder)

    assert proc.returncode == 0, proc.stderr
    summary = json_of(proc)
    assert summary["deleted"] == []
    assert summary["rotation_skipped"] == "the new backup holds no table"
    assert "deleted nothing" in proc.stderr
    assert old.exists() and os.path.exists(summary["dest"])


def test_empty_backups_do_not_count_among_the_kept(source, folder):
    real = old_backup(folder, "20200101T000000.000000Z", source)
    empty = folder / "live-20200102T000000.000000Z.db"
    sqlite3.connect(str(empty)).execute("VACUUM").connection.close()
    os.setxattr(empty, MARK, os.fsencode(os.path.realpath(source)))

    proc = run("--json", "--keep", "2", source, folder)

    assert proc.returncode == 0, proc.stderr
    assert json_of(proc)["deleted"] == [str(empty)]
    assert real.exists()


# Item 16: backups dated later than now.


def test_a_future_dated_backup_is_kept_reported_and_not_counted(source, folder):
    real = old_backup(folder, "20200101T000000.000000Z", source)
    future = old_backup(folder, "29990101T000000.000000Z", source)

    proc = run("--json", "--keep", "2", source, folder)

    assert proc.returncode == 0, proc.stderr
    summary = json_of(proc)
    assert summary["deleted"] == []
    assert summary["future_dated"] == [str(future)]
    assert "dated later than now" in proc.stderr
    assert real.exists() and future.exists()
    # With --keep 1, the real older one goes; the future one stays.
    proc = run("--json", "--keep", "1", source, folder)
    assert sorted(json_of(proc)["deleted"]) == sorted([str(real), summary["dest"]])
    assert future.exists()


# Item 9: a backup that cannot be deleted.


def immutable(path, on):
    return subprocess.run(
        ["chattr", "+i" if on else "-i", str(path)], capture_output=True, check=False
    )


def test_a_backup_that_cannot_be_deleted_is_reported_with_dest_in_place(source, folder):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr(1)")
    stuck = old_backup(folder, "20200101T000000.000000Z", source)
    (folder / (stuck.name + "-journal")).write_bytes(b"")
    gone = old_backup(folder, "20200102T000000.000000Z", source)
    if immutable(stuck, True).returncode != 0:
        pytest.skip("cannot make a file immutable here")
    try:
        proc = run("--json", "--keep", "1", source, folder)
    finally:
        immutable(stuck, False)

    assert proc.returncode == 1
    result = json_of(proc)
    assert result["dest_state"] == "verified"
    assert result["not_deleted"] == [str(stuck)]
    assert result["deleted"] == [str(gone)]
    # The JSON says what dest_state says: the copy in place was verified,
    # and describes it as a success's object does.
    assert result["verified"] is True and result["integrity"] == ["ok"]
    assert result["journal_mode"] is not None and result["pages"] > 1
    assert result["pages_copied"] == result["page_count"] == result["pages"]
    assert result["verification"] is not None
    assert output.problems(result) == []
    assert os.path.exists(result["dest"]) and verified(result["dest"])
    assert "holds the complete, verified copy" in proc.stderr
    assert "the new backup is in place" in proc.stderr
    assert repr(str(stuck)) in proc.stderr and "EPERM" in proc.stderr
    assert "not created" not in proc.stderr
    # Its side file was left with it: the old backup is whole.
    assert (folder / (stuck.name + "-journal")).exists()
    assert not gone.exists()


def test_a_side_file_left_of_a_deleted_backup_is_reported_as_it_is(source, folder):
    # The database file goes, its -wal cannot: not_deleted names the -wal
    # (what is left), the message says the database file was deleted, and
    # the backup is listed as deleted -- never the .db that is gone.
    if shutil.which("chattr") is None:
        pytest.skip("no chattr(1)")
    old = old_backup(folder, "20200101T000000.000000Z", source)
    wal = folder / (old.name + "-wal")
    wal.write_bytes(b"junk")
    if immutable(wal, True).returncode != 0:
        pytest.skip("cannot make a file immutable here")
    try:
        proc = run("--json", "--keep", "1", source, folder)
    finally:
        immutable(wal, False)

    assert proc.returncode == 1
    result = json_of(proc)
    assert not old.exists() and wal.exists()
    assert result["not_deleted"] == [str(wal)]
    assert result["deleted"] == [str(old)]
    assert result["dest_state"] == "verified"
    assert f"deleted the database file of 1 older backup ({str(old)!r})" in proc.stderr
    assert f"{str(wal)!r} is not accessible" in proc.stderr
    assert f"{str(old)!r} is not accessible" not in proc.stderr
    assert "could not delete 1 older backup" not in proc.stderr


def test_an_orphan_side_file_that_cannot_be_removed_is_reported(source, folder):
    # A side file whose backup's database file an earlier run deleted: this
    # run tries to remove it; when it cannot, it says so (exit 1, listed in
    # not_deleted) and never that it deleted that backup's database file.
    if shutil.which("chattr") is None:
        pytest.skip("no chattr(1)")
    shm = folder / "live-20200101T000001.000000Z.db-shm"
    shm.write_bytes(b"junk")
    if immutable(shm, True).returncode != 0:
        pytest.skip("cannot make a file immutable here")
    try:
        proc = run("--json", "--keep", "1", source, folder)
    finally:
        immutable(shm, False)

    assert proc.returncode == 1
    result = json_of(proc)
    assert result["dest_state"] == "verified"
    assert result["not_deleted"] == [str(shm)]
    assert f"{str(shm)!r} is not accessible" in proc.stderr
    assert "deleted the database file" not in proc.stderr
    assert output.problems(result) == []


def test_side_files_are_deleted_only_after_their_database(source, folder, tmp_path):
    # A failed deletion of a backup leaves it whole: the database file is
    # removed first, so a failure there leaves its side files as they were.
    from apsw_backup.cli import folder as rotation

    path = old_backup(folder, "20200101T000000.000000Z", source)
    (folder / (path.name + "-wal")).write_bytes(b"wal")
    order = []
    real_remove = os.remove

    def remove(p):
        order.append(os.path.basename(p))
        if p == str(path):
            raise PermissionError(1, "Operation not permitted", p)
        real_remove(p)

    rotation.os.remove = remove
    try:
        with pytest.raises(PermissionError):
            rotation.remove_backup(str(path))
    finally:
        rotation.os.remove = real_remove
    assert order == [path.name]
    assert names(folder) == [path.name, path.name + "-wal"]


# Item 1: runs that overlap.


def test_a_run_never_deletes_a_backup_another_run_has_not_reported_yet(
    tmp_path, source, folder
):
    marker = marker_path(tmp_path, "done")
    first = subprocess.Popen(
        command("--json", "--keep", "1", source, folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env("done", marker),
    )
    try:
        # The first run has put its backup in place and not reported yet.
        wait_for(lambda: marker.exists() or first.poll() is not None, "done")
        assert marker.exists(), first.communicate()
        (mine,) = [n for n in names(folder)]
        second = subprocess.Popen(
            command("--json", "--keep", "1", source, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)
            assert (folder / mine).exists()
            assert second.poll() is None  # waiting for the folder's lock
            first.send_signal(signal.SIGTERM)
            out, err = first.communicate(timeout=TIMEOUT)
            assert first.returncode == 143
            assert json_of_text(out)["dest_state"] == "verified"
            assert "holds the complete, verified copy" in err
            out2, err2 = second.communicate(timeout=TIMEOUT)
        finally:
            second.kill()
            second.wait(TIMEOUT)
    finally:
        first.kill()
        first.wait(TIMEOUT)
    assert second.returncode == 0, err2
    later = json_of_text(out2)
    assert later["deleted"] == [str(folder / mine)]
    assert names(folder) == [os.path.basename(later["dest"])]


def json_of_text(text):
    return json.loads(text.strip().splitlines()[-1])


def stamp_of(path):
    return os.path.basename(path).rsplit("-", 1)[1]


@pytest.mark.heavy
@pytest.mark.parametrize("round_", range(3))
def test_overlapping_keep_one_runs_leave_a_verified_backup_and_tell_the_truth(
    tmp_path, folder, round_
):
    source = make_source(tmp_path / "live.db", rows=3000, journal="wal")
    runs = [
        subprocess.Popen(
            command("--json", "--keep", "1", "--pages", "8", source, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = []
    try:
        for proc in runs:
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, err
            results.append(json_of_text(out))
    finally:
        for proc in runs:
            proc.kill()
            proc.wait(TIMEOUT)
    left = [folder / n for n in names(folder)]
    assert left, "no backup left"
    assert all(verified(path) for path in left)
    assert not [n for n in names(folder) if files.is_temporary_name(n)]
    dests = {r["dest"] for r in results}
    newest = max(dests, key=stamp_of)
    assert os.path.exists(newest)
    for result in results:
        assert result["dest_state"] == "verified"
        for path in result["deleted"]:
            # Only backups older than its own, and each reported by its run
            # before it was deleted (the lock), never the newest.
            assert stamp_of(path) < stamp_of(result["dest"])
            assert path != newest
        if not os.path.exists(result["dest"]):
            assert any(result["dest"] in r["deleted"] for r in results)


def test_future_dated_check_uses_the_time_of_rotation(source, folder):
    # A backup dated a moment ago is not "future": the name's time is UTC.
    now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    recent = old_backup(folder, now, source)
    proc = run("--json", "--keep", "1", source, folder)
    assert json_of(proc)["deleted"] == [str(recent)]


def test_a_run_that_cannot_get_the_folder_lock_puts_nothing_in_place(source, folder):
    old = old_backup(folder, "20200101T000000.000000Z", source)
    lock = files.FolderLock(str(folder))
    assert lock.acquire(True, 0)
    try:
        started = time.monotonic()
        proc = run("--json", "--keep", "1", "--timeout", "3", source, folder)
        took = time.monotonic() - started
    finally:
        lock.release()
    assert proc.returncode == 1
    assert "held the lock on DEST folder" in proc.stderr
    # The wait it used: what was left of --timeout, never 0 after the fact.
    assert re.search(r"for ([12]\.\d+|[23]) s", proc.stderr), proc.stderr
    assert json_of(proc)["dest_state"] == "not created"
    assert names(folder) == [old.name]  # no temporary file left either
    assert took < 10


def test_an_interrupt_while_waiting_for_the_folder_lock(source, folder):
    old = old_backup(folder, "20200101T000000.000000Z", source)
    lock = files.FolderLock(str(folder))
    assert lock.acquire(True, 0)
    try:
        proc = subprocess.Popen(
            command("--json", "--keep", "1", source, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.5)  # copied and verified by now: waiting for the lock
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            proc.kill()
            proc.wait(TIMEOUT)
    finally:
        lock.release()
    assert proc.returncode == 130, err
    assert json_of_text(out)["dest_state"] == "not created"
    assert names(folder) == [old.name]


@pytest.mark.heavy
# .ci/fsfaults (the full file-system fault matrix) runs more seeds.
@pytest.mark.parametrize("seed", range(int(os.environ.get("FSFAULTS_SEEDS", "3"))))
def test_overlapping_runs_with_random_kills_leave_nothing_the_next_run_keeps(
    tmp_path, folder, seed
):
    rng = random.Random(seed)
    source = make_source(tmp_path / "live.db", rows=3000, journal="wal")
    runs = [
        subprocess.Popen(
            command("--json", "--keep", "1", "--pages", "8", source, folder),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    killed = set(rng.sample(range(6), 2))
    results = []
    died = 0  # runs the kill ended (not those that had exited already)
    try:
        time.sleep(rng.uniform(0.05, 0.6))
        for index in killed:
            runs[index].kill()
        for index, proc in enumerate(runs):
            out, err = proc.communicate(timeout=TIMEOUT)
            if index in killed and proc.returncode == -signal.SIGKILL:
                died += 1
                continue
            assert proc.returncode == 0, err
            results.append(json_of_text(out))
    finally:
        for proc in runs:
            proc.kill()
            proc.wait(TIMEOUT)
    left = [folder / n for n in names(folder) if not files.is_temporary_name(n)]
    assert left and all(verified(p) for p in left if p.suffix == ".db")
    for result in results:
        if not os.path.exists(result["dest"]):
            # Deleted by a run that reported it, or by one killed after its
            # rotation (the reporting run had released the folder lock; a
            # later run may delete an older backup, reported or not): then
            # a newer backup is in place.  (.ci/fsfaults' 20 seeds showed
            # the second case in 3 of them.)
            reported = any(result["dest"] in r["deleted"] for r in results)
            newer = [p for p in left if stamp_of(p) > stamp_of(result["dest"])]
            assert reported or (died and newer), result["dest"]
    # The next run removes whatever the killed ones left, and rotates.
    last = run("--json", "--keep", "1", source, folder)
    assert last.returncode == 0, last.stderr
    assert names(folder) == [os.path.basename(json_of(last)["dest"])]


def test_side_files_left_by_a_half_done_deletion_go_with_the_next_rotation(
    source, folder
):
    orphan = folder / "live-20200101T000000.000000Z.db-journal"
    orphan.write_bytes(b"hot journal of a deleted backup")
    other = folder / "other-20200101T000000.000000Z.db-journal"
    other.write_bytes(b"not a name of SOURCE's backups")
    proc = run("--json", "--keep", "1", source, folder)
    assert proc.returncode == 0, proc.stderr
    assert not orphan.exists() and other.exists()


def test_an_unmarked_future_dated_file_is_reported_as_future_dated(source, folder):
    future = make_target(folder / "live-29990101T000000.000000Z.db")
    proc = run("--json", "--keep", "1", source, folder)
    assert proc.returncode == 0, proc.stderr
    assert json_of(proc)["future_dated"] == [str(future)]
    assert json_of(proc)["unmarked"] == []
    assert future.exists() and str(future) in proc.stderr


# Attack finding 06: a damaged (truncated) older backup.


def test_keep_does_not_count_nor_delete_a_damaged_backup(source, folder):
    older = [
        old_backup(folder, f"2020010{day}T000000.000000Z", source) for day in (1, 2, 3)
    ]
    db = sqlite3.connect(str(older[2]))
    db.execute("CREATE TABLE big(b)")
    db.executemany("INSERT INTO big VALUES (randomblob(3000))", [()] * 30)
    db.commit()
    db.close()
    os.truncate(older[2], os.path.getsize(older[2]) // 2)  # damaged

    proc = run("--json", "--keep", "2", source, folder)

    assert proc.returncode == 0, proc.stderr
    summary = json_of(proc)
    assert output.problems(summary) == []
    # Two sound backups are kept: the new one and the newest sound older one.
    assert summary["deleted"] == [str(older[0])]
    assert summary["damaged"] == [str(older[2])]
    assert older[1].exists() and older[2].exists()
    assert "does not look whole" in proc.stderr and str(older[2]) in proc.stderr
    proc = run("--keep", "2", source, folder)  # the text output says it too
    assert proc.returncode == 0 and "does not look whole" in proc.stderr
    assert older[2].exists() and not older[1].exists()


def test_a_forked_child_does_not_keep_the_folder_lock(tmp_path):
    """A flock() belongs to the open descriptor, which fork() shares: a
    child forked while a run held the folder's lock kept it for as long as
    it lived, so the parent's next run met "another backup is writing into"
    the folder.  The child closes its copy at once."""
    lock = files.FolderLock(str(tmp_path))
    assert lock.acquire(True, 0.0)
    read, write = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: holds nothing, waits to be told to go
        try:
            os.close(write)
            os.write(ready_w, b"r" if not lock.held else b"h")
            os.read(read, 1)
        finally:
            os._exit(0)
    os.close(read)
    os.close(ready_w)
    try:
        said = os.read(ready_r, 1)  # the child runs (its fork hooks have run)
        assert said == b"r", "the child believes it holds the lock"
        lock.release()
        again = files.FolderLock(str(tmp_path))
        assert again.acquire(True, 0.0), "the child still holds the lock"
        again.release()
    finally:
        os.write(write, b"x")
        os.close(write)
        os.close(ready_r)
        os.waitpid(pid, 0)
