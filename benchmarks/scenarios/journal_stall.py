"""journal_stall: rollback-journal writers' p99 and longest stall during copy().

In rollback-journal mode a reader's SHARED lock keeps writers from
committing, and any commit by another connection restarts the copy.  So a
copy either stops the writers while it reads (one step(-1), or the snapshot)
or restarts after their commits.  This measures the policies: a database of
`--stall-mb` (100; quick 4), a writer (harness.CWriter, synchronous=NORMAL,
5 s busy timeout: SQLite's busy handler polls at 1, 2, 5, 10, ... 100 ms)
committing every 2 ms, and copy(SOURCE_PATH, NEW_PATH, ...) with:

- defaults (pages=-1: one step, no restart possible);
- pages=256 (the CLI's default) and pages=100 with snapshot="auto" (the
  snapshot after 3 restarts);
- pages=1024 with snapshot=True (the snapshot from the first step);
- pages=100 with snapshot=False (no snapshot: can it finish at all?
  timeout=5 s, quick 1 s).

Each round (5; quick 1) is one fresh process running the cases in a rotated
order, each with a fresh writer and target.  Reported per case: copy time
(median, worst), restarts, the writer's p99 and longest commit during the
copy, and failed commits (busy timeout).
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, child, rotated, target

KEY = "journal_stall"
CASES = {
    "copy() defaults (pages=-1)": {},
    "pages=256, snapshot=auto": {"pages": 256},
    "pages=100, snapshot=auto": {"pages": 100},
    "pages=1024, snapshot=True": {"pages": 1024, "snapshot": True},
    "pages=100, snapshot=False": {"pages": 100, "snapshot": False},
}


def run(ctx: Context) -> dict:
    mb = getattr(ctx.a, "stall_mb", None) or (4 if ctx.quick else 100)
    source = ctx.database("journal_stall", mb, "delete")
    rounds = ctx.rounds(5, 1)
    give_up = 1.0 if ctx.quick else 5.0
    result = {
        "title": "rollback-journal writer (every 2 ms) during copy()",
        "source": source,
        "rounds": rounds,
        "timeout_s": give_up,
        "cases": {},
        "errors": {},
    }
    runs: dict[str, list] = {c: [] for c in CASES}
    for r in range(rounds):
        order = rotated(list(CASES), r)
        try:
            out = child(
                KEY,
                "measure",
                300,
                source=source["path"],
                target=ctx.dest,
                cases=[(n, CASES[n]) for n in order],
                timeout=give_up,
            )
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result["errors"][f"round {r}"] = str(exc)[-500:]
            continue
        for row in out:
            runs[row["case"]].append(row)
    for name, outs in runs.items():
        if not outs:
            continue
        done = [o for o in outs if o.get("finished")]
        times = [o["elapsed"] for o in done]
        result["cases"][name] = {
            "runs": len(outs),
            "finished": len(done),
            "copy_median_s": statistics.median(times) if times else None,
            "copy_worst_s": max(times) if times else None,
            "restarts": [o.get("restarts") for o in outs],
            "writer_p99_ms": max(o["writer"].get("p99_ms", 0) for o in outs),
            "writer_p99_median_ms": statistics.median(
                o["writer"].get("p99_ms", 0) for o in outs
            ),
            "stall_ms": max(o["writer"].get("max_ms", 0) for o in outs),
            "stall_median_ms": statistics.median(
                o["writer"].get("max_ms", 0) for o in outs
            ),
            "writer_errors": sum(o["writer_errors"] for o in outs),
            "commits_during_copy": sum(o["writer"].get("commits", 0) for o in outs),
        }
    return result


def measure(source: str, target: str, cases: list, timeout: float) -> list[dict]:
    """Child: each case once, with a fresh writer and a fresh target."""
    import time

    from harness import CWriter, remove_db, result_fields

    import apsw_backup

    out = []
    for name, kwargs in cases:
        remove_db(target)
        writer = CWriter(source, 0.002, busy_ms=5000)
        writer.start()
        time.sleep(0.1)
        errors0 = writer.errors
        begin = writer.mark()
        row: dict = {"case": name}
        start = time.perf_counter()
        try:
            res = apsw_backup.copy(source, target, timeout=timeout, **kwargs)
            row["elapsed"] = time.perf_counter() - start
            row["finished"] = True
            row |= result_fields(res)
        except apsw_backup.BusyError as exc:
            row["finished"] = False
            row["message"] = str(exc)[:300]
        end = writer.mark()
        time.sleep(0.02)  # the commit waiting at the end is counted whole
        writer.finish()
        row["writer"] = writer.window(begin, end + 1)
        row["writer_errors"] = writer.errors - errors0
        remove_db(target)
        out.append(row)
    return out


def targets(s: dict) -> list[dict]:
    out = []
    for name, c in s["cases"].items():
        if c["copy_median_s"] is None:
            value = (
                f"did not finish in {s['timeout_s']} s ({c['finished']}/{c['runs']})"
            )
        else:
            value = (
                f"copy {c['copy_median_s']:.3f} s, writer p99 "
                f"{c['writer_p99_median_ms']:.1f} ms, stall {c['stall_median_ms']:.0f} ms "
                f"(worst {c['stall_ms']:.0f})"
            )
        out.append(target(f"journal_stall {name} (reported)", value, None))
    return out


def table(s: dict) -> list[str]:
    lines = [
        f"[journal_stall] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB, "
        f"{s['rounds']} rounds, path -> new path"
    ]
    w = lines.append
    w(
        f"  {'case':28} {'done':>5} {'copy s':>7} {'worst':>7} {'restarts':>12} "
        f"{'p99 ms':>7} {'stall ms':>8} {'worst':>7} {'w.err':>5}"
    )
    for name, c in s["cases"].items():
        med = "-" if c["copy_median_s"] is None else f"{c['copy_median_s']:.3f}"
        worst = "-" if c["copy_worst_s"] is None else f"{c['copy_worst_s']:.3f}"
        restarts = "/".join("-" if x is None else str(x) for x in c["restarts"])
        w(
            f"  {name:28} {c['finished']:>2}/{c['runs']:<2} {med:>7} {worst:>7} "
            f"{restarts[:12]:>12} {c['writer_p99_median_ms']:>7.1f} "
            f"{c['stall_median_ms']:>8.0f} {c['stall_ms']:>7.0f} {c['writer_errors']:>5}"
        )
    w("  p99 and stall: medians over the runs of the writer's p99 / longest commit")
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
