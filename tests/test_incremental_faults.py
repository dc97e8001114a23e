"""Every SQLite I/O call of an incremental run and of a restore failing in
turn (the I/O sweep covers --incremental and restore).

tests/faults/faultshim.c wraps the default VFS (the source, the restored
DEST and its checks go through it); for each route and each kind of call a
counting run, then runs with the Nth call failing (once, and from then on)
for a sample of N.  After each run: a clear exception or a sound result;
every restore point in the folder verifies, the points made before still
restore to their own state, nothing but points is left in the folder, and
a DEST is absent, old, or the restored state -- never anything else.
"""

import os
import shutil
import sqlite3

import pytest
from faults import shim

import apsw_backup
from apsw_backup import incremental as inc

pytestmark = pytest.mark.heavy  # a few hundred runs: not for valgrind

SAMPLE = 6  # fault points per (route, call kind, once/persistent)
EXPECTED = (apsw_backup.Error, OSError, inc.IncrementalError)


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    loaded = shim.load(tmp_path_factory.mktemp("faultshim"))
    loaded.register_vfs()
    loaded.check_same_sqlite()
    yield loaded
    loaded.disarm()


def fill(path, rows=3000):
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(100)) for i in range(rows))
    )
    db.commit()
    db.close()


def rows_of(path):
    # read-write: a failed write into an existing DEST leaves a hot journal
    # that the next connection rolls back (a read-only one could not)
    conn = apsw_backup.Connection(str(path))
    try:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        return conn.execute(
            "SELECT count(*), sum(length(v)), total(id) FROM t"
        ).fetchall()
    finally:
        conn.close()


@pytest.fixture
def work(tmp_path):
    """A source with a base and one delta, and the state of each."""
    src = tmp_path / "src.db"
    fill(src)
    folder = tmp_path / "points"
    folder.mkdir()
    inc.incremental(src, folder)
    db = sqlite3.connect(str(src))
    db.execute("UPDATE t SET v=randomblob(100) WHERE id % 200 = 0")
    db.commit()
    db.close()
    inc.incremental(src, folder)
    states = {}
    for p in inc.list_points(folder):
        out = tmp_path / "state.db"
        inc.restore(p.path, out)
        states[p.path] = rows_of(out)
        out.unlink()
    db = sqlite3.connect(str(src))
    db.execute("UPDATE t SET v=randomblob(100) WHERE id % 300 = 1")
    db.commit()
    db.close()
    old = tmp_path / "old.db"
    fill(old, rows=10)
    return tmp_path, src, folder, states, old


def check_after(tmp_path, folder, states):
    names = os.listdir(folder)
    assert all(inc._parse_name(n) for n in names), names
    assert all(r.ok for r in inc.verify_folder(folder)), inc.verify_folder(folder)
    for path, state in states.items():
        out = tmp_path / "check.db"
        inc.restore(path, out)
        assert rows_of(out) == state
        out.unlink()


def run_route(route, tmp_path, src, folder, old):
    if route == "incremental":
        return inc.incremental(src, folder)
    dest = tmp_path / "dest.db"
    if route == "restore-new":
        return inc.restore(folder, dest)
    return inc.restore(folder, dest, overwrite=True)


def sample(count):
    if count <= SAMPLE:
        return list(range(1, count + 1))
    step = (count - 1) / (SAMPLE - 1)
    return sorted({1 + round(i * step) for i in range(SAMPLE)})


