"""copy() says what an existing target holds after a failed write, and it
is true when copy() returns: before any other connection opens the file.

A write that fails in the middle of a copy into an existing file (ENOSPC,
EIO) leaves SQLite's connection unable to roll back: the file is torn, and
only its hot -journal restores it, at the next open.  copy() said "the
target was rolled back to its previous content" while the file was torn
(a full tmpfs: 602 KB of a 8 KB database, the -journal beside it); the
command line rolled the journal back itself, copy() did not.  Now the rule
is in copy() (files.roll_back_hot_journal): it rolls the journal back
before it says so, and when it cannot (every write failing), it says the
target is incomplete and that its -journal restores it.

Each case runs in a child process whose default VFS is the fault shim
(tests/faults), failing every write from the nth on; the parent then looks
at the bytes of the files the child left, with no SQLite in between.
"""

import hashlib
import json
import os
import sqlite3

import pytest
from child_process import run_bounded

CHILD = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from faults import shim
import apsw_backup

folder, source, dest, nth, fault = sys.argv[2:7]
loaded = shim.load(folder + "/build")
loaded.register_vfs(default=True)
loaded.reset(os.path.dirname(dest))
if int(nth):
    loaded.arm(fault, int(nth), True)
else:
    loaded.count_only()
try:
    apsw_backup.copy(source, dest, verify=None, flush_every=None)
    out = {"error": None}
except apsw_backup.Error as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
out["writes"] = loaded.calls()["write"]
loaded.disarm()
print(json.dumps(out))
"""

OLD = [(n, f"old row {n} " * 20) for n in range(60)]


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make(path, rows, text):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(n INTEGER PRIMARY KEY, v)")
    conn.executemany(
        "INSERT INTO t VALUES (?, ?)", [(n, text * 30) for n in range(rows)]
    )
    conn.commit()
    conn.close()


def run(tmp_path, nth, fault="write-full"):
    tests = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "build").mkdir(exist_ok=True)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    dest = work / "dest.db"
    for name in os.listdir(work):
        os.remove(work / name)
    make(dest, 40, "old ")
    old = digest(dest)
    proc = run_bounded(
        CHILD, tests, tmp_path, tmp_path / "source.db", dest, nth, fault, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), dest, old


@pytest.mark.parametrize("fault", ["write-full", "write"])
def test_what_copy_says_of_an_existing_target_is_true_when_it_returns(tmp_path, fault):
    make(tmp_path / "source.db", 400, "new ")
    counted, _dest, _old = run(tmp_path, 0)
    assert counted["error"] is None
    writes = counted["writes"]
    assert writes > 10
    said = {"rolled back": 0, "incomplete": 0}
    for nth in sorted({1, 2, 3, writes // 4, writes // 2, writes - 2, writes - 1}):
        out, dest, old = run(tmp_path, nth, fault)
        assert out["error"] in ("FullError", "IOError"), (nth, out)
        message = out["message"]
        journal = f"{dest}-journal"
        if "rolled back to its previous content" in message:
            said["rolled back"] += 1
            # true now, with no connection in between: the very old bytes,
            # and no journal left that a later open would have to apply
            assert digest(dest) == old, (nth, message)
            assert not os.path.exists(journal) or os.path.getsize(journal) == 0
        elif "is left incomplete" in message:
            said["incomplete"] += 1
            assert os.path.getsize(journal) > 0, (nth, message)
            assert repr(journal) in message and "Do not delete" in message
            # and the journal does restore it
            conn = sqlite3.connect(dest)
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (40,)
            conn.close()
            assert digest(dest) == old
        else:
            pytest.fail(f"write {nth}: says nothing of the target: {message}")
    # every write failing from the first: nothing was written, nothing torn
    assert said["rolled back"] >= 1
    # every write failing from the middle of the copy on: SQLite cannot roll
    # back even when copy() reopens the file, and says so
    assert said["incomplete"] >= 1, said
