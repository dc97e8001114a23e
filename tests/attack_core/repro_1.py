# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_1: a private connection ATTACHes a shared-cache URI inside a busy
handler of a shared-cache connection of that file -> the process hangs for
ever (SQLite self-deadlocks on the shared cache's mutex) instead of
ReentrancyError.  Prints BUG and exits 1 when the child hangs."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import faulthandler, sys
faulthandler.dump_traceback_later(8, exit=True)   # stack of the hang, exit 1
import apsw_backup as ab
db = sys.argv[1]
uri = "file:%s?cache=shared" % db
S1 = ab.Connection(uri, flags=ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI)
P = ab.Connection(db)                  # a private connection holding the file's lock
P.execute("BEGIN EXCLUSIVE")
m = ab.Connection(":memory:")          # private, has never ATTACHed anything
def handler(n):
    if n == 0:
        try:
            m.execute("ATTACH ? AS s", (uri,))       # <- hangs here
            m.execute("SELECT count(*) FROM s.t").fetchall()
        except ab.Error as e:
            print("refused:", type(e).__name__, e, flush=True)
        P.execute("COMMIT")
    return True
S1.set_busy_handler(handler)
print(S1.execute("SELECT count(*) FROM t").fetchall(), flush=True)
print("OK: no hang")
"""

CHILD_STEP = r"""
import faulthandler, sys, os
faulthandler.dump_traceback_later(8, exit=True)
import apsw_backup as ab
db = sys.argv[1]
uri = "file:%s?cache=shared" % db
S = ab.Connection(uri, flags=ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_URI)   # backup source, shared cache
P = ab.Connection(db); P.execute("BEGIN EXCLUSIVE")
dest = ab.Connection(db + ".dest")
b = dest.backup("main", S, "main")
def h(n):
    if n == 0:
        m = ab.Connection(":memory:")
        try:
            m.execute("ATTACH ? AS s", (uri,))       # <- hangs here, inside Backup.step()
        except ab.Error as e:
            print("refused:", type(e).__name__, e, flush=True)
        P.execute("COMMIT")
    return True
S.set_busy_handler(h)
print(b.step(-1)); b.finish(); print("OK: no hang")
"""

d = tempfile.mkdtemp()
db = os.path.join(d, "x.db")
c = sqlite3.connect(db)
c.execute("CREATE TABLE t(x)")
c.execute("INSERT INTO t VALUES (1)")
c.commit()
c.close()
bug = False
for name, code in (("execute", CHILD), ("Backup.step", CHILD_STEP)):
    try:
        p = subprocess.run(
            [sys.executable, "-c", code, db], capture_output=True, text=True, timeout=30
        )
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        out = "(timeout)"
    print("== outer call:", name)
    print(out)
    if "OK: no hang" not in out:
        bug = True
if bug:
    print(
        "BUG: ATTACH of a shared-cache URI inside a busy handler deadlocked the process"
    )
    sys.exit(1)
print("not reproduced")
