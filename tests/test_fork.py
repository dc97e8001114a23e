"""docs/locking.md: objects inherited through os.fork() never call into SQLite in
the child -- not in dealloc, not at exit -- and using them raises
ForkingViolationError, which names fork.

Found in review: a child that only called sys.exit(0) during a backup ran
finalizers that rolled back the parent's backup through the inherited
handles; the parent's next step failed with IOError and the destination
was left corrupt (1 row of 3000).  Every case runs in a subprocess that
forks, bounded in time.
"""

import os
import sqlite3

import pytest
from attack_helpers import child_env
from child_process import run_bounded, run_child

import apsw_backup

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
    proc = run_bounded(PARENT, tmp_path, child_does, timeout=60)
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


# -- forks at the moments the trust review found (run_child: bounded) ------
#
# Each script forks at a chosen moment -- inside a busy handler, while
# another thread holds a connection or settles what was let go of -- and
# checks that the child never changes the parent's databases and that what
# it makes itself works.  The fork's moments are built with events, never
# with sleeps; a thread inside SQLite at the fork is always parked in a
# Python callback (a busy handler, a hook), so the child never inherits a
# mutex of SQLite's own held mid-call.

HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)

# x holds an open write transaction: an INSERT ... RETURNING read to its
# first row, big enough to spill pages into the file (only its journal can
# undo them).  Thread U is inside x (a long query, in a call made from z's
# busy handler); the main thread, in a's busy handler, lets go of that
# cursor, then forks -- after U left x ("after_release") or while U is
# still inside it ("while_busy").  The parent never commits after the
# fork: it dies (os._exit).  So whatever the file holds at the end was
# committed before the fork -- or by the child, which must never happen.
STATEMENT_LET_GO_BEFORE_FORK = """
import sqlite3, threading, time
import apsw_backup as ab
d, moment, child_does = sys.argv[1:4]
P = lambda n: os.path.join(d, n)
x = ab.Connection(P("x.db"))
x.execute("PRAGMA cache_size=5; CREATE TABLE t(v); INSERT INTO t VALUES (0)")
a = ab.Connection(P("a.db"))
a.execute("CREATE TABLE t(v)")
z = ab.Connection(P("z.db"))
z.execute("CREATE TABLE t(v)")
holder = [x.execute(
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<300) "
    "INSERT INTO t SELECT randomblob(3000) FROM n RETURNING rowid")]
LONG = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i<100000000) SELECT count(*) FROM n")
u_in_x, u_left_x, finish_u = threading.Event(), threading.Event(), threading.Event()
def z_handler(n):
    u_in_x.set()
    try:
        x.execute(LONG).fetchall()
    except ab.Error:
        pass
    u_left_x.set()  # still inside z's call
    finish_u.wait(20)
    return False
z.set_busy_handler(z_handler)
wz = sqlite3.connect(P("z.db"), isolation_level=None, check_same_thread=False)
wz.execute("BEGIN EXCLUSIVE")
def U():
    try:
        z.execute("INSERT INTO t VALUES (1)")
    except ab.Error:
        pass
threading.Thread(target=U, daemon=True).start()
assert u_in_x.wait(10)
def busy(c):
    try:
        c.get_autocommit()
    except ab.ThreadingViolationError:
        return True
    return False
while not busy(x):
    time.sleep(0.001)
time.sleep(0.05)  # U past its prepare, inside sqlite3_step
wa = sqlite3.connect(P("a.db"), isolation_level=None, check_same_thread=False)
wa.execute("BEGIN EXCLUSIVE")
parent = os.getpid()
def committed():
    reader = sqlite3.connect(P("x.db"), timeout=0)
    try:
        return reader.execute("SELECT count(*) FROM t").fetchall()[0][0]
    except sqlite3.OperationalError:
        return "locked"
    finally:
        reader.close()
def journal():
    try:
        st = os.stat(P("x.db-journal"))
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
def leave_x():
    while not u_left_x.is_set():
        x.interrupt()
        u_left_x.wait(0.01)
def a_handler(n):
    holder.clear()  # x is busy in U: left to U (or deferred)
    if moment == "after_release":
        leave_x()
    before = (committed(), journal())
    pid = os.fork()
    if pid == 0:
        if child_does == "reopen":
            x.close(force=True)
            try:
                x.__init__(P("x.db"))
            except ab.ForkingViolationError:
                pass
        elif child_does == "close_all":
            for c in (x, a, z):
                c.close(force=True)
        elif child_does == "exit":
            sys.exit(0)  # finalizers, at exit
        return False  # the call a was making returns in the child
    _, status = os.waitpid(pid, 0)
    report("CHILD_EXIT", os.waitstatus_to_exitcode(status))
    report("AT_FORK", before[0])
    report("CHILD_LEFT_ALONE", (committed(), journal()) == before)
    if moment == "while_busy":
        leave_x()
    os._exit(0)  # the parent dies with whatever is uncommitted
a.set_busy_handler(a_handler)
try:
    a.execute("INSERT INTO t VALUES (1)")
except BaseException:
    pass
os._exit(0)  # the child, once a's call returned
"""


