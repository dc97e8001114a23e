"""copy()'s file rules found missing by a blind attack, each fixed in the file
layer (copy.py, files.py) where copy() and the command share it; each test
failed before its fix."""

import os
import sqlite3
import threading
import time

import pytest

import apsw_backup
from apsw_backup import files


def make(path, rows=50):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x)")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 500,)] * rows)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("side", ["-journal", "-wal", "-shm"])
def test_a_source_named_as_the_targets_side_file_is_refused_and_kept(tmp_path, side):
    # SQLite, opening the target, took the source for the target's own
    # journal/WAL and deleted it (exit 0 for -journal): data lost.
    target = tmp_path / "x.db"
    make(target, 1)
    source = tmp_path / f"x.db{side}"
    make(source)
    before = source.read_bytes()
    with pytest.raises(files.SameFileError) as info:
        apsw_backup.copy(str(source), str(target))
    assert info.value.role == "source" and info.value.side == side
    assert "rename or copy the source" in str(info.value)
    assert source.read_bytes() == before


def test_a_source_file_named_memory_is_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make(tmp_path / ":memory:", 30)
    result = apsw_backup.copy(":memory:", "out.db")
    assert result.pages > 1
    conn = sqlite3.connect(tmp_path / "out.db")
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (30,)
    conn.close()


@pytest.mark.parametrize("which", ["source", "target"])
def test_a_fifo_is_refused_at_once(tmp_path, which):
    # copy('fifo', ...) blocked for ever in SQLite's open (timeout=2 or not).
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    db = tmp_path / "db.db"
    make(db)
    args = (
        (str(fifo), str(tmp_path / "out.db"))
        if which == "source"
        else (str(db), str(fifo))
    )
    result = {}

    def run():
        try:
            apsw_backup.copy(*args, timeout=2)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the open, then fail
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
        pytest.fail("copy() hung on a FIFO")
    error = result.get("error")
    assert isinstance(error, apsw_backup.CantOpenError), error
    assert "not a regular file" in str(error) and error.role == which


def test_a_sleep_time_cannot_outgrow_time_sleep(tmp_path):
    db = tmp_path / "db.db"
    make(db)
    with pytest.raises(ValueError, match="sleep must be a number of seconds from 0 to"):
        apsw_backup.copy(str(db), str(tmp_path / "out.db"), sleep=1e308)
    assert not (tmp_path / "out.db").exists()


def test_the_timeout_bounds_a_copy_into_a_target_another_connection_locks(tmp_path):
    # It lasted timeout + 5 s: the roll-back of a hot journal waited 5 s for
    # the other connection's lock, though no write had failed.
    db, target = tmp_path / "db.db", tmp_path / "target.db"
    make(db, 200)
    make(target, 1)
    holder = sqlite3.connect(target, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (1)")
    try:
        begun = time.monotonic()
        with pytest.raises(apsw_backup.BusyError) as info:
            apsw_backup.copy(str(db), str(target), timeout=0.5, verify=None)
        took = time.monotonic() - begun
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert took < 3.0, took
    assert info.value.target_state == "unchanged"  # never written: locked out


def test_the_command_refuses_a_source_named_as_dests_side_file(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "x.db"
    make(target, 1)
    source = tmp_path / "x.db-journal"
    make(source)
    before = source.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "--overwrite", str(source), str(target)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "is named as DEST's rollback journal" in proc.stderr
    assert "target" not in proc.stderr
    assert source.read_bytes() == before


def test_a_source_with_a_hot_journal_is_named_with_its_cure(tmp_path):
    # copy() said only "attempt to write a readonly database".
    import subprocess
    import sys

    db = tmp_path / "hj.db"
    make(db, 300)
    crash = (
        "import sqlite3, os, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA cache_size=2')\n"
        "c.execute('BEGIN'); c.execute('UPDATE t SET x=randomblob(600)')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(db)], timeout=60, check=False)
    assert os.path.getsize(f"{db}-journal") > 0
    with pytest.raises(apsw_backup.ReadOnlyError) as info:
        apsw_backup.copy(str(db), str(tmp_path / "out.db"))
    text = str(info.value)
    assert f"has a hot journal '{db}-journal'" in text
    assert "Open the database once read-write" in text
    assert info.value.extendedresult == apsw_backup.SQLITE_READONLY | (3 << 8)
    assert not (tmp_path / "out.db").exists()


@pytest.mark.parametrize("size", [248, 255])
def test_a_target_whose_journal_name_cannot_exist_is_refused(tmp_path, size):
    # A 248-255 byte name was copied and reported verified; its -journal
    # name is over 255 bytes, so no later write to it could ever happen.
    db = tmp_path / "db.db"
    make(db)
    target = tmp_path / ("é" * ((size - 3) // 2) + "x" * ((size - 3) % 2) + ".db")
    assert len(os.fsencode(target.name)) == size
    with pytest.raises(apsw_backup.CantOpenError) as info:
        apsw_backup.copy(str(db), str(target))
    assert "of at most 247 bytes" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["db.db"]


def test_a_target_name_of_247_bytes_is_copied(tmp_path):
    db = tmp_path / "db.db"
    make(db)
    target = tmp_path / ("x" * 244 + ".db")
    apsw_backup.copy(str(db), str(target))
    assert target.exists()
