"""incremental: restore points against full backups (the targets of docs/incremental.md).

Builds (in --workdir) a database of --mb MB (default 200): one table of
rows with a 400-byte blob (about 9 rows to a 4 KiB page), then measures,
each measurement in a fresh process (its time inside the process, its peak
RSS from the kernel), the source in the OS cache:

- full:        apsw_backup.copy(SOURCE, new DEST), unverified;
- full+check:  the same with verify(DEST, "default") (quick_check: no
               recorder) before the rename;
- base:        incremental() into an empty folder (every page);
- delta:       incremental() after 1 % of the rows were updated (random
               rows), at its default verification: its pages re-read from
               the disk and checked against their hashes, the chain it
               extends checked page by page (docs/incremental.md,
               "Verification");
- delta, unverified: incremental(verify=False) after another 1 %: the
               new pages not read back (the chain it extends still
               checked) -- the counterpart of the unverified full backup;
- delta+check: the same with quick_check=True: also PRAGMA quick_check of
               the new point's state through the overlay, before it is put
               in place (the full backup's default check, on a delta);
- restore:     restore() of base + 10 deltas into a new file (the chain
               checked, every page read back from the disk and checked
               against the manifest, quick_check), the chain's files in the
               OS cache as the source is for the full backup.

and the disk used by 11 restore points (a base, then 10 runs each after
1 % of the rows changed, default rebase rules) against 11 full copies.

Targets (docs/incremental.md): delta bytes <= 12 % of a full backup's, delta time
<= 40 % (both unverified, and each at its default verification: the
delta's hashes, the full backup's quick_check); 11 points
<= 25 % of 11 full copies; restore of base + 10 <= 2x a full backup; peak
memory <= 64 MB.  The delta with quick_check against the full backup with
quick_check (the same structural check on both), and the delta at its
default against the unverified full backup, are printed too.

    python benchmarks/incremental.py                 # 200 MB, 3 rounds
    python benchmarks/incremental.py --mb 20 --rounds 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROW_BYTES = 400
ROWS_PER_MB = 1024 * 1024 // (ROW_BYTES + 40)


def build(path: Path, mb: int) -> int:
    rows = mb * ROWS_PER_MB
    if path.exists():
        return rows
    tmp = path.with_suffix(".building")
    if tmp.exists():
        tmp.unlink()
    db = sqlite3.connect(str(tmp))
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER, v BLOB)")
    db.execute(
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < ?) "
        "INSERT INTO t SELECT i, i * 7, randomblob(?) FROM c",
        (rows, ROW_BYTES),
    )
    db.commit()
    db.close()
    tmp.rename(path)
    return rows


def update_one_percent(path: Path, rows: int, seed: int) -> None:
    rnd = random.Random(seed)
    ids = rnd.sample(range(1, rows + 1), rows // 100)
    db = sqlite3.connect(str(path))
    db.executemany(
        "UPDATE t SET v = randomblob(?), n = n + 1 WHERE id = ?",
        ((ROW_BYTES, i) for i in ids),
    )
    db.commit()
    db.close()


def warm(path: Path) -> None:
    with open(path, "rb") as f:  # a benchmark's own source, no SQLite here
        while f.read(1 << 24):
            pass


# -- the child side --------------------------------------------------------


def child(op: str, args: list[str]) -> dict[str, object]:
    import apsw_backup
    from apsw_backup import incremental as inc
    from apsw_backup import verify

    began = time.perf_counter()
    out: dict[str, object] = {}
    if op in ("full", "full+check"):
        src, dest = args
        check = (lambda p: verify.verify(p, "default")) if op == "full+check" else None
        apsw_backup.copy(src, dest, verify=check)
        out["bytes"] = os.path.getsize(dest)
    elif op in ("incremental", "incremental+check", "incremental-unverified"):
        src, folder = args
        r = inc.incremental(
            src,
            folder,
            quick_check=op == "incremental+check",
            verify=op != "incremental-unverified",
        )
        out.update(bytes=r.bytes_written, kind=r.kind, pages=r.pages_written)
    elif op == "restore":
        folder, dest = args
        r = inc.restore(folder, dest)
        out["bytes"] = os.path.getsize(dest)
    else:
        raise SystemExit(f"unknown op {op}")
    out["seconds"] = time.perf_counter() - began
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure(op: str, *args: object) -> dict[str, object]:
    subprocess.run(["sync"], check=False)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", op, *map(str, args)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# -- the parent side -------------------------------------------------------


def one_round(
    work: Path, src: Path, rows: int, seed: int
) -> dict[str, dict[str, object]]:
    res: dict[str, dict[str, object]] = {}
    folder = work / f"points-{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for dest in work.glob("full*.db"):
        dest.unlink()
    warm(src)
    res["full"] = measure("full", src, work / "full.db")
    res["full+check"] = measure("full+check", src, work / "full2.db")
    res["base"] = measure("incremental", src, folder)
    update_one_percent(src, rows, seed)
    warm(src)
    res["delta"] = measure("incremental", src, folder)
    update_one_percent(src, rows, seed + 1000)
    warm(src)
    res["delta+check"] = measure("incremental+check", src, folder)
    update_one_percent(src, rows, seed + 3000)
    warm(src)
    res["delta-unverified"] = measure("incremental-unverified", src, folder)
    for k in range(7):  # to base + 10 runs after the base
        update_one_percent(src, rows, seed + 2000 + k)
        measure("incremental", src, folder)
    points = sorted(p.name for p in folder.iterdir())
    res["chain"] = {
        "points": len(points),
        "bases": sum(".base." in p for p in points),
        "bytes": folder_size(folder),
    }
    restored = work / "restored.db"
    if restored.exists():
        restored.unlink()
    for point in folder.iterdir():  # in the OS cache, as the source is for full
        warm(point)
    res["restore"] = measure("restore", folder, restored)
    shutil.rmtree(folder, ignore_errors=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(opts.child[0], opts.child[1:])))
        return
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="incr-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"source-{opts.mb}.db"
    rows = build(src, opts.mb)
    size = src.stat().st_size
    print(f"source: {size / 1e6:.1f} MB, {rows} rows, 1 % = {rows // 100} rows a run")
    rounds = [one_round(work, src, rows, 100 * r + 1) for r in range(opts.rounds)]

    def med(key: str, field: str) -> float:
        return statistics.median(float(r[key][field]) for r in rounds)  # type: ignore[arg-type]

    full_t, full_b = med("full", "seconds"), med("full", "bytes")
    fullc_t = med("full+check", "seconds")
    delta_t, delta_b = med("delta", "seconds"), med("delta", "bytes")
    deltac_t = med("delta+check", "seconds")
    deltau_t = med("delta-unverified", "seconds")
    chain_b = med("chain", "bytes")
    rest_t = med("restore", "seconds")
    rss = max(float(r[k]["max_rss_mb"]) for r in rounds for k in r if k != "chain")  # type: ignore[arg-type]
    print(f"{'measure':40} {'value':>12} {'target':>10}")
    rows_out = [
        ("full backup, s (unverified)", f"{full_t:.3f}", ""),
        ("full backup, s (verified: quick_check)", f"{fullc_t:.3f}", ""),
        ("base, s", f"{med('base', 'seconds'):.3f}", ""),
        ("delta, s (default verification: hashes)", f"{delta_t:.3f}", ""),
        ("delta, s (unverified: not read back)", f"{deltau_t:.3f}", ""),
        ("delta + quick_check via overlay, s", f"{deltac_t:.3f}", ""),
        ("delta bytes / full bytes", f"{delta_b / full_b:.1%}", "<= 12%"),
        ("delta / full (both unverified)", f"{deltau_t / full_t:.1%}", "<= 40%"),
        ("delta / full+check (default levels)", f"{delta_t / fullc_t:.1%}", "<= 40%"),
        ("delta (default) / full (unverified)", f"{delta_t / full_t:.1%}", ""),
        ("delta+check / full+check (quick_check)", f"{deltac_t / fullc_t:.1%}", ""),
        (
            f"11 points ({rounds[0]['chain']['bases']} bases) / 11 full copies",
            f"{chain_b / (11 * full_b):.1%}",
            "<= 25%",
        ),
        ("restore base+10, s", f"{rest_t:.3f}", ""),
        ("restore base+10 / full backup", f"{rest_t / full_t:.2f}x", "<= 2x"),
        ("peak RSS of any run, MB", f"{rss:.0f}", "<= 64"),
    ]
    for name, value, target in rows_out:
        print(f"{name:40} {value:>12} {target:>10}")
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    (out / "incremental.json").write_text(
        json.dumps({"size": size, "rounds": rounds}, indent=1)
    )


if __name__ == "__main__":
    main()
