"""The checks of a restore into a new DEST, run beside the writing
(docs/incremental.md, "Restoring"): the chain, DEST read back, and
quick_check of the point through the overlay -- which serves only pages
that match the point's manifest."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest
from incremental_helpers import change_blobs, make_blobs

import apsw_backup
from apsw_backup import incremental as inc


def make(path, rows=3000, wal=False):
    make_blobs(path, rows, wal)


def change(path):
    change_blobs(path, 97)


def corrupt_structure(path):
    """The table's root page (an interior page or a leaf) given an absurd
    cell count: every page reads fine, quick_check reports the b-tree."""
    db = sqlite3.connect(str(path))
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='t'").fetchone()[0]
    P = db.execute("PRAGMA page_size").fetchone()[0]
    db.execute("PRAGMA journal_mode=DELETE").fetchall()
    db.close()
    with open(path, "r+b") as f:  # no connection is open on it
        f.seek((root - 1) * P)
        assert f.read(1)[0] in (5, 13)
        f.seek((root - 1) * P + 3)
        f.write(b"\xff\xf0")


def leftovers(folder, name):
    return sorted(n for n in os.listdir(folder) if n.startswith(name))


def flip_stored_page(point_path, position):
    point = inc._read_point(point_path)
    P = point.info.page_size
    with open(point_path, "r+b") as f:
        f.seek(point.offset_of(position) + P - 7)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))
    return point.index[position]


@pytest.mark.parametrize("wal, keep_wal", [(False, False), (True, False), (True, True)])
def test_a_point_whose_state_fails_quick_check_is_not_restored(tmp_path, wal, keep_wal):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src, wal=wal)
    inc.incremental(src, bk)
    corrupt_structure(src)
    if wal:  # recorded as a WAL database's point
        sqlite3.connect(str(src)).execute("PRAGMA journal_mode=WAL").fetchall()
    made = inc.incremental(src, bk)  # by its hashes only: recorded as it is
    assert made.kind == "delta"
    with pytest.raises(inc.IncrementalError, match="fails quick_check"):
        inc.restore(bk, tmp_path / "r.db", keep_wal=keep_wal)
    assert leftovers(tmp_path, "r.db") == []
    # the sound point before it still restores
    first = inc.list_points(bk)[0].path
    inc.restore(first, tmp_path / "r.db", keep_wal=keep_wal)
    db = sqlite3.connect(str(tmp_path / "r.db"))
    assert db.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    db.close()


def test_the_overlay_serves_no_page_altered_after_the_chain_was_checked(tmp_path):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    base = inc.incremental(src, bk)
    with inc.open_restore_point(bk) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchall() == [(1,)]
        flip_stored_page(base.path, 20)  # a table leaf, after the open
        with pytest.raises(apsw_backup.CorruptError):
            conn.execute("SELECT sum(length(b)) FROM t").fetchall()


def test_a_restore_stopped_by_its_progress_callback_leaves_no_thread(tmp_path):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src, rows=20000)
    inc.incremental(src, bk)
    change(src)
    inc.incremental(src, bk)
    before = set(threading.enumerate())

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        inc.restore(bk, tmp_path / "r.db", progress=stop)
    assert set(threading.enumerate()) == before
    assert leftovers(tmp_path, "r.db") == []
    # and a restore afterwards is whole
    inc.restore(bk, tmp_path / "r.db")
    full = tmp_path / "full.db"
    apsw_backup.copy(src, full)
    assert (tmp_path / "r.db").read_bytes() == full.read_bytes()


def test_a_damaged_file_of_the_chain_is_said_before_anything_else(tmp_path):
    """A page of the base that the delta replaced: only the chain check
    reads it; it names the base, and nothing is put in place."""
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    base = inc.incremental(src, bk)
    db = sqlite3.connect(str(src))
    db.execute("UPDATE t SET b = randomblob(300) WHERE id <= 100")
    db.commit()
    db.close()
    delta = inc.incremental(src, bk)
    assert delta.kind == "delta"
    replaced = [p for p in inc._read_point(delta.path).index if p > 2]
    base_point = inc._read_point(base.path)
    flip_stored_page(base.path, base_point.index.index(replaced[0]))
    with pytest.raises(inc.BrokenChainError) as info:
        inc.restore(bk, tmp_path / "r.db")
    assert info.value.path == base.path
    assert leftovers(tmp_path, "r.db") == []
