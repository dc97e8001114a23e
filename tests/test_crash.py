"""Crash consistency: a backup killed with SIGKILL at a
random moment leaves its destination either as it was or as a complete copy
of the source -- never anything in between, never corrupt.

A child process (``sys.executable -c CHILD``) copies a source of about 4 MB
into a file that already holds a different database, stepping by 1, 5 or 50
pages (now and then -1) with short sleeps, so the copy is under way for a
a few hundred milliseconds; the dest's page cache (2 MB) is smaller than the
source, so pages spill into the file before the commit.  The parent kills it
after a random delay spread over the copy's measured duration, then opens
the destination afresh (which rolls a hot journal back), runs
integrity_check and compares its content with the old and the new.  The
seed is fixed; outcomes (old / new, killed before or after the child saw
the backup finish, hot journal left) are counted and printed.
"""

import hashlib
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import apsw_backup

pytestmark = pytest.mark.heavy  # too slow for valgrind

TRIALS = 36
SEED = 20240604
SOURCE_ROWS = 1000  # of 4000 random bytes: about 1000 pages, 4 MB
OLD_ROWS = 200

CHILD = r"""
import random, sys, time
import apsw_backup
src_path, dest_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
src = apsw_backup.Connection(src_path, apsw_backup.SQLITE_OPEN_READONLY)
dest = apsw_backup.Connection(dest_path)
backup = dest.backup("main", src, "main")
print("started", flush=True)
while not backup.done:
    backup.step(-1 if rng.random() < 0.01 else rng.choice((1, 5, 50)))
    time.sleep(rng.choice((0.001, 0.003, 0.006)))
backup.finish()
print("finished", flush=True)
sys.stdin.read()  # wait here to be killed
"""


def content_digest(path):
    """integrity_check and a digest of schema and rows, read by a fresh
    Connection (the first read rolls back a hot journal)."""
    conn = apsw_backup.Connection(str(path))
    try:
        check = conn.execute("PRAGMA integrity_check").fetchall()
        digest = hashlib.sha256()
        master = conn.execute(
            "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
        ).fetchall()
        digest.update(repr(master).encode())
        for kind, name, _ in master:
            if kind == "table":
                for row in conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid'):
                    digest.update(repr(row).encode())
        return check, digest.hexdigest()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def databases(tmp_path_factory):
    """(source path, old destination path) built once with sqlite3."""
    base = tmp_path_factory.mktemp("crash")
    source = base / "source.db"
    db = sqlite3.connect(str(source))
    db.execute("CREATE TABLE big(id INTEGER PRIMARY KEY, data BLOB)")
    db.execute("CREATE INDEX big_len ON big(length(data))")
    db.executemany(
        "INSERT INTO big(data) VALUES (randomblob(?))", [(4000,)] * SOURCE_ROWS
    )
    db.commit()
    db.close()
    old = base / "old.db"
    db = sqlite3.connect(str(old))
    db.execute("CREATE TABLE old(n INTEGER, text TEXT)")
    db.executemany(
        "INSERT INTO old VALUES (?, ?)",
        [(n, f"old row {n}" * 20) for n in range(OLD_ROWS)],
    )
    db.commit()
    db.close()
    return source, old


def wait_for_line(proc, expected, timeout=30):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the child did not print {expected!r} within {timeout} s"
    line = proc.stdout.readline()
    assert line.strip() == expected, (
        line,
        proc.stderr.read() if proc.poll() is not None else "",
    )


def start_child(source, dest, seed):
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(source), str(dest), str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def measure_copy_seconds(source, dest, seed):
    """How long the child takes from backup() to finish(), uninterrupted."""
    proc = start_child(source, dest, seed)
    try:
        wait_for_line(proc, "started")
        started = time.monotonic()
        wait_for_line(proc, "finished")
        return time.monotonic() - started
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def test_sigkill_mid_backup_leaves_old_or_complete_copy(tmp_path, databases):
    source, old = databases
    _, new_digest = content_digest(source)
    _, old_digest = content_digest(old)
    assert new_digest != old_digest

    # The longest of three uninterrupted copies (a -1 step shortens some).
    durations = []
    for seed in range(3):
        calibration = tmp_path / "calibrate.db"
        shutil.copy(old, calibration)
        durations.append(measure_copy_seconds(source, calibration, seed))
        assert content_digest(calibration) == ([("ok",)], new_digest)
    duration = max(durations)

    rng = random.Random(SEED)
    outcomes = {"old": 0, "new": 0}
    killed_before_finish = hot_journals = 0
    started_at = time.monotonic()
    for trial in range(TRIALS):
        dest = tmp_path / f"dest{trial}.db"
        shutil.copy(old, dest)
        proc = start_child(source, dest, SEED + trial)
        try:
            wait_for_line(proc, "started")
            time.sleep(rng.uniform(0, duration * 1.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        if "finished" not in out:
            killed_before_finish += 1
        journal = tmp_path / f"dest{trial}.db-journal"
        hot_journals += journal.exists() and journal.stat().st_size > 0
        check, digest = content_digest(dest)
        assert check == [("ok",)], f"trial {trial}: integrity_check {check}"
        assert digest in (old_digest, new_digest), (
            f"trial {trial}: neither old nor new content"
        )
        outcomes["old" if digest == old_digest else "new"] += 1
        if "finished" in out:
            assert digest == new_digest, f"trial {trial}: finished, yet the old content"
        os.remove(dest)
    elapsed = time.monotonic() - started_at
    print(
        f"\ncrash: {TRIALS} SIGKILL trials in {elapsed:.1f} s (copy takes {duration:.2f} s): "
        f"old content {outcomes['old']}, new content {outcomes['new']}; "
        f"{killed_before_finish} killed before finish() returned, "
        f"{hot_journals} left a hot journal"
    )
    # The delays are spread over the copy: both outcomes must occur, or the
    # test is not exercising what it claims to.
    assert outcomes["old"] > 0 and outcomes["new"] > 0
    assert hot_journals > 0
