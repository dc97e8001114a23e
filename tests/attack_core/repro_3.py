# From the blind attack on the core (round 2, see tests/test_attack_core.py). Exits 1 and prints BUG while the defect is present.
"""repro_3: out-of-range ints for set_busy_timeout() and Connection(flags=)
raise OverflowError('signed integer is greater than maximum'), a message that
names neither the argument nor the range (step() does both for npages).
Prints BUG and exits 1 when a message does not name its argument."""

import subprocess
import sys

CHILD = r"""
import apsw_backup as ab
c = ab.Connection(":memory:")
out = []
for what, f in (("set_busy_timeout(2**40)", lambda: c.set_busy_timeout(2**40)),
                ("Connection(flags=2**40)", lambda: ab.Connection(":memory:", flags=2**40)),
                ("step(2**40) [for comparison]", lambda: c.backup("main", ab.Connection(":memory:"), "main").step(2**40))):
    try:
        f(); print(what, "-> no error")
    except Exception as e:
        print(what, "->", type(e).__name__ + ":", e)
"""
p = subprocess.run(
    [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30
)
print(p.stdout + p.stderr)
bad = [
    line
    for line in p.stdout.splitlines()
    if "comparison" not in line and "signed integer is greater than maximum" in line
]
if bad:
    print("BUG: message does not name the argument or its range:", bad)
    sys.exit(1)
print("not reproduced")
