"""User code run while a call prepares its act, or builds its answer, can
change everything the call checked: never a crash, a hang, two unfinished
backups into one destination, or a call that waits for itself.

src/README.md, "Three phases per method": arguments (and every allocation
that can run the collector) are turned into C values before the locks are
taken and anything is checked; results and exceptions are built after the
locks are let go of.  Each reproducer runs in a child process: before the
design it crashed (SIGSEGV) or hung.
"""

import pytest
from attack_helpers import child_env
from child_process import (
    ARM_COLLECTOR,
    COLLECTOR_RUNS_INSIDE_C_CALLS,
    NO_COLLECTION_INSIDE_C_CALLS,
    run_bounded,
    run_child,
)

import apsw_backup as ab

POPULATE = (
    "CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
    "SELECT i+1 FROM n WHERE i<40) INSERT INTO t SELECT randomblob(3000) FROM n"
)

# Two sources (src, src2) and a destination holding old content; `act` is
# run by the trigger while dst.backup("main", src, "main") is being made;
# then every backup left unfinished into dst is counted, the lock checked,
# each run to its end, and the destination's content classified.
BACKUP_CREATE = (
    ARM_COLLECTOR
    + f"""
import apsw_backup as ab
d, trigger, action = sys.argv[1:4]
P = lambda n: os.path.join(d, n)
src = ab.Connection(P("s.db"))
src.execute({POPULATE!r})
src2 = ab.Connection(P("s2.db"))
src2.execute({POPULATE!r} + "; CREATE TABLE marker(m)")
dst = ab.Connection(P("d.db"))
dst.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)")
made = {{}}
if action == "drop_backup_into_dest":
    made["earlier"] = dst.backup("main", src2, "main")
inside = [False]
ran = []

def act():
    if ran:
        return
    ran.append(inside[0])
    try:
        if action == "close_source":
            src.close()
        elif action == "close_source_force":
            src.close(force=True)
        elif action == "close_dest_force":
            dst.close(force=True)
        elif action == "second_backup_into_dest":
            made["second"] = dst.backup("main", src2, "main")
        elif action == "backup_into_source":
            made["into_source"] = src.backup("main", src2, "main")
        elif action == "drop_backup_into_dest":
            made.pop("earlier")
    except ab.Error as exc:
        report("ACTION_RAISED", type(exc).__name__)

class Name(str):
    def __repr__(self):
        act()
        return str.__repr__(self)

if trigger == "collector":
    call, args = dst.backup, ("main", src, "main")
else:
    call, args = dst.backup, (Name("main"), src, Name("main"))
inside[0] = True
if trigger == "collector":
    arm(act)
try:
    made["b"] = call(*args)
    report("CALL", "made")
except (ab.Error, ValueError) as exc:
    report("CALL", type(exc).__name__)
inside[0] = False
disarm()
report("RAN_INSIDE", ran)

unfinished = [k for k, b in made.items() if b and k != "into_source"]
report("UNFINISHED_INTO_DEST", sorted(unfinished))
if unfinished:
    try:
        dst.execute("SELECT 1").fetchall()
        report("DEST_LOCKED", False)
    except ab.DestinationLockedError:
        report("DEST_LOCKED", True)
    except ab.ConnectionClosedError:
        report("DEST_LOCKED", "closed")
for b in list(made.values()):
    try:
        while b and not b.step(7):
            pass
        b.finish()
    except ab.Error as exc:
        report("FINISH_RAISED", type(exc).__name__)
for c in (src, src2, dst):
    c.close(force=True)
check = ab.Connection(P("d.db"))
names = {{r[0] for r in check.execute("SELECT name FROM sqlite_master")}}
report("CONTENT", "old" if names == {{"old"}} else "src" if names == {{"t"}}
       else "src2" if names == {{"t", "marker"}} else sorted(names))
report("INTEGRITY", check.execute("PRAGMA integrity_check").fetchall()[0][0])
"""
)

ACTIONS = [
    "close_source",
    "close_source_force",
    "close_dest_force",
    "second_backup_into_dest",
    "backup_into_source",
    "drop_backup_into_dest",
]


def check_backup_create(report):
    # Never two unfinished backups into one destination (the first one's
    # finish would unlock it under the second: a partial copy committed),
    # and an unfinished one keeps it locked.
    assert len(report["UNFINISHED_INTO_DEST"]) <= 1, report
    if report["UNFINISHED_INTO_DEST"]:
        assert report["DEST_LOCKED"] is True, report
    assert report["CONTENT"] in ("old", "src", "src2"), report
    assert report["INTEGRITY"] == "ok", report


