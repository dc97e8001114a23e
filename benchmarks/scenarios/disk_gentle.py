"""disk_gentle: a WAL writer's fsync latency while a copy writes to the same disk.

Real fsyncs, one disk (the one holding `--workdir`).  A small WAL database
gets a writer (harness.CWriter, synchronous=FULL: every commit fsyncs the
WAL) committing every 2 ms, while a quiescent database of `--disk-mb` (60;
quick 8), in the OS cache, is copied to a new file beside it by:

- cp + fsync: `cp SRC DEST`, then fsync(DEST): the plain file copy;
- stdlib: sqlite3 `src.backup(dst)` (all at once, synchronous=FULL);
- copy() defaults: `apsw_backup.copy(SRC, DEST)`, every argument the
  default: flush_every=2 MiB (the target's cache is 1 MiB, so pages spill to
  the file as the copy goes, and each time it grew by 2 MiB copy() starts
  writing that slice out and waits for the slice before: sync_file_range
  on Linux, no more than ~2 slices of the copy's dirty data in flight);
- copy(flush_every=None): no flushing, everything left to the final commit
  (what copy() did before), the baseline of the "copy <= 1.3x" target;
- copy(flush_every=4 MiB), copy(flush_every=1 MiB): other slice sizes;
- sliced 4 MB (prototype): the earlier prototype outside copy():
  `copy(SRC, dst, pages=256, progress=FlushPacer)`, dst a Connection with
  cache_size=-1024 and the progress callback fdatasyncing every 4 MiB.

Each run is a fresh process: os.sync(), the writer starts, 0.3 s later the
copy; the commits that began during the copy are kept; "none" keeps 1 s of
the writer alone.  5 rounds (quick 1), contenders rotated; latencies pooled.
Targets (docs/performance.md): writer p99 during copy() <= 0.5x its p99 during cp +
fsync; copy() defaults no more than 1.3x slower than copy(flush_every=None).
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, child, rotated, target

KEY = "disk_gentle"
CASES = {
    "none": {"how": "none"},
    "cp + fsync": {"how": "cp"},
    "stdlib backup()": {"how": "stdlib"},
    "copy() defaults": {"how": "copy"},
    "copy(flush_every=None)": {"how": "copy", "flush_every": None},
    "copy(flush_every=4 MiB)": {"how": "copy", "flush_every": 4 * 2**20},
    "copy(flush_every=1 MiB)": {"how": "copy", "flush_every": 2**20},
    "sliced 4 MB (prototype)": {"how": "sliced", "slice_mb": 4},
}
BASELINE = "copy(flush_every=None)"


def run(ctx: Context) -> dict:
    mb = getattr(ctx.a, "disk_mb", None) or (8 if ctx.quick else 60)
    source = ctx.database("disk_gentle", mb, "delete")
    log = ctx.database("disk_writer", 1, "wal")
    rounds = ctx.rounds(5, 1)
    result = {
        "title": "WAL writer (synchronous=FULL, every 2 ms) during a copy, one disk",
        "source": source,
        "rounds": rounds,
        "cases": {},
        "errors": {},
    }
    pooled: dict[str, list] = {c: [] for c in CASES}
    outs: dict[str, list] = {c: [] for c in CASES}
    for r in range(rounds):
        for name in rotated(list(CASES), r):
            try:
                out = child(
                    KEY,
                    "measure",
                    300,
                    source=source["path"],
                    target=ctx.dest,
                    writer_db=log["path"],
                    case=CASES[name],
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result["errors"][f"{name}/{r}"] = str(exc)[-500:]
                continue
            pooled[name] += out.pop("latencies")
            outs[name].append(out)
    from harness import latency_summary

    for name in CASES:
        if not pooled[name]:
            continue
        times = [o["elapsed"] for o in outs[name] if o["elapsed"] is not None]
        result["cases"][name] = latency_summary(pooled[name]) | {
            "copy_median_s": statistics.median(times) if times else None,
            "copy_times": times,
            "flushes": [o.get("flushes") for o in outs[name]],
        }
    cases = result["cases"]
    cp, ours = cases.get("cp + fsync"), cases.get(BASELINE)
    for c in cases.values():
        if cp:
            c["p99_vs_cp"] = c["p99_ms"] / cp["p99_ms"]
        if ours and c["copy_median_s"] and ours["copy_median_s"]:
            c["copy_vs_no_flush"] = c["copy_median_s"] / ours["copy_median_s"]
        if cp and c["copy_median_s"] and cp["copy_median_s"]:
            c["copy_vs_cp"] = c["copy_median_s"] / cp["copy_median_s"]
    return result


def measure(source: str, target: str, writer_db: str, case: dict) -> dict:
    """Child: sync, start the writer, run the case, keep its commits."""
    import os
    import sqlite3
    import time

    from harness import CWriter, FlushPacer, remove_db

    import apsw_backup

    remove_db(target)
    os.sync()
    writer = CWriter(writer_db, 0.002, synchronous="FULL")
    writer.start()
    time.sleep(0.3)
    how, out = case["how"], {"elapsed": None}
    begin = writer.mark()
    start = time.perf_counter()
    if how == "none":
        time.sleep(1.0)
    elif how == "cp":
        subprocess.run(["cp", source, target], check=True)
        fd = os.open(target, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    elif how == "stdlib":
        src, dst = sqlite3.connect(source), sqlite3.connect(target)
        src.backup(dst)
        dst.close()
        src.close()
    elif how == "copy" and "flush_every" in case:
        apsw_backup.copy(source, target, flush_every=case["flush_every"])
    elif how == "copy":
        apsw_backup.copy(source, target)
    else:
        dst = apsw_backup.Connection(target)
        dst.execute("PRAGMA cache_size=-1024").fetchall()
        if case.get("journal"):
            dst.execute(f"PRAGMA journal_mode={case['journal']}").fetchall()
        pacer = FlushPacer(target, int(case["slice_mb"] * 1024 * 1024))
        try:
            apsw_backup.copy(source, dst, pages=256, progress=pacer)
        finally:
            pacer.close()
            dst.close()
        out["flushes"] = pacer.flushes
    if how != "none":
        out["elapsed"] = time.perf_counter() - start
    end = writer.mark()
    writer.finish()
    remove_db(target)
    out["latencies"] = writer.latencies[begin:end]
    return out


def targets(s: dict) -> list[dict]:
    out = []
    cases = s["cases"]
    for name in ("copy() defaults",):
        c = cases.get(name)
        if not c or "p99_vs_cp" not in c:
            continue
        slower = c.get("copy_vs_no_flush")
        ok = c["p99_vs_cp"] <= 0.5 and (slower is None or slower <= 1.3)
        out.append(
            target(
                f"disk_gentle {name}: writer p99 <= 0.5x cp + fsync, copy <= 1.3x "
                f"{BASELINE}",
                f"{c['p99_vs_cp']:.2f}x, {slower or 1:.2f}x",
                ok,
            )
        )
    return out


def table(s: dict) -> list[str]:
    lines = [
        f"[disk_gentle] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB -> new file, "
        f"{s['rounds']} rounds, latencies pooled"
    ]
    w = lines.append
    w(
        f"  {'case':30} {'commits':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'p99/cp':>6} {'copy s':>7} {'x nofl':>8} {'x cp':>5}"
    )
    for name, c in s["cases"].items():
        took = "-" if not c["copy_median_s"] else f"{c['copy_median_s']:.3f}"
        w(
            f"  {name:30} {c['commits']:>7} {c['p50_ms']:>7.2f} {c['p99_ms']:>7.2f} "
            f"{c['max_ms']:>7.1f} {c.get('p99_vs_cp', 0):>6.2f} {took:>7} "
            f"{c.get('copy_vs_no_flush') or 0:>8.2f} {c.get('copy_vs_cp') or 0:>5.2f}"
        )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
