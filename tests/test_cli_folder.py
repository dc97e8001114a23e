"""Backups as people keep them (docs/command-line.md): DEST may be a
folder (the copy is <SOURCE stem>-<UTC timestamp>.db there), --keep N
rotates those backups only, once the new one is verified, and
`apsw-backup verify FILE...` checks existing backups."""

import fcntl
import os
import re
import sqlite3
from datetime import datetime, timezone

import pytest
from cli_helpers import json_of, run
from copy_helpers import make_source, make_target, query

from apsw_backup import cli

NAME = re.compile(r"live-(\d{8}T\d{6}\.\d{6})Z\.db")


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "live.db", journal="wal")


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "backups"
    path.mkdir()
    return path


def backups(folder):
    """The backup files in folder (not the folders or links so named)."""
    return sorted(
        entry.name
        for entry in os.scandir(folder)
        if NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
    )


@pytest.mark.parametrize("spelling", ["{}", "{}/"])
def test_a_folder_dest_gets_a_timestamped_self_contained_copy(source, folder, spelling):
    before = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
    proc = run("--json", source, spelling.format(folder))
    after = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")

    assert proc.returncode == 0, proc.stderr
    (name,) = os.listdir(folder)  # one file: no -wal, -shm, temporary file
    stamp = NAME.fullmatch(name)[1]
    assert before <= stamp <= after
    summary = json_of(proc)
    assert summary["dest"] == os.path.join(spelling.format(folder), name)
    assert summary["journal_mode"] == "delete"
    assert query(folder / name, "PRAGMA journal_mode") == [("delete",)]
    assert query(folder / name, "SELECT count(*) FROM t") == [(300,)]
    assert sorted(os.listdir(source.parent)) == ["backups", "live.db"]


def test_keep_wal_leaves_the_copy_in_wal_mode_and_nothing_beside_it(source, folder):
    proc = run("--json", "--keep-wal", source, folder)
    assert proc.returncode == 0, proc.stderr
    (name,) = os.listdir(folder)
    assert json_of(proc)["journal_mode"] == "wal"
    assert (folder / name).read_bytes()[18:20] == b"\x02\x02"  # WAL in the header


def test_two_runs_in_one_second_get_two_names_in_time_order(source, folder):
    names = []
    for _ in range(3):
        assert run(source, folder).returncode == 0
        names.append(backups(folder)[-1])
    assert len(set(names)) == 3
    assert names == sorted(names)


def test_backup_name_is_unique_even_at_the_same_microsecond(tmp_path):
    moment = datetime(2024, 1, 31, 23, 59, 59, 123456, tzinfo=timezone.utc)
    first = cli.backup_name(str(tmp_path), "/x/live.db", moment)
    assert first == str(tmp_path / "live-20240131T235959.123456Z.db")
    open(first, "w").close()
    second = cli.backup_name(str(tmp_path), "/x/live.db", moment)
    assert second == str(tmp_path / "live-20240131T235959.123457Z.db")
    open(second + "-journal", "w").close()  # a side file takes the name too
    assert cli.backup_name(str(tmp_path), "/x/live.db", moment).endswith(
        "235959.123458Z.db"
    )


def make_old_backups(folder, count, source=None):
    """Backups of source (default: the fixture's live.db) as --keep knows
    them: so named, and marked with that source's real path."""
    source = source or folder.parent / "live.db"
    paths = [folder / f"live-2020010{i}T000000.000000Z.db" for i in range(1, count + 1)]
    for path in paths:
        make_target(path)
        os.setxattr(path, "user.apsw_backup.source", os.fsencode(source.resolve()))
    return paths


