"""A DEST that is SOURCE or one of SOURCE's side files is refused, exit 2,
DEST untouched, before anything else is looked at (docs/command-line.md): a copy written to live.db-wal is deleted by the next open of live.db."""

import os
import sqlite3

import pytest
from cli_helpers import digest, json_of, leftovers, run
from copy_helpers import make_source, make_target


@pytest.fixture
def source(tmp_path):
    return make_source(tmp_path / "live.db", journal="wal")


def assert_refused(proc, dest, what):
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" or json_of(proc)["exit_code"] == 2
    assert f"DEST '{dest}' is {what}" in proc.stderr
    assert "Choose another DEST" in proc.stderr
    assert "--overwrite" not in proc.stderr  # never advice to overwrite it


@pytest.mark.parametrize(
    ("suffix", "what"),
    [
        ("-wal", "SOURCE's write-ahead log (-wal file)"),
        ("-shm", "SOURCE's shared-memory index (-shm file)"),
        ("-journal", "SOURCE's rollback journal (-journal file)"),
    ],
)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_refuses_a_side_file_of_source_that_does_not_exist_yet(
    source, tmp_path, suffix, what, overwrite
):
    dest = tmp_path / f"live.db{suffix}"
    proc = run(*overwrite, source, dest)
    assert_refused(proc, dest, what)
    assert not dest.exists()
    assert leftovers(tmp_path) == ["live.db"]


def test_refuses_the_wal_of_an_open_source_before_the_not_empty_check(source, tmp_path):
    # While another connection has SOURCE open, its -wal exists and is not
    # empty: the refusal must not be "pass --overwrite".
    live = sqlite3.connect(str(source), isolation_level=None)
    try:
        live.execute("PRAGMA wal_autocheckpoint=0")
        live.execute("INSERT INTO w(n) VALUES (1)")
        wal = tmp_path / "live.db-wal"
        assert wal.stat().st_size > 0
        before = digest(wal)
        for overwrite in ([], ["--overwrite"]):
            proc = run(*overwrite, source, wal)
            assert_refused(proc, wal, "SOURCE's write-ahead log (-wal file)")
            assert digest(wal) == before
    finally:
        live.close()


def test_refuses_source_itself_under_another_name(source, tmp_path):
    (tmp_path / "sub").mkdir()
    other_name = tmp_path / "sub" / ".." / "live.db"
    proc = run("--overwrite", source, other_name)
    assert_refused(proc, other_name, "SOURCE itself")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_refuses_a_link_to_source(source, tmp_path, link):
    dest = tmp_path / "link.db"
    (os.symlink if link == "symlink" else os.link)(source, dest)
    before = digest(source)
    proc = run("--overwrite", source, dest)
    assert_refused(proc, dest, "SOURCE itself")
    assert digest(source) == before


def test_refuses_a_link_to_a_side_file_of_source(source, tmp_path):
    dest = tmp_path / "innocent.db"
    os.symlink(tmp_path / "live.db-journal", dest)  # dangling for now
    proc = run(source, dest)
    assert_refused(proc, dest, "SOURCE's rollback journal (-journal file)")
    assert not (tmp_path / "live.db-journal").exists()


def test_refuses_source_reached_through_a_linked_folder(source, tmp_path):
    os.symlink(tmp_path, tmp_path / "alias")
    dest = tmp_path / "alias" / "live.db-wal"
    proc = run(source, dest)
    assert_refused(proc, dest, "SOURCE's write-ahead log (-wal file)")


def test_refusal_with_json_prints_one_object(source, tmp_path):
    dest = tmp_path / "live.db-wal"
    proc = run("--json", source, dest)
    assert proc.returncode == 2
    result = json_of(proc)
    assert result["ok"] is False
    assert result["exit_code"] == 2
    assert result["error"]["class"] == "ValueError"
    assert "write-ahead log" in result["error"]["message"]


def test_refuses_a_side_file_name_of_another_database(tmp_path):
    # other.db-wal would be taken for other.db's write-ahead log: the next
    # open of other.db would apply the copy to it, or delete it.
    source = make_source(tmp_path / "live.db")
    other = make_target(tmp_path / "other.db")
    before = digest(other)
    dest = tmp_path / "other.db-wal"
    proc = run(source, dest)
    assert proc.returncode == 2, proc.stderr
    assert f"DEST '{dest}' is the -wal file name of the database '{other}'" in (
        proc.stderr
    )
    assert not dest.exists()
    assert digest(other) == before


@pytest.mark.parametrize("suffix", ["-journal", "-wal"])
def test_refuses_a_new_dest_with_a_stale_side_file(tmp_path, suffix):
    # A journal or WAL left beside a DEST that does not exist would be
    # applied to the new copy by the next open, corrupting it.
    source = make_source(tmp_path / "live.db")
    stale = tmp_path / f"dest.db{suffix}"
    stale.write_bytes(b"left over" * 100)
    proc = run(source, tmp_path / "dest.db")
    assert proc.returncode == 2, proc.stderr
    assert f"'{stale}' is there" in proc.stderr
    assert "SQLite would apply it to the new copy" in proc.stderr
    assert not (tmp_path / "dest.db").exists()
    assert stale.read_bytes() == b"left over" * 100


# Attack findings 10 and 13, and --schema nosuch: refusals before anything
# is written exit 2, name the right files and say nothing was written.


def test_demo_with_source_and_dest_names_them_right(source, tmp_path):
    dest = make_target(tmp_path / "ex.db")
    before = digest(dest)
    proc = run("--json", "--demo", tmp_path, source, dest)
    assert proc.returncode == 2, proc.stderr
    obj = json_of(proc)
    assert obj["source"] == str(source) and obj["dest"] == str(dest)
    assert obj["dest_state"] == "unchanged"
    assert f"DEST '{dest}' was left as it was" in proc.stderr
    proc = run("--demo", "--json", source, dest)  # --demo without FOLDER
    assert json_of(proc)["dest"] == str(dest)
    assert digest(dest) == before


def test_a_wal_dest_of_another_page_size_is_refused_before_writing(tmp_path):
    src = make_source(tmp_path / "src.db")
    dest = tmp_path / "o.db"
    db = sqlite3.connect(str(dest))
    db.execute("PRAGMA page_size=512")
    db.execute("PRAGMA journal_mode=wal")
    db.execute("CREATE TABLE t(x)")
    db.commit()
    db.close()
    before = digest(dest)
    proc = run("--json", "--overwrite", src, dest)
    assert proc.returncode == 2, proc.stderr
    message = json_of(proc)["error"]["message"]
    assert message.startswith(f"DEST '{dest}' is in WAL mode and its page size (512)")
    assert "Nothing was written" in message and "SOURCE's (4096)" in message
    assert "destination" not in message and "'main'" not in message
    assert json_of(proc)["dest_state"] == "unchanged"
    assert digest(dest) == before


def test_schema_of_no_database_is_a_usage_error(source, tmp_path):
    proc = run("--json", "--schema", "nosuch", source, tmp_path / "d.db")
    assert proc.returncode == 2, proc.stderr
    message = json_of(proc)["error"]["message"]
    assert "--schema 'nosuch' is not a database of SOURCE" in message
    assert "attached database" not in message.split("(")[0]
    assert "was not created" in message
