"""Findings of the third blind attack on incremental backups.

- a database moved, a link left at its old name: the next run through the
  link made a delta on the old path's base, which stopped restoring once
  the link was removed (points' sources were resolved again when read);
- list's chain numbers mixed two sources sharing a folder;
- --keep 1: the result named the merged base but counted only the delta;
- a dangling symbolic link as DEST: "pass --overwrite", which then failed.
"""

import json
import os
import sqlite3
import subprocess
import sys

import pytest

import apsw_backup
from apsw_backup import incremental as inc


def make(path, rows=200):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, x)")
    c.executemany("INSERT INTO t(x) VALUES (randomblob(200))", [()] * rows)
    c.commit()
    c.close()


def cli(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return proc


def test_a_point_made_through_a_link_left_by_a_move_restores_after_it_goes(tmp_path):
    src, moved, folder = tmp_path / "app.db", tmp_path / "moved.db", tmp_path / "bk"
    folder.mkdir()
    make(src)
    inc.incremental(src, folder)
    os.rename(src, moved)
    os.symlink(moved, src)
    make(moved, rows=1)
    r = inc.incremental(src, folder)  # another real file: a base of its own
    state = tmp_path / "state.db"
    apsw_backup.copy(moved, state)
    os.unlink(src)
    out = tmp_path / "after.db"
    inc.restore(r.path, out)
    assert out.read_bytes() == state.read_bytes()
    assert all(report.ok for report in inc.verify_folder(folder))


def test_list_numbers_chains_per_source(tmp_path):
    folder = tmp_path / "bk"
    folder.mkdir()
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    s1, s2 = tmp_path / "s1" / "app.db", tmp_path / "s2" / "app.db"
    for _ in range(3):  # interleaved in time: s1, s2, s1, s2, ...
        for src in (s1, s2):
            make(src, rows=1 if src.exists() else 200)
            inc.incremental(src, folder)
    proc = cli("list", "--json", folder)
    points = json.loads(proc.stdout)["points"]
    by_root = {p["root"]: p for p in points}
    sources_of_chain: dict[int, set[str]] = {}
    for p in points:
        sources_of_chain.setdefault(p["chain"], set()).add(p["source"])
        if p["kind"] == "delta":
            assert by_root[p["parent_root"]]["chain"] == p["chain"]
    assert all(len(s) == 1 for s in sources_of_chain.values()), sources_of_chain
    assert len(sources_of_chain) == 2


def test_keep_counts_what_the_run_wrote(tmp_path):
    src, folder = tmp_path / "app.db", tmp_path / "bk"
    folder.mkdir()
    make(src)
    inc.incremental(src, folder, keep=1)
    make(src, rows=1)
    r = inc.incremental(src, folder, keep=1)
    assert r.kind == "base" and r.merged
    (point,) = inc.list_points(folder)
    assert point.path == r.path
    # the delta it wrote, and the base the merge wrote
    assert r.bytes_written > point.size
    assert r.pages_written > point.stored_pages


def test_a_dangling_link_as_dest_is_refused_for_what_it_is(tmp_path):
    src, folder = tmp_path / "app.db", tmp_path / "bk"
    folder.mkdir()
    make(src)
    inc.incremental(src, folder)
    dest = tmp_path / "dest.db"
    os.symlink(tmp_path / "nowhere" / "x.db", dest)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="symbolic link to nothing"):
            inc.restore(folder, dest, overwrite=overwrite)
    assert os.path.islink(dest)
