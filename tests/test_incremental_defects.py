"""Defects found in the incremental verbs (attack 19): each test failed
before its fix."""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from apsw_backup import incremental as inc


def make_db(path, rows=600):
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(500)) for i in range(rows))
    )
    db.commit()
    db.close()
    return path


def touch_rows(path):
    db = sqlite3.connect(str(path))
    db.execute("UPDATE t SET v = randomblob(500) WHERE id % 50 = 3")
    db.commit()
    db.close()


def flip_page_byte(point_path):
    point = inc._read_point(point_path)
    position = min(3, len(point.index) - 1)
    offset = point.data_offset + position * point.info.page_size + 100
    with open(point_path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))


def test_no_delta_on_a_parent_whose_pages_are_damaged(tmp_path):
    src = make_db(tmp_path / "app.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    first = inc.incremental(src, folder)
    flip_page_byte(first.path)
    touch_rows(src)
    second = inc.incremental(src, folder)
    assert second.kind == "base"
    assert first.path in second.reason and "damaged" in second.reason
    inc.restore(folder, tmp_path / "r.db")  # the newest point restores


@pytest.mark.parametrize("side", ["-wal", "-journal", "-shm"])
def test_restore_refuses_dest_named_as_another_databases_side_file(tmp_path, side):
    src = make_db(tmp_path / "live.db", rows=50)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    dest = str(src) + side
    with pytest.raises(ValueError, match=side + " file name of the database"):
        inc.restore(folder, dest)
    assert not os.path.exists(dest)


def test_keep_and_chains_are_per_source_not_per_stem(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    s1 = make_db(tmp_path / "s1" / "app.db", rows=50)
    s2 = make_db(tmp_path / "s2" / "app.db", rows=80)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(s1, folder, keep=1)
    only = inc.incremental(s2, folder, keep=1)
    assert only.deleted == []  # s1's point is not s2's to delete
    touch_rows(s1)
    inc.incremental(s1, folder, keep=1)
    touch_rows(s2)
    last = inc.incremental(s2, folder, keep=2)
    assert last.kind == "delta" and last.deleted == []  # interleaved chains
    assert os.path.exists(only.path)
    for report in inc.verify_folder(folder):
        assert report.ok, report.problems
    inc.restore(last.path, tmp_path / "r2.db")
    db = sqlite3.connect(str(tmp_path / "r2.db"))
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 80
    db.close()


def test_restore_of_a_folder_shared_by_two_databases_of_one_name_is_refused(
    tmp_path,
):
    """docs/incremental.md: a BACKUP folder holding several sources' points
    is refused -- also when they share a stem (s1/app.db, s2/app.db): its
    newest point may be the other database's, and --overwrite would put
    that database's rows into the live one."""
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    s1 = make_db(tmp_path / "s1" / "app.db", rows=50)
    s2 = make_db(tmp_path / "s2" / "app.db", rows=80)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(s1, folder)
    inc.incremental(s2, folder)
    before = (tmp_path / "s1" / "app.db").read_bytes()
    for kwargs in ({}, {"at": "2099-01-01T00:00:00Z"}):
        with pytest.raises(ValueError, match="several databases"):
            inc.restore(folder, tmp_path / "out.db", **kwargs)
        assert not (tmp_path / "out.db").exists()
    with pytest.raises(ValueError, match="several databases"):
        inc.restore(folder, s1, overwrite=True)
    assert (tmp_path / "s1" / "app.db").read_bytes() == before


def closed_pipe():
    """A pipe whose reader is gone (`| head -c1` once head has exited)."""
    read, write = os.pipe()
    os.close(read)
    return write


def run_cli(*argv, stdout=None, stderr=None):
    return subprocess.run(
        [sys.executable, "-m", "apsw_backup", *map(str, argv)],
        stdout=stdout,
        stderr=stderr,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "verb",
    [
        ["--incremental", "--json", "{src}", "{bk}"],
        ["--incremental", "{src}", "{bk}"],
        ["restore", "--json", "{bk}", "{r}"],
        ["restore", "{bk}", "{r}"],
        ["verify", "--json", "{bk}"],
        ["verify", "{bk}"],
        ["list", "--json", "{bk}"],
        ["list", "{bk}"],
    ],
)
def test_a_reader_gone_does_not_change_the_exit_code(tmp_path, verb):
    src = make_db(tmp_path / "app.db", rows=50)
    bk = tmp_path / "bk"
    bk.mkdir()
    inc.incremental(src, bk)
    argv = [a.format(src=src, bk=bk, r=tmp_path / "r.db") for a in verb]
    for where in ("stdout", "stderr"):
        write = closed_pipe()
        try:
            other = subprocess.PIPE
            proc = run_cli(
                *argv,
                stdout=write if where == "stdout" else other,
                stderr=write if where == "stderr" else other,
            )
        finally:
            os.close(write)
        said = (proc.stdout or b"") + (proc.stderr or b"")
        assert proc.returncode == 0, said
        assert b"Traceback" not in said and b"Exception ignored" not in said
        if verb[0] == "restore":
            os.remove(tmp_path / "r.db")


def test_verify_json_of_a_folder_has_the_documented_keys(tmp_path, capsys):
    from apsw_backup.cli import main, output

    src = make_db(tmp_path / "app.db", rows=80)
    bk = tmp_path / "bk"
    bk.mkdir()
    inc.incremental(src, bk)
    touch_rows(src)
    delta = inc.incremental(src, bk).path
    assert main(["verify", "--json", str(bk)]) == 0
    good = json.loads(capsys.readouterr().out)
    flip_page_byte(delta)
    assert main(["verify", "--json", str(bk)]) == 3
    bad = json.loads(capsys.readouterr().out)
    assert main(["verify", "--json", str(bk), str(src)]) == 2  # a usage error
    usage = json.loads(capsys.readouterr().out)
    for obj in (good, bad, usage):
        # one schema for the verb, FILEs or FOLDERs (path, chains included)
        assert set(obj) == set(output.VERIFY_KEYS) >= {"path", "chains"}
        assert output.problems(obj, verify=True) == []
    assert good["error"] is None and good["path"] is None
    assert bad["path"] == delta and delta in bad["error"]["message"]
    assert [f["file"] for f in bad["files"] if f["exit_code"] == 3] == [delta]
    assert usage["error"]["class"] == "UsageError" and usage["files"] == []


def test_timeout_bounds_the_whole_incremental_run(tmp_path):
    src = make_db(tmp_path / "app.db", rows=30000)  # ~17 MB
    folder = tmp_path / "bk"
    folder.mkdir()
    with pytest.raises(inc.IncrementalError, match=r"timeout \(0.01 s\) passed"):
        inc.incremental(src, folder, timeout=0.01)
    assert inc.list_points(folder) == []  # nothing kept
    assert [n for n in os.listdir(folder) if not n.startswith(".")] == []
    inc.incremental(src, folder, timeout=60)  # a timeout long enough
    assert len(inc.list_points(folder)) == 1


def test_incremental_leaves_no_wal_or_shm_beside_source(tmp_path):
    src = tmp_path / "live.db"
    db = sqlite3.connect(str(src))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    db.close()
    assert sorted(os.listdir(tmp_path)) == ["live.db"]
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    assert sorted(os.listdir(tmp_path)) == ["bk", "live.db"]
    # side files that were there before are left alone (another connection's)
    other = sqlite3.connect(str(src))
    other.execute("SELECT count(*) FROM t").fetchall()
    inc.incremental(src, folder)
    assert os.path.exists(str(src) + "-wal")
    other.close()


def test_a_source_name_that_is_not_utf8(tmp_path):
    src = os.path.join(os.fsencode(tmp_path), b"\xff.db")
    db = sqlite3.connect(src)
    db.execute("CREATE TABLE t(x)")
    db.commit()
    db.close()
    folder = tmp_path / "bk"
    folder.mkdir()
    first = inc.incremental(os.fsdecode(src), folder)
    assert inc._read_point(first.path).info.source == os.fsdecode(src)
    second = inc.incremental(os.fsdecode(src), folder)
    assert second.kind == "delta"  # the chain is recognised as its source's


def test_a_restore_point_name_too_long_is_refused_naming_source(tmp_path):
    src = make_db(tmp_path / ("c" * 225 + ".db"), rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    with pytest.raises(ValueError, match="SOURCE's name .* shorter name"):
        inc.incremental(src, folder)
    assert os.listdir(folder) == []


def test_a_wal_source_on_a_read_only_file_system(tmp_path):
    from cli_helpers import can_mount, in_mount

    if not can_mount(tmp_path):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here")
    made = tmp_path / "made.db"
    db = sqlite3.connect(str(made))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(x)")
    db.commit()
    db.close()
    folder = tmp_path / "ro"
    folder.mkdir()
    bk = tmp_path / "bk"
    bk.mkdir()
    source = folder / "w.db"
    proc = in_mount(
        folder,
        "size=1m",
        ["--incremental", source, bk],
        setup=f"cp {made} {source}",
        remount="ro",
    )
    assert proc.returncode == 1, proc.stderr
    assert "in WAL mode" in proc.stderr and "(EROFS)" in proc.stderr
    assert "unable to open database file" not in proc.stderr


def test_restore_overwrite_refuses_a_dest_that_is_not_a_database(tmp_path):
    src = make_db(tmp_path / "app.db", rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    notes = tmp_path / "notes.txt"
    notes.write_text("notes, not a database\n")
    with pytest.raises(ValueError, match="notes.txt' exists and is not an SQLite"):
        inc.restore(folder, notes, overwrite=True)
    assert notes.read_text() == "notes, not a database\n"


def locked(path):
    """A process holding an exclusive lock on path (killed by the caller)."""
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True)\n"
            "time.sleep(20)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout.readline().strip() == "locked"
    return locker


def run_locked(path, *argv):
    locker = locked(path)
    try:
        return run_cli(*argv, stderr=subprocess.PIPE)
    finally:
        locker.kill()
        locker.wait(timeout=10)


def test_restore_busy_message_names_dest_in_the_commands_words(tmp_path):
    src = make_db(tmp_path / "app.db", rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    live = tmp_path / "live.db"
    make_db(live, rows=3)
    proc = run_locked(live, "restore", "--overwrite", "--timeout", "0.3", folder, live)
    said = proc.stderr.decode()
    assert proc.returncode == 1, said
    assert str(live) in said and "--timeout" in said
    assert "copy()" not in said and "None" not in said


def test_incremental_busy_source_message_has_cause_and_cure(tmp_path):
    src = make_db(tmp_path / "app.db", rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    proc = run_locked(src, "--incremental", "--timeout", "0.3", src, folder)
    said = proc.stderr.decode()
    assert proc.returncode == 1, said
    assert "locked by another connection" in said and "--timeout" in said
    assert "copy()" not in said and "None" not in said and "Error:" not in said
    assert inc.list_points(folder) == []


def test_restore_refuses_a_new_dest_with_a_stale_journal_naming_dest(tmp_path):
    src = make_db(tmp_path / "app.db", rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    (tmp_path / "r.db-journal").write_bytes(b"x" * 512)
    proc = run_cli("restore", folder, tmp_path / "r.db", stderr=subprocess.PIPE)
    said = proc.stderr.decode()
    assert proc.returncode == 2, said
    assert "the new DEST" in said and "r.db-journal" in said
    assert "choose another DEST" in said
    assert not (tmp_path / "r.db").exists()


def test_list_and_verify_say_which_source_points_are_of(tmp_path, capsys):
    from apsw_backup.cli import main

    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    s1 = make_db(tmp_path / "s1" / "app.db", rows=5)
    s2 = make_db(tmp_path / "s2" / "app.db", rows=5)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(s1, folder)
    inc.incremental(s2, folder)
    assert main(["list", "--json", str(folder)]) == 0
    rows = json.loads(capsys.readouterr().out)["points"]
    assert sorted(r["source"] for r in rows) == sorted([str(s1), str(s2)])
    assert main(["verify", str(folder)]) == 0
    said = capsys.readouterr().err
    assert f"app (of {s1}): 1 restore points, ok" in said
    assert f"app (of {s2}): 1 restore points, ok" in said