def test_keep_deletes_the_oldest_backups_of_that_name_pattern_only(source, folder):
    old = make_old_backups(folder, 4)
    bystanders = [
        "live.db",  # the pattern needs a timestamp
        "live-20200101T000000Z.db",  # no microseconds: not our name
        "live-20200101T000000.000000Z.db.bak",
        "other-20200101T000000.000000Z.db",  # another database's backup
        "live-2-20200101T000000.000000Z.db",  # live-2.db's backup
        "notes.txt",
    ]
    for name in bystanders:
        (folder / name).write_text("keep me")
    os.mkdir(folder / "live-20190101T000000.000000Z.db")  # a folder, not a file
    os.symlink(old[0], folder / "live-20190102T000000.000000Z.db")  # a link
    temporary = (
        folder / "live-20190103T000000.000000Z.db.apsw-backup-1-0123abcd.partial"
    )
    temporary.write_text("another run's, live: it holds its lock")
    with open(temporary, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run("--json", "--keep", "3", source, folder)

    assert proc.returncode == 0, proc.stderr
    summary = json_of(proc)
    assert summary["deleted"] == [str(old[0]), str(old[1])]
    assert [p.exists() for p in old] == [False, False, True, True]
    assert backups(folder) == [
        old[2].name,
        old[3].name,
        os.path.basename(summary["dest"]),
    ]
    for name in bystanders:
        assert (folder / name).read_text() == "keep me"
    assert (folder / "live-20190101T000000.000000Z.db").is_dir()
    assert os.path.islink(folder / "live-20190102T000000.000000Z.db")
    assert temporary.exists()


def test_keep_removes_the_side_files_of_a_deleted_backup(source, folder):
    (old,) = make_old_backups(folder, 1)
    for suffix in ("-wal", "-shm", "-journal"):
        (folder / (old.name + suffix)).write_bytes(b"")
    proc = run("--keep", "1", source, folder)
    assert proc.returncode == 0, proc.stderr
    assert len(os.listdir(folder)) == 1
    assert "deleted 1 older backup" in proc.stdout


def test_keep_never_deletes_the_new_backup_even_if_the_clock_went_back(source, folder):
    # A backup dated later than now (the clock ran ahead, or went back since)
    # is kept and reported, never counted as the newest (docs/cli.md#folders-and---keep).
    (future,) = make_old_backups(folder, 1)
    future = future.rename(folder / "live-29990101T000000.000000Z.db")
    proc = run("--json", "--keep", "1", source, folder)
    assert proc.returncode == 0, proc.stderr
    new = json_of(proc)["dest"]
    assert os.path.exists(new)
    assert future.exists()
    assert json_of(proc)["future_dated"] == [str(future)]


def test_keep_deletes_nothing_when_the_new_backup_fails_verification(tmp_path, folder):
    source = tmp_path / "live.db"
    db = sqlite3.connect(str(source), isolation_level=None)
    db.execute("CREATE TABLE t(x)")
    db.execute("CREATE INDEX ix ON t(x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX ix ON t(x DESC)' WHERE name='ix'"
    )
    db.close()
    old = make_old_backups(folder, 3)
    proc = run("--keep", "1", "--verify", "full", source, folder)
    assert proc.returncode == 3
    assert all(path.exists() for path in old)
    assert backups(folder) == [path.name for path in old]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--keep", "2", "{source}", "{tmp}/one.db"],
            "--keep needs DEST to be a folder",
        ),
        (["--keep", "0", "{source}", "{folder}"], "is not a whole number >= 1"),
        (["--keep", "2", "--no-verify", "{source}", "{folder}"], "--no-verify"),
    ],
)
def test_keep_usage_errors(source, folder, tmp_path, args, says):
    proc = run(*[a.format(source=source, folder=folder, tmp=tmp_path) for a in args])
    assert proc.returncode == 2
    assert says in proc.stderr
    assert os.listdir(folder) == []


# -- apsw-backup verify --------------------------------------------------------


def make_corrupt(path):
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("CREATE TABLE t(x)")
    db.execute("CREATE INDEX ix ON t(x)")
    db.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
    db.execute("PRAGMA writable_schema=ON")
    db.execute(
        "UPDATE sqlite_master SET sql='CREATE INDEX ix ON t(x DESC)' WHERE name='ix'"
    )
    db.close()
    return path


def test_verify_passes_good_backups_and_changes_nothing(source, folder):
    assert run(source, folder).returncode == 0
    assert run("--keep-wal", source, folder).returncode == 0
    files = [folder / name for name in backups(folder)]
    before = {p: p.read_bytes() for p in files}
    proc = run("verify", *files)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("integrity_check ok") == 2
    assert {p: p.read_bytes() for p in files} == before
    assert sorted(os.listdir(folder)) == sorted(p.name for p in files)


def test_verify_exit_codes_and_json(tmp_path, source):
    good = make_target(tmp_path / "good.db")
    bad = make_corrupt(tmp_path / "bad.db")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    missing = tmp_path / "missing.db"

    assert run("verify", good).returncode == 0
    assert run("verify", good, missing).returncode == 1
    assert run("verify", bad).returncode == 3
    assert run("verify", text).returncode == 3
    proc = run("verify", "--json", good, bad, missing, text)
    assert proc.returncode == 3
    result = json_of(proc)
    assert result["ok"] is False
    assert result["exit_code"] == 3
    by_file = {item["file"]: item for item in result["files"]}
    assert by_file[str(good)]["verified"] is True
    assert by_file[str(good)]["exit_code"] == 0
    assert by_file[str(bad)]["verified"] is False
    assert any("missing from index ix" in p for p in by_file[str(bad)]["integrity"])
    assert by_file[str(missing)]["exit_code"] == 1
    assert "(ENOENT)" in by_file[str(missing)]["error"]["message"]
    assert by_file[str(text)]["exit_code"] == 3
    assert by_file[str(text)]["error"]["class"] == "VerificationFailed"
    assert result["error"]["message"].startswith("verification failed")
    assert "verification failed" in proc.stderr
    assert "missing from index ix" in proc.stderr


def test_verify_usage(tmp_path):
    proc = run("verify")
    assert proc.returncode == 2
    assert "usage: apsw-backup verify" in proc.stderr
    proc = run("verify", "--help")
    assert proc.returncode == 0
    assert "exit codes" in proc.stdout
