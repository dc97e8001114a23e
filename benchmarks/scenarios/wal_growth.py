"""wal_growth: how much a WAL source's -wal file grows during copy() with a writer.

A WAL database of `--size-mb` (200; quick 16) whose WAL was checkpointed and
truncated first, a writer (harness.CWriter: synchronous=NORMAL, automatic
checkpoint at 1000 frames as SQLite's default) committing every 2 ms, and
copy(SOURCE_PATH, NEW_PATH) with the defaults (pages=-1) and with
pages=256.  A reader's read mark keeps the writers' checkpoints from
resetting the WAL, so it grows while the copy runs.  Reported: the -wal
file's size before and after (measured here), CopyResult.wal_growth when
copy.py reports it, the largest WAL the writer saw (frames of 4 KiB + 24
bytes), and the copy time.  5 rounds (quick 1), cases rotated.
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, child, rotated, target

KEY = "wal_growth"
CASES = {"copy() defaults (pages=-1)": {}, "pages=256": {"pages": 256}}


def run(ctx: Context) -> dict:
    source = ctx.database("wal_growth", ctx.a.size_mb, "wal")
    rounds = ctx.rounds(5, 1)
    result = {
        "title": "the source's WAL during copy(), writer every 2 ms",
        "source": source,
        "rounds": rounds,
        "cases": {},
        "errors": {},
    }
    runs: dict[str, list] = {c: [] for c in CASES}
    for r in range(rounds):
        for name in rotated(list(CASES), r):
            try:
                out = child(
                    KEY,
                    "measure",
                    300,
                    source=source["path"],
                    target=ctx.dest,
                    kwargs=CASES[name],
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result["errors"][f"{name}/{r}"] = str(exc)[-500:]
                continue
            runs[name].append(out)
    for name, outs in runs.items():
        if not outs:
            continue
        grown = [o["wal_after"] - o["wal_before"] for o in outs]
        reported = [o["wal_growth"] for o in outs if o.get("wal_growth") is not None]
        result["cases"][name] = {
            "runs": len(outs),
            "copy_median_s": statistics.median(o["elapsed"] for o in outs),
            "wal_before": [o["wal_before"] for o in outs],
            "grown_bytes_median": statistics.median(grown),
            "grown_bytes_max": max(grown),
            "reported_wal_growth": reported or None,
            "frames_max": max(o["writer"]["frames_max"] for o in outs),
            "commits_during_copy": statistics.median(o["commits"] for o in outs),
        }
    return result


def measure(source: str, target: str, kwargs: dict) -> dict:
    """Child: truncate the WAL, start the writer, copy once."""
    import sqlite3
    import time

    from harness import CWriter, remove_db, result_fields, wal_size

    import apsw_backup

    remove_db(target)
    db = sqlite3.connect(source)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    writer = CWriter(source, 0.002)
    writer.start()
    time.sleep(0.1)
    before = wal_size(source)
    begin = writer.mark()
    start = time.perf_counter()
    res = apsw_backup.copy(source, target, **kwargs)
    elapsed = time.perf_counter() - start
    after = wal_size(source)
    commits = writer.mark() - begin
    writer.finish()
    remove_db(target)
    return {
        "elapsed": elapsed,
        "wal_before": before,
        "wal_after": after,
        "commits": commits,
        "writer": writer.counters(),
    } | result_fields(res)


def targets(s: dict) -> list[dict]:
    out = []
    for name, c in s["cases"].items():
        value = (
            f"grew {c['grown_bytes_median'] / 1e6:.2f} MB median "
            f"(max {c['grown_bytes_max'] / 1e6:.2f}) in {c['copy_median_s']:.3f} s"
        )
        ok = None
        if c["reported_wal_growth"] is not None:
            value += f"; CopyResult.wal_growth {c['reported_wal_growth']}"
        out.append(target(f"wal_growth {name} (reported)", value, ok))
    return out


def table(s: dict) -> list[str]:
    lines = [
        f"[wal_growth] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB, "
        f"{s['rounds']} rounds"
    ]
    w = lines.append
    w(
        f"  {'case':28} {'copy s':>7} {'commits':>7} {'grew MB':>8} {'max MB':>7} "
        f"{'WAL frames max':>14} {'CopyResult.wal_growth':>24}"
    )
    for name, c in s["cases"].items():
        rep = c["reported_wal_growth"]
        rep = "not in this copy.py" if rep is None else "/".join(map(str, rep))
        w(
            f"  {name:28} {c['copy_median_s']:>7.3f} {c['commits_during_copy']:>7.0f} "
            f"{c['grown_bytes_median'] / 1e6:>8.2f} {c['grown_bytes_max'] / 1e6:>7.2f} "
            f"{c['frames_max']:>14} {rep[:24]:>24}"
        )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
