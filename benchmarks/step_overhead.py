"""Instructions each contender spends per backup step beyond SQLite's own.

    python benchmarks/step_overhead.py [--mb 32] [--keep DIR]

Wall-clock time on a shared machine is noisy; instruction counts are not.
This runs every contender of run.py under valgrind's callgrind on the same
database into :memory:, once with step(1) and once with step(-1), and reports
per step:

- in SQLite: sqlite3_backup_step's inclusive instructions per step(1) call;
- binding: the contender's step method minus SQLite (apsw_backup's
  Backup.step, APSW's Backup.step; for the standard library its whole C loop);
- py loop: the Python `while not b.step(1)` around it;
- beyond SQLite: the marginal instructions of one more step outside SQLite,
  (I(step 1) - I(step -1) - the same difference inside SQLite) / (N - 1), so
  start-up, imports and opening cancel out; and that as a share of SQLite's.

Then it splits apsw_backup's Backup.step into the GIL hand-over and its own
code.  Needs valgrind.  System calls cost no instructions here, so the share
is an upper bound of the share of wall time.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402 (bench.py sits beside this file)

COLLECTED = re.compile(r"Collected : (\d+)")


def _package_parent() -> str:
    import apsw_backup

    return os.path.dirname(os.path.dirname(os.path.abspath(apsw_backup.__file__)))


def callgrind(cmd: list[str], out: Path) -> int:
    # A fixed hash seed makes the two runs of one contender do the same work
    # outside the backup, so that work cancels out in the difference.
    # The interpreter runs by its real path (valgrind follows no shim), which
    # leaves any virtual environment: its import path is passed on instead.
    # (An editable install is found through a .pth file, which PYTHONPATH
    # does not read: the folder apsw_backup is imported from goes first.)
    path = os.pathsep.join([_package_parent(), *(p for p in sys.path if p)])
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=path)
    proc = subprocess.run(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr[-2000:]}")
    return int(COLLECTED.search(proc.stderr).group(1))


ENTRY = {
    "raw_c": None,
    "apsw_backup": "backup_step",
    "stdlib": "pysqlite_connection_backup",
    "apsw": "APSWBackup_step",
}
TREE_LINE = re.compile(r"\s*([\d,]+)\s+([*>])\s+(\S+?):(\S+)(?: \((\d+)x\))?")


def tree(out: Path) -> dict[str, dict]:
    """Per function: inclusive cost and its callees' costs (callgrind_annotate)."""
    proc = subprocess.run(
        [
            "callgrind_annotate",
            "--tree=calling",
            "--inclusive=yes",
            "--show-percs=no",
            "--threshold=100",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    funcs: dict[str, dict] = {}
    current = None
    for line in proc.stdout.splitlines():
        m = TREE_LINE.match(line)
        if not m:
            continue
        cost, kind, name = int(m.group(1).replace(",", "")), m.group(2), m.group(4)
        name = name.split("'")[0]
        if kind == "*":
            current = funcs.setdefault(name, {"inclusive": 0, "callees": {}})
            current["inclusive"] = max(current["inclusive"], cost)
        elif current is not None:
            current["callees"][name] = current["callees"].get(name, 0) + cost
    return funcs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=32, help="database size (default 32 MB)")
    p.add_argument("--keep", type=Path, help="keep the callgrind files here")
    a = p.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    work = Path(tempfile.mkdtemp(prefix="apsw_backup_cg_"))
    try:
        raw_c, _ = bench.build_raw_c(work)
        names, info = bench.contenders_available(raw_c)
        db = bench.make_db(work / "source.db", a.mb)
        n = db["pages"]
        python = os.path.realpath(sys.executable)  # not a shim: valgrind follows it
        rows, trees = {}, {}
        for name in names:
            totals, sqlite = {}, {}
            for pages in (1, -1):
                out = work / f"callgrind.{name}.{'one' if pages == 1 else 'all'}"
                if name == "raw_c":
                    cmd = [str(raw_c), db["path"], ":memory:", str(pages)]
                else:
                    cmd = [
                        python,
                        str(bench.WORKER),
                        "backup",
                        name,
                        db["path"],
                        ":memory:",
                        str(pages),
                        "OFF",
                    ]
                totals[pages] = callgrind(cmd, out)
                trees[name, pages] = tree(out)
                sqlite[pages] = trees[name, pages]["sqlite3_backup_step"]["inclusive"]
            beyond = (totals[1] - totals[-1] - (sqlite[1] - sqlite[-1])) / (n - 1)
            per_call = sqlite[1] / n
            entry = ENTRY[name]
            binding = None
            if entry:
                binding = (trees[name, 1][entry]["inclusive"] - sqlite[1]) / n
            rows[name] = (per_call, binding, beyond)
        print(f"{n} pages of 4096 into :memory: with step(1); instructions per step")
        print(
            f"  {'contender':12} {'in SQLite':>9} {'binding':>8} {'py loop':>8} "
            f"{'beyond SQLite':>13} {'% of SQLite':>11}"
        )
        for name, (per_call, binding, beyond) in rows.items():
            loop = "" if binding is None else f"{max(0.0, beyond - binding):.0f}"
            if name == "stdlib":
                loop = "(in C)"
            print(
                f"  {name:12} {per_call:>9.0f} "
                f"{'' if binding is None else f'{binding:.0f}':>8} {loop:>8} "
                f"{beyond:>13.0f} {100 * beyond / per_call:>10.1f}%"
            )
        print("  in SQLite: sqlite3_backup_step's inclusive cost per call; binding:")
        print("  the step method (stdlib: its whole C loop) minus SQLite; py loop: the")
        print("  Python `while not b.step(1)` around it; beyond SQLite: the marginal")
        print("  instructions of a step, step(1) run against step(-1) run.")
        if "apsw" in rows:
            print(
                f"  apsw runs its own SQLite "
                f"{info['apsw'].split('SQLite ')[1].split()[0]}, not the system one."
            )
        if ("apsw_backup", 1) in trees:
            t = trees["apsw_backup", 1]["backup_step"]
            callees = t["callees"]
            gil = callees.get("PyEval_SaveThread", 0) + callees.get(
                "PyEval_RestoreThread", 0
            )
            own = t["inclusive"] - sum(callees.values())
            print("\napsw_backup backup_step() per call, beyond sqlite3_backup_step:")
            print(f"  {'GIL release + re-acquire':34} {gil / n:>7.0f}")
            print(f"  {'backup_step own code':34} {own / n:>7.0f}")
            for callee, cost in sorted(callees.items(), key=lambda kv: -kv[1]):
                if callee not in (
                    "sqlite3_backup_step",
                    "PyEval_SaveThread",
                    "PyEval_RestoreThread",
                ):
                    print(f"  {callee:34} {cost / n:>7.0f}")
        if a.keep:
            a.keep.mkdir(parents=True, exist_ok=True)
            for f in work.glob("callgrind.*"):
                shutil.copy(f, a.keep / f.name)
            print(f"\ncallgrind files in {a.keep} (callgrind_annotate FILE)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
