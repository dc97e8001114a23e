"""From the blind attacks on the parallel restore (docs/incremental.md,
"Restoring"): names the OS allows but UTF-8 does not, damage met while a
restore reads the chain, rotation of a damaged chain, what the results
and errors say."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from incremental_helpers import change_blobs, flip, make_blobs

from apsw_backup import incremental as inc


def make(path, rows=3000):
    make_blobs(path, rows)


def change(path):
    change_blobs(path, 211)


def content(path):
    db = sqlite3.connect(os.fsdecode(path))
    try:
        return db.execute("SELECT id, b FROM t ORDER BY id").fetchall()
    finally:
        db.close()


@pytest.mark.parametrize("where", ["source", "folder"])
def test_names_that_are_not_utf8_are_backed_up_and_restored(tmp_path, where):
    """A source (or folder) named with a byte UTF-8 cannot decode: the
    point was made and verified, and could never be restored or opened
    (UnicodeEncodeError naming the shims' paths)."""
    odd = os.fsdecode(b"caf\xe9")
    src = tmp_path / (f"{odd}.db" if where == "source" else "app.db")
    bk = tmp_path / (f"bk{odd}" if where == "folder" else "bk")
    bk.mkdir()
    make(src)
    base = inc.incremental(src, bk)
    change(src)
    delta = inc.incremental(src, bk, quick_check=True)
    assert (base.kind, delta.kind) == ("base", "delta")
    inc.restore(bk, tmp_path / "new.db")
    assert content(tmp_path / "new.db") == content(src)
    live = tmp_path / "live.db"
    make(live)
    inc.restore(bk, live, overwrite=True)
    assert content(live) == content(src)
    conn = inc.open_restore_point(bk)
    try:
        got = conn.execute("SELECT id, b FROM t ORDER BY id").fetchall()
    finally:
        conn.close()
    assert got == content(src)
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "restore", os.fsencode(bk),
         os.fsencode(tmp_path / "cli.db")],
        capture_output=True, text=True, errors="replace", timeout=120,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert content(tmp_path / "cli.db") == content(src)


def a_chain(tmp_path, deltas=1, rows=3000):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make(src, rows)
    points = [inc.incremental(src, bk).path]
    for _ in range(deltas):
        change(src)
        points.append(inc.incremental(src, bk).path)
    return src, bk, points


def page_one(points):
    """The newest point storing page 1, and where page 1 lies in it."""
    for point in reversed(points):
        p = inc._read_point(point)
        fd = p.open()
        try:
            where = list(p.positions(fd, 0, p.info.stored_pages))
        finally:
            os.close(fd)
        if 1 in where:
            return point, p.offset_of(where.index(1))
    raise AssertionError("no point stores page 1")


def test_a_flipped_byte_in_page_one_is_the_damage_it_is(tmp_path):
    """Page 1 of the chain altered: restore into a new DEST said
    CorruptError (exit 1, no file named) -- the overlay its quick_check
    reads failed to open before the chain check spoke."""
    src, bk, points = a_chain(tmp_path)
    damaged, at = page_one(points)
    flip(damaged, at + 120)  # past the header: page 1 still opens as one
    with pytest.raises(inc.BrokenChainError, match="page 1 does not match") as got:
        inc.restore(bk, tmp_path / "new.db")
    assert got.value.path == damaged
    assert not (tmp_path / "new.db").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "restore", str(bk),
         str(tmp_path / "cli.db")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert os.path.basename(damaged) in proc.stderr
    assert not (tmp_path / "cli.db").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_a_file_cut_short_during_a_restore_is_named(tmp_path, existing):
    """The base truncated while a restore read it: the error blamed DEST
    (EIO, "cannot use DEST"), or named the overlay's virtual path."""
    src, bk, points = a_chain(tmp_path, rows=20000)  # 6 MB: 6 progress calls
    dest = tmp_path / "dest.db"
    if existing:
        make(dest)
        before = content(dest)
    calls = []

    def progress(done, total):
        calls.append(done)
        if len(calls) == 1:
            os.truncate(points[0], os.path.getsize(points[0]) // 2)

    with pytest.raises(inc.BrokenChainError) as got:
        inc.restore(bk, dest, overwrite=existing, progress=progress)
    assert got.value.path == points[0]
    if existing:
        assert content(dest) == before
    else:
        assert not dest.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["app.db", "bk"] + (["dest.db"] if existing else [])
    )


