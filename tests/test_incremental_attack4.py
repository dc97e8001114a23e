"""Findings of the fresh blind attack on incremental backups (round 3,
second helper).  Each test is the class of a defect it found:

- a flipped bit in a header's source-path length gave ValueError
  ("embedded null byte", exit 2) from verify, restore and every later
  --incremental, instead of naming the damaged file;
- restore() into a new DEST failing while it opened the chain's files
  (EMFILE) left DEST's temporary file and a descriptor behind;
- one unreadable point (EACCES) made list and verify of the folder fail;
- --incremental into a folder it may not write named its temporary file;
- an open_restore_point() connection as incremental()'s SOURCE recorded a
  name that never exists (every run a base).
"""

import errno
import os
import sqlite3
import struct

import pytest

from apsw_backup import files
from apsw_backup import incremental as inc


def make_source(path, rows=50):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE IF NOT EXISTS t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(300))", [()] * rows)
    c.commit()
    c.close()


@pytest.fixture
def chain(tmp_path):
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src, rows=200)
    for _ in range(3):
        make_source(src, rows=1)  # a small change: a delta each time
        inc.incremental(src, folder)
    points = inc.list_points(folder)
    assert [p.kind for p in points] == ["base", "delta", "delta"]
    return src, folder, [p.path for p in points]


@pytest.mark.parametrize("bit", range(16))
def test_a_flipped_bit_in_the_path_length_names_the_damaged_point(chain, bit):
    src, folder, paths = chain
    base = paths[0]
    offset = inc._HEADER.size - 2  # the source path length, u16
    with open(base, "r+b") as f:
        f.seek(offset)
        (length,) = struct.unpack(">H", f.read(2))
        f.seek(offset)
        f.write(struct.pack(">H", length ^ (1 << bit)))
    reports = inc.verify_folder(folder)
    assert any(base in r.at_fault for r in reports), reports
    with pytest.raises(inc.BrokenChainError) as caught:
        inc.restore(folder, folder.parent / "r.db")
    assert caught.value.path == base
    make_source(src)
    r = inc.incremental(src, folder)
    assert r.kind == "base" and base in r.reason


def test_restore_failing_to_open_the_chain_leaves_nothing(chain, monkeypatch):
    src, folder, paths = chain
    out = folder.parent / "out"
    out.mkdir()
    real = inc._ChainFiles

    class Failing(real):  # type: ignore[misc,valid-type]
        def __init__(self, chain, *args):
            super().__init__(chain, *args)
            self.close()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(inc, "_ChainFiles", Failing)
    with pytest.raises(OSError) as caught:
        inc.restore(folder, out / "restored.db")
    assert caught.value.errno == errno.EMFILE
    assert os.listdir(out) == []  # DEST's temporary file went too


def test_an_unreadable_point_of_another_source_breaks_neither_list_nor_verify(
    tmp_path, monkeypatch
):
    folder = tmp_path / "points"
    folder.mkdir()
    app, other = tmp_path / "app.db", tmp_path / "other.db"
    make_source(app)
    make_source(other)
    inc.incremental(app, folder)
    locked = inc.incremental(other, folder).path
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if os.fspath(path) == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(inc.os, "open", denied)
    assert [p.stem for p in inc.list_points(folder)] == ["app"]
    reports = {r.stem: r for r in inc.verify_folder(folder)}
    assert reports["app"].ok
    assert not reports["other"].ok and reports["other"].at_fault == [locked]
    assert "permission denied" in reports["other"].problems[0]


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src)

    def create(self):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), self.path)

    monkeypatch.setattr(files.NewFile, "create", create)
    with pytest.raises(PermissionError) as caught:
        inc.incremental(src, folder)
    assert caught.value.filename == str(folder)


def test_a_restore_point_connection_is_no_source(chain):
    src, folder, paths = chain
    with inc.open_restore_point(folder) as conn:
        with pytest.raises(ValueError, match="open_restore_point"):
            inc.incremental(conn, folder)
    assert [p.path for p in inc.list_points(folder)] == paths
