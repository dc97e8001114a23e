"""The fast paths of incremental backups and restores (docs/incremental.md,
"Where the time goes") give the bytes and the refusals of the slow ones.

- A source in rollback-journal mode is read through SQLite's own file
  handle inside one read transaction (_Recording._read_directly): the
  recording must be the one the backup API makes, page 1 included.
- A restore into a new DEST checks the chain in a thread beside the writing
  and reads DEST back from the disk slice by slice: a damaged page of any
  file, the ones later points replaced too, is still refused, and a page
  that does not read back as written keeps DEST out of place.
- quick_check=True (--quick-check) refuses a point whose state fails
  PRAGMA quick_check; without it the point is checked by its hashes.
"""

import os
import sqlite3

import pytest

import apsw_backup
from apsw_backup import _apsw_backup as _c
from apsw_backup import incremental as inc
from apsw_backup.cli import main


def make_db(path, rows=3000, page_size=4096, blob=300):
    db = sqlite3.connect(str(path))
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.execute("CREATE INDEX tv ON t(v)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(blob)) for i in range(rows))
    )
    db.commit()
    db.close()
    return path


def touch(path, every=40):
    db = sqlite3.connect(str(path))
    db.execute(f"UPDATE t SET v = randomblob(300) WHERE id % {every} = 1")
    db.commit()
    db.close()