@pytest.mark.skipif(
    not COLLECTOR_RUNS_INSIDE_C_CALLS, reason=NO_COLLECTION_INSIDE_C_CALLS
)
@pytest.mark.parametrize("action", ACTIONS)
def test_backup_finalizer_run_while_backup_is_made_is_refused_or_safe(tmp_path, action):
    """B.1 of the trust review: the Backup's allocation in backup() ran the
    collector after the checks; a finalizer closing the source crashed in
    the same-file check (SIGSEGV), one starting a second backup into the
    destination left two unfinished backups locking it."""
    report = run_child(BACKUP_CREATE, tmp_path, "collector", action)
    assert report["RAN_INSIDE"] == [True], "the finalizer did not run in the call"
    check_backup_create(report)
    if action in ("close_source", "close_source_force", "close_dest_force"):
        assert report["CALL"] == "ConnectionClosedError", report
    if action == "second_backup_into_dest":
        assert report["CALL"] == "DestinationLockedError", report


@pytest.mark.parametrize("action", ACTIONS)
def test_backup_schema_name_repr_cannot_pull_the_rug(tmp_path, action):
    """B.1 of the trust review: a str subclass as a schema name had its
    __repr__ called (for the Backup's repr) after the checks; one closing
    the source crashed, one starting a second backup into the destination
    left two unfinished.  Names are copied as exact str before anything is
    checked: the outcome is one the checks made."""
    report = run_child(BACKUP_CREATE, tmp_path, "repr", action)
    check_backup_create(report)
    if report["RAN_INSIDE"]:
        # Only as part of turning the arguments into C values, before the
        # checks: then the call must have seen what it did.
        if action in ("close_source", "close_source_force", "close_dest_force"):
            assert report["CALL"] == "ConnectionClosedError", report


# A backup whose last step failed (BUSY: another connection held the source
# exclusively), so that finishing it raises: the error is built with the
# collector armed, and the finalizer acts on the backup being finished.
FINISH_ERROR = (
    ARM_COLLECTOR
    + f"""
import sqlite3
import apsw_backup as ab
d, how, action = sys.argv[1:4]
P = lambda n: os.path.join(d, n)
src = ab.Connection(P("s.db"))
src.execute({POPULATE!r})
dst = ab.Connection(P("d.db"))
dst.execute("CREATE TABLE old(n); INSERT INTO old VALUES (7)")
b = dst.backup("main", src, "main")
b.step(2)
locker = sqlite3.connect(P("s.db"), isolation_level=None)
locker.execute("BEGIN EXCLUSIVE")
try:
    b.step(2)
except ab.BusyError:
    report("STEP", "BusyError")
locker.rollback()
locker.close()
inside = [False]
ran = []

def act():
    if ran:
        return
    ran.append(inside[0])
    try:
        if action == "close_dest_force":
            dst.close(force=True)
        elif action == "close_dest":
            dst.close()
        elif action == "finish_again":
            b.finish()
        elif action == "close_backup":
            b.close()
        elif action == "close_source":
            src.close()
        elif action == "backup_again":
            ran.append(dst.backup("main", src, "main").finish())
    except ab.Error as exc:
        report("ACTION_RAISED", type(exc).__name__)

call = {{"finish": b.finish, "close": b.close, "exit": b.__exit__}}[how]
args = (None, None, None) if how == "exit" else ()
inside[0] = True
arm(act)
try:
    call(*args)
    report("CALL", "returned")
except ab.Error as exc:
    report("CALL", type(exc).__name__)
inside[0] = False
disarm()
report("RAN_INSIDE", ran[:1])
report("BACKUP_OPEN", bool(b))
for c in (src, dst):
    c.close(force=True)
check = ab.Connection(P("d.db"))
report("OLD", check.execute("SELECT n FROM old").fetchall())
report("INTEGRITY", check.execute("PRAGMA integrity_check").fetchall()[0][0])
"""
)


@pytest.mark.skipif(
    not COLLECTOR_RUNS_INSIDE_C_CALLS, reason=NO_COLLECTION_INSIDE_C_CALLS
)
@pytest.mark.parametrize("how", ["finish", "close", "exit"])
@pytest.mark.parametrize(
    "action",
    [
        "close_dest_force",
        "close_dest",
        "finish_again",
        "close_backup",
        "close_source",
        "backup_again",
    ],
)
def test_finalizer_run_while_finish_builds_its_error_never_waits_for_it(
    tmp_path, how, action
):
    """B.3 of the trust review: finish()'s error was built (an allocation:
    the collector, a finalizer) while the backup was still claimed; a
    finalizer calling dest.close(force=True) or finish() waited for ever
    for the finish it ran inside.  The error is now built once the backup
    is finished and its locks let go of."""
    report = run_child(FINISH_ERROR, tmp_path, how, action, timeout=20)
    assert report["STEP"] == "BusyError"
    assert report["RAN_INSIDE"] == [True], "the finalizer did not run in the call"
    # The finish's own error (its last step was BUSY) still comes out.
    assert report["CALL"] == "BusyError", report
    assert report["BACKUP_OPEN"] is False
    assert report["OLD"] == [(7,)], "the destination was not rolled back"
    assert report["INTEGRITY"] == "ok"


