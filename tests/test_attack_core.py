"""The blind attack on the core (round 2): its reproducers, as it wrote them
(tests/attack_core/), each run in a child bounded in time; each exits 1
and prints BUG while its defect is present.

- repro_1: ATTACH of a shared-cache URI by a private connection inside a
  busy handler hung for ever (now ReentrancyError).
- repro_4: a child forked in a busy handler that ended with sys.exit(3) or
  an uncaught exception exited 0 (now 3, or 1 with the traceback).
- repro_6, repro_6b: a Backup let go of inside a busy handler stayed
  unfinished, its destination locked, while another thread's call lasted
  (one list of what waits, drained by whichever call ends first); for
  ever when that thread waited for the destination.
- repro_9: a backup made inside `with dest:` stayed committed when the
  block raised (backup() now refuses a destination with an open
  transaction).
- repro_3: out-of-range set_busy_timeout() and flags= said only "signed
  integer is greater than maximum" (now they name the argument and range).
- repro_5: a let-go Backup's finish error reached sys.unraisablehook with
  no object, printed as a bare traceback (now "Exception ignored in: ...").
- repro_10: a copy() that never got the target's lock said target_state
  "rolled back" (now "unchanged").
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack_core")


@pytest.mark.parametrize(
    "name",
    [
        "repro_1",
        "repro_3",
        "repro_4",
        "repro_5",
        "repro_6",
        "repro_6b",
        "repro_9",
        "repro_10",
    ],
)
def test_attack_reproducer_finds_nothing(tmp_path, name):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, name + ".py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0 and "BUG" not in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-2000:]
    )
