# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_5: the error of finishing a Backup that was let go of goes to
sys.unraisablehook with object=None and no err_msg, so the default hook prints a
bare "Traceback (most recent call last): ... BusyError" pointing at whatever
unrelated line happened to drop the last reference -- indistinguishable from an
uncaught exception, although the program goes on and exits 0.
Prints BUG and exits 1 when the report carries no context."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, apsw_backup as ab
src, dst = sys.argv[1], sys.argv[2]
S, D = ab.Connection(src), ab.Connection(dst)
L = ab.Connection(src); L.execute("BEGIN EXCLUSIVE")     # the source is locked
b = D.backup("main", S, "main")
try:
    b.step(-1)
except ab.BusyError:
    pass
seen = []
sys.unraisablehook, old = (lambda u: (seen.append((u.object, u.err_msg)), old(u))), sys.unraisablehook
x = 1 + 1      # an unrelated line
del b          # the Backup is let go of: its finish fails (BUSY)
print("hook got object=%r err_msg=%r" % seen[0] if seen else "hook not called", flush=True)
print("program goes on")
"""
d = tempfile.mkdtemp()
src, dst = os.path.join(d, "s.db"), os.path.join(d, "d.db")
for p in (src, dst):
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t(x)")
    c.execute("INSERT INTO t VALUES (1)")
    c.commit()
    c.close()
p = subprocess.run(
    [sys.executable, "-c", CHILD, src, dst], capture_output=True, text=True, timeout=30
)
print("exit status", p.returncode)
print("--- stdout\n" + p.stdout + "--- stderr\n" + p.stderr)
if "object=None err_msg=None" in p.stdout and "Exception ignored" not in p.stderr:
    print(
        "BUG: the let-go Backup's finish error is reported with no context (looks like an uncaught exception)"
    )
    sys.exit(1)
print("not reproduced")
