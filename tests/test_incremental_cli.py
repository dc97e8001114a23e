"""The incremental verbs of the command line (docs/incremental.md): --incremental,
restore, list, verify FOLDER; their exit codes and what they print."""

import errno
import json
import os
import sqlite3
import sys

import pytest

import apsw_backup
from apsw_backup import incremental as inc
from apsw_backup.cli import main


def make_source(path, rows=2000):
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(80)) for i in range(rows))
    )
    db.commit()
    db.close()
    return str(path)


def touch_rows(path, n=5):
    db = sqlite3.connect(str(path))
    db.execute("UPDATE t SET v=randomblob(80) WHERE id < ?", (n,))
    db.commit()
    db.close()


def run_json(capsys, *argv):
    code = main([*argv, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


@pytest.fixture
def points(tmp_path, capsys):
    src = make_source(tmp_path / "app.db")
    folder = tmp_path / "points"
    folder.mkdir()
    code, first = run_json(capsys, "--incremental", src, str(folder) + "/")
    assert code == 0 and first["kind"] == "base"
    touch_rows(src)
    code, second = run_json(capsys, "--incremental", src, str(folder) + "/")
    assert code == 0 and second["kind"] == "delta"
    assert second["pages_written"] < first["pages_written"] / 4
    return src, folder, [first["path"], second["path"]]


def test_incremental_then_restore_is_identical_to_a_full_backup(
    points, tmp_path, capsys
):
    src, folder, _ = points
    apsw_backup.copy(src, str(tmp_path / "full.db"))
    code = main(["restore", str(folder), str(tmp_path / "r.db")])
    assert code == 0
    assert "restored" in capsys.readouterr().err
    assert (tmp_path / "r.db").read_bytes() == (tmp_path / "full.db").read_bytes()


def test_restore_at_a_time_picks_the_point_then(points, tmp_path, capsys):
    _, folder, paths = points
    stamp = inc._parse_name(paths[0])["stamp"]
    code, out = run_json(
        capsys, "restore", str(folder), str(tmp_path / "r.db"), "--at", stamp
    )
    assert code == 0 and out["point"] == paths[0]
    code, out = run_json(
        capsys, "restore", str(folder), str(tmp_path / "x.db"), "--at", "2001-01-01"
    )
    assert code == 2 and "at or before" in out["error"]["message"]


def test_restore_refuses_an_existing_dest_without_overwrite(points, tmp_path, capsys):
    _, folder, _ = points
    dest = make_source(tmp_path / "live.db", rows=3)
    before = open(dest, "rb").read()
    code, out = run_json(capsys, "restore", str(folder), dest)
    assert code == 2 and "--overwrite" in out["error"]["message"]
    assert open(dest, "rb").read() == before
    code, out = run_json(capsys, "restore", str(folder), dest, "--overwrite")
    assert code == 0 and out["overwrote"] and out["writers_held"] > 0
    assert "wal_growth" in out
    assert sqlite3.connect(dest).execute("SELECT count(*) FROM t").fetchone() == (2000,)


def test_list_shows_time_kind_size_and_chain(points, capsys):
    _, folder, paths = points
    code, out = run_json(capsys, "list", str(folder))
    assert code == 0
    assert [p["kind"] for p in out["points"]] == ["base", "delta"]
    assert [p["chain"] for p in out["points"]] == [1, 1]
    assert [p["path"] for p in out["points"]] == paths
    assert out["points"][1]["size"] == os.path.getsize(paths[1])
    assert main(["list", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "delta" in text and os.path.basename(paths[1]) in text


def test_verify_folder_checks_every_chain(points, capsys):
    _, folder, paths = points
    code, out = run_json(capsys, "verify", str(folder))
    assert code == 0 and out["chains"][0]["ok"]
    code, out = run_json(capsys, "verify", paths[1])
    assert code == 0 and out["chains"][0]["points"] == paths
    with open(paths[0], "r+b") as f:  # a restore point, never a database
        f.seek(inc._read_point(paths[0]).data_offset + 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    code, out = run_json(capsys, "verify", str(folder))
    assert code == 3 and not out["chains"][0]["ok"]
    assert paths[0] in out["chains"][0]["problems"][0]
    code, out = run_json(capsys, "verify", paths[1])  # a point: its chain
    assert code == 3 and paths[0] in out["chains"][0]["problems"][0]


def test_restore_of_a_broken_chain_exits_3_naming_the_file(points, tmp_path, capsys):
    _, folder, paths = points
    os.truncate(paths[1], os.path.getsize(paths[1]) - 1)
    code, out = run_json(capsys, "restore", str(folder), str(tmp_path / "r.db"))
    assert (
        code == 3 and out["path"] == paths[1] and "truncated" in out["error"]["message"]
    )
    assert not (tmp_path / "r.db").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2  # no restore points there
    assert "holds no restore points" in capsys.readouterr().err
    assert main(["restore", str(tmp_path)]) == 2
    assert main(["list", str(tmp_path / "nope")]) == 2
    # a missing SOURCE is the plain backup's exit 1, not a usage error
    assert main(["--incremental", str(tmp_path / "nope.db"), str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_os_errors_name_the_file_and_the_cause(points, tmp_path, capsys):
    _, folder, _ = points
    missing = tmp_path / "no-such-folder" / "r.db"
    code, out = run_json(capsys, "restore", str(folder), str(missing))
    assert code == 1
    assert (
        "no-such-folder" in out["error"]["message"]
        and "ENOENT" in out["error"]["message"]
    )


def test_keep_counts_points_and_merges_rather_than_break_a_chain(tmp_path, capsys):
    src = make_source(tmp_path / "app.db")
    folder = tmp_path / "points"
    folder.mkdir()
    for n in range(5):
        touch_rows(src, n + 2)
        code, out = run_json(capsys, "--incremental", src, str(folder), "--keep", "3")
        assert code == 0
    assert out["merged"]  # the oldest delta became the base
    code, listed = run_json(capsys, "list", str(folder))
    assert [p["kind"] for p in listed["points"]] == ["base", "delta", "delta"]
    assert run_json(capsys, "verify", str(folder))[0] == 0
    assert main(["--incremental", src, str(folder), "--keep", "0"]) == 2


def test_restore_takes_a_plain_backup_file_too(tmp_path, capsys):
    src = make_source(tmp_path / "app.db")
    plain = tmp_path / "app-backup.db"
    apsw_backup.copy(src, str(plain))
    code, out = run_json(capsys, "restore", str(plain), str(tmp_path / "r.db"))
    assert code == 0 and not out["overwrote"]
    assert (tmp_path / "r.db").read_bytes() == plain.read_bytes()
    live = make_source(tmp_path / "live.db", rows=3)
    code, out = run_json(capsys, "restore", str(plain), live, "--overwrite")
    assert code == 0 and out["overwrote"]
    assert sqlite3.connect(live).execute("SELECT count(*) FROM t").fetchone() == (2000,)
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database at all, but long enough " * 5)
    code, out = run_json(capsys, "restore", str(junk), str(tmp_path / "x.db"))
    assert code == 2 and "nor an SQLite database" in out["error"]["message"]
    assert not (tmp_path / "x.db").exists()


@pytest.mark.parametrize("verb", [["restore"], ["list"], ["--incremental"]])
def test_help_of_each_verb_exits_0(verb, capsys):
    assert main([*verb, "--help"]) == 0
    assert "usage: apsw-backup" in capsys.readouterr().out


def test_restore_overwrite_interrupted_says_what_dest_holds(
    points, tmp_path, capsys, monkeypatch
):
    # A SIGTERM noted at copy()'s last progress call (SQLite had committed
    # DEST): the message says DEST holds the restored database (attack
    # finding 14).
    import signal

    _, folder, _ = points
    dest = make_source(tmp_path / "old.db", rows=10)
    real = inc.restore
    holder = {}

    def restore(*a, progress, **kw):
        def wrapped(done, total):
            if done >= total:
                holder["interrupts"].signum = signal.SIGTERM
            progress(done, total)

        return real(*a, progress=wrapped, **kw)

    from apsw_backup.cli import incremental as cli_inc

    monkeypatch.setattr(inc, "restore", restore)
    real_run = cli_inc.run

    def run(argv, interrupts):
        holder["interrupts"] = interrupts
        return real_run(argv, interrupts)

    monkeypatch.setattr(cli_inc, "run", run)
    code, out = run_json(capsys, "restore", str(folder), dest, "--overwrite")
    assert code == 143
    message = out["error"]["message"]
    db = sqlite3.connect(dest)
    rows = db.execute("SELECT count(*) FROM t").fetchone()[0]
    db.close()
    assert rows == 2000
    assert "holds the restored database" in message
    assert "nothing" not in message


def test_every_json_object_of_the_verbs_follows_the_schema(points, tmp_path, capsys):
    # "error": null on success too (attack finding 07), and the error
    # object's keys on failure.
    from apsw_backup.cli import output

    src, folder, _ = points
    runs = [
        ("--incremental", src, str(folder) + "/"),
        ("restore", str(folder), str(tmp_path / "new.db")),
        ("restore", str(folder), str(tmp_path / "new.db")),  # exists: exit 2
        ("list", str(folder)),
        ("list", str(tmp_path / "nosuch")),
    ]
    for argv in runs:
        code, out = run_json(capsys, *argv)
        assert output.verb_problems(out) == [], (argv, out)
    assert output.verb_problems({"ok": True, "exit_code": 0}) == ["error is missing"]


def test_restore_refusals_are_worded_by_the_command(tmp_path, capsys):
    # restore()'s refusals carry facts; the command words them with BACKUP,
    # DEST and --overwrite (attack finding 07).
    src = make_source(tmp_path / "app.db", rows=10)
    folder = tmp_path / "pts"
    folder.mkdir()
    assert main(["--incremental", src, str(folder) + "/"]) == 0
    capsys.readouterr()
    code, out = run_json(capsys, "restore", "--overwrite", src, src)
    message = out["error"]["message"]
    assert code == 2 and "is BACKUP itself" in message and "SOURCE" not in message
    junk = tmp_path / "notdb.db"
    junk.write_bytes(b"not a database at all")
    code, out = run_json(capsys, "restore", "--overwrite", str(folder), str(junk))
    message = out["error"]["message"]
    assert code == 2 and "--overwrite replaces" in message
    assert message.startswith("DEST ") and "unchanged" in message
    code, out = run_json(capsys, "restore", str(folder), src)
    message = out["error"]["message"]
    assert code == 2 and "pass --overwrite" in message and "=True" not in message
    code, out = run_json(capsys, "restore", str(junk), str(tmp_path / "x.db"))
    message = out["error"]["message"]
    assert code == 2 and message.startswith("BACKUP ") and "x.db" not in message
    code, out = run_json(capsys, "restore", src, str(tmp_path / "y.db"), "--at", "2020")
    assert code == 2 and "--at chooses" in out["error"]["message"]
    code, out = run_json(capsys, "restore", str(folder), str(tmp_path))
    assert code == 2 and out["error"]["message"].startswith("DEST ")
    side = str(tmp_path / "app.db-wal")
    code, out = run_json(capsys, "restore", str(folder), side)
    message = out["error"]["message"]
    assert code == 2 and "Choose another DEST" in message and "dest" not in message


# -- attack 21: messages that name the user's files (findings 6, 7, 8, 11) ---


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_a_restore_names_dest(points, tmp_path, capsys, monkeypatch):
    # finding 6 (a): the OSError of a write into the new DEST named no file
    _, folder, _ = points
    dest = tmp_path / "restored.db"
    monkeypatch.setattr(inc, "_write_all", _enospc)
    code, out = run_json(capsys, "restore", str(folder), str(dest))
    message = out["error"]["message"]
    assert code == 1 and f"DEST '{dest}'" in message and "ENOSPC" in message
    assert ".partial" not in message and not dest.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    with pytest.raises(OSError) as raised:
        inc.restore(folder, dest)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(dest)


def test_a_full_disk_in_a_rebase_names_the_new_base(tmp_path, capsys, monkeypatch):
    # finding 6 (b): the rebase after a kept delta failed naming no file
    src = make_source(tmp_path / "app.db")
    folder = tmp_path / "points"
    folder.mkdir()
    assert main(["--incremental", src, str(folder)]) == 0
    touch_rows(src, 200)
    real = inc._write_all

    def write_all(fd, data, offset):
        if sys._getframe(1).f_code.co_name == "_materialize":
            _enospc()
        real(fd, data, offset)

    monkeypatch.setattr(inc, "_write_all", write_all)
    capsys.readouterr()
    code, out = run_json(
        capsys, "--incremental", src, str(folder), "--rebase-share", "0.0001"
    )
    message = out["error"]["message"]
    tail = message.split("what came after it failed:")[-1]
    assert code == 1 and out["kept_point"] and "ENOSPC" in tail
    assert str(folder) in tail and ".base.apswb" in tail and ".partial" not in tail


def test_a_wal_source_through_a_link_is_left_without_side_files(tmp_path, capsys):
    # finding 7: SQLite puts -wal/-shm beside the link's target
    real_dir, links, folder = (tmp_path / n for n in ("real", "links", "points"))
    for d in (real_dir, links, folder):
        d.mkdir()
    src = make_source(real_dir / "app.db", rows=50)
    db = sqlite3.connect(src)
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    assert sorted(os.listdir(real_dir)) == ["app.db"]
    link = links / "app.db"
    link.symlink_to(src)
    assert main(["--incremental", str(link), str(folder)]) == 0
    touch_rows(src)
    assert main(["--incremental", str(link), str(folder)]) == 0
    assert sorted(os.listdir(real_dir)) == ["app.db"]
    assert sorted(os.listdir(links)) == ["app.db"]


def test_restore_names_dest_and_its_folder_not_a_temporary_file(
    points, tmp_path, capsys
):
    # finding 8: the plain restore's words, never the internal .partial name
    _, folder, _ = points
    missing = tmp_path / "nofolder" / "x.db"
    code, out = run_json(capsys, "restore", str(folder), str(missing))
    message = out["error"]["message"]
    assert code == 1 and ".partial" not in message
    assert f"DEST's folder '{missing.parent}'" in message and "ENOENT" in message
    with pytest.raises(apsw_backup.CantOpenError) as raised:
        inc.restore(folder, missing)
    assert raised.value.role == "target's folder"
    assert raised.value.path == str(missing.parent)
    long = tmp_path / ("a" * 300 + ".db")
    code, out = run_json(capsys, "restore", str(folder), str(long))
    message = out["error"]["message"]
    assert code == 1 and ".partial" not in message
    assert f"DEST '{long}'" in message and "ENAMETOOLONG" in message


def test_restore_says_another_file_appeared_at_dest(
    points, tmp_path, capsys, monkeypatch
):
    # finding 8: DEST created by someone else while the restore was made
    _, folder, _ = points
    dest = tmp_path / "same.db"
    real = inc._StructureCheck.finish

    def meanwhile(self):
        real(self)
        dest.write_bytes(b"theirs")

    monkeypatch.setattr(inc._StructureCheck, "finish", meanwhile)
    code, out = run_json(capsys, "restore", str(folder), str(dest))
    message = out["error"]["message"]
    assert code == 1 and ".partial" not in message
    assert f"another file appeared at DEST '{dest}'" in message
    assert dest.read_bytes() == b"theirs"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_incremental_words_a_bad_source_or_folder_as_the_plain_backup(tmp_path, capsys):
    # finding 11: no false "does not exist", no internal .virtual file
    folder = tmp_path / "points"
    folder.mkdir()
    adir = tmp_path / "adir.db"
    adir.mkdir()
    pipe = tmp_path / "pipe.db"
    os.mkfifo(pipe)
    text = tmp_path / "text.db"
    text.write_text("hello world" * 1000)
    src = make_source(tmp_path / "app.db", rows=10)
    notadir = tmp_path / "notadir"
    notadir.write_text("x")
    for source, words in (
        (adir, "is a folder (EISDIR), not a database file"),
        (pipe, "is not a regular file"),
        (text, "is not an SQLite database (it does not begin with the SQLite"),
    ):
        code, out = run_json(capsys, "--incremental", str(source), str(folder))
        message = out["error"]["message"]
        assert code == 1 and message.startswith(f"SOURCE '{source}' {words}")
        assert "does not exist" not in message and ".virtual" not in message
        plain = main([str(source), str(tmp_path / "plain.db")])
        assert plain == 1 and message in capsys.readouterr().err
    code, out = run_json(capsys, "--incremental", src, str(notadir))
    message = out["error"]["message"]
    assert code == 2 and "is a file, not a folder" in message
    assert "does not exist" not in message
    assert os.listdir(folder) == []
    # the library: the right classes, naming the path
    with pytest.raises(apsw_backup.CantOpenError, match="is a folder"):
        inc.incremental(adir, folder)
    with pytest.raises(apsw_backup.CantOpenError, match="not a regular file"):
        inc.incremental(pipe, folder)
    with pytest.raises(apsw_backup.NotADBError, match="not an SQLite database"):
        inc.incremental(text, folder)
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        inc.incremental(src, notadir)
    assert os.listdir(folder) == []
