"""Incremental backups (docs/incremental.md): every restore is byte-identical to a full
backup of the same state, and a damaged chain is refused naming the file.

Each "full backup of the same state" is apsw_backup.copy() into a new file,
taken right after the incremental run with the source unchanged between.
"""

import errno
import os
import random
import sqlite3

import pytest

import apsw_backup
from apsw_backup import incremental as inc


def fill(path, rows=20000, page_size=None, wal=False):
    db = sqlite3.connect(str(path))
    if page_size:
        db.execute(f"PRAGMA page_size={page_size}")
    if wal:
        db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.execute("CREATE INDEX tid ON t(id, length(v))")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(90)) for i in range(rows))
    )
    db.commit()
    db.close()
    return path


def change(path, seed, inserts=20, updates=15, deletes=8):
    rnd = random.Random(seed)
    db = sqlite3.connect(str(path))
    top = db.execute("SELECT max(id) FROM t").fetchone()[0] or 0
    db.executemany(
        "INSERT INTO t VALUES (?, ?)",
        ((top + 1 + i, rnd.randbytes(90)) for i in range(inserts)),
    )
    ids = [r[0] for r in db.execute("SELECT id FROM t")]
    for i in rnd.sample(ids, updates):
        db.execute("UPDATE t SET v=? WHERE id=?", (rnd.randbytes(90), i))
    for i in rnd.sample(ids, deletes):
        db.execute("DELETE FROM t WHERE id=?", (i,))
    db.commit()
    db.close()


def full_copy(source, target):
    apsw_backup.copy(str(source), str(target))
    return target.read_bytes()


@pytest.fixture
def setup(tmp_path):
    src = fill(tmp_path / "src.db")
    folder = tmp_path / "points"
    folder.mkdir()
    return src, folder


def restored(point_or_folder, tmp_path, name, **kw):
    out = tmp_path / name
    inc.restore(point_or_folder, out, **kw)
    return out.read_bytes()


def test_base_restores_byte_identical(setup, tmp_path):
    src, folder = setup
    r = inc.incremental(src, folder)
    assert r.kind == "base" and r.pages_written == r.page_count
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")


def test_base_plus_one_keeps_only_changed_pages(setup, tmp_path):
    src, folder = setup
    base = inc.incremental(src, folder)
    change(src, 1, inserts=0, updates=3, deletes=0)
    r = inc.incremental(src, folder)
    assert r.kind == "delta" and r.chain_length == 2
    assert 0 < r.pages_written < base.page_count / 4
    assert r.bytes_written < base.bytes_written / 4
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")


def test_base_plus_ten_every_point_restores_its_own_state(setup, tmp_path):
    src, folder = setup
    fulls = []
    points = []
    for k in range(11):
        if k:
            change(src, k)
        r = inc.incremental(src, folder, rebase_share=10.0)
        points.append(r.path)
        fulls.append(full_copy(src, tmp_path / f"full{k}.db"))
    kinds = [p.kind for p in inc.list_points(folder)]
    assert kinds == ["base"] + ["delta"] * 10
    for k, point in enumerate(points):
        assert restored(point, tmp_path, f"r{k}.db") == fulls[k], k
    # by time: the newest at or before a point's own stamp is that point
    stamp = inc._parse_name(points[4])["stamp"]
    assert restored(folder, tmp_path, "at.db", at=stamp) == fulls[4]


def test_open_restore_point_reads_that_state_read_only(setup, tmp_path):
    src, folder = setup
    inc.incremental(src, folder)
    before = sqlite3.connect(str(src)).execute("SELECT count(*) FROM t").fetchone()
    change(src, 2, inserts=100, updates=0, deletes=0)
    inc.incremental(src, folder)
    first = inc.list_points(folder)[0].path
    with inc.open_restore_point(first) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [before]
        with pytest.raises(apsw_backup.ReadOnlyError):
            conn.execute("DELETE FROM t")
    with inc.open_restore_point(folder) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(before[0] + 100,)]
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]