def final_count(tmp_path):
    check = sqlite3.connect(str(tmp_path / "x.db"))
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return check.execute("SELECT count(*) FROM t").fetchall()[0][0]
    finally:
        check.close()


@pytest.mark.skipif(not HAS_RETURNING, reason="needs RETURNING (SQLite 3.35)")
@pytest.mark.parametrize("moment", ["after_release", "while_busy"])
@pytest.mark.parametrize("child_does", ["reopen", "close_all", "exit"])
def test_statement_let_go_before_fork_is_never_finalized_by_the_child(
    tmp_path, moment, child_does
):
    """B.6 of the trust review: a deferred statement finalize survived the
    fork; after close(force=True) and __init__ in the child, the drain
    finalized the parent's statement there and committed the parent's open
    transaction into its file."""
    report = run_child(STATEMENT_LET_GO_BEFORE_FORK, tmp_path, moment, child_does)
    assert report["CHILD_EXIT"] == 0
    assert report["CHILD_LEFT_ALONE"] is True, report
    if moment == "after_release":
        # Nothing was committed after the fork but by the child: none.
        expected = 1 if report["AT_FORK"] == "locked" else report["AT_FORK"]
        assert final_count(tmp_path) == expected, report
    else:
        assert final_count(tmp_path) in (1, 301)


# A call whose busy handler forks (another process holds the file); the
# user's handler, in the child, keeps answering "retry" (it is the
# parent's code, run on).  The parent gives up, finishes or rolls back,
# and lets the other process go; the child must not carry on the parent's
# SQLite call.
FORK_IN_BUSY_HANDLER = """
import subprocess, time
import apsw_backup as ab
d, where = sys.argv[1:3]
P = lambda n: os.path.join(d, n)
src = ab.Connection(P("s.db"))
src.execute("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
            "SELECT i+1 FROM n WHERE i<100) INSERT INTO t SELECT randomblob(3000) FROM n")
dst = ab.Connection(P("d.db"))
dst.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)")
LOCKER = ("import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], "
          "isolation_level=None); c.execute('BEGIN EXCLUSIVE'); "
          "print('locked', flush=True); time.sleep(60)")
def lock(name):
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, P(name)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc
parent = os.getpid()
children = []
def handler(n):
    if os.getpid() != parent:
        time.sleep(0.01)
        return n < 1000  # the child: retry, for up to 10 s
    if n == 0:
        pid = os.fork()
        if pid == 0:
            return True
        children.append(pid)
    return False
def outcome(call):
    try:
        call()
        return "returned"
    except BaseException as exc:
        return type(exc).__name__
if where == "backup_source_busy":
    b = dst.backup("main", src, "main")
    b.step(1)  # the destination is the backup's now
    locker = lock("s.db")
    src.set_busy_handler(handler)
    out = outcome(lambda: b.step(-1))
elif where == "backup_dest_busy":
    dst.set_busy_handler(handler)
    b = dst.backup("main", src, "main")
    locker = lock("d.db")
    out = outcome(lambda: b.step(-1))
else:
    dst.set_busy_handler(handler)
    locker = lock("d.db")
    out = outcome(lambda: dst.execute("INSERT INTO old VALUES (8)"))
if os.getpid() != parent:
    os._exit(0)
report("PARENT", out)
if where.startswith("backup"):
    outcome(b.finish)  # rolls the destination back
locker.kill()
locker.wait(10)
deadline = time.monotonic() + 5
status = "still running"
while time.monotonic() < deadline:
    pid, st = os.waitpid(children[0], os.WNOHANG)
    if pid:
        status = os.waitstatus_to_exitcode(st)
        break
    time.sleep(0.01)
if status == "still running":
    os.kill(children[0], 9)
    os.waitpid(children[0], 0)
report("CHILD", status)
check = ab.Connection(P("d.db"))
tables = [r[0] for r in check.execute("SELECT name FROM sqlite_master")]
report("DEST_TABLES", tables)
if "old" in tables:
    report("DEST_OLD", check.execute("SELECT n FROM old").fetchall())
"""