# ----------------------------------------------------------------------------
# Re-entrancy (docs/locking.md): Python code that runs inside
# a method after its guard -- argument conversion (`__index__`), busy
# handlers, destructors -- must not be able to close or lock the connection
# under that method (A1).
#
# Crash-prone cases run in a subprocess, bounded in time.


def test_set_busy_timeout_index_closes_connection(tmp_path):
    proc = run_bounded(
        """
        import apsw_backup as ab
        c = ab.Connection(":memory:")
        class Ms:
            def __index__(self):
                c.close()
                return 100
        try:
            c.set_busy_timeout(Ms())
        except ab.ConnectionClosedError as exc:
            print("REFUSED", exc)
        else:
            print("NO ERROR")
        """,
        env=child_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "closed" in proc.stdout


def test_set_busy_timeout_index_locks_connection(tmp_path):
    src = ab.Connection(str(tmp_path / "s.db"))
    src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    dst = ab.Connection(str(tmp_path / "d.db"))
    box = []

    class Ms:
        def __index__(self):
            box.append(dst.backup("main", src, "main"))
            return 100

    try:
        with pytest.raises(ab.ThreadingViolationError, match="unfinished Backup"):
            dst.set_busy_timeout(Ms())
    finally:
        for b in box:
            b.finish()
        dst.close()
        src.close()


def test_close_force_of_destination_from_source_busy_handler_refused(tmp_path):
    sp = str(tmp_path / "s.db")
    s = ab.Connection(sp)
    s.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    d = ab.Connection(str(tmp_path / "d.db"))
    b = d.backup("main", s, "main")
    b.step(1)
    w = ab.Connection(sp)
    w.execute("BEGIN EXCLUSIVE")
    seen = {}

    def handler(count):
        for what, call in (
            ("finish", b.finish),
            ("close", lambda: d.close(force=True)),
        ):
            try:
                call()
                seen[what] = "done"
            except ab.ThreadingViolationError:
                seen[what] = "refused"
        return False

    s.set_busy_handler(handler)
    try:
        with pytest.raises(ab.BusyError):
            s.execute("SELECT count(*) FROM t").fetchall()
        # b.finish() is refused there (a callback inside a call on the
        # backup's source); close(force=True) of its destination must be too.
        assert seen == {"finish": "refused", "close": "refused"}
    finally:
        w.execute("COMMIT")
        b.close(force=True)
        d.close(force=True)
        s.close(force=True)
        w.close()


DEADLOCK = """
import os, sys, threading, time
import apsw_backup as ab
d = sys.argv[1]
P = lambda n: os.path.join(d, n)
def mk(p):
    c = ab.Connection(p)
    c.execute("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
              "SELECT i+1 FROM n WHERE i<200) INSERT INTO t SELECT randomblob(500) FROM n")
    return c
s1, x = mk(P("s1.db")), mk(P("x.db"))
d6, d7 = ab.Connection(P("d6.db")), ab.Connection(P("d7.db"))
b6 = d6.backup("main", s1, "main")   # s1 -> d6: stepped by T
b7 = d7.backup("main", x, "main")    # x -> d7: finished from T's busy handler
w = ab.Connection(P("s1.db"))
w.execute("BEGIN EXCLUSIVE")         # b6's step calls s1's busy handler
in_handler, u_started = threading.Event(), threading.Event()
result = {}
def handler(n):
    if n == 0:
        in_handler.set()
        u_started.wait(5)
        time.sleep(0.3)              # U now holds x's mutex, waits for s1's
        try:
            b7.finish()
            result["finish"] = "done"
        except ab.ThreadingViolationError:
            result["finish"] = "refused"
    return False
s1.set_busy_handler(handler)
b5 = s1.backup("main", x, "main")    # x -> s1: stepped by U
def T():
    try:
        b6.step(-1)
    except ab.Error:
        pass
def U():
    in_handler.wait(5)
    u_started.set()
    try:
        b5.step(-1)
    except ab.Error:
        pass
ts = [threading.Thread(target=T, daemon=True), threading.Thread(target=U, daemon=True)]
for t in ts:
    t.start()
for t in ts:
    t.join(10)
print("ALIVE", [t.is_alive() for t in ts], result, flush=True)
os._exit(0)
"""


def test_finish_from_busy_handler_cannot_deadlock(tmp_path):
    proc = run_bounded(DEADLOCK, tmp_path, timeout=60, env=child_env(tmp_path))
    assert "ALIVE [False, False]" in proc.stdout, proc.stdout + proc.stderr[-2000:]


GIL_DEADLOCK = r"""
# 3-thread deadlock: T calls sqlite3_errmsg(S) with the GIL held; U (collecting b2, no in-use check)
# holds S's mutex and waits for D2's; V holds D2's (stepping b3: D2 -> D3) and waits for the GIL in D3's busy handler.
import os, sys, threading, time, apsw_backup as ab
d = sys.argv[1]; P = lambda n: os.path.join(d, n)
S = ab.Connection(P("s.db")); S.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
D2 = ab.Connection(P("d2.db")); D2.execute("CREATE TABLE u(x); INSERT INTO u VALUES (1)")
D3 = ab.Connection(P("d3.db"))
W3 = ab.Connection(P("d3.db")); W3.execute("CREATE TABLE w(x)"); W3.execute("BEGIN EXCLUSIVE")
stop = threading.Event(); in_handler = threading.Event()
def d3_busy(n):
    in_handler.set(); time.sleep(0.005); return not stop.is_set()
D3.set_busy_handler(d3_busy)
b3 = D3.backup("main", D2, "main")         # D2 -> D3, stepped by V
holder = [D2.backup("main", S, "main")]    # S -> D2, dropped by U
LONG = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i<100000000) SELECT count(*) FROM n"
def V():
    try: b3.step(-1)
    except ab.Error as e: print("V:", type(e).__name__, flush=True)
def T():
    try: S.execute(LONG).fetchall()
    except ab.Error as e: print("T:", type(e).__name__, flush=True)
def U():
    holder.clear(); print("U: b2 collected", flush=True)
tv = threading.Thread(target=V, daemon=True); tv.start(); in_handler.wait(5)
tt = threading.Thread(target=T, daemon=True); tt.start()
def busy(c):
    try: c.get_autocommit()
    except ab.ThreadingViolationError: return True
    return False
while not busy(S): time.sleep(0.001)
tu = threading.Thread(target=U, daemon=True); tu.start()
time.sleep(0.3)                 # U now waits for S's mutex (T's query holds it)
S.interrupt()                   # T's step ends: U takes S's mutex, waits for D2's; T wants S's with the GIL
tt.join(3)
print("T alive:", tt.is_alive(), flush=True)
stop.set()
for t in (tt, tu, tv): t.join(5)
print("ALIVE", [t.is_alive() for t in (tt, tu, tv)], flush=True)
"""


def test_error_message_with_gil_cannot_deadlock_against_collected_backup(tmp_path):
    # The interleaving is the scheduler's: on the defect about 3 runs in 4
    # freeze; three clean runs in a row are needed.
    for attempt in range(3):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        proc = run_bounded(GIL_DEADLOCK, folder, timeout=20, env=child_env(tmp_path))
        assert "ALIVE [False, False, False]" in proc.stdout, (
            proc.stdout + proc.stderr[-2000:]
        )


CURSOR_DEADLOCK = """
import os, sys, threading, time
import apsw_backup as ab
d = sys.argv[1]
P = lambda n: os.path.join(d, n)
def mk(p):
    c = ab.Connection(p)
    c.execute("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
              "SELECT i+1 FROM n WHERE i<200) INSERT INTO t SELECT randomblob(500) FROM n")
    return c
s1, x = mk(P("s1.db")), mk(P("x.db"))
d6, d7 = ab.Connection(P("d6.db")), ab.Connection(P("d7.db"))
b6 = d6.backup("main", s1, "main")   # s1 -> d6: stepped by T
holder = [x.execute("SELECT x FROM t")]   # a live statement of x: dropped in T's busy handler
w = ab.Connection(P("s1.db"))
w.execute("BEGIN EXCLUSIVE")         # b6's step calls s1's busy handler
in_handler, u_started = threading.Event(), threading.Event()
result = {}
def handler(n):
    if n == 0:
        in_handler.set()
        u_started.wait(5)
        time.sleep(0.3)              # U now holds x's mutex, waits for s1's
        holder.clear()               # cursor_dealloc: sqlite3_finalize on x
        result["dropped"] = True
    return False
s1.set_busy_handler(handler)
b5 = s1.backup("main", x, "main")    # x -> s1: stepped by U
def T():
    try:
        b6.step(-1)
    except ab.Error:
        pass
def U():
    in_handler.wait(5)
    u_started.set()
    try:
        b5.step(-1)
    except ab.Error:
        pass
ts = [threading.Thread(target=T, daemon=True), threading.Thread(target=U, daemon=True)]
for t in ts:
    t.start()
for t in ts:
    t.join(10)
print("ALIVE", [t.is_alive() for t in ts], result, flush=True)
os._exit(0)
"""


def test_cursor_dropped_in_busy_handler_cannot_deadlock(tmp_path):
    proc = run_bounded(CURSOR_DEADLOCK, tmp_path, timeout=60, env=child_env(tmp_path))
    assert "ALIVE [False, False]" in proc.stdout, proc.stdout + proc.stderr[-2000:]
