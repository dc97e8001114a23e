"""Scenario 5: peak RSS (ru_maxrss) of a file -> file backup, by database size.

apsw_backup with step(-1) and step(100), raw C and the standard library for
reference, at `--size-mb` and `--big-mb`.  Target: below 100 MB, and it must
not grow with the database.
"""

from __future__ import annotations

import subprocess

from bench import Context, fmt_s, rotated, summary, target

KEY = "s5"


def run(ctx: Context) -> dict:
    sources = {
        "main": ctx.database("main", ctx.a.size_mb),
        "big": ctx.database("main", ctx.a.big_mb),
    }
    rounds = min(ctx.a.rounds, 3) if ctx.a.rounds else (1 if ctx.quick else 3)
    plan = [("apsw_backup", -1), ("apsw_backup", 100)]
    plan += [(n, -1) for n in ctx.names if n in ("raw_c", "stdlib")]
    result = {"title": "peak RSS of a file->file backup", "sizes": {}, "errors": {}}
    for label, source in sources.items():
        rows = {}
        for r in range(rounds):
            for name, pages in rotated(plan, r):
                key = f"{name} step({pages})"
                try:
                    out = ctx.runner.backup(name, source["path"], ctx.dest, pages)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    result["errors"][f"{label}/{key}"] = str(exc)
                    continue
                rows.setdefault(key, []).append(out)
        result["sizes"][label] = {
            "source": source,
            "contenders": {
                key: {
                    "maxrss_kb": max(o["maxrss_kb"] for o in outs),
                    "maxrss_kb_before_backup": max(
                        o.get("maxrss_kb_before", 0) for o in outs
                    )
                    or None,
                    "elapsed": summary([o["elapsed"] for o in outs]),
                }
                for key, outs in rows.items()
            },
        }
    return result


def targets(s: dict) -> list[dict]:
    out = []
    if not s["sizes"]:
        return out
    big = s["sizes"][max(s["sizes"], key=lambda k: s["sizes"][k]["source"]["bytes"])]
    for key, c in big["contenders"].items():
        if key.startswith("apsw_backup"):
            mb = c["maxrss_kb"] / 1024
            out.append(
                target(
                    f"s5: peak RSS of {key}, {big['source']['bytes'] / 1e6:.0f} MB, "
                    "< 100 MB",
                    round(mb, 1),
                    mb < 100,
                )
            )
    return out


def table(s: dict) -> list[str]:
    lines: list[str] = []
    w = lines.append
    w(
        f"[s5] {s['title']} (ru_maxrss of the whole process; 'before' = after "
        "imports and opening, before the backup)"
    )
    w(
        f"  {'database':>9} {'contender':22} {'peak MB':>8} {'before MB':>9} {'median s':>9}"
    )
    for size in s["sizes"].values():
        for key, c in size["contenders"].items():
            before = c["maxrss_kb_before_backup"]
            w(
                f"  {size['source']['bytes'] / 1e6:>6.0f} MB {key:22} "
                f"{c['maxrss_kb'] / 1024:>8.1f} "
                f"{'' if not before else f'{before / 1024:.1f}':>9} "
                f"{fmt_s(c['elapsed']['median']):>9}"
            )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
