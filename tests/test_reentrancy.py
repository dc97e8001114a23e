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
from child_process import (
    ARM_COLLECTOR,
    COLLECTOR_RUNS_INSIDE_C_CALLS,
    NO_COLLECTION_INSIDE_C_CALLS,
    run_child,
)

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
