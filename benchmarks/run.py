"""apsw_backup's benchmarks: one runner, one module per scenario.

    python benchmarks/run.py                    # every scenario, full sizes
    python benchmarks/run.py --quick            # small sizes: a smoke run
    python benchmarks/run.py --only live_copy   # one scenario (or s1,s2,...)
    python benchmarks/run.py --list             # the scenarios and what they do

The scenarios are the modules in benchmarks/scenarios/ (see ORDER there and
benchmarks/README.md).  Each measurement runs in a fresh process; contenders
are interleaved round by round, the order rotated each round.  Prints a
table and the targets, writes OUT/results.json and, when matplotlib is
importable, OUT/results.png (scenarios 1-6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenarios  # noqa: E402
from bench import Context, loadavg  # noqa: E402

MODULES = scenarios.load()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--quick", action="store_true", help="small databases, few runs: a smoke run")
    add(
        "--only",
        metavar="NAME[,NAME]",
        help="run only these scenarios: their key (s1, live_copy), module name "
        "or number (1-6); default all",
    )
    add("--list", action="store_true", help="list the scenarios and exit")
    add(
        "--rounds",
        type=int,
        help="rounds (or runs) of every scenario, overriding each one's own "
        "default (s1-s3: 15, s4/s6: 5, s5: 3, live_copy: 10, ...)",
    )
    add("--size-mb", type=float, help="database for s1-s4, s6 (default 200, quick 16)")
    add("--big-mb", type=float, help="database for s5 (default 1024, quick 64)")
    add("--disk-mb", type=float, help="database for disk_gentle (60, quick 8)")
    add("--cli-mb", type=float, help="database for cli_vs_shell (300, quick 8)")
    add("--latency-seconds", type=float, help="s4 window per run (3, quick 0.3)")
    add(
        "--writer-interval",
        type=float,
        default=0.002,
        help="s4: seconds between the writer's commits",
    )
    add(
        "--step-pause",
        type=float,
        default=0.001,
        help="s4: the pause after each step in the '+pause' runs",
    )
    add(
        "--copy-writer-interval",
        type=float,
        default=0.005,
        help="s6: seconds between the writer's commits",
    )
    add("--cap", type=float, help="s6: give up on a copy after this many s (20)")
    add(
        "--synchronous",
        default="OFF",
        help="PRAGMA synchronous of every destination in s1-s5 (default OFF)",
    )
    add("--out", type=Path, default=HERE / "out", help="for results.json/.png")
    add(
        "--workdir",
        type=Path,
        help="where the databases go (default: a temporary directory, "
        "removed afterwards); the disk scenarios measure this disk",
    )
    add("--no-chart", action="store_true")
    add(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print the table (and draw the chart into --out) "
        "from a results.json written before",
    )
    a = p.parse_args(argv)
    a.size_mb = a.size_mb or (16 if a.quick else 200)
    a.big_mb = a.big_mb or (64 if a.quick else 1024)
    a.selected = select(p, a.only)
    return a


def select(p: argparse.ArgumentParser, only: str | None) -> list:
    if not only:
        return list(MODULES)
    chosen = []
    for name in (n.strip() for n in only.split(",") if n.strip()):
        key = f"s{name}" if name.isdigit() else name
        found = [m for m in MODULES if key in (m.KEY, m.__name__.split(".")[-1])]
        if not found:
            names = ", ".join(m.KEY for m in MODULES)
            p.error(f"unknown scenario {name!r}: choose from {names}")
        chosen += [m for m in found if m not in chosen]
    return chosen


def table(results: dict, meta: dict) -> str:
    lines = [
        f"apsw_backup benchmarks — {meta['when']}  (load average at start "
        f"{meta['loadavg_start']}, end {meta['loadavg_end']}, {meta['cpus']} CPUs)",
        f"  command: {meta.get('command', '')}",
    ]
    for name, text in meta["contenders"].items():
        lines.append(f"  {name:12} {text}")
    for m in MODULES:
        if m.KEY in results:
            lines.append("")
            lines += m.table(results[m.KEY])
            after = results[m.KEY].get("loadavg_after")
            if after is not None:
                lines.append(f"  (load average after: {after})")
    if meta.get("targets"):
        lines += ["", "Targets"]
        if meta.get("quick"):
            lines.append(
                "  (--quick: the databases and windows are too small for these "
                "to mean much)"
            )
        for t in meta["targets"]:
            extra = (
                f" (ratio of medians {t['ratio_of_medians']})"
                if "ratio_of_medians" in t
                else ""
            )
            note = f"  [{t['note']}]" if t.get("note") else ""
            lines.append(
                f"  {t['verdict']:>12}  {t['target']}: {t['value']}{extra}{note}"
            )
    return "\n".join(lines)


def all_targets(results: dict) -> list[dict]:
    out = []
    for m in MODULES:
        if m.KEY in results:
            out += m.targets(results[m.KEY])
    return out


def draw(a: argparse.Namespace, results: dict) -> None:
    if a.no_chart or not any(
        k in results for k in ("s1", "s2", "s3", "s4", "s5", "s6")
    ):
        return
    import charts

    a.out.mkdir(parents=True, exist_ok=True)
    note = charts.chart(results, a.out / "results.png")
    print(note or f"wrote {a.out / 'results.png'}")


def report(a: argparse.Namespace) -> int:
    """The table and chart of a saved run, with this version's statistics."""
    saved = json.loads(a.report.read_text())
    meta, results = saved["meta"], saved["scenarios"]
    meta["targets"] = all_targets(results)
    print(table(results, meta))
    draw(a, results)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.list:
        for m in MODULES:
            print(f"{m.KEY:20} {(m.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if a.report:
        return report(a)
    started = time.monotonic()
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="apsw_backup_bench_")
        workdir = Path(tmp.name)
    else:
        workdir = a.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run_all(a, workdir, started)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run_all(a: argparse.Namespace, workdir: Path, started: float) -> int:
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": loadavg(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "quick": a.quick,
        "destination_synchronous": a.synchronous,
        "command": " ".join(["python", "benchmarks/run.py", *sys.argv[1:]]),
    }
    ctx = Context(a, workdir)
    meta["raw_c_build"], meta["contenders"] = ctx.raw_c_build, ctx.contenders
    print(f"contenders: {', '.join(ctx.names)}", flush=True)
    for name, text in ctx.contenders.items():
        print(f"  {name:12} {text}", flush=True)
    results: dict[str, dict] = {}
    meta["scenario_seconds"] = {}
    for m in a.selected:
        t = time.monotonic()
        print(f"{m.KEY} ... ", end="", flush=True)
        results[m.KEY] = m.run(ctx)
        results[m.KEY]["loadavg_after"] = loadavg()
        meta["scenario_seconds"][m.KEY] = round(time.monotonic() - t, 1)
        print(f"{meta['scenario_seconds'][m.KEY]} s", flush=True)
    meta["setup_seconds"] = round(ctx.setup_seconds, 1)
    meta["loadavg_end"] = loadavg()
    meta["targets"] = all_targets(results)
    meta["total_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(results, meta))
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    path.write_text(json.dumps({"meta": meta, "scenarios": results}, indent=1))
    print(f"\nwrote {path}")
    draw(a, results)
    print(f"total {meta['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
