# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_6: a Backup let go of inside a busy handler (its source may share a cache)
is promised to be finished "once the call the handler ran inside has returned".
If that source connection is already on ANOTHER thread's "later" list (that
thread's busy handler was refused the same connection), the backup stays
unfinished -- its destination locked, in this process and against other
processes -- after this thread's call has returned, for as long as the other
thread's call lasts.  Prints BUG and exits 1 when the destination is still
locked after the call returned."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import faulthandler, gc, os, sys, threading, time, subprocess
faulthandler.dump_traceback_later(25, exit=True)
import apsw_backup as ab
d = sys.argv[1]
x, y, z, dd = (os.path.join(d, n) for n in ("x.db", "y.db", "z.db", "d.db"))
UF = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI
S2 = ab.Connection("file:%s?cache=shared" % x, flags=UF)     # may share a cache
D = ab.Connection(dd)
holder = [D.backup("main", S2, "main")]
holder[0].step(1)                                              # D is locked, holds d.db's write lock

# Thread A: inside a long busy wait, its handler is refused S2 (S2 goes on A's list).
A1 = ab.Connection(y); PA = ab.Connection(y); PA.execute("BEGIN EXCLUSIVE")
a_in = threading.Event(); a_go = threading.Event()
def hA(n):
    if n == 0:
        try: S2.execute("SELECT 1")
        except ab.ReentrancyError: pass
        a_in.set()
    return not a_go.wait(0.01) or True
A1.set_busy_handler(hA)
def thread_a():
    A1.execute("INSERT INTO t VALUES (1)")
ta = threading.Thread(target=thread_a); ta.start(); a_in.wait()

# This thread: a busy handler lets go of the Backup, then its call returns.
B1 = ab.Connection(z); PB = ab.Connection(z); PB.execute("BEGIN EXCLUSIVE")
def hB(n):
    if n == 0:
        holder.clear(); gc.collect()
        PB.execute("COMMIT")
    return True
B1.set_busy_handler(hB)
B1.execute("INSERT INTO t VALUES (1)")                         # the call has returned here
try:
    D.execute("SELECT 1").fetchall(); print("D usable after the call returned", flush=True)
except ab.Error as e:
    print("D after the call returned:", type(e).__name__, str(e)[:120], flush=True)
r = subprocess.run([sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=0.2, isolation_level=None)\ntry:\n c.execute('BEGIN EXCLUSIVE'); print('unlocked')\nexcept Exception as e: print('LOCKED', e)", dd], capture_output=True, text=True)
print("another process on d.db:", r.stdout.strip(), flush=True)
time.sleep(1.0)
r2 = subprocess.run([sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=0.2, isolation_level=None)\ntry:\n c.execute('BEGIN EXCLUSIVE'); print('unlocked')\nexcept Exception as e: print('LOCKED', e)", dd], capture_output=True, text=True)
print("one second later:", r2.stdout.strip(), flush=True)
a_go.set(); PA.execute("COMMIT"); ta.join()
try:
    D.execute("SELECT 1").fetchall(); print("D usable once thread A's call returned", flush=True)
except ab.Error as e:
    print("D after A:", type(e).__name__, flush=True)
"""
d = tempfile.mkdtemp()
for n in ("x.db", "y.db", "z.db", "d.db"):
    c = sqlite3.connect(os.path.join(d, n))
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 20)
    c.commit()
    c.close()
try:
    p = subprocess.run(
        [sys.executable, "-c", CHILD, d], capture_output=True, text=True, timeout=60
    )
    out = p.stdout + p.stderr
except subprocess.TimeoutExpired:
    out = "(timeout)"
print(out)
if (
    "another process on d.db: LOCKED" in out
    or "D after the call returned: Destination" in out
):
    print(
        "BUG: the let-go backup was not finished when the call it was let go of in returned; d.db stays locked"
    )
    sys.exit(1)
print("not reproduced")
