"""Incremental backups killed with SIGKILL at random moments (docs/incremental.md):
every restore point reported made still restores, the folder never holds a
file that list or the next run would take for a point, and the next run
cleans up and carries on.  Plus the interrupted merge, made deterministic.
"""

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

from apsw_backup import files
from apsw_backup import incremental as inc

CHILD = r"""
import sys, time
from apsw_backup import incremental as inc
src, folder = sys.argv[1], sys.argv[2]
def progress(status, remaining, total):
    time.sleep(0.001)
while True:
    r = inc.incremental(src, folder, pages=40, progress=progress, keep=4,
                        rebase_share=0.3)
    print("made", r.path, flush=True)
    for p in r.deleted + r.merged:
        print("gone", p, flush=True)
"""


def make_source(path, rows=6000):
    db = sqlite3.connect(str(path))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)", ((i, os.urandom(200)) for i in range(rows))
    )
    db.commit()
    db.close()


def writer_step(path, rnd):
    db = sqlite3.connect(str(path), timeout=10)
    for _ in range(20):
        db.execute("UPDATE t SET v=randomblob(200) WHERE id=?", (rnd.randrange(6000),))
    db.commit()
    db.close()


@pytest.mark.heavy
def test_killed_runs_never_leave_a_false_point(tmp_path):
    rnd = random.Random(2112)
    src = tmp_path / "src.db"
    make_source(src)
    folder = tmp_path / "points"
    folder.mkdir()
    made, gone = set(), set()
    for trial in range(14):
        writer_step(src, rnd)
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(src), str(folder)],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + rnd.uniform(0.05, 1.2)
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.01)
            if ready:
                words = proc.stdout.readline().split()
                if len(words) == 2:
                    (made if words[0] == "made" else gone).add(words[1])
                if rnd.random() < 0.5:
                    writer_step(src, rnd)
        proc.send_signal(signal.SIGKILL)
        rest = proc.communicate(timeout=30)[0]
        for line in rest.splitlines():
            words = line.split()
            if len(words) == 2:  # a line cut by the kill is not a report
                (made if words[0] == "made" else gone).add(words[1])
        for name in os.listdir(folder):
            # nothing half-written under a point's name; temporary files
            # only under their own names (removed by the next run)
            assert inc._parse_name(name) or files.is_temporary_name(name), name
        assert all(r.ok for r in inc.verify_folder(folder)), inc.verify_folder(folder)
        present = sorted(inc._stamp(p.path) for p in inc.list_points(folder))
        for path in made - gone:
            chosen = path if os.path.exists(path) else path.replace(".delta.", ".base.")
            if not os.path.exists(chosen):
                # --keep of a run killed before it said so: only ever the
                # oldest points
                assert inc._stamp(path) < present[0], path
                continue
            out = tmp_path / f"r{trial}.db"
            inc.restore(chosen, out)
            check = sqlite3.connect(str(out)).execute("PRAGMA quick_check").fetchone()
            assert check == ("ok",)
            out.unlink()
    r = inc.incremental(src, folder)  # the next run cleans up and carries on
    assert not [n for n in os.listdir(folder) if files.is_temporary_name(n)]
    assert len(made - gone) > 3  # the runs did make points
    full = tmp_path / "full.db"
    inc.restore(r.path, tmp_path / "last.db")
    import apsw_backup

    apsw_backup.copy(str(src), str(full))
    assert (tmp_path / "last.db").read_bytes() == full.read_bytes()


def test_an_interrupted_rebase_leaves_a_twin_the_next_run_removes(tmp_path):
    src = tmp_path / "src.db"
    make_source(src, rows=2000)
    folder = tmp_path / "points"
    folder.mkdir()
    inc.incremental(src, folder)
    writer_step(src, random.Random(1))
    delta = inc.incremental(src, folder)
    assert delta.kind == "delta"
    # the rebase wrote the base of the delta's moment, then was killed
    chain = inc._chain_to(delta.path, str(folder))
    base = inc._materialize(chain, str(folder), "src")
    assert base.root == chain[-1].root and os.path.exists(delta.path)
    assert all(r.ok for r in inc.verify_folder(folder))
    assert inc.restore(folder, tmp_path / "a.db").point in (delta.path, base.info.path)
    writer_step(src, random.Random(2))
    nxt = inc.incremental(src, folder)
    assert not os.path.exists(delta.path)  # the twin is gone
    assert nxt.kind == "delta"
    assert inc._chain_to(nxt.path, str(folder))[0].info.path == base.info.path
    inc.restore(folder, tmp_path / "b.db")
    shutil.copy(src, tmp_path / "plain.db")


def test_a_delta_left_by_an_interrupted_merge_still_restores(tmp_path):
    src = tmp_path / "src.db"
    make_source(src, rows=2000)
    folder = tmp_path / "points"
    folder.mkdir()
    inc.incremental(src, folder)
    writer_step(src, random.Random(1))
    d1 = inc.incremental(src, folder)
    writer_step(src, random.Random(2))
    d2 = inc.incremental(src, folder)
    chain = inc._chain_to(d2.path, str(folder))
    # --keep's merge: the new base of d1's moment is in place and the old
    # base removed; killed before d1 itself was removed
    inc._materialize(chain[:2], str(folder), "src")
    os.remove(chain[0].info.path)
    assert os.path.exists(d1.path)
    inc.restore(d1.path, tmp_path / "d1.db")  # through its base twin
    inc.restore(d2.path, tmp_path / "d2.db")
    assert all(r.ok for r in inc.verify_folder(folder))
    with inc.open_restore_point(d1.path) as conn:
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]


def test_a_forked_child_lets_go_of_nothing_of_the_parents(tmp_path):
    from child_process import run_child

    report = run_child(
        """
        import gc, sqlite3
        import apsw_backup
        from apsw_backup import incremental as inc
        folder = os.path.join(sys.argv[1], "points")
        os.mkdir(folder)
        src = os.path.join(sys.argv[1], "src.db")
        db = sqlite3.connect(src)
        db.execute("CREATE TABLE t(v)")
        db.executemany("INSERT INTO t VALUES (?)", [(os.urandom(100),)] * 500)
        db.commit()
        db.close()
        inc.incremental(src, folder)
        conn = inc.open_restore_point(folder)
        pid = os.fork()
        if pid == 0:
            try:
                conn.close()
            except apsw_backup.Error as exc:
                pass
            del conn
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        report("child", status)
        report("rows", conn.execute("SELECT count(*) FROM t").fetchall())
        conn.close()
        """,
        tmp_path,
    )
    assert report["child"] == 0
    assert report["rows"] == [(500,)]
