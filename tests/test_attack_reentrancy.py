"""Attack review of issue 10 (branch `attack`): Python code that runs inside
a method after its guard -- argument conversion (`__index__`), busy
handlers, destructors -- must not be able to close or lock the connection
under that method.  See /work/notes/attack-findings.md (A1).

Crash-prone cases run in a subprocess, bounded in time.
"""

import subprocess
import sys
import textwrap

import pytest

import apsw_backup as ab


def run_child(code, timeout=30):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.xfail(strict=True, reason="A1: set_busy_timeout guards before __index__ runs: SIGSEGV")
def test_set_busy_timeout_index_closes_connection():
    proc = run_child(
        """
        import apsw_backup as ab
        c = ab.Connection(":memory:")
        class Ms:
            def __index__(self):
                c.close()
                return 100
        try:
            c.set_busy_timeout(Ms())
        except ab.ConnectionClosedError as exc:
            print("REFUSED", exc)
        else:
            print("NO ERROR")
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "closed" in proc.stdout


@pytest.mark.xfail(strict=True, reason="A1: set_busy_timeout guards before __index__ runs: lock bypassed")
def test_set_busy_timeout_index_locks_connection(tmp_path):
    src = ab.Connection(str(tmp_path / "s.db"))
    src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    dst = ab.Connection(str(tmp_path / "d.db"))
    box = []

    class Ms:
        def __index__(self):
            box.append(dst.backup("main", src, "main"))
            return 100

    try:
        with pytest.raises(ab.ThreadingViolationError, match="unfinished Backup"):
            dst.set_busy_timeout(Ms())
    finally:
        for b in box:
            b.finish()
        dst.close()
        src.close()
