"""No SQL may run (docs/locking.md) on a backup's destination while the backup is unfinished -- it can commit
the backup's write transaction (a partial copy).

A8: a Cursor of the destination with a live statement on *another* schema
(attached, or temp) does not stop backup(); closing or dropping that cursor
during the backup finalizes the statement, and SQLite's autocommit then
commits every schema's transaction -- the backup's partial copy included.
finish() says "rolled back"; the destination is corrupt and its old content
gone.
"""

import pytest

import apsw_backup as ab


def make(tmp_path):
    s = ab.Connection(str(tmp_path / "s.db"))
    s.execute("PRAGMA page_size=1024")
    s.execute(
        "CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 "
        "FROM n WHERE i<2000) INSERT INTO t SELECT randomblob(900) FROM n"
    )
    a = ab.Connection(str(tmp_path / "aux.db"))
    a.execute("CREATE TABLE a(x); INSERT INTO a VALUES (1), (2), (3)")
    a.close()
    d = ab.Connection(str(tmp_path / "d.db"))
    d.execute("PRAGMA page_size=1024")
    d.execute("CREATE TABLE old(y); INSERT INTO old VALUES ('old content')")
    d.execute("ATTACH ? AS aux", (str(tmp_path / "aux.db"),))
    return s, d


@pytest.mark.parametrize("how", ["close", "del"])
def test_destination_cursor_finalized_during_backup_keeps_old_content(tmp_path, how):
    s, d = make(tmp_path)
    cur = d.execute("SELECT x FROM aux.a")
    assert cur.fetchone() == (1,)  # a live statement on another schema
    try:
        b = d.backup("main", s, "main")
    except (ab.ThreadingViolationError, ab.SQLError):
        b = None  # refusing the backup is a fine answer
    if b is not None:
        assert b.step(200) is False
        if how == "close":
            cur.close()
        else:
            del cur
        b.finish()  # before the copy completed: rolled back
    d.close(force=True)
    s.close()
    check = ab.Connection(str(tmp_path / "d.db"))
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute("SELECT y FROM old").fetchall() == [("old content",)]
    check.close()
