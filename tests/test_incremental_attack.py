"""Findings of the blind attack on incremental backups (round 2).

Each test is the class of a defect the attack found, kept small:

- a clock stepped back (or ahead for one run) named a new point before its
  parent: reported as made, never restorable, and `--keep` deleted it;
- a SOURCE name with a newline: its points were invisible (every run a base);
- `--keep 1` merged the run's own delta away and the result still named it;
- a flipped bit in a header's recorded source path made the point another
  database's (restore of the folder refused, the wrong file named);
- another source's unreadable point in a shared folder broke a healthy chain;
- restore(overwrite=True, progress=f): f raising after the only step left
  DEST replaced, against the docstring.
"""

import datetime as dtm
import os
import sqlite3

import pytest

from apsw_backup import incremental as inc


def make_source(path, rows=100):
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


def count(path):
    c = sqlite3.connect(path)
    try:
        return c.execute("SELECT count(*) FROM t").fetchone()[0]
    finally:
        c.close()


class _Shifted(dtm.datetime):
    shift = dtm.timedelta(0)

    @classmethod
    def now(cls, tz=None):
        return dtm.datetime.now(tz) + cls.shift


@pytest.fixture
def clock(monkeypatch):
    """Set clock.shift to move the library's clock (an NTP step, a VM)."""
    monkeypatch.setattr(inc, "datetime", _Shifted)
    _Shifted.shift = dtm.timedelta(0)
    yield _Shifted
    _Shifted.shift = dtm.timedelta(0)


@pytest.mark.parametrize("keep", [None, 2])
def test_a_clock_stepped_back_never_names_a_point_before_its_parent(
    tmp_path, clock, keep
):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    bases = {"max_chain": 0} if keep else {}
    inc.incremental(src, bk, keep=keep, **bases)
    change(src)
    inc.incremental(src, bk, keep=keep, **bases)
    change(src)
    clock.shift = -dtm.timedelta(hours=1)
    made = inc.incremental(src, bk, keep=keep, **bases)
    clock.shift = dtm.timedelta(0)
    assert os.path.exists(made.path), "--keep deleted the point just made"
    assert made.path == sorted(str(p) for p in bk.iterdir())[-1]
    inc.restore(made.path, tmp_path / "r.db")
    assert count(tmp_path / "r.db") == 102
    assert all(r.ok for r in inc.verify_folder(bk))
    change(src)
    after = inc.incremental(src, bk, keep=keep, **bases)
    assert keep or after.kind == "delta"
    inc.restore(bk, tmp_path / "r2.db")
    assert count(tmp_path / "r2.db") == 103


def test_a_clock_that_ran_ahead_once_leaves_the_chain_usable(tmp_path, clock):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    inc.incremental(src, bk)
    change(src)
    clock.shift = dtm.timedelta(days=2)
    inc.incremental(src, bk)
    clock.shift = dtm.timedelta(0)
    for n in range(3):
        change(src)
        made = inc.incremental(src, bk)
        assert made.kind == "delta", made.reason
        inc.restore(made.path, tmp_path / f"r{n}.db")
        assert count(tmp_path / f"r{n}.db") == 102 + n
    assert all(r.ok for r in inc.verify_folder(bk))


def test_a_source_name_with_a_newline_has_its_chain(tmp_path):
    src, bk = tmp_path / "my\ndb.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    first = inc.incremental(src, bk)
    change(src)
    second = inc.incremental(src, bk)
    assert (first.kind, second.kind) == ("base", "delta")
    inc.incremental(src, bk, keep=1)
    assert len(inc.list_points(bk)) == 1
    inc.restore(bk, tmp_path / "r.db")
    inc.restore(inc.list_points(bk)[0].path, tmp_path / "r2.db")
    assert count(tmp_path / "r.db") == count(tmp_path / "r2.db") == 101
    assert [r.ok for r in inc.verify_folder(bk)] == [True]


def test_keep_one_names_the_base_its_delta_was_merged_into(tmp_path):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    inc.incremental(src, bk)
    change(src)
    made = inc.incremental(src, bk, keep=1)
    assert made.merged and made.kind == "base" and made.chain_length == 1
    assert os.path.exists(made.path) and made.path.endswith(".base.apswb")
    inc.restore(made.path, tmp_path / "r.db")
    assert count(tmp_path / "r.db") == 101


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_recorded_source_is_damage_not_another_database(
    tmp_path,
):
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    for _ in range(3):
        inc.incremental(src, bk)
        change(src)
    base = sorted(bk.iterdir())[0]
    header_size = inc._HEADER.size
    _flip(base, header_size + 1)  # a byte of the recorded source path
    with pytest.raises(inc.BrokenChainError) as info:
        inc.restore(bk, tmp_path / "r.db")
    assert info.value.path == str(base), str(info.value)
    newest = sorted(bk.iterdir())[-1]
    with pytest.raises(inc.BrokenChainError) as info:
        inc.restore(newest, tmp_path / "r2.db")
    assert info.value.path == str(base), str(info.value)
    faults = [f for r in inc.verify_folder(bk) for f in r.at_fault]
    assert faults == [str(base)], faults
    assert not (tmp_path / "r.db").exists() and not (tmp_path / "r2.db").exists()


