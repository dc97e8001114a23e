"""docs/api.md#errors-from-step, docs/locking.md: the page-size trap (a WAL, in-memory or temp destination
whose page size differs from the source's) is explained, and no SQL runs on
the destination while the backup is unfinished.

Found in review: the message used to be built by PRAGMAs run on the
destination while the backup held its write transaction; they committed the
partial copy (WAL: "database disk image is malformed", the old table gone;
in memory: a later query hung).  Each case runs in a subprocess with a
timeout, so the hang fails the test rather than the suite.
"""

import pytest
from child_process import run_bounded

SCRIPT = """
import os, sys
import apsw_backup as ab
d, kind, changer = sys.argv[1:4]
src_path = os.path.join(d, "s.db")
src = ab.Connection(src_path)
src.execute(
    "CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL "
    "SELECT i+1 FROM n WHERE i<2000) INSERT INTO t SELECT randomblob(300) FROM n")
schema = "main"
if kind == "wal":
    dst = ab.Connection(os.path.join(d, "d.db"))
    dst.execute("PRAGMA journal_mode=WAL").fetchall()
elif kind == "memory":
    dst = ab.Connection(":memory:")
else:
    dst = ab.Connection(os.path.join(d, "d.db"))
    schema = "temp"
dst.execute(f"CREATE TABLE {schema}.keep(y); INSERT INTO {schema}.keep VALUES (42)")
b = dst.backup(schema, src, "main")
for _ in range(3):
    b.step(7)
if changer == "other":
    other = ab.Connection(src_path)
    other.execute("PRAGMA page_size=1024; VACUUM")
    other.close()
else:
    src.execute("PRAGMA page_size=1024; VACUUM")
try:
    b.step(7)
except ab.ReadOnlyError as exc:
    print("STEP", exc)
try:
    b.finish()
except ab.ReadOnlyError as exc:
    print("FINISH", exc)
print("KEEP", dst.execute(f"SELECT y FROM {schema}.keep").fetchall())
print("CHECK", dst.execute(f"PRAGMA {schema}.integrity_check").fetchall())
if kind == "wal":
    dst.close()
    again = ab.Connection(os.path.join(d, "d.db"))
    print("REOPENED", again.execute("SELECT y FROM keep").fetchall(),
          again.execute("PRAGMA integrity_check").fetchall())
"""


@pytest.mark.parametrize("changer", ["other", "source"])
@pytest.mark.parametrize("kind", ["wal", "memory", "temp"])
def test_page_size_change_leaves_destination_intact_and_explained(
    tmp_path, kind, changer
):
    proc = run_bounded(SCRIPT, tmp_path, kind, changer, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    step = lines["STEP"]
    assert "page size" in step and "1024" in step and "4096" in step
    assert ("WAL" in step) == (kind == "wal")
    assert "destination was not changed" in step
    assert lines["FINISH"] == step, "finish() reports the step's error again"
    assert lines["KEEP"] == "[(42,)]"
    assert lines["CHECK"] == "[('ok',)]"
    if kind == "wal":
        assert lines["REOPENED"] == "[(42,)] [('ok',)]"


def test_read_only_destination_is_not_called_the_page_size_trap(tmp_path):
    """READONLY for a read-only destination gets the plain message."""
    import apsw_backup

    path = tmp_path / "ro.db"
    rw = apsw_backup.Connection(str(path))
    rw.execute("CREATE TABLE t(x)").fetchall()
    rw.close()
    src = apsw_backup.Connection(str(tmp_path / "s.db"))
    src.execute("PRAGMA page_size=1024; CREATE TABLE s(x)").fetchall()
    ro = apsw_backup.Connection(str(path), apsw_backup.SQLITE_OPEN_READONLY)
    b = ro.backup("main", src, "main")
    with pytest.raises(apsw_backup.ReadOnlyError) as info:
        b.step(-1)
    assert "page size" not in str(info.value)
    with pytest.raises(apsw_backup.ReadOnlyError):
        b.finish()
    ro.close()
    src.close()