def test_vacuum_makes_a_new_base(setup, tmp_path):
    src, folder = setup
    inc.incremental(src, folder)
    db = sqlite3.connect(str(src))
    db.execute("DELETE FROM t WHERE id % 3 = 0")
    db.commit()
    db.execute("VACUUM")
    db.close()
    r = inc.incremental(src, folder)
    assert r.kind == "base" and "VACUUM" in r.reason
    assert [p.kind for p in inc.list_points(folder)] == ["base", "base"]
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")


def test_page_size_change_makes_a_new_base(setup, tmp_path):
    src, folder = setup
    inc.incremental(src, folder)
    db = sqlite3.connect(str(src))
    db.execute("PRAGMA page_size=8192")
    db.execute("VACUUM")
    db.close()
    r = inc.incremental(src, folder)
    assert r.kind == "base" and "page size" in r.reason
    assert inc.list_points(folder)[-1].page_size == 8192
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")


def test_wal_source_with_changes_only_in_the_wal(tmp_path):
    src = fill(tmp_path / "src.db", wal=True)
    folder = tmp_path / "points"
    folder.mkdir()
    inc.incremental(src, folder)
    writer = sqlite3.connect(str(src))
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("UPDATE t SET v=randomblob(90) WHERE id % 1000 = 0")
    writer.commit()
    assert os.path.getsize(str(src) + "-wal") > 0
    r = inc.incremental(src, folder, rebase_share=10.0)
    assert r.kind == "delta", r.reason
    full = full_copy(src, tmp_path / "full.db")
    writer.close()
    got = restored(folder, tmp_path, "r.db")
    assert got == full
    assert got[18:20] == b"\x01\x01"  # one file, as copy() leaves it
    assert not os.path.exists(tmp_path / "r.db-wal")
    with inc.open_restore_point(folder) as conn:  # WAL flag: shown as one file
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(20000,)]
    assert not [n for n in os.listdir(folder) if not n.endswith(inc.SUFFIX)]


def test_restore_into_existing_needs_overwrite(setup, tmp_path):
    src, folder = setup
    inc.incremental(src, folder)
    dest = fill(tmp_path / "live.db", rows=10)
    with pytest.raises(FileExistsError, match="overwrite"):
        inc.restore(folder, dest)
    other = sqlite3.connect(str(dest))  # another connection keeps it open
    r = inc.restore(folder, dest, overwrite=True)
    assert r.overwrote and r.writers_held > 0
    rows = other.execute("SELECT count(*), sum(length(v)) FROM t").fetchone()
    want = sqlite3.connect(str(src)).execute("SELECT count(*), sum(length(v)) FROM t")
    assert rows == want.fetchone()
    assert other.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    other.close()


def test_restore_into_existing_wal_reports_wal_growth(setup, tmp_path):
    src, folder = setup
    inc.incremental(src, folder)
    dest = fill(tmp_path / "live.db", rows=10, wal=True)
    reader = sqlite3.connect(str(dest))  # keeps the -wal from being reset
    reader.execute("SELECT count(*) FROM t").fetchall()
    r = inc.restore(folder, dest, overwrite=True)
    assert r.wal_growth > 0
    assert reader.execute("SELECT count(*) FROM t").fetchone()[0] == 20000
    reader.close()


def test_a_copy_restarted_by_writers_restores_the_final_state(
    setup, tmp_path, monkeypatch
):
    src, folder = setup
    inc.incremental(src, folder)
    change(src, 1)
    # A tiny cache makes SQLite spill the copy to the shim, and read it
    # back after each restart: unkept pages come back poisoned and must be
    # written again.
    monkeypatch.setattr(inc, "DEST_CACHE_PAGES", 5)
    writer = sqlite3.connect(str(src))
    calls = []

    def progress(status, remaining, total):
        calls.append(remaining)
        if len(calls) in (3, 6):  # twice, before copy() takes a snapshot
            writer.execute("UPDATE t SET v=randomblob(90) WHERE id=?", (len(calls),))
            writer.commit()

    r = inc.incremental(src, folder, pages=20, progress=progress, rebase_share=10.0)
    writer.close()
    assert r.kind == "delta" and r.restarts == 2
    assert r.recording["unkept_reads"] > 0
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")