def test_another_sources_unreadable_point_leaves_a_chain_alone(tmp_path):
    (tmp_path / "s1").mkdir()
    (tmp_path / "s2").mkdir()
    s1, s2, bk = tmp_path / "s1" / "app.db", tmp_path / "s2" / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(s1)
    make_source(s2, 50)
    inc.incremental(s1, bk)
    other = inc.incremental(s2, bk)
    change(s1)
    delta = inc.incremental(s1, bk)
    with open(other.path, "r+b") as f:
        f.truncate(20)  # its header can no longer be read
    inc.restore(delta.path, tmp_path / "r.db")
    assert count(tmp_path / "r.db") == 101
    reports = inc.verify_folder(bk)
    assert [r.at_fault for r in reports if not r.ok] == [[other.path]]
    assert [r.ok for r in reports if r.source == str(s1)] == [True]
    change(s1)
    assert inc.incremental(s1, bk).kind == "delta"


@pytest.mark.parametrize("plain", [False, True])
def test_a_progress_that_raises_leaves_an_existing_dest_as_it_was(tmp_path, plain):
    src, bk, live = tmp_path / "app.db", tmp_path / "bk", tmp_path / "live.db"
    bk.mkdir()
    make_source(src, 3000)
    make_source(live, 10)
    if plain:
        import apsw_backup

        apsw_backup.copy(src, tmp_path / "plain.db")
        backup = tmp_path / "plain.db"
    else:
        inc.incremental(src, bk)
        backup = bk
    calls = []

    def cancel(done, total):
        calls.append((done, total))
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        inc.restore(backup, live, overwrite=True, progress=cancel)
    assert calls and calls[0][0] < calls[0][1], calls
    assert count(live) == 10


def test_verify_and_restore_meeting_a_keep_merge_read_again(tmp_path, monkeypatch):
    """Readers take no folder lock (they never hold up a scheduled run): a
    --keep merge that removed points while they read made them report a
    sound folder as damaged.  They read again when a point they met is gone
    and the folder changed."""
    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src, 500)
    inc.incremental(src, bk)
    change(src)
    inc.incremental(src, bk)

    def scheduled_run():
        change(src)
        inc.incremental(src, bk, keep=2)  # merges the base and first delta

    real = inc._verify_pages
    fired = []

    def meanwhile(*args, **kwargs):
        if not fired:
            fired.append(1)
            scheduled_run()
        return real(*args, **kwargs)

    monkeypatch.setattr(inc, "_verify_pages", meanwhile)
    assert [r.ok for r in inc.verify_folder(bk)] == [True]
    assert fired
    fired.clear()
    real_chain_files = inc._ChainFiles

    def chain_files(chain, *args):
        if not fired:
            fired.append(1)
            scheduled_run()
        return real_chain_files(chain, *args)

    monkeypatch.setattr(inc, "_ChainFiles", chain_files)
    inc.restore(bk, tmp_path / "r.db")
    assert fired
    assert count(tmp_path / "r.db") in (502, 503)


def test_a_crafted_page_size_is_refused_as_damage(tmp_path):
    """A point whose header says a page size SQLite cannot have (its hashes
    made to match) is damaged, said so, naming it -- not a ValueError from
    deep inside."""
    import struct

    src, bk = tmp_path / "app.db", tmp_path / "bk"
    bk.mkdir()
    make_source(src)
    point = inc.incremental(src, bk).path
    data = bytearray(open(point, "rb").read())
    fields = list(inc._HEADER.unpack_from(data, 0))
    fields[3] = 3  # page size
    inc._HEADER.pack_into(data, 0, *fields)
    trailer = list(inc._TRAILER.unpack_from(data, len(data) - inc._TRAILER.size))
    data_offset, stored, count = fields[4], fields[6], fields[5]
    index = bytes(data[trailer[1] : trailer[1] + 8 * stored])
    manifest = bytes(data[trailer[2] : trailer[2] + 16 * count])
    trailer[4] = inc.root_hash(3, manifest)
    head = struct.pack(">8sQQ16s16s", *trailer[:5])
    trailer[5] = inc._c.page_hash(bytes(data[:data_offset]) + index + manifest + head)
    inc._TRAILER.pack_into(data, len(data) - inc._TRAILER.size, *trailer)
    open(point, "wb").write(bytes(data))
    (report,) = inc.verify_folder(bk)
    assert not report.ok and report.at_fault == [point]
    assert "page size" in report.problems[0]
    with pytest.raises(inc.BrokenChainError):
        inc.restore(bk, tmp_path / "r.db")
