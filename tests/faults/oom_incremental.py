"""Out of memory at allocations of an incremental run and a restore (issue
21), run as a fresh process by tests/test_incremental_faults.py:

    python oom_incremental.py SHIM ROUTE FOLDER

As oom_child.py: the shim's counting allocator is installed before SQLite
initialises; a counting run gives K, the allocations SQLite makes during
the route; then for a sample of N in 1..K (every one with ALL=1), once and
from then on, the Nth fails.  Each run must end in success or a clear error
(NoMemError, MemoryError, or IncrementalError naming the cause) -- never a
crash or a misleading error -- with every restore point in the folder
verifying, the points made before restoring to their own state, no file but
points in the folder, DEST absent or complete, and SQLite's memory back
where it was.

Prints one JSON object: points, runs, outcomes by class, problems.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from faults.shim import SQLITE_OK, Shim  # noqa: E402

shim = Shim(Path(sys.argv[1]))
installed = shim.install_allocator()
if installed != SQLITE_OK:
    print(json.dumps({"problems": [f"SQLITE_CONFIG_MALLOC answered {installed}"]}))
    sys.exit(0)

import apsw_backup  # noqa: E402
from apsw_backup import incremental as inc  # noqa: E402

ROUTE, FOLDER = sys.argv[2], Path(sys.argv[3])
SAMPLE = int(os.environ.get("APSW_BACKUP_OOM_SAMPLE", "60"))
POINTS = FOLDER / "points"
SRC = FOLDER / "src.db"
DEST = FOLDER / "dest.db"


def execute(path, sql):
    conn = apsw_backup.Connection(str(path))
    try:
        conn.execute(sql).fetchall()
    finally:
        conn.close()


def state(path):
    conn = apsw_backup.Connection(str(path))
    try:
        check = conn.execute("PRAGMA quick_check").fetchall()
        rows = conn.execute("SELECT count(*), total(length(v)), total(id) FROM t")
        return check, rows.fetchall()
    finally:
        conn.close()


def setup():
    FOLDER.mkdir(parents=True, exist_ok=True)
    POINTS.mkdir()
    execute(
        SRC,
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);"
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
        "WHERE i < 400) INSERT INTO t SELECT i, randomblob(300) FROM c",
    )
    inc.incremental(SRC, POINTS)
    execute(SRC, "UPDATE t SET v = randomblob(300) WHERE id % 40 = 0")
    inc.incremental(SRC, POINTS)
    states = {}
    for p in inc.list_points(POINTS):
        inc.restore(p.path, DEST)
        states[p.path] = state(DEST)
        os.remove(DEST)
    execute(SRC, "UPDATE t SET v = randomblob(300) WHERE id % 40 = 1")
    return states


def act():
    if ROUTE == "incremental":
        inc.incremental(SRC, POINTS)
    else:
        inc.restore(POINTS, DEST)


def tidy(states):
    for name in os.listdir(POINTS):
        if str(POINTS / name) not in states:
            os.remove(POINTS / name)
    for side in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(f"{DEST}{side}"):
            os.remove(f"{DEST}{side}")


def one(nth, persistent, states, expected):
    tidy(states)
    shim.mem_arm(nth, persistent)
    try:
        act()
        error = None
    except (apsw_backup.Error, MemoryError, inc.IncrementalError) as exc:
        error = exc
    finally:
        calls, injected = shim.mem_calls(), shim.mem_injected()
        shim.mem_disarm()
    problems = []
    if error is not None:
        nomem = isinstance(error, (apsw_backup.NoMemError, MemoryError))
        if not nomem and "memory" not in str(error):
            problems.append(f"raised {type(error).__name__}: {error}")
    names = os.listdir(POINTS)
    if not all(inc._parse_name(n) for n in names):
        problems.append(f"left {names}")
    if not all(r.ok for r in inc.verify_folder(POINTS)):
        problems.append("a chain does not verify")
    for path, want in states.items():
        out = FOLDER / "check.db"
        inc.restore(path, out)
        if state(out) != want:
            problems.append(f"{path} restores another state")
        os.remove(out)
    if ROUTE == "restore":
        if DEST.exists() and (error is not None or state(DEST) != expected):
            problems.append("DEST exists but is not the restored state")
        if error is None and not DEST.exists():
            problems.append("succeeded without DEST")
    else:
        made = len(names) - len(states)
        if made != (error is None):
            problems.append(f"{made} new points after {error!r}")
    outcome = "ok" if error is None else type(error).__name__
    return calls, injected, problems, outcome


def main():
    states = setup()
    newest = max(states, key=inc._stamp)
    expected = states[newest] if ROUTE == "restore" else None
    calls, _, problems, outcome = one(0, False, states, expected)
    if ROUTE == "restore":
        expected = state(DEST) if DEST.exists() else None
    one(0, False, states, expected)
    baseline = shim.memory_used()
    report = {
        "sqlite": apsw_backup.sqlite_lib_version(),
        "route": ROUTE,
        "points": calls,
        "runs": 0,
        "outcomes": {},
        "problems": [f"counting run: {p}" for p in problems],
    }
    if outcome != "ok":
        report["problems"].append(f"counting run raised {outcome}")
    step = max(1, calls // SAMPLE)
    for nth in range(1, calls + 1, step):
        for persistent in (False, True):
            _, injected, problems, outcome = one(nth, persistent, states, expected)
            report["runs"] += 1
            report["outcomes"][outcome] = report["outcomes"].get(outcome, 0) + 1
            used = shim.memory_used()
            if used != baseline:
                problems.append(f"SQLite memory {baseline} -> {used} bytes")
                baseline = used
            mode = "persistent" if persistent else "once"
            report["problems"] += [f"#{nth} {mode}: {p}" for p in problems]
    print(json.dumps(report))


main()
