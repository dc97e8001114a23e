# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_6b: the consequence of finding 6 as a permanent hang.  Thread A waits
(busy handler that keeps retrying) for d.db, whose write lock is held by a
backup into d.db; the main thread's busy handler lets go of that backup.  The
backup should be finished when the main thread's call returns, releasing d.db
so A can go on -- but A's handler was refused the backup's (shared-cache)
source earlier, so the source sits on A's "later" list and the orphan backup
is left for A to finish after A's call returns: A waits for itself for ever.
Prints BUG and exits 1 on the hang."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import faulthandler, gc, os, sys, threading, time
import apsw_backup as ab
d = sys.argv[1]; touch = sys.argv[2] == "touch"
x, z, dd = (os.path.join(d, n) for n in ("x.db", "z.db", "d.db"))
UF = ab.SQLITE_OPEN_READWRITE | ab.SQLITE_OPEN_CREATE | ab.SQLITE_OPEN_URI
S2 = ab.Connection("file:%s?cache=shared" % x, flags=UF)     # may share a cache
D = ab.Connection(dd)
holder = [D.backup("main", S2, "main")]
holder[0].step(1)                                              # the backup holds d.db's write lock

A1 = ab.Connection(dd)                                         # thread A writes d.db: it must wait
a_in = threading.Event()
def hA(n):
    if n == 0:
        if touch:
            try: S2.execute("SELECT 1")                        # refused: S2 goes on A's list
            except ab.ReentrancyError: pass
        a_in.set()
    time.sleep(0.005)
    return True                                                # keep waiting (a legitimate policy)
A1.set_busy_handler(hA)
def thread_a():
    A1.execute("INSERT INTO t VALUES (1)"); print("thread A got d.db", flush=True)
ta = threading.Thread(target=thread_a); ta.start(); a_in.wait()

B1 = ab.Connection(z); PB = ab.Connection(z); PB.execute("BEGIN EXCLUSIVE")
def hB(n):
    if n == 0:
        holder.clear(); gc.collect()                           # let go of the backup
        PB.execute("COMMIT")
    return True
B1.set_busy_handler(hB)
B1.execute("INSERT INTO t VALUES (1)")
print("main thread's call returned", flush=True)
faulthandler.dump_traceback_later(8, exit=True)
ta.join()
print("OK: no hang")
"""
d = tempfile.mkdtemp()
for n in ("x.db", "z.db", "d.db"):
    c = sqlite3.connect(os.path.join(d, n))
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 20)
    c.commit()
    c.close()
bug = False
for mode in ("control", "touch"):
    try:
        p = subprocess.run(
            [sys.executable, "-c", CHILD, d, mode],
            capture_output=True,
            text=True,
            timeout=40,
        )
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired:
        out = "(timeout)"
    print(
        "==",
        mode,
        "(thread A's handler %s S2)"
        % ("touches" if mode == "touch" else "does not touch"),
    )
    print(out)
    if mode == "touch" and "OK: no hang" not in out:
        bug = True
if bug:
    print("BUG: thread A waits for ever for a lock held by a backup that was let go of")
    sys.exit(1)
print("not reproduced")
