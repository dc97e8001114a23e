"""Disk full (docs/api.md#errors-from-step, docs/api.md#backup): a backup whose destination
runs out of space fails with FullError or IOError and a clear message, the
error is sticky, finish() rolls back (reporting the same error), and the
destination keeps its old content and passes integrity_check.

The destination holds an old database of about 100 KB (its journal fits);
the source, about 4 MB, does not fit.  Space runs out three ways:

- RLIMIT_FSIZE in a child process that ignores SIGXFSZ, so a write past the
  limit fails with EFBIG instead of killing it.  SQLite maps EFBIG to
  SQLITE_IOERR_WRITE: IOError.  Three cases: the destination's page cache
  is small, so pages spill into the file while the copy is under way; or
  large, so everything is written when the last step commits; or one step.
- A 600 KB tmpfs mounted in a private mount namespace (unshare), where the
  write fails with ENOSPC: SQLITE_FULL, FullError.  Skipped when no mount
  namespace can be made.
- PRAGMA max_page_count on the destination (in this process, file and
  memory destinations): SQLite's own "database or disk is full", FullError.

The parent checks the destination afterwards with a fresh connection.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from child_process import run_bounded

import apsw_backup

pytestmark = pytest.mark.heavy  # too slow for valgrind

LIMIT = 512 * 1024
TMPFS_SIZE = "600k"
OLD_ROWS = [(n, f"old row {n} " * 40) for n in range(200)]
SQLITE_IOERR_WRITE = apsw_backup.SQLITE_IOERR | (3 << 8)

CHILD = r"""
import json, resource, signal, sys
import apsw_backup

source_path, dest_path, limit, cache_kib, npages = sys.argv[1:]
if int(limit):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
src = apsw_backup.Connection(source_path, apsw_backup.SQLITE_OPEN_READONLY)
dest = apsw_backup.Connection(dest_path)
dest.execute(f"PRAGMA cache_size=-{cache_kib}").fetchall()
report = {"steps": 0}

def describe(exc):
    return {"class": type(exc).__name__, "message": str(exc),
            "result": exc.result, "extendedresult": exc.extendedresult}

backup = dest.backup("main", src, "main")
report["step_error"] = None
try:
    while not backup.step(int(npages)):
        report["steps"] += 1
except apsw_backup.Error as exc:
    report["step_error"] = describe(exc)
report["done"] = backup.done
report["again"] = report["finish"] = None
try:
    backup.step(1)
except apsw_backup.Error as exc:
    report["again"] = describe(exc)
try:
    backup.finish()
except apsw_backup.Error as exc:
    report["finish"] = describe(exc)
report["finished"] = not backup
report["rows_after"] = dest.execute("SELECT n, text FROM old ORDER BY n").fetchall()
dest.close()
src.close()
print(json.dumps(report))
"""

# Runs inside a private mount namespace: a small tmpfs holds the destination,
# which is copied out afterwards for the parent to check.
IN_NAMESPACE = r"""
set -e
mount -t tmpfs -o size="$TMPFS_SIZE" tmpfs "$MNT"
cp "$OLD" "$MNT/dest.db"
env LD_PRELOAD="$CHILD_PRELOAD" "$PYTHON" -c "$CHILD" "$SOURCE" "$MNT/dest.db" 0 "$CACHE" "$NPAGES" > "$OUT/report.json"
cp "$MNT/dest.db" "$OUT/after.db"
if [ -e "$MNT/dest.db-journal" ]; then cp "$MNT/dest.db-journal" "$OUT/after.db-journal"; fi
"""

NAMESPACE_PREFIXES = (
    ["unshare", "--mount", "--propagation", "private"],
    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
)


def without_preload():
    """The environment for unshare/sh/cp: a sanitizer runtime preloaded for
    the tests is handed to the Python child only."""
    env = dict(os.environ)
    env["CHILD_PRELOAD"] = env.pop("LD_PRELOAD", "")
    return env


@pytest.fixture(scope="module")
def namespace_prefix(tmp_path_factory):
    """A command prefix that runs its command in a private mount namespace
    where tmpfs can be mounted, or skip."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = tmp_path_factory.mktemp("probe")
    for prefix in NAMESPACE_PREFIXES:
        proc = subprocess.run(
            [*prefix, "sh", "-c", f'mount -t tmpfs -o size=64k tmpfs "{probe}"'],
            check=False,
            capture_output=True,
            env=without_preload(),
            timeout=30,
        )
        if proc.returncode == 0:
            return prefix
    pytest.skip("cannot mount a tmpfs in a private mount namespace here")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("diskfull") / "source.db"
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, data BLOB)")
    db.executemany("INSERT INTO big(data) VALUES (randomblob(?))", [(4000,)] * 1000)
    db.commit()
    db.close()
    assert os.path.getsize(path) > 7 * LIMIT
    return path