@pytest.mark.parametrize("route", ["incremental", "restore-new", "restore-existing"])
@pytest.mark.parametrize("fault", ["open", "read", "write", "sync", "filesize", "lock"])
def test_every_io_fault_leaves_points_sound(faults, work, route, fault):
    tmp_path, src, folder, states, old = work
    dest = tmp_path / "dest.db"
    newest = max(states, key=inc._stamp)

    def prepare():
        for side in ("", "-journal", "-wal", "-shm"):
            if os.path.exists(str(dest) + side):
                os.remove(str(dest) + side)
        if route == "restore-existing":
            shutil.copy(old, dest)
        for p in os.listdir(folder):  # a successful run's new point goes
            path = str(folder / p)
            if path not in states:
                os.remove(path)

    prepare()
    faults.reset(tmp_path)
    faults.count_only()
    run_route(route, tmp_path, src, folder, old)
    calls = faults.calls()[shim.FAULTS[fault][0]]
    faults.disarm()
    expected_rows = rows_of(dest) if route != "incremental" else None
    failures = 0
    for persistent in (False, True):
        for nth in sample(calls):
            prepare()
            faults.reset(tmp_path)
            faults.arm(fault, nth, persistent)
            try:
                run_route(route, tmp_path, src, folder, old)
                outcome = None
            except EXPECTED as exc:
                outcome = exc
                failures += 1
                assert str(exc) and "not an error" not in str(exc)
            finally:
                faults.disarm()
            check_after(tmp_path, folder, states)
            if route == "restore-new":
                if outcome is None:
                    assert rows_of(dest) == expected_rows
                else:
                    assert not dest.exists()
                    assert not [n for n in os.listdir(tmp_path) if ".partial" in n]
            elif route == "restore-existing":
                assert rows_of(dest) in (expected_rows, rows_of(old)), (nth, outcome)
            elif outcome is None:
                assert len(os.listdir(folder)) == len(states) + 1
    assert newest in states
    print(f"{route} {fault}: {calls} calls, {failures} runs failed cleanly")


class Failing:
    """os.<name> failing at its nth call (and, if persistent, later ones)."""

    def __init__(self, real, nth, persistent, err):
        self.real, self.nth, self.persistent, self.err = real, nth, persistent, err
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.nth or (self.persistent and self.calls > self.nth):
            raise OSError(self.err, os.strerror(self.err))
        return self.real(*args, **kwargs)


@pytest.mark.parametrize("route", ["incremental", "restore-new"])
@pytest.mark.parametrize(
    ("name", "err"),
    [("pwrite", 28), ("fsync", 5), ("ftruncate", 5), ("pread", 5), ("link", 28)],
)
def test_every_os_call_of_ours_failing_leaves_points_sound(
    work, monkeypatch, route, name, err
):
    """The files written by apsw_backup itself (points, a new DEST)."""
    tmp_path, src, folder, states, old = work
    dest = tmp_path / "dest.db"
    real = getattr(os, name)
    counter = Failing(real, 0, False, err)
    monkeypatch.setattr(os, name, counter)
    run_route(route, tmp_path, src, folder, old)
    calls = counter.calls
    for p in os.listdir(folder):
        if str(folder / p) not in states:
            os.remove(folder / p)
    if dest.exists():
        dest.unlink()
    for persistent in (False, True):
        for nth in sample(calls):
            monkeypatch.setattr(os, name, Failing(real, nth, persistent, err))
            try:
                run_route(route, tmp_path, src, folder, old)
                outcome = None
            except EXPECTED as exc:
                outcome = exc
            finally:
                monkeypatch.setattr(os, name, real)
            check_after(tmp_path, folder, states)
            leftovers = [n for n in os.listdir(tmp_path) if ".partial" in n]
            leftovers += [n for n in os.listdir(folder) if ".partial" in n]
            assert not leftovers, (nth, outcome)
            if route == "restore-new":
                # (complete and renamed into place when only the folder's
                # fsync failed)
                assert dest.exists() == (outcome is None) or name == "fsync", (
                    nth,
                    outcome,
                )
                if dest.exists():
                    rows_of(dest)
                    dest.unlink()
            else:
                for p in os.listdir(folder):
                    if str(folder / p) not in states:
                        # made, or complete and renamed into place when the
                        # folder's fsync failed (kept: it verifies, above)
                        assert outcome is None or name == "fsync", (nth, outcome)
                        os.remove(folder / p)


# The shim's own failed write (EFBIG): tests/test_incremental_attack3.py,
# test_the_shims_failed_write_says_the_os_cause_and_names_the_point.


@pytest.mark.parametrize("route", ["incremental", "restore"])
def test_out_of_memory_in_sqlite_leaves_points_sound(tmp_path_factory, route):
    import json
    import subprocess
    import sys
    from pathlib import Path

    shim_path = shim.build(tmp_path_factory.mktemp("faultshim"))
    child = Path(__file__).with_name("faults") / "oom_incremental.py"
    folder = tmp_path_factory.mktemp("oom")
    proc = subprocess.run(
        [sys.executable, str(child), str(shim_path), route, str(folder / "w")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"\noom {route}: {report['points']} allocations, {report['runs']} runs, {report['outcomes']}"
    )
    assert report["problems"] == []
    assert report["points"] > 10
    assert sum(n for k, n in report["outcomes"].items() if k != "ok") > 0
