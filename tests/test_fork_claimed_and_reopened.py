"""Fork (docs/locking.md): a Backup claimed by another thread at the moment
of fork(), and an inherited Connection reopened in the child.

A2: a Backup claimed by another thread's finish (or restart) at the moment
of fork() is never released in the child: finish()/close(force=True)/
__exit__ there wait for ever.
A3: a child that reopens an inherited Connection object (close(force=True),
then __init__) revives the parent's Cursors and Backups, which then call
into the parent's SQLite state (the destination ends up corrupt).

Every case runs in a subprocess that
forks, bounded in time.
"""

import subprocess
import sys
import textwrap

import pytest
from attack_helpers import child_env


def run_child(code, args, timeout=60):
    """args: the test's tmp_path, or (tmp_path, more...)."""
    args = args if isinstance(args, tuple) else (args,)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=child_env(args[0]),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


FORK_DURING_FINISH = """
import os, sys, signal, threading, time
import apsw_backup as ab
d, action = sys.argv[1], sys.argv[2]
src = ab.Connection(os.path.join(d, "s.db"))
src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
dst = ab.Connection(os.path.join(d, "d.db"))
b = dst.backup("main", src, "main")
b.step(1)
def busy(c):
    try:
        c.get_autocommit()
    except ab.ThreadingViolationError:
        return True
    return False
q = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
     "WHERE i<30000000) SELECT count(*) FROM n")
tc = threading.Thread(target=lambda: src.execute(q).fetchall())
tc.start()
while not busy(src) and tc.is_alive():
    time.sleep(0.001)
ta = threading.Thread(target=b.finish)  # waits in sqlite3_backup_finish
ta.start()
while not busy(dst) and ta.is_alive():
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    signal.alarm(5)  # the defect: waits for ever
    try:
        if action == "close_force":
            b.close(force=True)
            print("RETURNED", bool(b), flush=True)
        elif action == "finish":
            b.finish()
            print("RETURNED", flush=True)
        else:
            b.__exit__(None, None, None)  # as a with-block entered earlier
            print("RETURNED", flush=True)
    except ab.ForkingViolationError as exc:
        print("FORK ERROR", exc, flush=True)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
# An interrupt that lands before the query's first step is forgotten by
# SQLite when the step begins: keep interrupting until it has stopped.
while tc.is_alive():
    src.interrupt()
    tc.join(0.05)
ta.join()
"""


@pytest.mark.parametrize("action", ["close_force", "finish", "exit"])
def test_fork_while_other_thread_finishes(tmp_path, action):
    proc = run_child(FORK_DURING_FINISH, (tmp_path, action))
    assert "CHILD 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    if action == "close_force":
        assert "RETURNED False" in proc.stdout
    else:
        assert "FORK ERROR" in proc.stdout and "fork" in proc.stdout


REOPEN_IN_CHILD = """
import os, sys
import apsw_backup as ab
d = sys.argv[1]
sp, dp = os.path.join(d, "s.db"), os.path.join(d, "d.db")
src = ab.Connection(sp)
src.execute("PRAGMA page_size=1024")
src.execute("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
            "SELECT i+1 FROM n WHERE i<3000) INSERT INTO t SELECT randomblob(900) FROM n")
dst = ab.Connection(dp)
dst.execute("PRAGMA page_size=1024; PRAGMA cache_size=10")
dst.execute("CREATE TABLE old(y); INSERT INTO old VALUES ('old content')")
b = dst.backup("main", src, "main")
b.step(2000)
cur = src.execute("SELECT x FROM t")
pid = os.fork()
if pid == 0:
    for c, p in ((src, sp), (dst, dp)):
        c.close(force=True)
        try:
            c.__init__(p)
            print("REOPENED", flush=True)
        except ab.ForkingViolationError:
            print("REOPEN REFUSED", flush=True)
    for what, call in (("cursor", cur.fetchone), ("backup", b.finish)):
        try:
            call()
            print("CALLED", what, flush=True)
        except ab.ForkingViolationError:
            print("REFUSED", what, flush=True)
        except BaseException as exc:
            print("OTHER", what, type(exc).__name__, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
while not b.step(500):
    pass
b.finish()
cur.close()
dst.close()
check = ab.Connection(dp)
print("CHECK", check.execute("PRAGMA integrity_check").fetchall()[0][0][:40])
print("ROWS", check.execute("SELECT count(*) FROM t").fetchall()[0][0])
"""


def test_reopened_connection_in_child_does_not_revive_parent_objects(tmp_path):
    proc = run_child(REOPEN_IN_CHILD, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    # An inherited Connection is inert for ever: opening it again is
    # refused (ForkingViolationError), so nothing of the parent's can be
    # revived through it.
    assert proc.stdout.count("REOPEN REFUSED") == 2, proc.stdout
    assert "REOPENED" not in proc.stdout
    # A forced close in the child lets go of the handle's cursors and
    # backups: closed/finished in the child's eyes; never run on the
    # parent's state.
    assert (
        "REFUSED cursor" in proc.stdout
        or "OTHER cursor CursorClosedError" in proc.stdout
    )
    assert "REFUSED backup" in proc.stdout or "CALLED backup" in proc.stdout
    assert "CHECK ok" in proc.stdout
    assert "ROWS 3000" in proc.stdout


FORK_IN_BUSY_HANDLER = """
import os, sys, time
import apsw_backup as ab
p = os.path.join(sys.argv[1], "x.db")
a = ab.Connection(p)
a.execute("CREATE TABLE t(x)")
r = ab.Connection(p)
r.execute("BEGIN; SELECT count(*) FROM t").fetchall()   # a's commit must wait
child = []
def handler(n):
    if n == 0 and not child:
        pid = os.fork()
        if pid == 0:
            sys.exit(0)          # the child only exits...
        child.append(pid)
    return n < 5 and (time.sleep(0.01) or True)
a.set_busy_handler(handler)
try:
    a.execute("BEGIN; INSERT INTO t VALUES (1); COMMIT")
except ab.BusyError:
    pass
deadline = time.time() + 10
while time.time() < deadline:
    pid, status = os.waitpid(child[0], os.WNOHANG)
    if pid:
        print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
        break
    time.sleep(0.05)
else:
    print("CHILD HUNG", flush=True)
    os.kill(child[0], 9)
    os.waitpid(child[0], 0)
"""


def test_child_forked_in_busy_handler_exits(tmp_path):
    proc = run_child(FORK_IN_BUSY_HANDLER, tmp_path)
    assert "CHILD 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
