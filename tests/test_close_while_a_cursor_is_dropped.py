"""Ownership (docs/locking.md): Connection.close() while another thread
drops one of its cursors (a reproducer from an attack review).

A9: Connection.close() walks its cursor list with borrowed pointers and
calls cursor_close_internal(), which finalizes with the GIL released and
then touches the cursor again (reset_state).  Another thread that drops
the cursor's last reference in that window frees it under close():
heap-use-after-free (ASan), SIGSEGV with PYTHONMALLOC=debug.

The child runs with PYTHONMALLOC=debug so that the freed cursor is filled
with dead bytes and the use after free crashes on any build.
"""

import os
import shutil
import subprocess
import sys

import pytest
from attack_helpers import child_env, under_asan

UAF = r"""
import threading, apsw_backup as ab
for i in range(3000):
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


def test_cursor_dropped_while_connection_close_finalizes_it(tmp_path):
    # Under the ASan build, ASan's allocator takes the place of debug malloc.
    env = (
        child_env(tmp_path)
        if under_asan()
        else child_env(tmp_path, PYTHONMALLOC="debug")
    )
    proc = subprocess.run(
        [sys.executable, "-c", UAF],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, (
        proc.returncode,
        proc.stderr[-2000:],
    )


INTERRUPT_DURING_CLOSE = r"""
import sys, threading, apsw_backup as ab
stop = False
box = [ab.Connection(":memory:")]
def hammer():
    while not stop:
        try:
            box[0].interrupt()
        except ab.Error:
            pass
t = threading.Thread(target=hammer)
t.start()
try:
    for i in range(300):
        c = ab.Connection(":memory:")
        box[0] = c
        c.close()      # sqlite3_close frees the handle, GIL released; db still set
finally:
    stop = True
    t.join()
print("SURVIVED")
"""


@pytest.mark.skipif(
    shutil.which("valgrind") is None or under_asan(),
    reason="needs valgrind (and not the ASan build)",
)
@pytest.mark.heavy  # a valgrind run: about 4 s
def test_interrupt_while_close_frees_the_handle():
    # The write happens inside libsqlite3, which ASan does not instrument:
    # valgrind sees it.
    env = dict(os.environ, PYTHONMALLOC="malloc")
    proc = subprocess.run(
        ["valgrind", "-q", sys.executable, "-c", INTERRUPT_DURING_CLOSE],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert "SURVIVED" in proc.stdout, proc.stderr[-2000:]
    assert "connection_interrupt" not in proc.stderr, proc.stderr[-3000:]
