"""From the blind attacks on the memory rework of incremental backups
(docs/incremental.md, "Memory"): rotation and a chain it cannot read."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
from datetime import datetime, timedelta

import pytest
from incremental_helpers import change_blobs, make_blobs

import apsw_backup
from apsw_backup import incremental as inc


def make(path):
    make_blobs(path, 3000)


def change(path):
    change_blobs(path, 211)


def a_chain(tmp_path, deltas):
    """app.db, its backup folder and the paths of a base and `deltas`
    deltas made of it."""
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    points = [inc.incremental(src, bk).path]
    for _ in range(deltas):
        change(src)
        made = inc.incremental(src, bk)
        assert made.kind == "delta"
        points.append(made.path)
    return src, bk, points


def test_keep_never_deletes_the_base_of_a_chain_with_an_unreadable_delta(
    tmp_path, monkeypatch
):
    """--keep 1 with the first delta unreadable (EACCES) deleted the base
    and kept its deltas: a chain without its base, for good."""
    src, bk, points = a_chain(tmp_path, 3)
    unreadable = points[1]
    real = inc._read_point

    def read_point(path):
        if path == unreadable:
            raise inc.BrokenChainError(
                f"restore point {path!r} cannot be read: it is not readable (EACCES)",
                path,
            )
        return real(path)

    monkeypatch.setattr(inc, "_read_point", read_point)
    change(src)
    with pytest.raises(inc.IncrementalError, match="deleted nothing") as caught:
        inc.incremental(src, bk, keep=1)
    assert unreadable in str(caught.value)
    assert caught.value.kept_point  # the new point is made and kept
    monkeypatch.undo()
    for path in points:  # nothing of the old chain went
        assert (bk / path.split("/")[-1]).exists()
    assert all(r.ok for r in inc.verify_folder(bk))
    inc.restore(points[-1], tmp_path / "r.db")


def test_wal_growth_is_counted_when_sqlite_removed_the_wal_at_close(tmp_path):
    """restore --overwrite into a WAL DEST nobody else had open: SQLite
    removed the -wal as the restore's connection closed, and wal_growth
    said 0 though the whole database had passed through it."""
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src)
    inc.incremental(src, bk)
    dest = tmp_path / "dest.db"
    db = sqlite3.connect(str(dest))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE x(y)")
    db.commit()
    db.close()
    result = inc.restore(bk, dest, overwrite=True)
    assert not (tmp_path / "dest.db-wal").exists()
    assert result.wal_growth >= dest.stat().st_size


def test_a_copy_of_a_point_under_another_name_breaks_no_chain_anywhere(tmp_path):
    """A delta copied by hand under a name 1 microsecond later (between two
    points): verify and the next run took it for a stray, but restore said
    the chain was broken at it -- a point reported made that did not
    restore.  All now agree: a stray breaks no chain."""
    src, bk, points = a_chain(tmp_path, 3)
    points = points[1:]  # the deltas
    name = points[0].split("/")[-1]
    stamp = re.search(r"\d{8}T\d{6}\.\d{6}Z", name)[0]
    later = datetime.strptime(stamp, inc.STAMP) + timedelta(microseconds=1)
    copy = bk / name.replace(stamp, later.strftime(inc.STAMP))
    assert not copy.exists() and copy.name < points[1].split("/")[-1]
    copy.write_bytes((bk / name).read_bytes())
    change(src)
    made = inc.incremental(src, bk)
    assert made.kind == "delta" and not made.reason
    reports = inc.verify_folder(bk)
    assert any(str(copy) in str(r) for r in reports)  # seen, as a stray
    inc.restore(made.path, tmp_path / "r.db")
    inc.restore(bk, tmp_path / "r2.db")
    apsw_backup.copy(str(src), str(tmp_path / "full.db"))
    full = (tmp_path / "full.db").read_bytes()
    assert (tmp_path / "r.db").read_bytes() == full
    assert (tmp_path / "r2.db").read_bytes() == full


@pytest.mark.parametrize("damaged", [2, 3])
def test_keep_merges_nothing_in_a_chain_this_run_found_damaged(tmp_path, damaged):
    """A flipped byte in a stored page of a delta: the run's check of the
    chain found it and made a new base, but --keep then merged the damaged
    chain's base and first delta away before failing at the damage."""
    src, bk, points = a_chain(tmp_path, 4)
    point = inc._read_point(points[damaged])
    with open(points[damaged], "r+b") as f:
        f.seek(point.offset_of(0) + 200)
        byte = f.read(1)
        f.seek(point.offset_of(0) + 200)
        f.write(bytes([byte[0] ^ 1]))
    before = sorted(p.name for p in bk.iterdir())
    change(src)
    with pytest.raises(inc.IncrementalError, match="deleted nothing") as caught:
        inc.incremental(src, bk, keep=2)
    assert points[damaged] in str(caught.value)
    kept = caught.value.kept_point
    assert kept and kept.endswith(".base.apswb")
    after = sorted(p.name for p in bk.iterdir())
    assert after == sorted(before + [kept.split("/")[-1]])  # nothing went
    inc.restore(points[damaged - 1], tmp_path / "r.db")
    inc.restore(kept, tmp_path / "r2.db")


def test_a_point_that_cannot_be_read_is_an_os_error_for_a_restore(
    tmp_path, monkeypatch
):
    """EACCES opening the point to restore: a file-system error naming it
    (exit 1), not a broken chain (exit 3) of an intact folder -- found by
    the file-system fault harness."""
    src, bk, points = a_chain(tmp_path, 1)
    delta = points[1]
    real = os.open

    def refuse(path, *args, **kwargs):
        if str(path) == delta:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    for call in (
        lambda: inc.restore(bk, tmp_path / "r.db"),
        lambda: inc.open_restore_point(delta),
    ):
        with pytest.raises(PermissionError) as caught:
            call()
        assert caught.value.filename == delta
    monkeypatch.undo()
    assert not (tmp_path / "r.db").exists()
    inc.restore(bk, tmp_path / "r.db")
