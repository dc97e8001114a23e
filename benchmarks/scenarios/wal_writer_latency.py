"""wal_writer_latency: WAL writers' p99 during copy(), and why (disk out of it).

A WAL source (`--size-mb`, 200; quick 16) and a writer (harness.CWriter,
synchronous=NORMAL: its commits do not fsync, its checkpoints do) committing
every 2 ms.  Each run is a fresh process: the writer starts, then the case
runs for a window: back-to-back `copy(SOURCE, Connection(DEST,
synchronous=OFF))` calls (5 copies; quick 2), or for "none" nothing for as
long.  Latencies of the commits that began inside a copy() call are pooled
over the rounds (5; quick 1), cases interleaved and rotated.

The writer does SQLite's automatic checkpoint itself (a PASSIVE checkpoint
from a wal_hook once the WAL holds 1000 frames, as wal_autocheckpoint=1000
does), so each commit is known to have run a checkpoint or not.  Cases:

- none / none, no autocheckpoint: the writer alone;
- copy() defaults (pages=-1: one step);
- copy() defaults, writer with no autocheckpoint (is it the checkpoints?);
- read the file: a plain read of the source file in a loop, no SQLite, no
  read mark (is it the machine: a second busy core, memory bandwidth?);
- copy(pages=1024): steps of 4 MB back to back;
- copy(pages=1024) + pause 25%: after each step the progress callback
  sleeps a quarter of the step's own time (the pacing prototype; the source
  holds no read mark meanwhile);
- copy(pages=256) + pause 1 ms.

Target (docs/performance.md): p99 with copy() defaults <= 1.3x none; the copy no more
than 1.2x slower for whatever pacing is proposed.
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, child, rotated, target

KEY = "wal_writer_latency"
CASES = {
    "none": {"copy": None},
    "none, no autocheckpoint": {"copy": None, "autocheckpoint": 0},
    "copy() defaults": {"copy": {}},
    "copy() defaults, no autocheckpoint": {"copy": {}, "autocheckpoint": 0},
    "read the file (no SQLite)": {"copy": "read"},
    "copy(pages=1024)": {"copy": {"pages": 1024}},
    "copy(pages=1024) + pause 25%": {"copy": {"pages": 1024}, "pause": 0.25},
    "copy(pages=256) + pause 1 ms": {"copy": {"pages": 256}, "pause_s": 0.001},
}


def run(ctx: Context) -> dict:
    source = ctx.database("wal_latency", ctx.a.size_mb, "wal")
    rounds = ctx.rounds(5, 1)
    copies = 2 if ctx.quick else 5
    result = {
        "title": "WAL writer (every 2 ms) during copy(), destination synchronous=OFF",
        "source": source,
        "rounds": rounds,
        "copies_per_run": copies,
        "cases": {},
        "errors": {},
    }
    pooled: dict[str, list] = {c: [] for c in CASES}
    flags: dict[str, list] = {c: [] for c in CASES}
    extra: dict[str, list] = {c: [] for c in CASES}
    window = None
    for r in range(rounds):
        for name in rotated(CASES, r):
            case = CASES[name]
            if case["copy"] is None and window is None:
                window = 0.6 if ctx.quick else 2.0
            try:
                out = child(
                    KEY,
                    "measure",
                    600,
                    source=source["path"],
                    target=ctx.dest,
                    case=case,
                    copies=copies,
                    window=window or 2.0,
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                result["errors"][name] = str(exc)[-500:]
                continue
            pooled[name] += out.pop("latencies")
            flags[name] += out.pop("in_checkpoint")
            extra[name].append(out)
            if case["copy"] == {} and out["copy_times"]:
                # "none" windows last as long as the default copies took
                window = sum(out["copy_times"])
    from harness import percentile

    for name in CASES:
        lat = pooled[name]
        if not lat:
            continue
        ordered = sorted(lat)
        ranked = sorted(zip(lat, flags[name], strict=True), reverse=True)
        top = ranked[: max(1, len(ranked) // 100)]
        plain = sorted(x for x, f in ranked if not f)
        outs = extra[name]
        times = [t for o in outs for t in o["copy_times"]]
        seconds = sum(o["window_s"] for o in outs)
        counters = [o["writer"] for o in outs]
        result["cases"][name] = {
            "commits": len(lat),
            "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * percentile(ordered, 0.99),
            "max_ms": 1000 * ordered[-1],
            "checkpoint_commits_per_s": sum(flags[name]) / seconds if seconds else 0,
            "checkpoint_ms_per_s": sum(c["checkpoint_ms"] for c in counters) / seconds
            if seconds
            else 0,
            "slowest_1pct_ran_checkpoint": sum(f for _, f in top) / len(top),
            "p99_without_checkpoints_ms": 1000 * percentile(plain, 0.99)
            if plain
            else None,
            "wal_frames_max": max(c["frames_max"] for c in counters),
            "copy_median_s": statistics.median(times) if times else None,
            "copy_times": times,
        }
    base = result["cases"].get("none")
    ref = result["cases"].get("copy() defaults")
    for c in result["cases"].values():
        if base:
            c["p99_vs_none"] = c["p99_ms"] / base["p99_ms"]
        if ref and c["copy_median_s"] and ref["copy_median_s"]:
            c["copy_vs_defaults"] = c["copy_median_s"] / ref["copy_median_s"]
    return result


def measure(source: str, target: str, case: dict, copies: int, window: float) -> dict:
    """Child: a writer, then the case for `copies` copies (or `window` s)."""
    import time

    from harness import CWriter, remove_db

    import apsw_backup

    writer = CWriter(source, 0.002, autocheckpoint=case.get("autocheckpoint", 1000))
    writer.start()
    time.sleep(0.3)
    spans, times = [], []
    how = case["copy"]
    if how is None:
        begin = writer.mark()
        time.sleep(window)
        spans.append((begin, writer.mark()))
    elif how == "read":
        deadline = time.perf_counter() + window
        begin = writer.mark()
        while time.perf_counter() < deadline:
            with open(source, "rb", buffering=0) as f:
                while f.read(1 << 20) and time.perf_counter() < deadline:
                    pass
        spans.append((begin, writer.mark()))
    else:
        for _ in range(copies):
            remove_db(target)
            dst = apsw_backup.Connection(target)
            dst.execute("PRAGMA synchronous=OFF").fetchall()
            progress = None
            if case.get("pause"):
                progress = Pacer(case["pause"])
            elif case.get("pause_s"):
                progress = lambda *_, s=case["pause_s"]: time.sleep(s)  # noqa: E731
            begin = writer.mark()
            start = time.perf_counter()
            apsw_backup.copy(source, dst, progress=progress, **how)
            times.append(time.perf_counter() - start)
            spans.append((begin, writer.mark()))
            dst.close()
            time.sleep(0.05)
        remove_db(target)
    writer.finish()
    lat, ran = [], []
    for a, b in spans:
        lat += writer.latencies[a:b]
        ran += writer.in_checkpoint[a:b]
    return {
        "latencies": lat,
        "in_checkpoint": ran,
        "copy_times": times,
        "window_s": sum(times) if times else window,
        "writer": writer.counters(),
    }


class Pacer:
    """Progress callback: sleep `share` times the time since the last call."""

    def __init__(self, share: float) -> None:
        import time

        self.share, self.clock = share, time.perf_counter
        self.last = self.clock()

    def __call__(self, status: int, remaining: int, total: int) -> None:
        import time

        if remaining:
            time.sleep(self.share * (self.clock() - self.last))
        self.last = self.clock()


def targets(s: dict) -> list[dict]:
    out = []
    d = s["cases"].get("copy() defaults")
    if d and "p99_vs_none" in d:
        out.append(
            target(
                "wal_writer_latency: p99 during copy() defaults <= 1.3x none",
                round(d["p99_vs_none"], 2),
                d["p99_vs_none"] <= 1.3,
            )
        )
    for name, c in s["cases"].items():
        if "pause" in name and "p99_vs_none" in c and "copy_vs_defaults" in c:
            # A pacing copy() could adopt: it would have to keep the copy
            # within 1.2x of the defaults.  Not the default (which needs
            # none), so reported, not judged.
            paced_ok = c["p99_vs_none"] <= 1.3 and c["copy_vs_defaults"] <= 1.2
            out.append(
                target(
                    f"wal_writer_latency: {name} (pacing, not the default): "
                    "p99 <= 1.3x none, copy <= 1.2x defaults",
                    f"{c['p99_vs_none']:.2f}x, {c['copy_vs_defaults']:.2f}x",
                    None,
                    "would qualify" if paced_ok else "would not qualify",
                )
            )
    return out


def table(s: dict) -> list[str]:
    lines = [
        f"[wal_writer_latency] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB, "
        f"{s['rounds']} rounds x {s['copies_per_run']} copies, pooled"
    ]
    w = lines.append
    w(
        f"  {'case':36} {'commits':>7} {'p50 ms':>7} {'p99 ms':>7} {'x none':>6} "
        f"{'max ms':>7} {'ckpt/s':>6} {'ckpt ms/s':>9} {'top1% ckpt':>10} "
        f"{'p99 no-ckpt':>11} {'WAL max':>7} {'copy s':>7} {'x def':>5}"
    )
    for name, c in s["cases"].items():
        nock = c["p99_without_checkpoints_ms"]
        took = "-" if not c["copy_median_s"] else f"{c['copy_median_s']:.3f}"
        w(
            f"  {name:36} {c['commits']:>7} {c['p50_ms']:>7.3f} {c['p99_ms']:>7.3f} "
            f"{c.get('p99_vs_none', 0):>6.2f} {c['max_ms']:>7.2f} "
            f"{c['checkpoint_commits_per_s']:>6.1f} {c['checkpoint_ms_per_s']:>9.2f} "
            f"{100 * c['slowest_1pct_ran_checkpoint']:>9.0f}% "
            f"{'-' if nock is None else f'{nock:.3f}':>11} {c['wal_frames_max']:>7} "
            f"{took:>7} "
            f"{c.get('copy_vs_defaults', 0) or 0:>5.2f}"
        )
    w(
        "  ckpt/s: commits that ran a checkpoint per second of window; top1% ckpt: "
        "share of the slowest 1% of commits that ran one;"
    )
    w("  p99 no-ckpt: p99 of the commits that ran none; WAL max: frames")
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
