"""Findings of the blind attack on incremental backups (round 3).

Each test is the class of a defect the attack found:

- a file only named like a restore point (empty, another program's) set
  the time of the next real point and made every run a new base;
- one database named through a symbolic link and by its own path was two
  sources (a second base, restore of the folder refused, --keep blind);
- a full disk while a point's pages were written was an IncrementalError
  with no errno and no file named;
- the direct read refused a source whose file ends inside its last page,
  which the backup API (and copy()) take;
- a SOURCE name that fits a base's name but not a delta's: the first run
  made a base, every later one was refused;
- bad arguments: restore(at=5) an AttributeError, incremental(timeout=-1)
  a DeadlineError;
- verify --json lacked `path` and `chains` for a usage error.
"""

import json
import math
import os
import sqlite3
import struct
import subprocess
import sys

import pytest

import apsw_backup
from apsw_backup import incremental as inc


def make_source(path, rows=300):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(300))", [()] * rows)
    c.commit()
    c.close()


def change(path, rows=1):
    c = sqlite3.connect(path)
    c.executemany("INSERT INTO t VALUES (randomblob(300))", [()] * rows)
    c.commit()
    c.close()


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "apsw_backup", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("junk", [b"", b"not ours at all" * 100])
def test_a_file_only_named_like_a_point_is_not_one(tmp_path, junk):
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src)
    inc.incremental(src, folder)
    stray = folder / "app-20991231T000000.000000Z.delta.apswb"
    stray.write_bytes(junk)
    change(src)
    r = inc.incremental(src, folder)
    # a delta on the real chain, stamped by the clock, not after the stray
    assert r.kind == "delta", r.reason
    assert not os.path.basename(r.path).startswith("app-2099")
    assert [p.path for p in inc.list_points(folder)][-1] == r.path
    out = tmp_path / "now.db"
    assert inc.restore(folder, out, at=apsw_backup_now()).point == r.path
    assert inc.restore(folder, tmp_path / "newest.db").point == r.path
    # --keep never deletes it, verify still says it is there
    inc.incremental(src, folder, keep=1)
    assert stray.exists()
    reports = inc.verify_folder(folder)
    assert any(str(stray) in r.at_fault for r in reports)


def apsw_backup_now():
    import datetime as dtm

    return dtm.datetime.now(dtm.timezone.utc) + dtm.timedelta(seconds=1)


