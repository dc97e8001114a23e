"""Attack review of issue 10 (branch `attack`), SPEC 3.7 ownership.

A9: Connection.close() walks its cursor list with borrowed pointers and
calls cursor_close_internal(), which finalizes with the GIL released and
then touches the cursor again (reset_state).  Another thread that drops
the cursor's last reference in that window frees it under close():
heap-use-after-free (ASan), SIGSEGV with PYTHONMALLOC=debug.

The child runs with PYTHONMALLOC=debug so that the freed cursor is filled
with dead bytes and the use after free crashes on any build.
"""

import os
import subprocess
import sys

import pytest

UAF = r"""
import threading, apsw_backup as ab
for i in range(300):
    conn = ab.Connection(":memory:")
    holder = [conn.execute("SELECT 1 UNION ALL SELECT 2")]  # live statement
    ev = threading.Event()
    def dropper():
        ev.wait()
        holder.clear()          # the cursor's last reference
    t = threading.Thread(target=dropper)
    t.start()
    ev.set()
    conn.close()                # finalizes that cursor, GIL released
    t.join()
print("SURVIVED")
"""


@pytest.mark.xfail(strict=True, reason="A9: close() follows a borrowed Cursor across its finalize's GIL release: use after free")
def test_cursor_dropped_while_connection_close_finalizes_it():
    env = dict(os.environ, PYTHONMALLOC="debug")
    proc = subprocess.run(
        [sys.executable, "-c", UAF], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, (
        proc.returncode,
        proc.stderr[-2000:],
    )