def test_max_chain_starts_a_new_base(setup):
    src, folder = setup
    kinds = []
    for k in range(5):
        change(src, k, inserts=1, updates=1, deletes=0)
        kinds.append(inc.incremental(src, folder, max_chain=2).kind)
    assert kinds == ["base", "delta", "delta", "base", "delta"]


def test_keep_never_breaks_a_chain(setup, tmp_path):
    src, folder = setup
    for k in range(6):
        change(src, k, inserts=5, updates=5, deletes=2)
        r = inc.incremental(src, folder, keep=3, rebase_share=10.0)
    points = inc.list_points(folder)
    assert len(points) == 3
    assert [p.kind for p in points] == ["base", "delta", "delta"]
    assert r.merged  # the oldest delta became the base
    assert all(report.ok for report in inc.verify_folder(folder))
    assert restored(folder, tmp_path, "r.db") == full_copy(src, tmp_path / "full.db")
    oldest = restored(points[0].path, tmp_path, "old.db")
    assert sqlite3.connect(str(tmp_path / "old.db")).execute(
        "PRAGMA integrity_check"
    ).fetchone() == ("ok",)
    assert oldest[:16] == b"SQLite format 3\0"


def test_a_second_source_in_the_folder_has_its_own_chain(setup, tmp_path):
    src, folder = setup
    other = fill(tmp_path / "other.db", rows=100)
    inc.incremental(src, folder)
    assert inc.incremental(other, folder).kind == "base"
    assert inc.incremental(src, folder).kind == "delta"
    with pytest.raises(ValueError, match="several databases"):
        inc.restore(folder, tmp_path / "r.db")


# -- a chain that is not what was written ------------------------------------


@pytest.fixture
def chain(setup):
    src, folder = setup
    for k in range(4):
        if k:
            change(src, k)
        inc.incremental(src, folder, rebase_share=10.0)
    return folder, [p.path for p in inc.list_points(folder)]


def refused(folder, tmp_path, path, *words):
    with pytest.raises(inc.BrokenChainError) as info:
        inc.restore(folder, tmp_path / "r.db")
    assert info.value.path == path
    assert path in str(info.value)
    for word in words:
        assert word in str(info.value)
    assert not os.path.exists(tmp_path / "r.db")
    reports = inc.verify_folder(folder)
    assert not all(r.ok for r in reports)


def test_missing_delta_refused(chain, tmp_path):
    folder, paths = chain
    os.remove(paths[1])
    refused(folder, tmp_path, paths[2], "missing")


def test_missing_base_refused(chain, tmp_path):
    folder, paths = chain
    os.remove(paths[0])
    refused(folder, tmp_path, paths[1], "missing")


def test_reordered_points_refused(chain, tmp_path):
    folder, paths = chain
    tmp = paths[1] + ".x"
    os.rename(paths[1], tmp)
    os.rename(paths[2], paths[1])
    os.rename(tmp, paths[2])
    with pytest.raises(inc.BrokenChainError, match="renamed|out of order") as info:
        inc.restore(folder, tmp_path / "r.db")
    assert info.value.path in (paths[1], paths[2], paths[3])


def test_truncated_point_refused(chain, tmp_path):
    folder, paths = chain
    size = os.path.getsize(paths[1])
    os.truncate(paths[1], size - 100)
    refused(folder, tmp_path, paths[1], "truncated")


@pytest.mark.parametrize("where", ["page", "manifest", "header"])
def test_altered_byte_refused(chain, tmp_path, where):
    folder, paths = chain
    point = inc._read_point(paths[1])
    offset = {
        "page": point.data_offset + 7,
        "manifest": os.path.getsize(paths[1]) - inc._TRAILER.size - 5,
        "header": 30,
    }[where]
    with open(paths[1], "r+b") as f:  # a restore point, never a database
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    refused(folder, tmp_path, paths[1], "altered" if where != "header" else "")