def test_a_point_damaged_in_its_magic_is_still_reported_as_damaged(tmp_path):
    """The rule above must not hide a real point's damage: one that lost
    its first bytes keeps its end marker and breaks the chain by name."""
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src)
    inc.incremental(src, folder)
    change(src)
    middle = inc.incremental(src, folder).path
    change(src)
    inc.incremental(src, folder)
    with open(middle, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(inc.BrokenChainError) as caught:
        inc.restore(folder, tmp_path / "r.db")
    assert caught.value.path == middle


def test_a_symbolic_link_to_the_source_is_the_same_source(tmp_path):
    real = tmp_path / "data"
    real.mkdir()
    (tmp_path / "srv").symlink_to(real)
    src, alias = real / "app.db", tmp_path / "srv" / "app.db"
    folder = tmp_path / "points"
    folder.mkdir()
    make_source(src)
    inc.incremental(src, folder)
    change(src)
    r = inc.incremental(alias, folder)
    assert r.kind == "delta", r.reason
    restored = tmp_path / "r.db"
    assert inc.restore(folder, restored).point == r.path
    for _ in range(3):
        change(src)
        inc.incremental(alias if _ % 2 else src, folder, keep=1)
    assert len(inc.list_points(folder)) == 1
    proc = cli("restore", folder, tmp_path / "r2.db")
    assert proc.returncode == 0, proc.stderr


def test_the_shims_failed_write_says_the_os_cause_and_names_the_point(tmp_path):
    from child_process import run_child

    report = run_child(
        """
        import resource, signal, sqlite3, subprocess
        from apsw_backup import incremental as inc
        folder = os.path.join(sys.argv[1], "points")
        os.mkdir(folder)
        src = os.path.join(sys.argv[1], "src.db")
        db = sqlite3.connect(src)
        db.execute("CREATE TABLE t(v)")
        db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(1000),)] * 2000)
        db.commit()
        db.close()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        for pages in (-1, 50):  # the direct read, the backup API
            try:
                inc.incremental(src, folder, pages=pages)
                report(f"api{pages}", "made")
            except OSError as exc:
                report(f"api{pages}", [exc.errno, exc.filename])
        proc = subprocess.run(
            [sys.executable, "-m", "apsw_backup", "--incremental", src, folder,
             "--json"], capture_output=True, text=True, timeout=120)
        report("cli", [proc.returncode, proc.stdout])
        report("left", sorted(os.listdir(folder)))
        """,
        tmp_path,
    )
    import errno

    for pages in (-1, 50):
        code, filename = report[f"api{pages}"]
        assert code == errno.EFBIG
        assert filename.startswith(str(tmp_path / "points" / "src-"))
        assert filename.endswith(".base.apswb")
    code, out = report["cli"]
    assert code == 1
    obj = json.loads(out)
    assert obj["error"]["errno"] == errno.EFBIG
    assert (
        "too large" in obj["error"]["message"].lower()
        or "EFBIG" in obj["error"]["message"]
    )
    assert report["left"] == []


def test_a_source_ending_inside_its_last_page_reads_as_the_backup_reads_it(tmp_path):
    src = tmp_path / "app.db"
    make_source(src)
    with open(src, "ab") as f:
        f.write(b"\0" * 100)  # the file ends inside a page
    with open(src, "r+b") as f:  # an old-style header: SQLite sizes by the file
        head = bytearray(f.read(100))
        valid_for = struct.unpack(">I", head[92:96])[0]
        head[92:96] = struct.pack(">I", valid_for + 1000)
        f.seek(0)
        f.write(head)
    full = tmp_path / "full.db"
    apsw_backup.copy(src, full)
    # copy()'s bytes, as a root hash (the source fails quick_check -- "Page
    # 27 is never used" -- so restore() would rightly refuse to put it in
    # place; the points' roots say the same bytes)
    data = full.read_bytes()
    size = struct.unpack(">H", data[16:18])[0]
    manifest = b"".join(
        apsw_backup.page_hash(data[i : i + size]) for i in range(0, len(data), size)
    )
    roots = []
    for pages in (-1, 50):  # the direct read, the backup API
        folder = tmp_path / f"points{pages}"
        folder.mkdir()
        roots.append(inc.incremental(src, folder, pages=pages).root)
    assert roots[0] == roots[1] == inc.root_hash(size, manifest).hex()


def test_a_name_too_long_for_a_delta_is_refused_on_the_first_run(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    # "<stem>-<27-byte stamp>.base.apswb" fits, ".delta.apswb" does not
    stem = "x" * (limit - len("-20261205T000000.000000Z.base.apswb"))
    src, folder = tmp_path / (stem + ".db"), tmp_path / "points"
    folder.mkdir()
    make_source(src, rows=5)
    with pytest.raises(ValueError, match="shorter name"):
        inc.incremental(src, folder)
    assert os.listdir(folder) == []
    proc = cli("--incremental", src, folder)
    assert proc.returncode == 2, proc.stderr


@pytest.mark.parametrize("at", [5, 1.5, b"2026-01-01", object()])
def test_restore_at_of_a_wrong_type_is_a_type_error(tmp_path, at):
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src, rows=5)
    inc.incremental(src, folder)
    with pytest.raises(TypeError, match="at must be a datetime"):
        inc.restore(folder, tmp_path / "r.db", at=at)
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize(
    "call",
    [
        lambda s, f, d: inc.incremental(s, f, timeout=-1),
        lambda s, f, d: inc.incremental(s, f, timeout=math.nan),
        lambda s, f, d: inc.incremental(s, f, timeout="5"),
        lambda s, f, d: inc.incremental(s, f, progress=5),
        lambda s, f, d: inc.incremental(s, f, pages="5"),
        lambda s, f, d: inc.restore(f, d, timeout=-1),
        lambda s, f, d: inc.restore(f, d, progress="x"),
        lambda s, f, d: inc.restore(f, d, overwrite=1),
        lambda s, f, d: inc.restore(f, d, keep_wal="yes"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_made(tmp_path, call):
    src, folder = tmp_path / "app.db", tmp_path / "points"
    folder.mkdir()
    make_source(src, rows=5)
    inc.incremental(src, folder)
    before = sorted(os.listdir(folder))
    with pytest.raises((TypeError, ValueError)) as caught:
        call(src, folder, tmp_path / "r.db")
    assert not isinstance(caught.value, inc.IncrementalError)
    assert sorted(os.listdir(folder)) == before
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize("args", [[], ["missing"], ["points"], ["points", "missing"]])
def test_verify_json_has_the_same_keys_in_every_outcome(tmp_path, args):
    (tmp_path / "points").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "verify", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    obj = json.loads(proc.stdout)
    assert {"ok", "exit_code", "error", "path", "files", "chains"} <= set(obj)
    assert obj["exit_code"] == proc.returncode != 0
