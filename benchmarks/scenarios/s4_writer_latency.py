"""Scenario 4: a writer's commit latency during a hand-written stepped backup.

A writer thread commits one small row every 2 ms (`--writer-interval`) on
another connection, during a `step(100)` backup loop (restarted whenever it
completes) or during no backup; rollback-journal and WAL sources; 3 s per
run.  Each backup runs twice: steps back to back, and with a 1 ms pause after
each step (`--step-pause`).  The loops are in worker.py (`latency`).
Target: WAL writer p99 <= 2x no backup.  copy() itself is measured by
wal_writer_latency.
"""

from __future__ import annotations

import statistics
import subprocess

from bench import Context, remove_db, rotated, target

KEY = "s4"


def run(ctx: Context) -> dict:
    a = ctx.a
    seconds = a.latency_seconds or (0.3 if ctx.quick else 3.0)
    rounds = ctx.rounds(5, 2)
    sources = {
        "journal": ctx.database("live", a.size_mb, "delete"),
        "wal": ctx.database("live", a.size_mb, "wal"),
    }
    dest = ctx.dest
    pause = a.step_pause
    plus = f"+{pause * 1000:g}ms pause"
    configs = ("none", "apsw_backup", "apsw_backup" + plus, "stdlib", "stdlib" + plus)
    pooled = {(m, c): [] for m in sources for c in configs}
    extra = {(m, c): [] for m in sources for c in configs}
    errors = {}
    for r in range(rounds):
        for mode, source in sources.items():
            for config in rotated(configs, r):
                remove_db(dest)
                try:
                    out = ctx.runner.worker(
                        "latency",
                        config.split("+")[0],
                        source["path"],
                        dest,
                        100,
                        seconds,
                        a.writer_interval,
                        pause if "+" in config else 0.0,
                        timeout=seconds + 120,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    errors[f"{mode}/{config}"] = str(exc)
                    continue
                finally:
                    remove_db(dest)
                pooled[mode, config] += out.pop("latencies_ms", [])
                extra[mode, config].append(out)
    result = {
        "title": "writer commit latency during a step(100) backup",
        "pages_per_step": 100,
        "seconds_per_run": seconds,
        "writer_interval": a.writer_interval,
        "step_pause": pause,
        "configs": configs,
        "modes": {},
        "errors": errors,
    }
    for mode, source in sources.items():
        result["modes"][mode] = {"source": source}
        for config in configs:
            lat = sorted(pooled[mode, config])
            if not lat:
                continue
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
            outs = extra[mode, config]
            result["modes"][mode][config] = {
                "commits": len(lat),
                "p50_ms": statistics.median(lat),
                "p99_ms": p99,
                "max_ms": lat[-1],
                "writer_errors": sum(o.get("errors", 0) for o in outs),
                "backup_steps": sum(o["steps"] for o in outs),
                "backup_restarts": sum(o["restarts"] for o in outs),
                "backups_completed": sum(o["backups_completed"] for o in outs),
            }
        base = result["modes"][mode].get("none")
        for config in configs[1:]:
            r = result["modes"][mode].get(config)
            if base and r:
                r["p99_vs_no_backup"] = r["p99_ms"] / base["p99_ms"]
                r["p50_vs_no_backup"] = r["p50_ms"] / base["p50_ms"]
    return result


def targets(s: dict) -> list[dict]:
    out = []
    for config in s["configs"]:
        r = s["modes"].get("wal", {}).get(config, {}).get("p99_vs_no_backup")
        if r is None or not config.startswith("apsw_backup"):
            continue
        out.append(
            target(
                f"s4: WAL writer p99 with {config} <= 2x no backup", round(r, 2), r <= 2
            )
        )
    return out


def table(s: dict) -> list[str]:
    lines: list[str] = []
    w = lines.append
    w(
        f"[s4] {s['title']}: writer commits every {s['writer_interval'] * 1000:g} ms, "
        f"{s['seconds_per_run']:g} s per run, latencies pooled over the rounds"
    )
    w(
        f"  {'mode':8} {'backup':26} {'commits':>7} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'p99 x none':>10} {'steps':>7} {'restarts':>8} "
        f"{'completed':>9} {'w.err':>5}"
    )
    for mode, m in s["modes"].items():
        for config in s["configs"]:
            r = m.get(config)
            if not r:
                continue
            rel = r.get("p99_vs_no_backup")
            w(
                f"  {mode:8} {config:26} {r['commits']:>7} {r['p50_ms']:>8.3f} "
                f"{r['p99_ms']:>8.3f} {r['max_ms']:>8.2f} "
                f"{'' if rel is None else f'{rel:.2f}':>10} "
                f"{r['backup_steps'] if config != 'none' else '':>7} "
                f"{r['backup_restarts'] if config != 'none' else '':>8} "
                f"{r['backups_completed'] if config != 'none' else '':>9} "
                f"{r['writer_errors']:>5}"
            )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