@pytest.mark.parametrize(
    "where", ["backup_source_busy", "backup_dest_busy", "execute_write"]
)
def test_child_forked_in_busy_handler_stops_the_parents_call(tmp_path, where):
    """B.7 of the trust review: a child forked inside a busy handler kept
    answering "retry"; SQLite, still inside the parent's call in the child,
    copied and committed into the parent's destination (or made the
    parent's write) after the parent had rolled it back."""
    report = run_child(FORK_IN_BUSY_HANDLER, tmp_path, where)
    assert report["PARENT"] == "BusyError"
    assert report["DEST_TABLES"] == ["old"], report
    assert report["DEST_OLD"] == [(7,)], report
    assert report["CHILD"] == 0, "the child kept the parent's call going"


# The parent forks while another of its threads is in the middle of the
# ownership machinery: reporting the failed finish of a Backup let go of
# while its source was busy (sys.unraisablehook, run by whoever settles
# it), waiting in finish() for a busy source, or holding a connection in a
# busy handler.  In the child (one thread), a new pair's Backup let go of
# while its source is busy must still be finished: its destination usable.
FORK_WHILE_SETTLING = """
import gc, sqlite3, threading, time
import apsw_backup as ab
d, moment = sys.argv[1:3]
P = lambda n: os.path.join(d, n)
LONG = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i<100000000) SELECT count(*) FROM n")
def busy(c):
    try:
        c.get_autocommit()
    except ab.ThreadingViolationError:
        return True
    return False
def pair(tag):
    s = ab.Connection(P(tag + "s.db"))
    s.execute("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
              "SELECT i+1 FROM n WHERE i<40) INSERT INTO t SELECT randomblob(3000) FROM n")
    t = ab.Connection(P(tag + "d.db"))
    t.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)")
    return s, t
def park_in_busy_handler(conn, name, release):
    # A thread inside conn, parked in its busy handler until release.
    locker = sqlite3.connect(P(name), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    parked = threading.Event()
    def handler(n):
        parked.set()
        return not release.wait(0.01)
    conn.set_busy_handler(handler)
    def run():
        try:
            conn.execute("INSERT INTO t VALUES (1)")
        except ab.Error:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert parked.wait(10)
    return t, locker

src, dst = pair("p")
b = dst.backup("main", src, "main")
b.step(1)
release = threading.Event()
forked = threading.Event()
if moment == "settling":
    w = sqlite3.connect(P("ps.db"), isolation_level=None)
    w.execute("BEGIN EXCLUSIVE")
    try:
        b.step(1)  # BUSY: its finish will fail, and be reported
    except ab.BusyError:
        pass
    w.rollback()
    in_hook = threading.Event()
    def hook(unraisable):
        in_hook.set()
        forked.wait(10)
    sys.unraisablehook = hook
    u, locker = park_in_busy_handler(src, "ps.db", release)
    del b
    gc.collect()  # left to U
    locker.rollback()
    release.set()  # U lets go of src, finishes b, reports: parked in hook
    assert in_hook.wait(10), "the let-go backup's finish was never reported"
elif moment == "finish_waiting":
    u, locker = park_in_busy_handler(src, "ps.db", release)
    waiter = threading.Thread(target=lambda: b.finish(), daemon=True)
    waiter.start()
    time.sleep(0.05)  # the waiter waits for src (GIL released)
    assert waiter.is_alive()
else:  # "busy_handler"
    u, locker = park_in_busy_handler(src, "ps.db", release)

pid = os.fork()
if pid == 0:
    sys.unraisablehook = sys.__unraisablehook__
    s2, d2 = pair("c")
    b2 = d2.backup("main", s2, "main")
    b2.step(1)
    def V():
        try:
            s2.execute(LONG).fetchall()
        except ab.Error:
            pass
    v = threading.Thread(target=V)
    v.start()
    while not busy(s2):
        time.sleep(0.001)
    del b2
    gc.collect()  # s2 busy in V: left for later
    while v.is_alive():
        s2.interrupt()
        v.join(0.01)
    try:
        d2.execute("SELECT n FROM old").fetchall()
        report("CHILD_DEST", "usable")
    except ab.Error as exc:
        report("CHILD_DEST", type(exc).__name__)
    os._exit(0)
forked.set()
release.set()
if moment != "settling":
    locker.rollback()
u.join(10)
_, status = os.waitpid(pid, 0)
report("CHILD_EXIT", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.parametrize("moment", ["settling", "finish_waiting", "busy_handler"])
def test_child_settles_its_own_let_go_backups_whatever_the_parent_was_doing(
    tmp_path, moment
):
    """B.8 of the trust review: a fork while another thread drained the
    deferred work left the child with `draining = 1` for good: its own
    Backups let go of while busy were never finished, their destinations
    locked for ever.  Nothing of the kind is process-wide any more."""
    report = run_child(FORK_WHILE_SETTLING, tmp_path, moment)
    assert report["CHILD_EXIT"] == 0
    assert report["CHILD_DEST"] == "usable", report


# Another thread of the parent is inside c at the fork: parked in c's busy
# handler, in a binding's lookup of a call on c, or stepping a backup whose
# source is c (parked in c's busy handler).  In the child, c is inherited:
# close(force=True) always works; opening it again is refused (or, if
# allowed, gives a usable connection); a new connection works.
INHERITED_WHILE_BUSY = """
import sqlite3, threading, time
import apsw_backup as ab
d, inside = sys.argv[1:3]
P = lambda n: os.path.join(d, n)
c = ab.Connection(P("c.db"))
c.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
parked, release = threading.Event(), threading.Event()
def handler(n):
    parked.set()
    return not release.wait(0.01)
