"""What other threads see of a Backup while a claimed finish runs
(docs/api.md#backup: "bool(backup) is True until
finished. repr shows ... progress, or that it is finished").

A12: while another thread's finish() waits in sqlite3_backup_finish (GIL
released), bool(b) is True but repr(b) already says "finished" (repr tests
`backup == NULL`, bool tests `backup != NULL || finishing`).  The same
during restart_backup.
"""

import threading
import time

import apsw_backup as ab

LONG = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n "
    "WHERE i<30000000) SELECT count(*) FROM n"
)


def busy(conn):
    try:
        conn.get_autocommit()
    except ab.ThreadingViolationError:
        return True
    return False


def wait_until(pred, bound=10):
    deadline = time.monotonic() + bound
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_repr_and_bool_agree_during_another_threads_finish(tmp_path):
    src = ab.Connection(str(tmp_path / "s.db"))
    src.execute("CREATE TABLE t(x); INSERT INTO t VALUES (1)")
    dst = ab.Connection(str(tmp_path / "d.db"))
    b = dst.backup("main", src, "main")
    b.step(1)
    errors = []

    def query():
        try:
            src.execute(LONG).fetchall()
        except ab.InterruptError:
            pass
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    tc = threading.Thread(target=query)
    tc.start()
    ta = None
    try:
        wait_until(lambda: busy(src) or not tc.is_alive())
        ta = threading.Thread(target=b.finish)  # waits for the source's mutex
        ta.start()
        # The finish may end before it is seen (the query was between two
        # statements): then both must say finished, which is checked too.
        wait_until(lambda: busy(dst) or not ta.is_alive())
        alive, text = bool(b), repr(b)
    finally:
        # An interrupt before the query's first step is forgotten: repeat.
        deadline = time.monotonic() + 30
        while tc.is_alive() and time.monotonic() < deadline:
            src.interrupt()
            tc.join(0.05)
        if ta is not None:
            ta.join(30)
        tc.join(30)
    assert not errors
    assert not b
    assert ("finished" in text) == (not alive), (alive, text)
    src.close()
    dst.close()