def record(src, folder, parent, direct):
    """One recording of src against the manifest `parent`: {page: bytes}
    of the kept pages, the manifest, and the outcome."""
    page_size = inc._page_size_of(
        conn := _c.Connection(str(src), _c.SQLITE_OPEN_READONLY)
    )
    path = os.path.join(folder, f"rec-{direct}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    # the parent's manifest is read where it lies in a file
    parent_path = os.path.join(folder, f"parent-{direct}.bin")
    with open(parent_path, "wb") as f:
        f.write(parent)
    parent_fd = os.open(parent_path, os.O_RDONLY)
    rec = None
    try:
        rec = inc._Recording(
            str(folder),
            fd,
            4096,
            page_size,
            (parent_fd, 0, len(parent) // 16) if parent else None,
        )
        out = rec.run(conn, inc._RunOptions(-1, None, None), direct)
        slots = inc.array.array("q")
        for start in range(0, out["slots"], 1000):
            n = min(1000, out["slots"] - start)
            slots.frombytes(_c._delta_slots(rec.capsule, start, n))
        kept = {
            pgno: os.pread(fd, page_size, 4096 + slot * page_size)
            for slot, pgno in enumerate(slots)
            if pgno
        }
        count = out["page_count"]
        out["manifest"] = b"".join(
            _c._delta_manifest(rec.capsule, first, min(1000, count - first + 1))
            for first in range(1, count + 1, 1000)
        )
    finally:
        if rec is not None:
            rec.close()
        conn.close()
        os.close(fd)
        os.close(parent_fd)
    return kept, out


class Counting:
    """_c with _delta_read_source counted (the direct path taken)."""

    def __init__(self):
        self.calls = 0

    def __getattr__(self, name):
        value = getattr(_c, name)
        if name != "_delta_read_source":
            return value

        def counted(*args):
            self.calls += 1
            return value(*args)

        return counted


@pytest.mark.parametrize("page_size", [1024, 4096, 65536])
def test_direct_read_records_what_the_backup_api_writes(tmp_path, page_size):
    src = make_db(tmp_path / "src.db", rows=1500, page_size=page_size)
    # as a base (no parent), then as a delta after changes
    kept_api, out_api = record(src, tmp_path, b"", direct=False)
    kept_direct, out_direct = record(src, tmp_path, b"", direct=True)
    assert out_direct["manifest"] == out_api["manifest"]
    assert kept_direct == kept_api  # page 1 too: as a commit into a new file
    assert 1 in kept_direct
    parent = out_api["manifest"]
    touch(src)
    kept_api, out_api = record(src, tmp_path, parent, direct=False)
    kept_direct, out_direct = record(src, tmp_path, parent, direct=True)
    assert out_direct["manifest"] == out_api["manifest"]
    assert kept_direct == kept_api
    assert 0 < len(kept_direct) < out_direct["page_count"]


def test_incremental_takes_the_direct_path_with_progress_and_restores_identical(
    tmp_path, monkeypatch
):
    src = make_db(tmp_path / "src.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    counting = Counting()
    monkeypatch.setattr(inc, "_c", counting)
    seen = []
    inc.incremental(src, folder, progress=lambda *a: seen.append(a))  # as the CLI
    touch(src)
    r = inc.incremental(src, folder, progress=lambda *a: seen.append(a))
    assert r.kind == "delta" and counting.calls >= 2
    assert seen and all(status == _c.SQLITE_DONE for status, _, _ in seen)
    apsw_backup.copy(str(src), str(tmp_path / "full.db"))
    inc.restore(folder, tmp_path / "r.db")
    assert (tmp_path / "r.db").read_bytes() == (tmp_path / "full.db").read_bytes()


def test_a_wal_source_is_copied_by_the_backup_api(tmp_path, monkeypatch):
    src = tmp_path / "src.db"
    db = sqlite3.connect(str(src))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(x)")
    db.execute("INSERT INTO t VALUES (1)")
    db.commit()
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("INSERT INTO t VALUES (2)")  # only in the -wal
    db.commit()
    folder = tmp_path / "bk"
    folder.mkdir()
    counting = Counting()
    monkeypatch.setattr(inc, "_c", counting)
    inc.incremental(src, folder)
    db.close()
    assert counting.calls == 0
    with inc.open_restore_point(folder) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]


def chain_with_a_replaced_page(tmp_path):
    src = make_db(tmp_path / "src.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    touch(src)
    inc.incremental(src, folder)
    base, delta = (inc._read_point(p.path) for p in inc.list_points(folder))
    replaced = sorted(set(base.index) & set(delta.index))
    assert replaced
    return folder, base, replaced[len(replaced) // 2]


def flip(path, offset):
    with open(path, "r+b") as f:  # a restore point, never a database
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_the_chain_check_beside_the_copy_restores_identical_and_refuses_a_damaged_parent(
    tmp_path,
):
    src = make_db(tmp_path / "src.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    first = inc.incremental(src, folder)
    touch(src)
    assert inc.incremental(src, folder).kind == "delta"
    apsw_backup.copy(str(src), str(tmp_path / "full.db"))
    inc.restore(folder, tmp_path / "r.db")
    assert (tmp_path / "r.db").read_bytes() == (tmp_path / "full.db").read_bytes()
    base = inc._read_point(first.path)
    flip(first.path, base.offset_of(len(base.index) // 2) + 100)
    touch(src)
    again = inc.incremental(src, folder)
    assert again.kind == "base" and "damaged" in again.reason
    assert first.path in again.reason


def test_a_damaged_page_a_later_point_replaced_is_still_refused(tmp_path):
    folder, base, pgno = chain_with_a_replaced_page(tmp_path)
    P = base.info.page_size
    flip(base.info.path, base.offset_of(base.index.index(pgno)) + P // 2)
    with pytest.raises(inc.BrokenChainError, match=f"page {pgno}") as info:
        inc.restore(folder, tmp_path / "r.db")
    assert info.value.path == base.info.path
    assert not os.path.exists(tmp_path / "r.db")
    assert [n for n in os.listdir(tmp_path) if n.startswith("r.db")] == []


def test_a_page_that_does_not_read_back_keeps_dest_out_of_place(tmp_path, monkeypatch):
    src = make_db(tmp_path / "src.db")
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder)
    real = inc._read_exact

    def lying_disk(fd, n, offset):
        data = real(fd, n, offset)
        if offset <= 8192 < offset + len(data):  # page 3 reads back altered
            i = 8192 - offset + 100
            data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        return data

    monkeypatch.setattr(inc, "_read_exact", lying_disk)
    with pytest.raises(inc.IncrementalError, match="did not read back as written"):
        inc.restore(folder, tmp_path / "r.db")
    assert [n for n in os.listdir(tmp_path) if n.startswith("r.db")] == []


def corrupt_structure(path):
    """A database whose pages read fine but whose b-tree is damaged: the
    last table leaf's cell count raised (quick_check reports it)."""
    db = sqlite3.connect(str(path))
    root = db.execute("SELECT rootpage FROM sqlite_master WHERE name='t'").fetchone()[0]
    P = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(path, "r+b") as f:  # no connection is open on it
        f.seek((root - 1) * P)
        page = f.read(P)
        assert page[0] in (5, 13)
        f.seek((root - 1) * P + 3)
        f.write(b"\xff\xf0")  # an absurd cell count


def test_quick_check_refuses_a_point_whose_state_is_corrupt(tmp_path):
    src = make_db(tmp_path / "src.db", rows=400)
    folder = tmp_path / "bk"
    folder.mkdir()
    inc.incremental(src, folder, quick_check=True)  # sound: kept
    corrupt_structure(src)
    with pytest.raises(inc.IncrementalError, match="fails quick_check"):
        inc.incremental(src, folder, quick_check=True)
    assert len(inc.list_points(folder)) == 1  # nothing kept
    assert [n for n in os.listdir(folder) if "partial" in n] == []
    # by default a point is checked by its hashes only: it is kept
    assert inc.incremental(src, folder).kind == "delta"


def test_cli_quick_check_flag(tmp_path, capsys):
    src = make_db(tmp_path / "src.db", rows=400)
    folder = tmp_path / "bk"
    folder.mkdir()
    assert main(["--incremental", "--quick-check", str(src), str(folder)]) == 0
    corrupt_structure(src)
    assert main(["--incremental", "--quick-check", str(src), str(folder)]) == 1
    assert "fails quick_check" in capsys.readouterr().err
    assert len(inc.list_points(folder)) == 1
