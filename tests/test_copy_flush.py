"""copy(flush_every=...): the target written out in slices as the copy goes
(docs/performance.md, gentle on the disk).  The speed effect is measured by
`python benchmarks/run.py --only disk_gentle`; these tests pin what is
flushed, when, through which descriptor, and what a failed flush leaves."""

import asyncio
import errno
import os

import pytest
from copy_helpers import make_source, make_target, query

import apsw_backup
from apsw_backup import acopy, copy, files

DONE, OK = apsw_backup.SQLITE_DONE, apsw_backup.SQLITE_OK
SLICE = 256 * 1024


@pytest.fixture
def source(tmp_path):
    # ~3 MB: a dozen 256 KiB slices.
    return make_source(tmp_path / "source.db", rows=3000, blob=1000)


@pytest.fixture(params=["sync_file_range", "fdatasync"])
def syncs(request, monkeypatch):
    """Every write-out of the target: (size of the file then).  Both ways:
    Linux's sync_file_range, and fdatasync where there is none."""
    seen = []
    if request.param == "fdatasync":
        monkeypatch.setattr(files, "_SYNC_FILE_RANGE", False)
    real_range, real_sync = files._write_range, os.fdatasync

    def write_range(fd, offset, length, start=False):
        done = real_range(fd, offset, length, start)
        if done and start:
            seen.append(os.fstat(fd).st_size)
        return done

    def fdatasync(fd):
        seen.append(os.fstat(fd).st_size)
        real_sync(fd)

    monkeypatch.setattr(files, "_write_range", write_range)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return seen


def rows(path):
    return query(path, "SELECT count(*) FROM t") == [(3000,)]


@pytest.mark.parametrize("value", ["4M", 4.0, True])
def test_flush_every_of_the_wrong_type_is_refused_before_anything_exists(
    tmp_path, source, value
):
    with pytest.raises(TypeError, match="flush_every must be an int"):
        copy(source, tmp_path / "new.db", flush_every=value)
    assert not (tmp_path / "new.db").exists()


def test_negative_flush_every_is_refused(tmp_path, source):
    with pytest.raises(ValueError, match="flush_every must be >= 0"):
        copy(source, tmp_path / "new.db", flush_every=-1)
    assert os.listdir(tmp_path) == ["source.db"]


@pytest.mark.parametrize("run", ["copy", "acopy"])
def test_a_whole_copy_goes_in_slices_under_one_snapshot(tmp_path, source, syncs, run):
    calls = []

    def progress(*args):
        calls.append(args)

    kwargs = dict(progress=progress, flush_every=SLICE)
    if run == "copy":
        result = copy(source, tmp_path / "new.db", **kwargs)
    else:
        result = asyncio.run(acopy(source, tmp_path / "new.db", **kwargs))
    assert rows(tmp_path / "new.db")
    assert result.snapshot and result.restarts == 0
    # One read of the source, written out in slices of SLICE bytes -- and
    # reported as the one step pages=-1 asked for, as the standard library
    # reports it.
    assert [c[0] for c in calls] == [DONE]
    assert result.steps == 1
    # The file lags the copy by up to the target's 1 MiB page cache.
    assert len(syncs) >= 6


def test_stepped_copy_flushes_each_time_the_target_grew_a_slice(
    tmp_path, source, syncs
):
    copy(source, tmp_path / "new.db", pages=16, flush_every=SLICE)
    assert rows(tmp_path / "new.db")
    assert len(syncs) >= 8


@pytest.mark.parametrize("off", [None, 0])
def test_no_flushing_when_turned_off(tmp_path, source, syncs, off):
    calls = []
    result = copy(
        source,
        tmp_path / "new.db",
        flush_every=off,
        progress=lambda *a: calls.append(a),
    )
    assert rows(tmp_path / "new.db")
    assert syncs == []
    assert len(calls) == 1 and result.steps == 1  # pages=-1: one step, as before
    assert not result.snapshot


def test_snapshot_false_keeps_a_whole_copy_in_one_step(tmp_path, source, syncs):
    result = copy(source, tmp_path / "new.db", flush_every=SLICE, snapshot=False)
    assert rows(tmp_path / "new.db") and result.steps == 1


def test_existing_target_is_flushed_through_a_descriptor_already_open(
    tmp_path, source, syncs, monkeypatch
):
    """Closing a descriptor of its own would drop this process's POSIX locks
    on the target (SQLite's, another connection's): copy() opens none."""
    target = make_target(tmp_path / "target.db")
    other = apsw_backup.Connection(str(target))  # this process keeps it open
    opened = []
    real_open = os.open

    def tracking_open(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", tracking_open)
    try:
        copy(source, target, pages=16, flush_every=SLICE)
        assert other.execute("SELECT count(*) FROM t").fetchall() == [(3000,)]
    finally:
        other.close()
    assert not [p for p in opened if os.path.basename(p).startswith("target.db")]
    assert len(syncs) >= 4
    assert rows(target)
    assert query(target, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("kind", ["new", "existing"])
def test_a_failed_flush_is_an_ioerror_and_leaves_the_target_as_it_was(
    tmp_path, source, monkeypatch, kind
):
    target = tmp_path / "target.db"
    if kind == "existing":
        make_target(target)

    def fails(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(files, "_write_range", fails)
    monkeypatch.setattr(os, "fdatasync", fails)
    statuses = []
    with pytest.raises(apsw_backup.IOError, match="writing it out") as info:
        copy(
            source,
            target,
            pages=16,
            flush_every=SLICE,
            progress=lambda s, r, t: statuses.append(s),
        )
    assert info.value.extendedresult == apsw_backup.SQLITE_IOERR | (3 << 8)
    assert statuses[-1] == info.value.extendedresult
    if kind == "new":
        assert os.listdir(tmp_path) == ["source.db"]
    else:
        assert query(target, "SELECT note FROM old") == [("old content",)]
