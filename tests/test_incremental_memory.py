"""The incremental backups' "peak memory <= 64 MB whatever the database size", by
construction (docs/incremental.md, "Memory"): no run holds a table that grows
with the database.  Two proofs:

- no code path reads a point's whole index or manifest (the test-only
  properties _Point.index / _Point.manifest raise while every operation
  runs: base, delta by both paths, a rebase, a --keep merge, both restores,
  open_restore_point, verify, list);
- the peak resident memory of each operation, in a fresh process, does not
  grow with the database: a database of 16 times the pages costs less than
  a few MB more (before, 55-95 bytes a page: 5-9 MB more here).

benchmarks/incremental_memory.py measures the same on databases of up to
millions of pages.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from apsw_backup import _apsw_backup as _c
from apsw_backup import incremental as inc


def make_db(path, pages, page_size=512):
    db = sqlite3.connect(str(path))
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    db.executemany(
        "INSERT INTO t(b) VALUES (randomblob(?))",
        [(page_size * 3 // 4,)] * pages,
    )
    db.commit()
    db.close()


def change(path, every=50):
    db = sqlite3.connect(str(path))
    db.execute(f"UPDATE t SET b = randomblob(length(b)) WHERE id % {every} = 0")
    db.commit()
    db.close()


@pytest.fixture
def no_whole_tables(monkeypatch):
    def refuse(self):
        raise AssertionError("a whole index or manifest was read")

    monkeypatch.setattr(inc._Point, "index", property(refuse))
    monkeypatch.setattr(inc._Point, "manifest", property(refuse))


def test_no_operation_reads_a_whole_index_or_manifest(tmp_path, no_whole_tables):
    src, bk = tmp_path / "src.db", tmp_path / "bk"
    bk.mkdir()
    make_db(src, 2000)
    assert inc.incremental(src, bk).kind == "base"
    for _ in range(2):
        change(src)
        assert inc.incremental(src, bk).kind == "delta"  # the direct read
    change(src)
    conn = _c.Connection(str(src))
    try:  # a Connection as SOURCE: the backup API into the delta shim
        assert inc.incremental(conn, bk).kind == "delta"
    finally:
        conn.close()
    change(src)
    merged = inc.incremental(src, bk, keep=3)  # merges base and first delta
    assert merged.merged
    change(src, every=2)
    assert inc.incremental(src, bk, rebase_share=0.01).kind in ("base", "delta")
    change(src)
    inc.incremental(src, bk, quick_check=True)
    inc.restore(bk, tmp_path / "new.db")
    inc.restore(bk, src, overwrite=True)
    with inc.open_restore_point(bk) as c:
        assert c.execute("SELECT count(*) FROM t").fetchall() == [(2000,)]
    assert all(r.ok for r in inc.verify_folder(bk))
    assert inc.list_points(bk)
    with sqlite3.connect(str(tmp_path / "new.db")) as a:
        assert a.execute("SELECT count(*) FROM t").fetchone() == (2000,)


CHILD = textwrap.dedent(
    """
    import json, sys
    from apsw_backup import incremental as inc
    op, args = sys.argv[1], sys.argv[2:]
    if op == "base" or op == "delta":
        r = inc.incremental(args[0], args[1])
        assert r.kind == op, r.kind
    elif op == "restore":
        inc.restore(args[0], args[1])
    elif op == "overwrite":
        inc.restore(args[0], args[1], overwrite=True)
    elif op == "open":
        with inc.open_restore_point(args[0]) as c:
            c.execute("SELECT sum(length(b)) FROM t").fetchall()
    elif op == "verify":
        assert all(r.ok for r in inc.verify_folder(args[0]))
    with open("/proc/self/status") as f:
        peak = [l for l in f if l.startswith("VmHWM:")][0].split()[1]
    print(json.dumps(int(peak)))  # KiB
    """
)


def peaks(tmp_path, name, pages):
    """Each operation's peak resident memory (KiB), in a fresh process."""
    work = tmp_path / name
    work.mkdir()
    src, bk = work / "src.db", work / "bk"
    bk.mkdir()
    make_db(src, pages)

    def run(op, *args):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, op, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    got = {"base": run("base", src, bk)}
    change(src)
    got["delta"] = run("delta", src, bk)
    got["restore"] = run("restore", bk, work / "new.db")
    got["overwrite"] = run("overwrite", bk, work / "new.db")
    got["open"] = run("open", bk)
    got["verify"] = run("verify", bk)
    return got


@pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="VmHWM: Linux's /proc"
)
@pytest.mark.skipif(
    "asan" in os.environ.get("LD_PRELOAD", "") or "PYTHONMALLOC" in os.environ,
    reason="a sanitizer's allocator keeps freed memory: peaks mean nothing",
)
def test_peak_memory_does_not_grow_with_the_database(tmp_path):
    small = peaks(tmp_path, "small", 10_000)  # 5 MB of 512-byte pages
    large = peaks(tmp_path, "large", 160_000)  # 80 MB
    grown = {op: (large[op] - small[op]) / 1024 for op in small}
    # before: 55-95 bytes a page, 8-14 MB more for 150,000 pages more
    assert all(mb < 4 for mb in grown.values()), grown


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_scratch_file_that_cannot_be_written_fails_the_run_cleanly(
    tmp_path, monkeypatch
):
    """A full disk under a scratch table (/dev/full: every write ENOSPC)
    fails the run as a full disk anywhere: OSError ENOSPC, nothing kept,
    the earlier points intact; a restore leaves no DEST."""
    src, bk = tmp_path / "src.db", tmp_path / "bk"
    bk.mkdir()
    make_db(src, 40_000)  # tables larger than their cached blocks
    inc.incremental(src, bk)
    before = sorted(os.listdir(bk))
    change(src)

    def full(folder):
        return open("/dev/full", "r+b", buffering=0)  # noqa: SIM115

    monkeypatch.setattr(inc, "_scratch", full)
    with pytest.raises(OSError) as caught:
        inc.incremental(src, bk)
    assert caught.value.errno == errno.ENOSPC
    assert sorted(os.listdir(bk)) == before
    with pytest.raises(OSError):  # ENOSPC, or /dev/full refusing ftruncate
        inc.restore(bk, tmp_path / "new.db")
    assert sorted(os.listdir(tmp_path)) == ["bk", "src.db"]  # no DEST, no temp
    monkeypatch.undo()
    assert all(r.ok for r in inc.verify_folder(bk))
    inc.restore(bk, tmp_path / "new.db")


class _FullScratch:
    """_c with every write of a scratch table failing as on a full disk."""

    def __getattr__(self, name):
        value = getattr(_c, name)
        if name not in ("_chain_open", "_check_inherited"):
            return value

        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return full


def test_a_full_disk_under_a_scratch_file_names_its_folder(tmp_path, monkeypatch):
    """A scratch file has no name: a full disk under one is said of the
    folder it is in (TMPDIR for a reader, DEST's folder for a new DEST)."""
    src, bk = tmp_path / "src.db", tmp_path / "bk"
    bk.mkdir()
    make_db(src, 100)
    inc.incremental(src, bk)
    change(src)
    inc.incremental(src, bk)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(inc.tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(inc, "_c", _FullScratch())
    for call in (
        lambda: inc.open_restore_point(bk),
        lambda: inc.restore(bk, src, overwrite=True),
        lambda: inc.verify_point(inc.list_points(bk)[-1].path),
    ):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.ENOSPC
        assert caught.value.filename == str(tmp)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError) as caught:
        inc.restore(bk, out / "new.db")
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename in (str(out), str(out / "new.db"))
    assert os.listdir(out) == []