def test_an_os_error_reading_the_chain_names_the_chain_not_dest(tmp_path, monkeypatch):
    """An EIO reading a point's pages (the file intact: a failing disk) is
    not DEST's: it names the point, and DEST is not created."""
    src, bk, points = a_chain(tmp_path)

    def gather(*args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(inc._c, "_chain_gather", gather)
    with pytest.raises(OSError) as got:
        inc.restore(bk, tmp_path / "new.db")
    assert got.value.filename == points[-1]
    assert getattr(got.value, "role", None) is None
    assert not (tmp_path / "new.db").exists()


def test_the_caller_s_progress_error_is_not_replaced_by_a_chain_check(
    tmp_path, monkeypatch
):
    src, bk, points = a_chain(tmp_path)
    checked = []
    real = inc._check_chain
    monkeypatch.setattr(
        inc, "_check_chain", lambda *a, **k: (checked.append(1), real(*a, **k))
    )

    class Mine(Exception):
        pass

    def progress(done, total):
        raise Mine()

    for existing in (False, True):
        dest = tmp_path / f"d{existing}.db"
        if existing:
            make(dest)
        checked.clear()
        with pytest.raises(Mine):
            inc.restore(bk, dest, overwrite=existing, progress=progress)
        assert len(checked) <= 1  # the restore's own check, not a second


def points_in(bk):
    return sorted(p for p in os.listdir(bk) if p.endswith(inc.SUFFIX))


def test_keep_counts_a_damaged_older_chain_and_says_it_deletes_nothing(tmp_path):
    """The older chain's base damaged (cut short): --keep 3 with 5 points
    returned success, deleted nothing, said nothing."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    os.truncate(points[0], os.path.getsize(points[0]) - 10)
    change(src)
    inc.incremental(src, bk, max_chain=0)  # a new chain: 4 points
    change(src)
    with pytest.raises(inc.IncrementalError, match="deleted nothing") as got:
        inc.incremental(src, bk, keep=3)
    assert os.path.exists(got.value.kept_point)
    assert len(points_in(bk)) == 5  # nothing deleted


def test_bytes_written_counts_every_base_a_keep_run_merged(tmp_path):
    """keep=1 on base + 3 deltas merges a base per delta: each was written
    (the run reported only the last)."""
    src, bk, points = a_chain(tmp_path, deltas=3)
    base = os.path.getsize(points[0])  # a merged base is about as large
    change(src)
    made = inc.incremental(src, bk, keep=1)
    assert len(made.merged) == 4  # four merges, a base each
    assert len([p for p in points_in(bk) if ".base." in p]) == 1
    assert made.bytes_written > 3.5 * base


def test_a_run_that_finishes_an_interrupted_merge_reports_the_delta(tmp_path):
    """A merge killed after its base was linked in, before the delta was
    removed: the next run removed the delta and reported nothing."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    base = inc._materialize([inc._read_point(p) for p in points[:2]], str(bk), "app")
    twin = points[1]
    assert base.info.path == inc._twin_base(twin)
    os.remove(points[0])  # killed after removing the old base
    change(src)
    made = inc.incremental(src, bk)
    assert twin in made.merged
    assert not os.path.exists(twin)


def test_list_shows_every_file_named_as_a_point(tmp_path):
    """A point that cannot be read (here: not one at all any more, zeros)
    vanished from `list` without a word."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    size = os.path.getsize(points[-1])
    with open(points[-1], "r+b") as f:
        f.write(bytes(size))
    damaged = points[1]
    flip(damaged, os.path.getsize(damaged) - 40)
    proc = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "list", str(bk), "--json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    rows = {r["path"]: r for r in json.loads(proc.stdout)["points"]}
    assert set(rows) == set(points)
    assert rows[points[0]]["problem"] is None
    assert rows[points[-1]]["kind"] == "?"
    assert "not one" in rows[points[-1]]["problem"]
    assert rows[damaged]["kind"] == "?" and rows[damaged]["problem"]
    text = subprocess.run(
        [sys.executable, "-m", "apsw_backup", "list", str(bk)],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    assert os.path.basename(points[-1]) in text
    assert "not listed as a restore point" in text


@pytest.mark.parametrize("how", ["restore", "copy"])
def test_an_interrupt_after_the_commit_says_dest_holds_the_copy(
    tmp_path, monkeypatch, how
):
    """Ctrl-C landing as the last step returned: DEST was replaced, and the
    KeyboardInterrupt said nothing (a caller takes it for 'nothing done')."""
    import importlib

    import apsw_backup

    copymod = importlib.import_module("apsw_backup.copy")

    src, bk, points = a_chain(tmp_path)
    live = tmp_path / "live.db"
    make(live, rows=10)
    real = copymod._Copy.react

    def react(self, outcome, counts=None):
        if outcome == inc._c.SQLITE_DONE:
            raise KeyboardInterrupt
        return real(self, outcome, counts)

    monkeypatch.setattr(copymod._Copy, "react", react)
    with pytest.raises(KeyboardInterrupt) as got:
        if how == "restore":
            inc.restore(bk, live, overwrite=True)
        else:
            apsw_backup.copy(src, live)
    assert got.value.target_state == "complete"
    assert got.value.path == str(live)
    assert content(live) == content(src)


def test_argument_types_are_checked_and_named(tmp_path):
    src, bk, points = a_chain(tmp_path)
    for kwargs, words in [
        ({"quick_check": "no"}, "quick_check must be True or False"),
        ({"keep": True}, "keep must be an int"),
        ({"max_chain": True}, "max_chain must be an int"),
        ({"rebase_share": "1"}, "rebase_share must be a number"),
    ]:
        with pytest.raises(TypeError, match=words):
            inc.incremental(src, bk, **kwargs)
    with pytest.raises(ValueError, match="empty name"):
        inc.incremental(src, "")
    change(src)
    made = inc.incremental(os.fsencode(src), os.fsencode(bk))
    assert made.kind == "delta"


def test_a_dest_ending_with_a_slash_names_a_folder(tmp_path):
    src, bk, points = a_chain(tmp_path)
    with pytest.raises(IsADirectoryError, match="names a folder") as got:
        inc.restore(bk, str(tmp_path / "newdir") + "/")
    assert got.value.target_state == "not created"
    assert not (tmp_path / "newdir").exists()


def test_a_signal_during_a_keep_merge_is_the_exit_status_once_it_is_done(
    tmp_path, monkeypatch, capsys
):
    """SIGTERM while --keep merged: the merge finished (never cut short),
    and the run exited 0 as if no signal had come."""
    import json
    import signal

    from apsw_backup.cli import main

    src, bk, points = a_chain(tmp_path, deltas=2)
    real = inc._materialize

    def materialize(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the command's handler
        return real(*args, **kwargs)

    monkeypatch.setattr(inc, "_materialize", materialize)
    change(src)
    code = main(["--incremental", str(src), str(bk), "--keep", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 128 + signal.SIGTERM
    assert out["exit_code"] == code and not out["ok"]
    assert os.path.exists(out["kept_point"])
    assert "interrupted after it was put in place" in out["error"]["message"]
    assert len(points_in(bk)) == 2  # the merge was done


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_keep_never_deletes_the_parents_of_a_damaged_newest_delta(tmp_path, damage):
    """The newest delta cut short (or its header damaged): the run made a
    new base, and --keep 1 deleted the delta's base and middle delta as an
    older chain -- the delta, once repaired, had no parents left."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    newest = points[-1]
    if damage == "truncated":
        os.truncate(newest, os.path.getsize(newest) // 2)
    else:
        flip(newest, 12)  # the kind
    change(src)
    with pytest.raises(inc.IncrementalError, match="deleted nothing") as got:
        inc.incremental(src, bk, keep=1)
    made = got.value.kept_point
    assert sorted(points_in(bk)) == sorted(os.path.basename(p) for p in points + [made])


@pytest.mark.parametrize("stray", ["text", "copy of the base"])
def test_a_stray_at_a_merge_base_s_name_is_passed_over(tmp_path, stray):
    """A file at <stem>-<a delta's time>.base.apswb that is not the merge's
    base: restore of that delta (and of the points after it) said the
    chain was broken."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    at = inc._twin_base(points[1])
    if stray == "text":
        with open(at, "w") as f:
            f.write("not a restore point\n")
    else:
        with open(points[0], "rb") as f, open(at, "wb") as g:
            g.write(f.read())
    for point in points[1:]:
        dest = tmp_path / f"r-{os.path.basename(point)}.db"
        inc.restore(point, dest)
        conn = inc.open_restore_point(point)
        try:
            got = conn.execute("SELECT id, b FROM t ORDER BY id").fetchall()
        finally:
            conn.close()
        assert content(dest) == got
    assert content(tmp_path / f"r-{os.path.basename(points[-1])}.db") == content(src)


def test_a_merge_whose_base_name_is_taken_says_so(tmp_path):
    """--keep merging a delta whose base name another file holds: a bare
    'File exists (EEXIST): check it'."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    at = inc._twin_base(points[1])
    with open(at, "w") as f:
        f.write("mine\n")
    change(src)
    with pytest.raises(inc.IncrementalError, match="already exists") as got:
        inc.incremental(src, bk, keep=2)
    assert at in str(got.value) and "move that file away" in str(got.value)
    with open(at) as f:
        assert f.read() == "mine\n"


@pytest.mark.parametrize("reader", [inc.list_points, inc.verify_folder])
def test_readers_name_a_folder_that_is_not_one(tmp_path, reader):
    """A missing folder gave the bare '[Errno 2] No such file or directory'."""
    with pytest.raises(FileNotFoundError, match="does not exist: check the path"):
        reader(tmp_path / "nowhere")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        reader(tmp_path / "f")
    with pytest.raises(ValueError, match="empty name"):
        reader("")


@pytest.mark.parametrize("when", ["point", "merge"])
def test_a_new_file_this_run_cannot_reopen_is_its_failure_not_a_broken_chain(
    tmp_path, monkeypatch, when
):
    """.ci/fsfaults, inc-keep, EACCES at the openat of a merge's temporary
    file: exit 3, 'a broken chain', of an intact folder."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    real = inc._read_point
    calls = []

    def read_point(path):
        if path.endswith(".partial"):
            calls.append(path)
            if (when == "point") == (len(calls) == 1):
                exc = PermissionError(13, "Permission denied", path)
                error = inc.BrokenChainError(f"{path!r} cannot be read", path)
                error.os_error = exc
                raise error
        return real(path)

    monkeypatch.setattr(inc, "_read_point", read_point)
    change(src)
    with pytest.raises(PermissionError) as got:
        inc.incremental(src, bk, keep=2)
    assert ".partial" not in got.value.filename
    assert got.value.filename.endswith(inc.SUFFIX)
    if when == "merge":
        assert os.path.exists(got.value.kept_point)
    assert not [p for p in os.listdir(bk) if p.endswith(".partial")]
    monkeypatch.setattr(inc, "_read_point", real)
    assert all(r.ok for r in inc.verify_folder(bk))


def test_an_interrupted_merge_s_damaged_base_does_not_cost_its_delta(tmp_path):
    """A merge killed with its base in place and the delta not yet removed,
    the base then damaged: the next run removed the delta as finished
    business -- the only sound link of the chain -- and the later points
    could never be restored again."""
    src, bk, points = a_chain(tmp_path, deltas=3)
    base = inc._materialize([inc._read_point(p) for p in points[:2]], str(bk), "app")
    p = inc._read_point(base.info.path)
    flip(base.info.path, p.data_offset + 200)  # a page of the merged base
    change(src)
    inc.incremental(src, bk)  # a new base: the newest chain is damaged
    assert os.path.exists(points[1])
    os.remove(base.info.path)  # the cure the message gives
    for point in points:
        inc.restore(point, tmp_path / f"r-{os.path.basename(point)}.db")


def test_a_point_named_at_the_end_of_time_is_named_not_a_traceback(tmp_path):
    src, bk, points = a_chain(tmp_path)
    last = bk / "app-99991231T235959.999999Z.base.apswb"
    with open(points[0], "rb") as f, open(last, "wb") as g:
        g.write(f.read())
    change(src)
    with pytest.raises(inc.IncrementalError, match="year 9999") as got:
        inc.incremental(src, bk)
    assert str(last) in str(got.value)


def test_a_name_whose_time_is_no_time_is_not_a_point_name(tmp_path):
    """Month 13 in a point-like name: list, --incremental and restore --at
    failed with strptime's 'does not match format' (exit 2)."""
    src, bk, points = a_chain(tmp_path)
    odd = bk / "app-20261340T250000.000000Z.base.apswb"
    with open(points[0], "rb") as f, open(odd, "wb") as g:
        g.write(f.read())
    change(src)
    made = inc.incremental(src, bk)
    assert made.kind == "delta"
    assert [p.path for p in inc.list_points(bk)] == [*points, made.path]
    inc.restore(bk, tmp_path / "r.db", at="2999-01-01T00:00:00Z")
    assert content(tmp_path / "r.db") == content(src)
    assert odd.exists()


def test_the_readers_take_bytes_paths(tmp_path):
    src, bk, points = a_chain(tmp_path)
    b = os.fsencode(bk)
    assert [p.path for p in inc.list_points(b)] == points
    assert all(r.ok for r in inc.verify_folder(b))
    inc.restore(b, tmp_path / "r.db")
    inc.restore(os.fsencode(points[-1]), tmp_path / "r2.db")
    conn = inc.open_restore_point(b)
    conn.close()
    assert content(tmp_path / "r.db") == content(tmp_path / "r2.db") == content(src)


def test_a_point_unreadable_after_a_merge_is_an_os_error_not_a_broken_chain(
    tmp_path, monkeypatch
):
    """.ci/fsfaults, inc-keep, EACCES at the openat of a point as the run
    counted the chain after its merge: exit 3 (a broken chain) of an intact
    folder."""
    src, bk, points = a_chain(tmp_path, deltas=2)
    real_rotate, real_read = inc._rotate, inc._read_point
    rotated = []

    def rotate(*args, **kwargs):
        out = real_rotate(*args, **kwargs)
        rotated.append(True)
        return out

    def read_point(path):
        if rotated:
            error = inc.BrokenChainError(f"{path!r} cannot be read", path)
            error.os_error = PermissionError(13, "Permission denied", path)
            raise error
        return real_read(path)

    monkeypatch.setattr(inc, "_rotate", rotate)
    monkeypatch.setattr(inc, "_read_point", read_point)
    change(src)
    with pytest.raises(PermissionError) as got:
        inc.incremental(src, bk, keep=2)
    assert os.path.exists(got.value.kept_point)


def test_a_restore_that_gave_up_on_a_locked_dest_does_not_check_the_chain_again(
    tmp_path, monkeypatch
):
    """A restore whose timeout passed (DEST's writer held it) spent a whole
    second check of the chain after its deadline before saying so."""
    src, bk, points = a_chain(tmp_path)
    live = tmp_path / "live.db"
    make(live, rows=10)
    checks = []
    real = inc._check_chain
    monkeypatch.setattr(
        inc, "_check_chain", lambda *a, **k: (checks.append(1), real(*a, **k))
    )
    writer = sqlite3.connect(str(live), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Exception) as got:
            inc.restore(bk, live, overwrite=True, timeout=0.3)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert getattr(got.value, "gave_up", None) is not None, got.value
    assert len(checks) == 1  # the one before the copy
