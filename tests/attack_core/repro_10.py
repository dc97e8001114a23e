# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_10: copy() into an existing target that another process keeps locked
gives up with target_state="rolled back" and the message "the target was rolled
back to its previous content", although 0 pages were copied and copy() never
wrote it: docs/api.md defines "unchanged" (never written) for exactly this.
Prints BUG and exits 1 when target_state is not "unchanged"."""

import os
import sqlite3
import subprocess
import sys
import tempfile

import apsw_backup as ab

d = tempfile.mkdtemp()
sp, tp = os.path.join(d, "s.db"), os.path.join(d, "t.db")
for p, n in ((sp, 100), (tp, 5)):
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (randomblob(2000))", [()] * n)
    c.commit()
    c.close()
before = open(tp, "rb").read()
h = subprocess.Popen(
    [
        sys.executable,
        "-c",
        "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None); c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(8)",
        tp,
    ],
    stdout=subprocess.PIPE,
    text=True,
)
h.stdout.readline()
state = None
try:
    ab.copy(sp, tp, timeout=1.0)
except ab.BusyError as e:
    state = getattr(e, "target_state", None)
    print(str(e)[:200])
    print("target_state =", state)
finally:
    h.kill()
    h.wait()
print("target bytes unchanged:", open(tp, "rb").read() == before)
if state != "unchanged":
    print(
        f"BUG: the target was never written (0 pages copied) but is reported as {state!r}"
    )
    sys.exit(1)
print("not reproduced")