class Lookup(dict):
    def __getitem__(self, key):
        parked.set()
        release.wait(20)
        return 1
locker = None
if inside in ("busy_handler", "backup_step"):
    locker = sqlite3.connect(P("c.db"), isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    c.set_busy_handler(handler)
if inside == "backup_step":
    dst = ab.Connection(P("d.db"))
    b = dst.backup("main", c, "main")
def U():
    try:
        if inside == "busy_handler":
            c.execute("INSERT INTO t VALUES (2)")
        elif inside == "binding_lookup":
            c.execute("SELECT :k", Lookup()).fetchall()
        else:
            b.step(-1)
    except ab.Error:
        pass
u = threading.Thread(target=U)
u.start()
assert parked.wait(10)
pid = os.fork()
if pid == 0:
    out = []
    def attempt(name, call):
        try:
            result = call()
            out.append(name)
            return result
        except Exception as exc:
            out.append(f"{name}:{type(exc).__name__}")
    attempt("closed", lambda: c.close(force=True))
    attempt("reopened", lambda: c.__init__(P("c.db")))
    if out[-1] == "reopened":
        attempt("used", lambda: c.execute("SELECT count(*) FROM t").fetchall())
    attempt("closed", lambda: c.close(force=True))
    if inside == "backup_step":
        attempt("dest_closed", lambda: dst.close(force=True))
    fresh = ab.Connection(P("fresh.db"))
    attempt("fresh", lambda: fresh.execute("CREATE TABLE z(a); SELECT 1").fetchall())
    report("CHILD", out)
    os._exit(0)
_, status = os.waitpid(pid, 0)
release.set()
u.join(10)
if locker is not None:
    locker.rollback()
report("CHILD_EXIT", os.waitstatus_to_exitcode(status))
report("PARENT_USES_C", c.execute("SELECT count(*) FROM t").fetchall())
"""


@pytest.mark.parametrize("inside", ["busy_handler", "binding_lookup", "backup_step"])
def test_connection_inherited_while_another_thread_was_inside_it(tmp_path, inside):
    """B.9 of the trust review: a connection opened again in a child after a
    fork taken while another thread was inside it stayed "in use" for ever;
    even close(force=True) raised."""
    report = run_child(INHERITED_WHILE_BUSY, tmp_path, inside)
    assert report["CHILD_EXIT"] == 0
    out = report["CHILD"]
    assert out[0] == "closed" and "closed" in out[1:], out
    assert out[1] in ("reopened", "reopened:ForkingViolationError"), out
    if out[1] == "reopened":
        assert "used" in out, out  # usable if it may be opened again
    assert not any(step.startswith("dest_closed:") for step in out), out
    assert "fresh" in out, out
    assert report["PARENT_USES_C"][0][0] >= 1


def test_reopening_an_inherited_connection_is_refused_and_says_fork(tmp_path):
    """The choice made for B.9 (src/README.md, "Fork"): an inherited object
    is inert for ever; __init__ on it says why and what to do."""
    script = """
import apsw_backup as ab
c = ab.Connection(os.path.join(sys.argv[1], "c.db"))
pid = os.fork()
if pid == 0:
    c.close(force=True)
    try:
        c.__init__(os.path.join(sys.argv[1], "c.db"))
        report("REOPEN", "allowed")
    except ab.ForkingViolationError as exc:
        report("REOPEN", str(exc))
    os._exit(0)
os.waitpid(pid, 0)
"""
    report = run_child(script, tmp_path)
    assert "fork" in report["REOPEN"] and "new Connection" in report["REOPEN"]
    assert issubclass(apsw_backup.ForkingViolationError, apsw_backup.Error)


CHILD_CARRIES_ON_IN_A_CALLBACK = """
import sqlite3, time
import apsw_backup as ab
d = sys.argv[1]
P = lambda n: os.path.join(d, n)
a = ab.Connection(P("a.db")); a.execute("CREATE TABLE t(v)")
w = sqlite3.connect(P("a.db"), isolation_level=None); w.execute("BEGIN EXCLUSIVE")
LONG = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
        "WHERE i<3000000) SELECT count(*) FROM n")
