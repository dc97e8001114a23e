# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_4: a child forked inside a busy handler that ends itself the usual
Python way -- sys.exit(3), or an uncaught exception -- exits with status 0 and
its exception is never printed: a failed child reports success to its parent.
Prints BUG and exits 1 when the child's status is 0."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import os, sys
import apsw_backup as ab
db = sys.argv[1]
P = ab.Connection(db); P.execute("BEGIN IMMEDIATE"); P.execute("INSERT INTO t VALUES (0)")
S = ab.Connection(db)
def h(n):
    if n == 0:
        pid = os.fork()
        if pid == 0:
            if sys.argv[2] == "exit3":
                sys.exit(3)                      # the child ends with status 3 ...
            raise RuntimeError("the child failed")  # ... or with an error (status 1)
        _, st = os.waitpid(pid, 0)
        print("child exit status", os.waitstatus_to_exitcode(st), flush=True)
        P.execute("COMMIT")
    return True
S.set_busy_handler(h)
S.execute("INSERT INTO t VALUES (1)")
"""
d = tempfile.mkdtemp()
db = os.path.join(d, "x.db")
c = sqlite3.connect(db)
c.execute("CREATE TABLE t(x)")
c.commit()
c.close()
bug = False
for how in ("exit3", "raise"):
    p = subprocess.run(
        [sys.executable, "-c", CHILD, db, how],
        capture_output=True,
        text=True,
        timeout=30,
    )
    print("==", how)
    print(p.stdout + p.stderr)
    if "child exit status 0" in p.stdout:
        bug = True
if bug:
    print(
        "BUG: the forked child's sys.exit(3) / uncaught exception became exit status 0 (and the traceback was dropped)"
    )
    sys.exit(1)
print("not reproduced")
