"""rollback_shim: what the rollback shim costs a copy (docs/journal-mode.md).

copy() opens every path target through the rollback shim (src/pageshim.c),
verified or not.  Two pairs, each interleaved over --rounds rounds (order
alternating) in one process, on a WAL source of --mb MB (built once in
--workdir):

- backup, no fsync: Connection.backup() step(-1) into a new file with
  synchronous=OFF, through the rollback shim vs the default VFS -- the VFS
  path alone, nothing waits for the disk;
- copy(), unverified: copy() as shipped vs copy() with the shim bypassed
  (the target opened on the default VFS), fsyncs and all.

Prints, per pair, the median seconds and the median of the paired ratios
(shim / without) of wall-clock and CPU time.  Target: the CPU ratio of the
backup pair within 1.00 +- 0.03 (the wall ratios follow the machine's
load).

    python benchmarks/rollback_shim.py                  # 100 MB, 21 rounds
    python benchmarks/rollback_shim.py --mb 4 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time

import apsw_backup
import apsw_backup.copy  # noqa: F401  (the module, not the function)
from apsw_backup import _apsw_backup as _c

copymod = sys.modules["apsw_backup.copy"]


def build(path: str, mb: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=wal")
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
        db.execute("CREATE INDEX ti ON t(b)")
        rows = max(1, mb * 2**20 // 1200)
        db.execute(
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c "
            f"WHERE i < {rows}) INSERT INTO t(b) SELECT randomblob(500) FROM c"
        )
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def remove(path: str) -> None:
    for side in ("", "-journal", "-wal", "-shm"):
        if os.path.exists(path + side):
            os.remove(path + side)


def timed(func) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - wall, time.process_time() - cpu


def raw_backup(source: str, dest: str, vfs: str | None) -> tuple[float, float]:
    remove(dest)

    def run() -> None:
        src = apsw_backup.Connection(source)
        target = apsw_backup.Connection(dest, vfs=vfs)
        try:
            target.execute("PRAGMA synchronous=OFF").fetchall()
            with target.backup("main", src, "main") as backup:
                backup.step(-1)
        finally:
            target.close()
            src.close()

    return timed(run)


def copy_call(source: str, dest: str, shim: bool) -> tuple[float, float]:
    remove(dest)
    shipped = copymod._TargetSide._vfs

    def default_vfs(self, path):
        shipped(self, path)  # keeps the recorder logic as it is
        return None

    copymod._TargetSide._vfs = shipped if shim else default_vfs
    try:
        return timed(lambda: apsw_backup.copy(source, dest))
    finally:
        copymod._TargetSide._vfs = shipped


def pair(rounds: int, with_shim, without) -> dict:
    with_shim(), without()  # warm the cache and the code
    walls, cpus, shim_s, plain_s = [], [], [], []
    for r in range(rounds):
        if r % 2:
            b = without()
            a = with_shim()
        else:
            a = with_shim()
            b = without()
        shim_s.append(a[0])
        plain_s.append(b[0])
        walls.append(a[0] / b[0])
        cpus.append(a[1] / b[1] if b[1] else 1.0)
    return {
        "shim_s": statistics.median(shim_s),
        "without_s": statistics.median(plain_s),
        "wall_ratio": statistics.median(walls),
        "cpu_ratio": statistics.median(cpus),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollback_shim")
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="rollback-shim-")
    source = os.path.join(work, f"src-{args.mb}mb.db")
    if not os.path.exists(source):
        build(source, args.mb)
    dest = os.path.join(work, "dest.db")
    rollback = _c._rollback_vfs()
    load = os.getloadavg()[0]
    report = {
        "mb": os.path.getsize(source) / 1e6,
        "rounds": args.rounds,
        "load": load,
        "backup, no fsync": pair(
            args.rounds,
            lambda: raw_backup(source, dest, rollback),
            lambda: raw_backup(source, dest, None),
        ),
        "copy(), unverified": pair(
            args.rounds,
            lambda: copy_call(source, dest, True),
            lambda: copy_call(source, dest, False),
        ),
    }
    remove(dest)
    print(
        f"source {report['mb']:.0f} MB, {args.rounds} rounds, "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    for name in ("backup, no fsync", "copy(), unverified"):
        r = report[name]
        print(
            f"{name}: shim {r['shim_s']:.3f} s, without {r['without_s']:.3f} s; "
            f"shim/without (median of paired ratios): wall {r['wall_ratio']:.3f}, "
            f"CPU {r['cpu_ratio']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
