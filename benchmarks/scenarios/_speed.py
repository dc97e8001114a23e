"""Scenarios 1-3: the same backup by every contender, interleaved, against raw C.

The timed span is backup_init .. finish, in C (raw_backup.c) and in Python
(worker.py `backup`).  Each contender runs in a fresh process; the order is
rotated round by round, and 'paired' is the median over the rounds of
(time / raw C's time in the same round).
"""

from __future__ import annotations

import subprocess

from bench import Context, fmt_ratio, fmt_s, paired, rotated, summary, target


def measure(ctx: Context, title: str, dest: str, pages: int) -> dict:
    source = ctx.database("main", ctx.a.size_mb)
    rounds = ctx.rounds(15, 3)
    names = ctx.names
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for name in rotated(names, r):
            if name in errors:
                continue
            try:
                runs[name].append(ctx.runner.backup(name, source["path"], dest, pages))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors[name] = str(exc)
    result = {
        "title": title,
        "source": source,
        "dest": dest,
        "pages_per_step": pages,
        "contenders": {},
        "errors": errors,
    }
    for name, rs in runs.items():
        if not rs:
            continue
        result["contenders"][name] = {
            "elapsed": summary([r["elapsed"] for r in rs]),
            "cpu": summary([r["cpu"] for r in rs]),
            "steps": rs[0]["steps"],
            "pages": rs[0]["pages"],
            "maxrss_kb": max(r["maxrss_kb"] for r in rs),
            "sqlite_version": rs[0]["sqlite_version"],
        }
    add_ratios(result["contenders"])
    return result


def add_ratios(contenders: dict) -> None:
    raw = contenders.get("raw_c")
    for c in contenders.values():
        for key in ("elapsed", "cpu"):
            c[key]["ratio_to_raw_c"] = (
                c[key]["median"] / raw[key]["median"] if raw else None
            )
            c[key]["min_ratio_to_raw_c"] = (
                c[key]["min"] / raw[key]["min"] if raw else None
            )
            c[key]["paired_ratio_to_raw_c"] = paired(c[key], raw[key]) if raw else None


def verdict_no_slower(ours: dict, theirs: dict) -> tuple[float, str]:
    ratio = paired(ours, theirs) or ours["median"] / theirs["median"]
    if ratio <= 1.0:
        return ratio, "met"
    overlap = ours["min"] <= theirs["max"]
    return ratio, "within noise" if ratio <= 1.03 and overlap else "MISSED"


def targets(key: str, s: dict) -> list[dict]:
    out: list[dict] = []
    c = s["contenders"]
    if "apsw_backup" not in c:
        return out
    ab = c["apsw_backup"]
    if "raw_c" in c:
        ratio = ab["elapsed"]["paired_ratio_to_raw_c"]
        if ratio is None:
            ratio = ab["elapsed"]["ratio_to_raw_c"]
        t = target(
            f"{key}: apsw_backup / raw C <= 1.05", round(ratio, 3), ratio <= 1.05
        )
        t["ratio_of_medians"] = round(ab["elapsed"]["ratio_to_raw_c"], 3)
        out.append(t)
    for other in ("stdlib", "apsw"):
        if other in c:
            ratio, verdict = verdict_no_slower(ab["elapsed"], c[other]["elapsed"])
            t = target(
                f"{key}: apsw_backup no slower than {other}", round(ratio, 3), True
            )
            t["verdict"] = verdict
            out.append(t)
    return out


def table(key: str, s: dict) -> list[str]:
    lines: list[str] = []
    w = lines.append
    rounds = max(
        (len(c["elapsed"]["runs"]) for c in s["contenders"].values()), default=0
    )
    w(
        f"[{key}] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB "
        f"({s['source']['pages']} pages of 4096) -> "
        f"{'a new file' if s['dest'] != ':memory:' else ':memory:'}, {rounds} rounds"
    )
    w(
        f"  {'':12} {'':>9} {'':>7} {'':>7} {'--- time / raw C ---':>26} "
        f"{'':>7} {'cpu/C':>7}"
    )
    w(
        f"  {'contender':12} {'median s':>9} {'min':>7} {'max':>7} {'paired':>8}"
        f" {'medians':>8} {'mins':>8} {'cpu s':>7} {'paired':>7} {'steps':>7}"
        f" {'maxrss MB':>9}"
    )
    for name, c in s["contenders"].items():
        e, cpu = c["elapsed"], c["cpu"]
        w(
            f"  {name:12} {fmt_s(e['median']):>9} {fmt_s(e['min']):>7} "
            f"{fmt_s(e['max']):>7} {fmt_ratio(e.get('paired_ratio_to_raw_c')):>8} "
            f"{fmt_ratio(e['ratio_to_raw_c']):>8} "
            f"{fmt_ratio(e['min_ratio_to_raw_c']):>8} {fmt_s(cpu['median']):>7} "
            f"{fmt_ratio(cpu.get('paired_ratio_to_raw_c')):>7} "
            f"{c['steps']:>7} {c['maxrss_kb'] / 1024:>9.1f}"
        )
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
