"""Scenario 6: copy() against the standard library while a writer commits.

A writer commits every 5 ms (`--copy-writer-interval`) while a `step(100)`
copy runs: `apsw_backup.copy(..., snapshot="auto")` against the standard
library's `backup(pages=100)`, rollback-journal and WAL.  The standard
library restarts on every commit and may never finish, so it is stopped
after `--cap` seconds (20; quick 1.5).  Target: copy() finishes, no slower.
"""

from __future__ import annotations

import subprocess

from bench import Context, fmt_s, remove_db, rotated, summary, target

KEY = "s6"


def run(ctx: Context) -> dict:
    a = ctx.a
    cap = a.cap or (1.5 if ctx.quick else 20.0)
    rounds = ctx.rounds(5, 2)
    sources = {
        "journal": ctx.database("live", a.size_mb, "delete"),
        "wal": ctx.database("live", a.size_mb, "wal"),
    }
    dest = ctx.dest
    result = {
        "title": "copy under constant writes",
        "pages_per_step": 100,
        "writer_interval": a.copy_writer_interval,
        "cap_seconds": cap,
        "modes": {},
        "errors": {},
    }
    runs = {(m, c): [] for m in sources for c in ("apsw_backup", "stdlib")}
    for r in range(rounds):
        for mode, source in sources.items():
            for contender in rotated(("apsw_backup", "stdlib"), r):
                remove_db(dest)
                try:
                    out = ctx.runner.worker(
                        "underload",
                        contender,
                        source["path"],
                        dest,
                        100,
                        cap,
                        a.copy_writer_interval,
                        timeout=cap + 120,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result["errors"][f"{mode}/{contender}"] = str(exc)
                    continue
                finally:
                    remove_db(dest)
                runs[mode, contender].append(out)
    for mode, source in sources.items():
        result["modes"][mode] = {"source": source}
        for contender in ("apsw_backup", "stdlib"):
            outs = runs[mode, contender]
            if not outs:
                continue
            done = [o["elapsed"] for o in outs if o["finished"]]
            result["modes"][mode][contender] = {
                "runs": len(outs),
                "finished": len(done),
                "elapsed": summary(done) if done else None,
                "restarts": [o.get("restarts") for o in outs],
                "snapshot": [o.get("snapshot") for o in outs],
                "writer_max_ms": max(o["writer"].get("max_ms", 0) for o in outs),
                "writer_p99_ms": max(o["writer"].get("p99_ms", 0) for o in outs),
                "writer_errors": sum(o["writer"].get("errors", 0) for o in outs),
            }
    return result


def targets(s: dict) -> list[dict]:
    out = []
    for mode, m in s["modes"].items():
        ab, std = m.get("apsw_backup"), m.get("stdlib")
        if ab and std:
            ok = ab["finished"] == ab["runs"] and (
                std["finished"] < std["runs"]
                or ab["elapsed"]["median"] <= std["elapsed"]["median"]
            )
            out.append(
                target(
                    f"s6 {mode}: copy(snapshot='auto') finishes, no slower than stdlib",
                    f"{ab['finished']}/{ab['runs']} vs {std['finished']}/{std['runs']}",
                    ok,
                )
            )
    return out


def table(s: dict) -> list[str]:
    lines: list[str] = []
    w = lines.append
    w(
        f"[s6] {s['title']}: step(100), writer commits every "
        f"{s['writer_interval'] * 1000:g} ms, capped at {s['cap_seconds']:g} s"
    )
    w(
        f"  {'mode':8} {'contender':32} {'finished':>8} {'median s':>9} {'min':>7} "
        f"{'max':>7} {'restarts':>14} {'writer max ms':>13}"
    )
    for mode, m in s["modes"].items():
        for contender, label in (
            ("apsw_backup", "apsw_backup.copy(snapshot=auto)"),
            ("stdlib", "sqlite3 backup(pages=100)"),
        ):
            r = m.get(contender)
            if not r:
                continue
            e = r["elapsed"]
            if e:
                times = (
                    f"{fmt_s(e['median']):>9} {fmt_s(e['min']):>7} {fmt_s(e['max']):>7}"
                )
            else:
                times = f"did not finish in {s['cap_seconds']:g} s".rjust(25)
            restarts = "/".join(str(x) for x in r["restarts"])
            w(
                f"  {mode:8} {label:32} {r['finished']:>3}/{r['runs']:<4} {times} "
                f"{restarts:>14} {r['writer_max_ms']:>13.1f}"
            )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