def make_old(path):
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE old(n INTEGER, text TEXT)")
    db.executemany("INSERT INTO old VALUES (?, ?)", OLD_ROWS)
    db.commit()
    db.close()
    assert os.path.getsize(path) < LIMIT / 4
    return path


def check_report(report, error_class, extendedresult):
    """The child's account: the step error, sticky, finish, content."""
    error = report["step_error"]
    assert error is not None, "the copy did not run out of space"
    assert error["class"] == error_class.__name__, error
    assert error["result"] == extendedresult & 0xFF
    assert error["extendedresult"] == extendedresult
    check_message(error["message"])
    assert report["done"] is False
    assert report["again"] == error  # sticky
    assert report["finish"] in (None, error)
    assert report["finished"] is True
    assert report["rows_after"] == [list(row) for row in OLD_ROWS]


def check_message(message):
    lower = message.lower()
    assert "not an error" not in lower
    assert "disk is full" in lower or "disk i/o error" in lower, message
    assert "finish() rolls the destination back" in message


def check_old_content(path):
    conn = apsw_backup.Connection(str(path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("old",)]
        assert conn.execute("SELECT n, text FROM old ORDER BY n").fetchall() == OLD_ROWS
    finally:
        conn.close()


@pytest.mark.parametrize(
    "cache_kib, npages",
    [(256, 50), (65536, 50), (65536, -1)],
    ids=["spills-while-copying", "fails-at-commit", "one-step"],
)
def test_file_size_limit_raises_io_error_and_keeps_old_content(
    source, tmp_path, cache_kib, npages
):
    dest = make_old(tmp_path / "dest.db")
    proc = run_bounded(CHILD, source, dest, LIMIT, cache_kib, npages, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    print(
        f"\ndiskfull RLIMIT_FSIZE [{cache_kib} KiB cache, step {npages}]: "
        f"{report['steps']} steps, then {report['step_error']}; finish: {report['finish']}"
    )
    check_report(report, apsw_backup.IOError, SQLITE_IOERR_WRITE)
    check_old_content(dest)
    assert os.path.getsize(dest) < LIMIT
    assert not os.path.exists(f"{dest}-journal")


@pytest.mark.parametrize(
    "cache_kib, npages",
    [(256, 50), (65536, -1)],
    ids=["spills-while-copying", "one-step"],
)
def test_full_tmpfs_raises_full_error_and_keeps_old_content(
    source, tmp_path, namespace_prefix, cache_kib, npages
):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = without_preload()
    env.update(
        TMPFS_SIZE=TMPFS_SIZE,
        MNT=str(mnt),
        OLD=str(make_old(tmp_path / "old.db")),
        PYTHON=sys.executable,
        CHILD=CHILD,
        SOURCE=str(source),
        CACHE=str(cache_kib),
        NPAGES=str(npages),
        OUT=str(tmp_path),
    )
    proc = subprocess.run(
        [*namespace_prefix, "sh", "-c", IN_NAMESPACE],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    print(
        f"\ndiskfull tmpfs {TMPFS_SIZE} [{cache_kib} KiB cache, step {npages}]: "
        f"{report['steps']} steps, then {report['step_error']}; finish: {report['finish']}"
    )
    check_report(report, apsw_backup.FullError, apsw_backup.SQLITE_FULL)
    assert not (tmp_path / "after.db-journal").exists()
    check_old_content(tmp_path / "after.db")


@pytest.mark.parametrize("dest_name", ["dest.db", ":memory:"])
def test_max_page_count_raises_full_error_and_keeps_old_content(
    source, tmp_path, dest_name
):
    filename = (
        dest_name if dest_name == ":memory:" else str(make_old(tmp_path / dest_name))
    )
    dest = apsw_backup.Connection(filename)
    src = apsw_backup.Connection(str(source), apsw_backup.SQLITE_OPEN_READONLY)
    try:
        if dest_name == ":memory:":
            dest.execute("CREATE TABLE old(n INTEGER, text TEXT)").fetchall()
            dest.executemany("INSERT INTO old VALUES (?, ?)", OLD_ROWS).fetchall()
        dest.execute("PRAGMA max_page_count=100").fetchall()
        backup = dest.backup("main", src, "main")
        with pytest.raises(apsw_backup.FullError) as step_error:
            while not backup.step(20):
                pass
        assert step_error.value.extendedresult == apsw_backup.SQLITE_FULL
        check_message(str(step_error.value))
        with pytest.raises(apsw_backup.FullError) as again:
            backup.step(20)
        assert str(again.value) == str(step_error.value)
        with pytest.raises(apsw_backup.FullError):
            backup.finish()
        assert not backup
        assert dest.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert dest.execute("SELECT n, text FROM old ORDER BY n").fetchall() == OLD_ROWS
    finally:
        dest.close(force=True)
        src.close(force=True)
    if dest_name != ":memory:":
        check_old_content(filename)
