"""SPEC 3.7: objects inherited through os.fork() never call into SQLite in
the child -- not in dealloc, not at exit -- and using them raises
ForkingViolationError, which names fork.

Issue 10 defect 6: a child that only called sys.exit(0) during a backup ran
finalizers that rolled back the parent's backup through the inherited
handles; the parent's next step failed with IOError and the destination
was left corrupt (1 row of 3000).  Every case runs in a subprocess that
forks, bounded in time.
"""

import subprocess
import sys
import textwrap

import pytest

PARENT = """
import gc, os, sys
import apsw_backup as ab
d, child_does = sys.argv[1], sys.argv[2]
src = ab.Connection(os.path.join(d, "s.db"))
src.execute(
    "CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
    "SELECT i+1 FROM n WHERE i<3000) INSERT INTO t SELECT randomblob(200) FROM n")
dst = ab.Connection(os.path.join(d, "d.db"))
b = dst.backup("main", src, "main")
b.step(20)
cur = src.execute("SELECT x FROM t")
cur.fetchone()
pid = os.fork()
if pid == 0:
    try:
        exec(child_does)
    except BaseException as exc:
        if not isinstance(exc, SystemExit):
            os._exit(3)
        raise
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status))
while not b.step(20):
    pass
b.finish()
cur.close()
dst.close()
check = ab.Connection(os.path.join(d, "d.db"))
print("ROWS", check.execute("SELECT count(*) FROM t").fetchall()[0][0])
print("CHECK", check.execute("PRAGMA integrity_check").fetchall()[0][0])
"""

CHILD_ACTIONS = {
    # The defect's reproducer: exit, letting finalizers run.
    "exit": "pass",
    "del_and_collect": "del b, cur, dst, src\ngc.collect()",
    "force_close_all": (
        "b.close(force=True)\ncur.close(force=True)\n"
        "dst.close(force=True)\nsrc.close(force=True)"
    ),
    "cycle_collected": "holder = [b, cur, dst, src]\nholder.append(holder)\n"
    "del b, cur, dst, src, holder\ngc.collect()",
}


def run(tmp_path, child_does):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PARENT), str(tmp_path), child_does],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


@pytest.mark.parametrize("action", sorted(CHILD_ACTIONS))
def test_child_leaves_the_parents_backup_alone(tmp_path, action):
    out = run(tmp_path, CHILD_ACTIONS[action])
    assert out["CHILD"] == "0"
    assert out["ROWS"] == "3000"
    assert out["CHECK"] == "ok"


USES = {
    "step": "b.step(1)",
    "finish": "b.finish()",
    "backup_close": "b.close()",
    "exit_block": "b.__exit__(None, None, None)",
    "execute_source": "src.execute('SELECT 1')",
    "execute_dest": "dst.execute('SELECT 1')",
    "cursor_fetch": "cur.fetchone()",
    "cursor_close": "cur.close()",
    "close": "src.close()",
    "interrupt": "src.interrupt()",
    "new_backup": "ab.Connection(':memory:').backup('main', src, 'main')",
}


@pytest.mark.parametrize("use", sorted(USES))
def test_using_an_inherited_object_raises_forking_violation(tmp_path, use):
    child = (
        "try:\n"
        f"    {USES[use]}\n"
        "except ab.ForkingViolationError as exc:\n"
        "    assert 'fork' in str(exc), exc\n"
        "    sys.exit(0)\n"
        "os._exit(4)\n"
    )
    out = run(tmp_path, child)
    assert out["CHILD"] == "0", "the child was not refused with ForkingViolationError"
    assert out["ROWS"] == "3000"
    assert out["CHECK"] == "ok"


def test_new_connections_in_the_child_work(tmp_path):
    child = (
        "c = ab.Connection(os.path.join(d, 'child.db'))\n"
        "c.execute('CREATE TABLE z(a); INSERT INTO z VALUES (1)')\n"
        "assert c.execute('SELECT a FROM z').fetchall() == [(1,)]\n"
        "c.close()\n"
    )
    out = run(tmp_path, child)
    assert out["CHILD"] == "0"
    assert out["ROWS"] == "3000"


def test_forking_violation_is_a_library_error():
    import apsw_backup

    assert issubclass(apsw_backup.ForkingViolationError, apsw_backup.Error)
    assert "fork" in apsw_backup.ForkingViolationError.__doc__