def handler(n):
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        report("CHILD_EXIT", os.waitstatus_to_exitcode(status))
        return False
    # The child carries on from inside the busy handler, with objects of
    # its own: they are not inside any call of the child's.
    s2 = ab.Connection(P("s2.db"))
    s2.execute("CREATE TABLE t(x); INSERT INTO t VALUES (randomblob(5000))")
    d2 = ab.Connection(P("d2.db"))
    b2 = d2.backup("main", s2, "main"); b2.step(1)
    v = threading.Thread(target=lambda: s2.execute(LONG).fetchall()); v.start()
    while True:
        try:
            s2.get_autocommit(); time.sleep(0.001)
        except ab.InUseError:
            break
    try:
        b2.finish(); report("FINISH", "waited and finished")
    except ab.Error as e:
        report("FINISH", type(e).__name__)
    v.join()
    os._exit(0)
a.set_busy_handler(handler)
try:
    a.execute("INSERT INTO t VALUES (1)")
except ab.Error:
    pass
"""


def test_a_child_forked_in_a_callback_is_not_inside_a_call_of_its_own(tmp_path):
    # The count of locks a thread holds starts again at 0 in a child: the
    # parent's objects are inert there, so a finish() of the child's own
    # backup waits for the child's other thread like anywhere else
    # (src/README.md, "Fork").
    report = run_child(CHILD_CARRIES_ON_IN_A_CALLBACK, tmp_path)
    assert report["FINISH"] == "waited and finished", report
    assert report["CHILD_EXIT"] == 0


# ----------------------------------------------------------------------------
# Fork (docs/locking.md): a Backup claimed by another thread at the moment
# of fork(), and an inherited Connection reopened in the child.
#
# A2: a Backup claimed by another thread's finish (or restart) at the moment
# of fork() is never released in the child: finish()/close(force=True)/
# __exit__ there wait for ever.
# A3: a child that reopens an inherited Connection object (close(force=True),
# then __init__) revives the parent's Cursors and Backups, which then call
# into the parent's SQLite state (the destination ends up corrupt).
#
# Every case runs in a subprocess that
# forks, bounded in time.


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
    proc = run_bounded(
        FORK_DURING_FINISH, tmp_path, action, timeout=60, env=child_env(tmp_path)
    )
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
    proc = run_bounded(REOPEN_IN_CHILD, tmp_path, timeout=60, env=child_env(tmp_path))
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


FORK_IN_BUSY_HANDLER_CHILD_EXITS = """
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
    proc = run_bounded(
        FORK_IN_BUSY_HANDLER_CHILD_EXITS, tmp_path, timeout=60, env=child_env(tmp_path)
    )
    assert "CHILD 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# ----------------------------------------------------------------------------
