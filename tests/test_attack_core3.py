"""Findings of the fresh blind attack on the core and the command (round 3,
second helper).  Each test is the class of a defect it found:

- copy() into another database's side file name (other.db-journal) made a
  "backup" SQLite deletes the next time other.db is opened (the command
  refused it, copy() did not);
- --keep judged "holds no table" by the page count: a SOURCE whose tables
  were all dropped (pages left free) rotated the real backups away;
- progress raising at the SQLITE_DONE call: an existing target holds the
  complete copy, and the exception did not say so;
- --sleep over an hour was a run failure (exit 1, the library's words);
- --verify with a wrong value: SOURCE was taken for DEST in the message;
- a huge flush_every: an OverflowError about "npages".
"""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

import apsw_backup as ab


def make(path, rows=20, table="t"):
    c = sqlite3.connect(path)
    c.execute(f"CREATE TABLE IF NOT EXISTS {table}(x)")
    c.executemany(f"INSERT INTO {table} VALUES (randomblob(3000))", [()] * rows)
    c.commit()
    c.close()


def cli(*args, cwd=None):
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("side", ["-journal", "-wal", "-shm"])
def test_copy_into_another_databases_side_file_name_is_refused(tmp_path, side):
    src, other = tmp_path / "src.db", tmp_path / "other.db"
    make(src)
    make(other, rows=1)
    target = tmp_path / ("other.db" + side)
    with pytest.raises(ValueError, match="file name of the database") as caught:
        ab.copy(src, target)
    assert caught.value.role == "target" and caught.value.side == side
    assert not target.exists()
    # the same name with no database beside it is an ordinary new file
    lone = tmp_path / ("lone.db" + side)
    ab.copy(src, lone)
    assert lone.exists()


def test_keep_counts_a_backup_whose_tables_were_dropped_as_empty(tmp_path):
    src, folder = tmp_path / "app.db", tmp_path / "b"
    folder.mkdir()
    make(src)
    code, first = cli("--keep", "1", src, folder)
    assert code == 0
    c = sqlite3.connect(src)
    c.execute("DROP TABLE t")  # its pages stay, free
    c.commit()
    c.close()
    assert os.path.getsize(src) > 4096
    code, second = cli("--keep", "1", src, folder)
    assert code == 0
    assert second["deleted"] == [] and second["rotation_skipped"]
    assert os.path.exists(first["dest"])


def test_progress_raising_at_done_says_the_existing_target_is_complete(tmp_path):
    src, live = tmp_path / "backup.db", tmp_path / "live.db"
    make(src, rows=3)
    make(live, rows=1, table="old")

    def progress(status, remaining, total):
        if status == ab.SQLITE_DONE:
            raise KeyboardInterrupt("too late")

    with pytest.raises(KeyboardInterrupt) as caught:
        ab.copy(src, live, progress=progress)
    assert caught.value.target_state == "complete"
    assert caught.value.path == str(live)
    c = sqlite3.connect(live)
    assert c.execute("SELECT count(*) FROM t").fetchone() == (3,)
    c.close()
    # a new target is still not put in place
    new = tmp_path / "new.db"
    with pytest.raises(KeyboardInterrupt):
        ab.copy(src, new, progress=progress)
    assert not new.exists()


def test_sleep_over_an_hour_is_a_usage_error(tmp_path):
    make(tmp_path / "s.db")
    code, out = cli("--sleep", "5000", "s.db", "o.db", cwd=tmp_path)
    assert code == 2
    assert out["error"]["class"] == "UsageError"
    assert "--sleep" in out["error"]["message"]


@pytest.mark.parametrize(
    "bad",
    [["--verify", "bogus"], ["--pages", "abc"], ["--schema", "x", "--keep", "no"]],
)
def test_a_bad_option_value_never_takes_source_for_dest(tmp_path, bad):
    make(tmp_path / "s.db")
    code, out = cli(*bad, "s.db", "o.db", cwd=tmp_path)
    assert code == 2
    assert (out["source"], out["dest"]) == ("s.db", "o.db")
    assert "'s.db'" not in out["error"]["message"].split("DEST")[-1]


def test_a_huge_flush_every_is_taken_as_rarely(tmp_path):
    src = tmp_path / "s.db"
    make(src)
    result = ab.copy(src, tmp_path / "o.db", flush_every=2**43 + 1)
    assert result.pages > 1


def test_figures_of_a_wal_dest_whose_checkpoint_a_reader_holds_back(tmp_path):
    """(third helper) --overwrite into a WAL DEST with a reader: the file's
    header is the old database's until a checkpoint; the figures are read
    through SQLite (the -wal), not from that stale header."""
    backup, dest = tmp_path / "bk.db", tmp_path / "live.db"
    make(backup, rows=10)
    live = sqlite3.connect(dest, isolation_level=None)
    live.execute("PRAGMA journal_mode=wal")
    live.execute("CREATE TABLE big(y)")
    live.executemany("INSERT INTO big VALUES (randomblob(3000))", [()] * 40)
    live.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    reader = sqlite3.connect(dest, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM big").fetchone()
    try:
        code, out = cli("--overwrite", backup, dest)
    finally:
        reader.execute("COMMIT")
        reader.close()
    pages = live.execute("PRAGMA page_count").fetchone()[0]
    live.close()
    assert code == 0
    assert out["pages"] == pages
    assert out["bytes"] == pages * out["page_size"]