def test_damaged_base_that_passes_integrity_check_is_caught(tmp_path):
    src = tmp_path / "src.db"
    db = sqlite3.connect(str(src))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")  # no index on v
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(90)) for i in range(2000))
    )
    db.commit()
    db.close()
    folder = tmp_path / "points"
    folder.mkdir()
    inc.incremental(src, folder)
    path = inc.list_points(folder)[0].path
    point = inc._read_point(path)
    # a byte of a row's blob: the database would still pass integrity_check
    position = point.index.index(point.index[-2])
    P = point.info.page_size
    with open(path, "r+b") as f:
        f.seek(point.data_offset + position * P + P - 10)
        b = f.read(1)
        f.seek(point.data_offset + position * P + P - 10)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(inc.BrokenChainError, match="page"):
        inc.open_restore_point(path)
    # SQLite itself sees nothing wrong in a database with that byte flipped
    pgno = point.index[position]
    same = tmp_path / "same.db"
    apsw_backup.copy(src, same)  # the bytes the point recorded
    with open(same, "r+b") as f:
        f.seek((pgno - 1) * P + P - 10)
        b = f.read(1)
        f.seek((pgno - 1) * P + P - 10)
        f.write(bytes([b[0] ^ 1]))
    check = sqlite3.connect(str(same))
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    check.close()
    # and the overlay serves no page that differs from the point's manifest
    chain = [inc._read_point(path)]
    with inc._Overlay(chain) as conn:
        with pytest.raises(apsw_backup.CorruptError):
            conn.execute("SELECT sum(length(v)) FROM t").fetchall()
    refused(folder, tmp_path, path, "altered")


def test_not_a_restore_point_and_missing_things(tmp_path):
    with pytest.raises(FileNotFoundError, match="no restore points"):
        inc.restore(tmp_path, tmp_path / "r.db")
    # copy()'s words and facts for a missing source (blind attack, round 3)
    with pytest.raises(apsw_backup.CantOpenError, match="does not exist") as caught:
        inc.incremental(tmp_path / "nope.db", tmp_path)
    assert (caught.value.role, caught.value.os_errno) == ("source", errno.ENOENT)
    assert caught.value.path == str(tmp_path / "nope.db")
    with pytest.raises(ValueError, match="max_chain"):
        inc.incremental(tmp_path / "nope.db", tmp_path, max_chain=-1)
    with pytest.raises(ValueError, match="ISO 8601"):
        inc._parse_time("yesterday")


@pytest.mark.heavy
def test_a_database_over_1_gib_never_stores_the_lock_byte_page(tmp_path):
    import filecmp

    src = tmp_path / "big.db"
    db = sqlite3.connect(str(src))
    db.execute("PRAGMA page_size=65536")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 1100)"
        " INSERT INTO t SELECT i, zeroblob(1000000) FROM c"
    )
    db.executemany(
        "INSERT INTO t(v) VALUES (?)", ((os.urandom(20000),) for _ in range(300))
    )
    db.commit()
    db.close()
    P = 65536
    lock = 2**30 // P + 1
    assert os.path.getsize(src) > lock * P
    folder = tmp_path / "points"
    folder.mkdir()
    base = inc.incremental(src, folder)
    point = inc._read_point(base.path)
    assert lock not in point.index and len(point.index) == point.info.page_count - 1
    assert point.manifest[(lock - 1) * 16 : lock * 16] == bytes(16)
    db = sqlite3.connect(str(src))
    db.execute("UPDATE t SET v=randomblob(20000) WHERE id > 1100 AND id % 7 = 0")
    db.commit()
    db.close()
    delta = inc.incremental(src, folder)
    assert delta.kind == "delta", delta.reason
    apsw_backup.copy(str(src), str(tmp_path / "full.db"))
    inc.restore(folder, tmp_path / "r.db")
    assert filecmp.cmp(tmp_path / "r.db", tmp_path / "full.db", shallow=False)
    (tmp_path / "full.db").unlink()
    assert all(r.ok for r in inc.verify_folder(folder))
    with inc.open_restore_point(folder) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchall() == [(1400,)]


def test_two_runs_into_one_folder_at_once_are_refused(setup):
    import fcntl

    src, folder = setup
    inc.incremental(src, folder)
    other = os.open(folder, os.O_RDONLY)  # another run holding the folder
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        change(src, 1)
        with pytest.raises(inc.FolderBusyError, match="another backup is writing"):
            inc.incremental(src, folder)
    finally:
        os.close(other)
    assert inc.incremental(src, folder).kind == "delta"
    assert len(inc.list_points(folder)) == 2