# A progress callback of copy() that forks: the child's copy() stops, and its
# clean-up removes nothing of the parent's new file, which the parent puts
# in place complete.


def make_copy_source(path, rows=50):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t(x)")
    conn.executemany("INSERT INTO t VALUES (randomblob(2000))", [()] * rows)
    conn.commit()
    conn.close()


FORK_IN_PROGRESS = """
import apsw_backup, sqlite3
folder = sys.argv[1]
source, target = os.path.join(folder, "s.db"), os.path.join(folder, "out.db")
when = sys.argv[2]
parent = os.getpid()
calls = []

def progress(status, remaining, total):
    calls.append(status)
    due = status == apsw_backup.SQLITE_DONE if when == "done" else len(calls) == 3
    if due and os.getpid() == parent:
        pid = os.fork()
        if pid == 0:
            return  # the child goes on inside copy()
        os.waitpid(pid, 0)
        report("after_child", sorted(os.listdir(folder)))

try:
    apsw_backup.copy(source, target, pages=20, progress=progress)
    outcome = "ok"
except BaseException as exc:
    outcome = type(exc).__name__
if os.getpid() != parent:
    os._exit(0)
report("outcome", outcome)
conn = sqlite3.connect(target)
report("check", conn.execute("PRAGMA integrity_check").fetchone()[0])
report("rows", conn.execute("SELECT count(*) FROM t").fetchone()[0])
conn.close()
report("files", sorted(os.listdir(folder)))
"""


def test_a_child_forked_in_a_progress_callback_leaves_the_parents_copy(tmp_path):
    make_copy_source(str(tmp_path / "s.db"), rows=300)
    for when in ("middle", "done"):
        for name in os.listdir(tmp_path):
            if name != "s.db":
                os.remove(tmp_path / name)
        result = run_child(FORK_IN_PROGRESS, tmp_path, when)
        assert any(".partial" in name for name in result["after_child"]), result
        assert result["outcome"] == "ok", result
        assert result["check"] == "ok"
        assert result["rows"] == 300
        assert result["files"] == ["out.db", "s.db"]


