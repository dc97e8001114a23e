"""Out of memory at every allocation of a backup (docs/testing.md).

Run as a fresh process by tests/test_oom.py and .ci/faults:

    python oom_child.py SHIM CASE FOLDER

It installs the shim's counting allocator with SQLITE_CONFIG_MALLOC before
anything initialises SQLite (so neither the standard sqlite3 module nor
anything that imports it is imported), then imports apsw_backup.  A counting
run gives K, the allocations SQLite makes during backup(), step() and
finish(); then for every N in 1..K, once and from then on, the Nth fails.
Each run must end in NoMemError (or MemoryError) or success -- never a
crash or another error -- with the backup finished, the destination (opened
afresh for a file) holding its old content or the complete copy with
integrity_check ok, the memory SQLite holds back to where it was once the
run's connections are closed, and a plain backup working afterwards.

Prints one JSON object: points, runs, outcomes by class, problems.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def summary(text):
    """`oom_child.py --summary JSON`: the figures of a report, for .ci/faults
    (first line: points runs failures)."""
    report = json.loads(text)
    print(report["points"], report["runs"], len(report["problems"]))
    print(
        f"oom {report['case']:8} SQLite {report['sqlite']}: {report['points']} "
        f"allocation points, {report['runs']} runs, outcomes "
        f"{report['outcomes']}, failures {len(report['problems'])}"
    )
    for problem in report["problems"][:10]:
        print("    " + problem)


if sys.argv[1] == "--summary":
    summary(sys.argv[2])
    sys.exit(0)

from faults.shim import SQLITE_OK, Shim  # noqa: E402  (no sqlite3 import)

shim = Shim(Path(sys.argv[1]))
installed = shim.install_allocator()
if installed != SQLITE_OK:
    print(json.dumps({"problems": [f"SQLITE_CONFIG_MALLOC answered {installed}"]}))
    sys.exit(0)

import apsw_backup  # noqa: E402

CASE, FOLDER = sys.argv[2], Path(sys.argv[3])
STEP_PAGES = 5


def fill_source(path):
    conn = apsw_backup.Connection(str(path))
    conn.execute(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, data BLOB);"
        "CREATE INDEX t_name ON t(name);"
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
        "WHERE i < 100) INSERT INTO t(name, data) "
        "SELECT 'row' || i, randomblob(1500) FROM c"
    ).fetchall()
    conn.close()


def fill_old(conn):
    conn.execute("BEGIN; CREATE TABLE old(n INTEGER, text TEXT)").fetchall()
    conn.executemany(
        "INSERT INTO old VALUES (?, ?)", [(n, f"old {n}" * 30) for n in range(30)]
    ).fetchall()
    conn.execute("COMMIT").fetchall()


def dump(conn):
    master = conn.execute(
        "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()
    return master, {
        name: conn.execute(f'SELECT * FROM "{name}" ORDER BY rowid').fetchall()
        for kind, name, _ in master
        if kind == "table"
    }


def prepare():
    """A fresh destination (file or memory) holding the old content."""
    dest_path = FOLDER / "dest.db"
    for suffix in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(f"{dest_path}{suffix}"):
            os.remove(f"{dest_path}{suffix}")
    dest = apsw_backup.Connection(":memory:" if CASE == "memory" else str(dest_path))
    if CASE != "new":
        fill_old(dest)
    return dest, dest_path


def backup(dest, source):
    """backup(), step()s, finish(): the first error, and whether it finished."""
    error = None
    b = None
    try:
        b = dest.backup("main", source, "main")
        while not b.step(STEP_PAGES):
            pass
    except (apsw_backup.Error, MemoryError) as exc:
        error = exc
    if b is not None:
        try:
            b.finish()
        except (apsw_backup.Error, MemoryError) as exc:
            error = error or exc
        return error, not b
    return error, True


def content(dest, dest_path):
    if CASE == "memory":
        return dump(dest), dest.execute("PRAGMA integrity_check").fetchall()
    dest.close()
    fresh = apsw_backup.Connection(str(dest_path))
    try:
        return dump(fresh), fresh.execute("PRAGMA integrity_check").fetchall()
    finally:
        fresh.close()


def one(source_path, nth, persistent, expected, old):
    """One backup from a source connection of its own (a cold page cache:
    the step allocates as it reads)."""
    dest, dest_path = prepare()
    source = apsw_backup.Connection(str(source_path))
    shim.mem_arm(nth, persistent)
    try:
        error, finished = backup(dest, source)
    finally:
        calls, injected = shim.mem_calls(), shim.mem_injected()
        shim.mem_disarm()
    problems = []
    if not finished:
        problems.append("finish() did not finish the backup")
    if error is not None:
        is_nomem = isinstance(error, apsw_backup.NoMemError) or (
            type(error) is MemoryError
        )
        if not is_nomem:
            problems.append(f"raised {type(error).__name__}: {error}")
        elif isinstance(error, apsw_backup.Error) and error.result != 7:
            problems.append(f"NoMemError with result {error.result}")
    got, integrity = content(dest, dest_path)
    if integrity != [("ok",)]:
        problems.append(f"integrity_check {integrity[:3]}")
    if got not in (old, expected):
        problems.append("destination neither old nor complete")
    if error is None and got != expected:
        problems.append("succeeded but the copy is not complete")
    if CASE == "memory":
        dest.close()
    source.close()
    outcome = "ok" if error is None else type(error).__name__
    return calls, injected, problems, outcome


def main():
    FOLDER.mkdir(parents=True, exist_ok=True)
    source_path = FOLDER / "src.db"
    fill_source(source_path)
    source = apsw_backup.Connection(str(source_path))
    expected = dump(source)
    source.close()
    old = ([], {}) if CASE == "new" else None
    if old is None:
        scratch = apsw_backup.Connection(":memory:")
        fill_old(scratch)
        old = dump(scratch)
        scratch.close()

    # The counting run, which also warms up every cache a run fills.
    calls, _, problems, outcome = one(source_path, 0, False, expected, old)
    one(source_path, 0, False, expected, old)
    baseline = shim.memory_used()
    report = {
        "sqlite": apsw_backup.sqlite_lib_version(),
        "case": CASE,
        "points": calls,
        "runs": 0,
        "outcomes": {},
        "problems": [f"counting run: {p}" for p in problems],
    }
    if outcome != "ok":
        report["problems"].append(f"counting run raised {outcome}")
    for nth in range(1, calls + 1):
        for persistent in (False, True):
            _, injected, problems, outcome = one(
                source_path, nth, persistent, expected, old
            )
            report["runs"] += 1
            report["outcomes"][outcome] = report["outcomes"].get(outcome, 0) + 1
            if not injected:
                problems.append("the allocation was never made")
            used = shim.memory_used()
            if used != baseline:
                problems.append(f"SQLite memory {baseline} -> {used} bytes")
                baseline = used
            mode = "persistent" if persistent else "once"
            report["problems"] += [f"#{nth} {mode}: {p}" for p in problems]

    # Usable afterwards: a plain backup into a fresh database copies it all.
    after = apsw_backup.Connection(":memory:")
    source = apsw_backup.Connection(str(source_path))
    with after.backup("main", source, "main") as b:
        b.step(-1)
    if dump(after) != expected:
        report["problems"].append("a backup after the faults is not complete")
    after.close()
    source.close()
    print(json.dumps(report))


main()
