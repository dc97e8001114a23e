# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_9: a backup made and finished inside `with dest:` is committed even when
the block raises (the with-block is promised to roll back); the same backup is
refused ('destination database is in use') if the block first wrote a row.
Prints BUG and exits 1 when the block raised and the copy stayed."""

import os
import sqlite3
import subprocess
import sys
import tempfile

CHILD = r"""
import sys, apsw_backup as ab
S, D = ab.Connection(sys.argv[1]), ab.Connection(sys.argv[2])
try:
    with D:                                    # a transaction: "rolled back if the block raises"
        b = D.backup("main", S, "main"); b.step(-1); b.finish()
        raise ValueError("the block fails")
except ValueError:
    pass
S.close(); D.close()
"""
d = tempfile.mkdtemp()
sp, dp = os.path.join(d, "s.db"), os.path.join(d, "d.db")
for p, n in ((sp, 50), (dp, 3)):
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE t(x)")
    c.executemany("INSERT INTO t VALUES (1)", [()] * n)
    c.commit()
    c.close()
p = subprocess.run(
    [sys.executable, "-c", CHILD, sp, dp], capture_output=True, text=True, timeout=30
)
print(p.stdout + p.stderr)
n = sqlite3.connect(dp).execute("SELECT count(*) FROM t").fetchone()[0]
print("destination rows after the failed block:", n, "(3 = rolled back, 50 = the copy)")
if n == 50:
    print("BUG: the backup made inside the failed with-block was committed")
    sys.exit(1)
print("not reproduced")