# The busy handler of an autocommit write forks while the commit waits for
# readers to go (the journal written, the database not yet).  The child's
# handler returns: any way back goes through SQLite, whose giving up would
# roll the parent's transaction back in the child -- deleting the parent's
# journal under it.  The child ends there instead (status 0, a line on
# stderr); the parent's commit goes on, and its journal stayed in place.
FORK_AT_COMMIT = """
import sqlite3, time
import apsw_backup as ab
d = sys.argv[1]
path = os.path.join(d, "w.db")
a = ab.Connection(path)
a.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
reader = sqlite3.connect(path, isolation_level=None)
reader.execute("BEGIN")
reader.execute("SELECT count(*) FROM t").fetchall()
parent = os.getpid()
state = {}
def handler(n):
    if os.getpid() != parent:
        return True          # the child falls through, into SQLite's call
    if n == 0:
        pid = os.fork()
        if pid == 0:
            return True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                state["child"] = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            state["child"] = "still running"
        state["journal"] = os.path.exists(path + "-journal")
        reader.execute("ROLLBACK")
    return n < 100
a.set_busy_handler(handler)
a.execute("INSERT INTO t VALUES (2)").fetchall()
report("CHILD", state["child"])
report("JOURNAL_KEPT", state["journal"])
report("ROWS", a.execute("SELECT x FROM t ORDER BY x").fetchall())
report("CHECK", a.execute("PRAGMA integrity_check").fetchall())
"""


def test_child_forked_at_commit_ends_without_touching_the_parents_files(tmp_path):
    report = run_child(FORK_AT_COMMIT, tmp_path)
    assert report["CHILD"] == 0
    assert report["JOURNAL_KEPT"] is True, "the child rolled the parent back"
    assert report["ROWS"] == [(1,), (2,)]
    assert report["CHECK"] == [("ok",)]
    assert "forked inside a busy handler" in report["_stderr"]


# restore() forked before it has made anything (a destructor the garbage
# collector ran while it read DEST's header, simulated here): the child
# carries on the parent's call from there, and must not restore into the
# parent's DEST -- it stops, touching nothing; the parent restores.
FORK_IN_RESTORE = """
import hashlib, sqlite3, time
from apsw_backup import files
from apsw_backup import incremental as inc
d = sys.argv[1]
src, dest, folder = (os.path.join(d, n) for n in ("s.db", "d.db", "points"))
os.mkdir(folder)
for path, rows in ((src, 300), (dest, 1)):
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (?)", [(os.urandom(200),) for _ in range(rows)])
    c.commit()
    c.close()
inc.incremental(src, folder)
digest = lambda: hashlib.sha256(open(dest, "rb").read()).hexdigest()
parent = os.getpid()
state = {}
real = files.read_header
def forking(*args, **kwargs):
    out = real(*args, **kwargs)
    if os.getpid() == parent and "child" not in state:
        before = digest()
        pid = os.fork()
        if pid == 0:
            return out  # the child carries on restore()
        _, status = os.waitpid(pid, 0)
        state["child"] = os.waitstatus_to_exitcode(status)
        state["unchanged"] = digest() == before
    return out
files.read_header = forking
try:
    inc.restore(folder, dest, overwrite=True)
except BaseException as exc:
    if os.getpid() != parent:
        sys.stderr.write(f"CHILD {type(exc).__name__}: {exc}\\n")
        os._exit(7 if isinstance(exc, __import__("apsw_backup").ForkingViolationError) else 8)
    raise
if os.getpid() != parent:
    os._exit(9)  # the child restored: the defect
report("CHILD", state["child"])
report("UNCHANGED", state["unchanged"])
c = sqlite3.connect(dest)
report("ROWS", c.execute("SELECT count(*) FROM t").fetchone()[0])
"""


def test_child_forked_in_restore_stops_touching_nothing(tmp_path):
    report = run_child(FORK_IN_RESTORE, tmp_path)
    assert report["CHILD"] == 7, report["_stderr"][-2000:]
    assert report["UNCHANGED"] is True
    assert report["ROWS"] == 300
    assert "forked during it" in report["_stderr"]
