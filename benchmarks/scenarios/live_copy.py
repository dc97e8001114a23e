"""live_copy: how fast copy() and acopy() finish while a writer commits every 2 ms.

A 10 MB database (quick: 2 MB), rollback journal and WAL; another
connection (harness.CWriter, synchronous=NORMAL, 5 s busy timeout) commits a
small row every 2 ms; `copy(SOURCE_PATH, NEW_TARGET_PATH, pages=P)` and the
same through `acopy()`, for P = 1, 100 and -1, all other arguments the
defaults but timeout=20 s
(a run that times out is counted as failed).  10 runs of each (quick: 2); each round is one fresh process per
journal mode, running the six (api, pages) cases in a rotated order, each
with a fresh writer thread and a fresh target.  Reported: the median and
worst time of the call, its steps, lock waits, restarts and whether it took
the snapshot, and the writer's longest commit during the copy.
Targets (docs/performance.md): journal < 0.2 s median and < 0.5 s worst; WAL < 0.1 s
(read as: worst < 0.1 s).
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, child, rotated, target

KEY = "live_copy"
CASES = [(api, pages) for api in ("copy", "acopy") for pages in (1, 100, -1)]
LIMITS = {"journal": (0.2, 0.5), "wal": (0.1, 0.1)}  # median, worst
GIVE_UP = 20.0  # copy()'s timeout: a copy that never finishes is a failed run


def run(ctx: Context) -> dict:
    mb = 2 if ctx.quick else 10
    rounds = ctx.rounds(10, 2)
    result = {
        "title": f"copy()/acopy() of a {mb} MB database, writer every 2 ms",
        "rounds": rounds,
        "modes": {},
        "errors": {},
    }
    runs: dict[str, dict[str, list]] = {}
    for mode, journal in (("journal", "delete"), ("wal", "wal")):
        source = ctx.database("live_copy", mb, journal)
        result["modes"][mode] = {"source": source}
        runs[mode] = {f"{api} pages={p}": [] for api, p in CASES}
        for r in range(rounds):
            try:
                out = child(
                    KEY,
                    "measure",
                    600,
                    source=source["path"],
                    target=ctx.dest,
                    cases=rotated(CASES, r),
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result["errors"][f"{mode}/round {r}"] = str(exc)[-500:]
                continue
            for case in out:
                runs[mode][case["case"]].append(case)
    for mode, cases in runs.items():
        for name, outs in cases.items():
            if not outs:
                continue
            times = [o["elapsed"] for o in outs if "elapsed" in o]
            result["modes"][mode][name] = {
                "runs": len(outs),
                "failed": [o["error"] for o in outs if "error" in o],
                "median_s": statistics.median(times) if times else None,
                "worst_s": max(times) if times else None,
                "times": times,
                "waits_max": max((o.get("waits") or 0 for o in outs), default=0),
                "restarts_max": max((o.get("restarts") or 0 for o in outs), default=0),
                "snapshots": sum(bool(o.get("snapshot")) for o in outs),
                "writer_stall_ms": max(o.get("writer_stall_ms", 0) for o in outs),
            }
    return result


def measure(source: str, target: str, cases: list) -> list[dict]:
    """Child: each (api, pages) case once, a fresh writer and target each."""
    import asyncio
    import time

    from harness import CWriter, remove_db, result_fields

    import apsw_backup

    out = []
    for api, pages in cases:
        remove_db(target)
        writer = CWriter(source, 0.002)
        writer.start()
        time.sleep(0.05)  # the writer is committing before the copy starts
        begin = writer.mark()
        row: dict = {"case": f"{api} pages={pages}"}
        start = time.perf_counter()
        try:
            if api == "copy":
                res = apsw_backup.copy(source, target, pages=pages, timeout=GIVE_UP)
            else:
                res = asyncio.run(
                    apsw_backup.acopy(source, target, pages=pages, timeout=GIVE_UP)
                )
            row["elapsed"] = time.perf_counter() - start
            row |= result_fields(res)
        except apsw_backup.Error as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        end = writer.mark()
        writer.finish()
        row["writer_stall_ms"] = writer.window(begin, end).get("max_ms", 0.0)
        remove_db(target)
        out.append(row)
    return out


def targets(s: dict) -> list[dict]:
    out = []
    for mode, (med, worst) in LIMITS.items():
        m = s["modes"].get(mode, {})
        for api, pages in CASES:
            r = m.get(f"{api} pages={pages}")
            if not r or r["median_s"] is None:
                continue
            ok = r["median_s"] < med and r["worst_s"] < worst and not r["failed"]
            limit = (
                f"< {med} s median, < {worst} s worst"
                if mode == "journal"
                else f"< {worst} s"
            )
            out.append(
                target(
                    f"live_copy {mode}: {api}(pages={pages}) {limit}",
                    f"{r['median_s']:.3f} / {r['worst_s']:.3f} s",
                    ok,
                )
            )
    return out


def table(s: dict) -> list[str]:
    lines = [f"[live_copy] {s['title']}: {s['rounds']} runs each, path -> new path"]
    w = lines.append
    w(
        f"  {'mode':8} {'call':18} {'runs':>4} {'median s':>9} {'worst s':>8} "
        f"{'waits':>5} {'restarts':>8} {'snapshot':>8} {'writer max ms':>13}"
    )
    for mode, m in s["modes"].items():
        for api, pages in CASES:
            r = m.get(f"{api} pages={pages}")
            if not r:
                continue
            med = "-" if r["median_s"] is None else f"{r['median_s']:.3f}"
            worst = "-" if r["worst_s"] is None else f"{r['worst_s']:.3f}"
            w(
                f"  {mode:8} {api + f'(pages={pages})':18} {r['runs']:>4} {med:>9} "
                f"{worst:>8} {r['waits_max']:>5} {r['restarts_max']:>8} "
                f"{r['snapshots']:>8} {r['writer_stall_ms']:>13.1f}"
            )
            for err in r["failed"]:
                w(f"    FAILED: {err[:200]}")
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
