"""Inside a busy handler nothing of ours calls SQLite on that thread.

SQLite calls a busy handler in the middle of a call, holding that call's
mutexes -- a shared cache's is not recursive.  Any SQLite call the handler's
Python code made on a connection of the same cache (closing it when its
last reference went, finalizing a cursor's statement, finishing a backup,
running a query, opening one more connection) would wait for that mutex on
the very thread that holds it: for ever.  Found by the stress harness in CI
(tests/test_stress.py seed 303: threads stuck in connection_dealloc under
busy_trampoline).

The rule (src/README.md): inside a busy handler every method that would
reach SQLite raises ReentrancyError, and what is let go of there (a
Connection, a Cursor, a Backup) is released once the call the handler ran
inside has returned -- not leaked, not held longer.
"""

import pytest
from child_process import run_child

SETUP = """
import gc, sqlite3, sys
import apsw_backup as ab

path = sys.argv[1] + "/d.db"
c = sqlite3.connect(path)
c.execute("CREATE TABLE t(x)")
c.execute("CREATE TABLE u(x)")
c.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(50)])
c.commit()
c.close()
flags = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_SHAREDCACHE
a = ab.Connection(path, flags)


def blocked_insert(handler):
    # Another process-level connection reads (a SHARED lock on the file):
    # a's commit waits for it in its busy handler, holding the cache's
    # mutex -- also while b, of the same cache, reads table t (a writes u).
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()
    calls = []

    def counting(count):
        calls.append(count)
        return handler(count)

    a.set_busy_handler(counting)
    try:
        a.execute("INSERT INTO u VALUES (1)").fetchall()
    except ab.BusyError:
        report("OUTCOME", "busy")
    report("CALLS", len(calls))
    reader.execute("ROLLBACK")
    reader.close()


def exclusive_now():
    # Nothing of ours may hold a lock on the file once the call returned.
    probe = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN EXCLUSIVE")
        probe.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()
"""

RELEASES = {
    "connection": """
held = [ab.Connection(path, flags)]
""",
    "cursor": """
b = ab.Connection(path, flags)
held = [b.execute("SELECT x FROM t")]
next(held[0])                  # a statement in the middle of its rows
""",
    "backup": """
dest = ab.Connection(":memory:")
b = ab.Connection(path, flags)
held = [dest.backup("main", b, "main")]
held[0].step(1)                # unfinished: finishing it enters b's cache
""",
}


@pytest.mark.parametrize("what", sorted(RELEASES))
def test_what_is_let_go_of_in_a_busy_handler_is_released_after_the_call(tmp_path, what):
    code = (
        SETUP
        + RELEASES[what]
        + """
def handler(count):
    if held:
        held.pop()             # the last reference, inside the handler
        gc.collect()
    return count < 2

blocked_insert(handler)
report("HELD", len(held))
report("EXCLUSIVE", exclusive_now())
for name in ("b", "dest"):
    if name in globals():
        globals()[name].close()
a.close()
report("DONE", True)
"""
    )
    out = run_child(code, tmp_path, timeout=20)
    assert out["OUTCOME"] == "busy"
    assert out["CALLS"] >= 1
    assert out["HELD"] == 0  # let go of inside the handler
    # Released once the call returned: nothing holds the file any more.
    assert out["EXCLUSIVE"] is True
    assert out["DONE"] is True


USES = {
    "execute": "other.execute('SELECT count(*) FROM t').fetchall()",
    "close": "other.close()",
    "open": "ab.Connection(path, flags)",
    "backup": "ab.Connection(':memory:').backup('main', other, 'main')",
    "finish": "other_backup.finish()",
    "get_autocommit": "other.get_autocommit()",
    "open_uri": "ab.Connection('file:' + path, ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_URI)",
}


@pytest.mark.parametrize("use", sorted(USES))
def test_no_connection_of_ours_is_used_inside_a_busy_handler(tmp_path, use):
    code = (
        SETUP
        + """
other = ab.Connection(path, flags)
other_backup = ab.Connection(':memory:').backup('main', other, 'main')
seen = []

def handler(count):
    try:
        USE
        seen.append("ran")
    except ab.ReentrancyError as e:
        seen.append(str(e))
    return False

blocked_insert(handler)
report("SEEN", seen)
# Usable again once the call has returned.
report("AFTER", other.execute("SELECT count(*) FROM t").fetchall())
other_backup.finish()
other.close()
a.close()
""".replace("USE", USES[use])
    )
    out = run_child(code, tmp_path, timeout=20)
    assert out["OUTCOME"] == "busy"
    assert out["CALLS"] >= 1
    (said,) = out["SEEN"]
    assert "inside a busy handler" in said and "has returned" in said, said
    assert out["AFTER"] == [(50,)]


def test_interrupt_still_works_inside_a_busy_handler(tmp_path):
    code = (
        SETUP
        + """
other = ab.Connection(path, flags)
seen = []
def handler(count):
    other.interrupt()          # no lock, no mutex: allowed
    seen.append("ran")
    return False

blocked_insert(handler)
report("SEEN", seen)
other.close()
a.close()
"""
    )
    out = run_child(code, tmp_path, timeout=20)
    assert out["OUTCOME"] == "busy"
    assert out["CALLS"] >= 1
    assert out["SEEN"] == ["ran"]


PRIVATE = """
import gc, sqlite3, sys
import apsw_backup as ab

d = sys.argv[1]
for name in ("a.db", "b.db", "c.db"):
    c = sqlite3.connect(f"{d}/{name}")
    c.execute("CREATE TABLE t(x)")
    c.commit()
    c.close()
reader = sqlite3.connect(f"{d}/a.db", isolation_level=None)
reader.execute("BEGIN")
reader.execute("SELECT count(*) FROM t").fetchall()
a = ab.Connection(f"{d}/a.db")
uri = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_URI
private = ab.Connection(f"{d}/b.db")             # no shared cache possible
attached = ab.Connection(f"{d}/c.db", uri)        # reads URIs, then attaches
attached.execute("ATTACH ? AS x", (f"file:{d}/b.db?cache=shared",))
held = [private.execute("SELECT 1 UNION ALL SELECT 2")]
next(held[0])
seen = {}

def handler(count):
    seen["private"] = private.execute("SELECT count(*) FROM t").fetchall()
    try:
        attached.execute("SELECT 1").fetchall()
        seen["attached"] = "ran"
    except ab.ReentrancyError:
        seen["attached"] = "refused"
    held.clear()               # a private cursor: finalized at once
    return False

a.set_busy_handler(handler)
try:
    a.execute("INSERT INTO t VALUES (1)").fetchall()
except ab.BusyError:
    report("OUTCOME", "busy")
report("SEEN", seen)
"""


def test_private_connections_work_in_a_busy_handler_as_before(tmp_path):
    """The rule is for connections that may share a cache: any other is
    used and released inside a busy handler as usual (a handler may, say,
    commit the transaction it waits for).  A connection that reads URI
    filenames and has run an ATTACH may share one: refused."""
    out = run_child(PRIVATE, tmp_path, timeout=20)
    assert out["OUTCOME"] == "busy"
    assert out["SEEN"] == {"private": [(0,)], "attached": "refused"}
