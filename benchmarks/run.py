"""apsw_backup side by side with raw C, the standard library and APSW.

    python benchmarks/run.py            # the full run (~200 MB and ~1 GB)
    python benchmarks/run.py --quick    # small sizes: a smoke run, < 1 min

Creates its own databases in a temporary directory, builds raw_backup.c
against the system libsqlite3, then runs the scenarios of benchmarks/README.md.
Every measurement runs in a fresh process (worker.py, or the C program);
contenders are interleaved round by round, the order rotated each round
(A B C D, B C D A, ...), and compared with raw C within each round.  Prints a
table, writes OUT/results.json and, when matplotlib is importable,
OUT/results.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
RAW_C = HERE / "raw_backup.c"
SCENARIOS = ("s1", "s2", "s3", "s4", "s5", "s6")
BACKUP_CONTENDERS = ("raw_c", "apsw_backup", "stdlib", "apsw")

# ---------------------------------------------------------------------------
# set-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small databases and short windows: a smoke run",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds of every scenario (default: 15 for scenarios 1-3, whose runs "
        "are short and noisy, 5 for 4 and 6, 3 for 5; quick: 3, 2, 1)",
    )
    p.add_argument(
        "--size-mb",
        type=float,
        help="database for scenarios 1-4 and 6 (default 200, quick 16)",
    )
    p.add_argument(
        "--big-mb", type=float, help="database for scenario 5 (default 1024, quick 64)"
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        help="scenario 4 window per run (default 3, quick 0.3)",
    )
    p.add_argument(
        "--writer-interval",
        type=float,
        default=0.002,
        help="scenario 4: seconds between the writer's commits",
    )
    p.add_argument(
        "--step-pause",
        type=float,
        default=0.001,
        help="scenario 4: the pause after each step in the '+pause' runs",
    )
    p.add_argument(
        "--copy-writer-interval",
        type=float,
        default=0.005,
        help="scenario 6: seconds between the writer's commits",
    )
    p.add_argument(
        "--cap",
        type=float,
        help="scenario 6: give up on a copy after this many seconds "
        "(default 20, quick 1.5)",
    )
    p.add_argument(
        "--synchronous",
        default="OFF",
        help="PRAGMA synchronous of every destination (default OFF)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(s[1] for s in SCENARIOS),
        help="which scenarios, e.g. 1,2,3 (default all)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "out",
        help="directory for results.json and results.png",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="where the databases go (default: a temporary directory, "
        "removed afterwards)",
    )
    p.add_argument("--no-chart", action="store_true")
    p.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: print the table (and draw the chart into --out) "
        "from a results.json written before",
    )
    a = p.parse_args(argv)
    quick = a.quick
    given = a.rounds
    a.copy_rounds = given or (3 if quick else 15)
    a.rounds = given or (2 if quick else 5)
    a.rss_rounds = min(given, 3) if given else (1 if quick else 3)
    a.size_mb = a.size_mb or (16 if quick else 200)
    a.big_mb = a.big_mb or (64 if quick else 1024)
    a.latency_seconds = a.latency_seconds or (0.3 if quick else 3.0)
    a.cap = a.cap or (1.5 if quick else 20.0)
    a.scenarios = ["s" + s.strip() for s in a.scenarios.split(",") if s.strip()]
    unknown = set(a.scenarios) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios: {sorted(unknown)}")
    return a


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return -1.0


def build_raw_c(workdir: Path) -> tuple[Path | None, str]:
    """Compile raw_backup.c with the system compiler against -lsqlite3."""
    cc = os.environ.get("CC", "cc")
    exe = workdir / "raw_backup"
    cmd = [cc, "-O2", "-o", str(exe), str(RAW_C), "-lsqlite3"]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"not built: {exc}"
    if proc.returncode != 0:
        return None, f"not built: {' '.join(cmd)} failed: {proc.stderr.strip()}"
    try:
        version = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    except (OSError, IndexError):
        version = cc
    return exe, f"{' '.join(cmd)} ({version})"


def probe(code: str) -> str | None:
    """stdout of `python -c code` in a fresh process, None if it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def contenders_available(raw_c: Path | None) -> tuple[list[str], dict]:
    info = {
        "raw_c": "system libsqlite3 " + sqlite3.sqlite_version
        if raw_c
        else "raw C program not built",
        "stdlib": f"sqlite3 module, SQLite {sqlite3.sqlite_version}",
    }
    ab = probe("import apsw_backup as a; print(a.__version__, a.sqlite_lib_version())")
    if ab is None:
        raise SystemExit("apsw_backup is not importable: python -m pip install -e .")
    ver, lib = ab.split()
    info["apsw_backup"] = f"apsw_backup {ver}, SQLite {lib}"
    apsw = probe("import apsw; print(apsw.apsw_version(), apsw.sqlite_lib_version())")
    if apsw is None:
        info["apsw"] = (
            "not importable: APSW skipped (pip install -e '.[bench]' installs it)"
        )
    else:
        ver, lib = apsw.split()
        info["apsw"] = (
            f"APSW {ver} with its own bundled SQLite {lib} (not the "
            f"system {sqlite3.sqlite_version}: compare it as a ratio)"
        )
    names = [
        n
        for n in BACKUP_CONTENDERS
        if (n != "raw_c" or raw_c) and (n != "apsw" or apsw)
    ]
    return names, info


def make_db(path: Path, megabytes: float, journal_mode: str = "delete") -> dict:
    """A database of about `megabytes` MB: rows of 1000 random bytes, indexed."""
    rows = max(1, int(megabytes * 1e6 / 1400))  # 1400 bytes a row, with the index
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;"
        "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v BLOB);"
        "CREATE INDEX t_k ON t(k);"
    )
    db.execute("BEGIN")
    db.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n "
        "WHERE i < ?) INSERT INTO t(k, v) SELECT hex(randomblob(8)), "
        "randomblob(1000) FROM n",
        (rows,),
    )
    db.execute("COMMIT")
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "pages": pages,
        "journal_mode": journal_mode,
    }


def copy_db(src: Path, dst: Path, journal_mode: str) -> dict:
    shutil.copyfile(src, dst)
    db = sqlite3.connect(dst, isolation_level=None)
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    return {
        "path": str(dst),
        "bytes": dst.stat().st_size,
        "pages": pages,
        "journal_mode": journal_mode,
    }


def warm(path: str) -> None:
    """Read a whole file once: every contender then finds it in the OS cache."""
    with open(path, "rb") as f:
        while f.read(1 << 22):
            pass


def remove_db(path: str) -> None:
    if path == ":memory:":
        return
    for suffix in ("", "-journal", "-wal", "-shm"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------
# one measurement


class Runner:
    def __init__(self, raw_c: Path | None, synchronous: str) -> None:
        self.raw_c = raw_c
        self.synchronous = synchronous

    def backup(self, contender: str, source: str, dest: str, pages: int) -> dict:
        """One timed backup in a fresh process, into a destination made anew."""
        remove_db(dest)
        try:
            if contender == "raw_c":
                cmd = [str(self.raw_c), source, dest, str(pages), self.synchronous]
                out = self._run(cmd, 900).split()
                return {
                    "elapsed": float(out[0]),
                    "cpu": float(out[1]),
                    "pages": int(out[2]),
                    "steps": int(out[3]),
                    "maxrss_kb": int(out[4]),
                    "sqlite_version": out[5],
                }
            return self.worker(
                "backup", contender, source, dest, pages, self.synchronous, timeout=900
            )
        finally:
            remove_db(dest)

    def worker(self, *args, timeout: float) -> dict:
        cmd = [sys.executable, str(WORKER), *map(str, args)]
        return json.loads(self._run(cmd, timeout).splitlines()[-1])

    @staticmethod
    def _run(cmd: list[str], timeout: float) -> str:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {proc.returncode}: "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return proc.stdout


def rotated(items, r: int) -> list:
    """The contenders' order in round r: A B C D, then B C D A, C D A B, ...

    Interleaving spreads slow spells of a shared machine over everybody;
    rotating also gives every contender every position in a round, so none
    always follows the same neighbour (whose deleted file the kernel may
    still be reclaiming).
    """
    items = list(items)
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


# ---------------------------------------------------------------------------
# scenarios


def scenario_backup(
    run: Runner,
    names: list[str],
    rounds: int,
    title: str,
    source: dict,
    dest: str,
    pages: int,
) -> dict:
    """Scenarios 1-3: the same backup by every contender, interleaved."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(rounds):
        for name in rotated(names, r):
            if name in errors:
                continue
            try:
                runs[name].append(run.backup(name, source["path"], dest, pages))
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


def paired(ours: dict, theirs: dict) -> float | None:
    """Median over the rounds of ours / theirs measured in the same round.

    The machine drifts (here: every contender 50% slower for minutes at a
    time); a ratio taken within a round cancels that, a ratio of medians
    does not.  None unless both have a run in every round.
    """
    a, b = ours["runs"], theirs["runs"]
    if not a or len(a) != len(b):
        return None
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


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


def scenario_latency(
    run: Runner, a: argparse.Namespace, sources: dict, dest: str
) -> dict:
    """Scenario 4: writer commit latency with no backup / a step(100) backup.

    Each backup runs twice: steps back to back, and with a short pause after
    each step (in WAL mode a reader that never lets go starves the writer's
    checkpoints: see README).
    """
    pause = a.step_pause
    plus = f"+{pause * 1000:g}ms pause"
    configs = ("none", "apsw_backup", "apsw_backup" + plus, "stdlib", "stdlib" + plus)
    pooled = {(m, c): [] for m in sources for c in configs}
    extra = {(m, c): [] for m in sources for c in configs}
    errors = {}
    for r in range(a.rounds):
        for mode, source in sources.items():
            for config in rotated(configs, r):
                remove_db(dest)
                try:
                    out = run.worker(
                        "latency",
                        config.split("+")[0],
                        source["path"],
                        dest,
                        100,
                        a.latency_seconds,
                        a.writer_interval,
                        pause if "+" in config else 0.0,
                        timeout=a.latency_seconds + 120,
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
        "seconds_per_run": a.latency_seconds,
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


def scenario_rss(
    run: Runner, names: list[str], rounds: int, sources: dict, dest: str
) -> dict:
    """Scenario 5: peak RSS of a file->file backup, by database size."""
    plan = [("apsw_backup", -1), ("apsw_backup", 100)]
    plan += [(n, -1) for n in names if n in ("raw_c", "stdlib")]
    result = {"title": "peak RSS of a file->file backup", "sizes": {}, "errors": {}}
    for label, source in sources.items():
        rows = {}
        for r in range(rounds):
            for name, pages in rotated(plan, r):
                key = f"{name} step({pages})"
                try:
                    out = run.backup(name, source["path"], dest, pages)
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


def scenario_underload(
    run: Runner, a: argparse.Namespace, sources: dict, dest: str
) -> dict:
    """Scenario 6: time to finish a step(100) copy while a writer commits."""
    result = {
        "title": "copy under constant writes",
        "pages_per_step": 100,
        "writer_interval": a.copy_writer_interval,
        "cap_seconds": a.cap,
        "modes": {},
        "errors": {},
    }
    runs = {(m, c): [] for m in sources for c in ("apsw_backup", "stdlib")}
    for r in range(a.rounds):
        for mode, source in sources.items():
            for contender in rotated(("apsw_backup", "stdlib"), r):
                remove_db(dest)
                try:
                    out = run.worker(
                        "underload",
                        contender,
                        source["path"],
                        dest,
                        100,
                        a.cap,
                        a.copy_writer_interval,
                        timeout=a.cap + 120,
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


# ---------------------------------------------------------------------------
# targets, table, chart


def verdict_no_slower(ours: dict, theirs: dict) -> tuple[float, str]:
    ratio = paired(ours, theirs) or ours["median"] / theirs["median"]
    if ratio <= 1.0:
        return ratio, "met"
    overlap = ours["min"] <= theirs["max"]
    return ratio, "within noise" if ratio <= 1.03 and overlap else "MISSED"


def targets(results: dict) -> list[dict]:
    out = []
    for key in ("s1", "s2", "s3"):
        s = results.get(key)
        if not s or "apsw_backup" not in s["contenders"]:
            continue
        c = s["contenders"]
        ab = c["apsw_backup"]
        if "raw_c" in c:
            ratio = ab["elapsed"]["paired_ratio_to_raw_c"]
            if ratio is None:
                ratio = ab["elapsed"]["ratio_to_raw_c"]
            out.append(
                {
                    "target": f"{key}: apsw_backup / raw C <= 1.05",
                    "value": round(ratio, 3),
                    "ratio_of_medians": round(ab["elapsed"]["ratio_to_raw_c"], 3),
                    "verdict": "met" if ratio <= 1.05 else "MISSED",
                }
            )
        for other in ("stdlib", "apsw"):
            if other in c:
                ratio, verdict = verdict_no_slower(ab["elapsed"], c[other]["elapsed"])
                out.append(
                    {
                        "target": f"{key}: apsw_backup no slower than {other}",
                        "value": round(ratio, 3),
                        "verdict": verdict,
                    }
                )
    s5 = results.get("s5")
    if s5 and s5["sizes"]:
        big = s5["sizes"][
            max(s5["sizes"], key=lambda k: s5["sizes"][k]["source"]["bytes"])
        ]
        for key, c in big["contenders"].items():
            if key.startswith("apsw_backup"):
                mb = c["maxrss_kb"] / 1024
                out.append(
                    {
                        "target": f"s5: peak RSS of {key}, "
                        f"{big['source']['bytes'] / 1e6:.0f} MB, < 100 MB",
                        "value": round(mb, 1),
                        "verdict": "met" if mb < 100 else "MISSED",
                    }
                )
    s4 = results.get("s4")
    if s4 and "wal" in s4["modes"]:
        for config in s4["configs"]:
            r = s4["modes"]["wal"].get(config, {}).get("p99_vs_no_backup")
            if r is None or not config.startswith("apsw_backup"):
                continue
            out.append(
                {
                    "target": f"s4: WAL writer p99 with {config} <= 2x no backup",
                    "value": round(r, 2),
                    "verdict": "met" if r <= 2 else "MISSED",
                }
            )
    s6 = results.get("s6")
    if s6:
        for mode, m in s6["modes"].items():
            ab, std = m.get("apsw_backup"), m.get("stdlib")
            if ab and std:
                ok = ab["finished"] == ab["runs"] and (
                    std["finished"] < std["runs"]
                    or ab["elapsed"]["median"] <= std["elapsed"]["median"]
                )
                out.append(
                    {
                        "target": f"s6 {mode}: copy(snapshot='auto') finishes, "
                        "no slower than stdlib",
                        "value": f"{ab['finished']}/{ab['runs']} vs "
                        f"{std['finished']}/{std['runs']}",
                        "verdict": "met" if ok else "MISSED",
                    }
                )
    return out


def fmt_s(x: float) -> str:
    return f"{x:.3f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: dict, meta: dict) -> str:
    lines = []
    w = lines.append
    w(
        f"apsw_backup benchmarks — {meta['when']}  (load average at start "
        f"{meta['loadavg_start']}, end {meta['loadavg_end']}, {meta['cpus']} CPUs)"
    )
    for name, text in meta["contenders"].items():
        w(f"  {name:12} {text}")
    w(
        "  time / raw C: 'paired' is the median over the rounds of the ratio within "
        "a round (the verdicts use it);\n  'medians' and 'mins' divide the "
        "contender's median and minimum by raw C's."
    )
    for key in ("s1", "s2", "s3"):
        s = results.get(key)
        if not s:
            continue
        w("")
        rounds = max(
            (len(c["elapsed"]["runs"]) for c in s["contenders"].values()), default=0
        )
        w(
            f"[{key[1]}] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB "
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
    s = results.get("s4")
    if s:
        w("")
        w(
            f"[4] {s['title']}: writer commits every {s['writer_interval'] * 1000:g} ms, "
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
    s = results.get("s5")
    if s:
        w("")
        w(
            f"[5] {s['title']} (ru_maxrss of the whole process; 'before' = after "
            "imports and opening, before the backup)"
        )
        w(
            f"  {'database':>9} {'contender':22} {'peak MB':>8} {'before MB':>9} "
            f"{'median s':>9}"
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
    s = results.get("s6")
    if s:
        w("")
        w(
            f"[6] {s['title']}: step(100), writer commits every "
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
                    times = f"{fmt_s(e['median']):>9} {fmt_s(e['min']):>7} {fmt_s(e['max']):>7}"
                else:
                    times = f"did not finish in {s['cap_seconds']:g} s".rjust(25)
                restarts = "/".join(str(x) for x in r["restarts"])
                w(
                    f"  {mode:8} {label:32} {r['finished']:>3}/{r['runs']:<4} {times} "
                    f"{restarts:>14} {r['writer_max_ms']:>13.1f}"
                )
        for name, err in s["errors"].items():
            w(f"  {name}: ERROR {err}")
    if meta.get("targets"):
        w("")
        w("Targets")
        if meta.get("quick"):
            w(
                "  (--quick: the databases and windows are too small for these to mean much)"
            )
        for t in meta["targets"]:
            extra = (
                f" (ratio of medians {t['ratio_of_medians']})"
                if "ratio_of_medians" in t
                else ""
            )
            w(f"  {t['verdict']:>12}  {t['target']}: {t['value']}{extra}")
    return "\n".join(lines)


def chart(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: no chart (pip install -e '.[bench]')"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    names = [
        n
        for n in BACKUP_CONTENDERS
        if any(
            n in results.get(k, {}).get("contenders", {}) for k in ("s1", "s2", "s3")
        )
    ]
    keys = [k for k in ("s1", "s2", "s3") if k in results]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, k in enumerate(keys):
            c = results[k]["contenders"].get(name)
            raw = results[k]["contenders"].get("raw_c")
            if not c or not raw:
                continue
            ratios = [
                x / y
                for x, y in zip(
                    c["elapsed"]["runs"], raw["elapsed"]["runs"], strict=False
                )
            ]
            q1, _, q3 = (
                statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            )
            xs.append(j + i * width)
            ys.append(statistics.median(ratios))
            lo.append(max(0.0, ys[-1] - q1))
            hi.append(max(0.0, q3 - ys[-1]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name)
    ax.axhline(1.05, color="red", linestyle="--", linewidth=1, label="target 1.05")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(
        [
            f"{k[1]}: step({results[k]['pages_per_step']})"
            f"\n-> {results[k]['dest'].rsplit('/', 1)[-1]}"
            for k in keys
        ]
    )
    ax.set_ylabel("time / raw C in the same round\n(median, quartiles)")
    ax.set_title("Scenarios 1-3: backup time relative to raw C")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    s4 = results.get("s4")
    if s4:
        labels, p50, p99 = [], [], []
        for mode, m in s4["modes"].items():
            for config in s4["configs"]:
                if config in m:
                    labels.append(f"{mode}\n{config.replace('+', chr(10) + '+')}")
                    p50.append(m[config]["p50_ms"])
                    p99.append(m[config]["p99_ms"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=6)
        ax.set_ylabel("commit latency, ms")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("Scenario 4: writer commit latency during step(100)")

    ax = axes[1][0]
    s5 = results.get("s5")
    if s5:
        labels, values = [], []
        for size in s5["sizes"].values():
            for key, c in size["contenders"].items():
                labels.append(f"{key}\n{size['source']['bytes'] / 1e6:.0f} MB")
                values.append(c["maxrss_kb"] / 1024)
        ax.bar(range(len(labels)), values)
        ax.axhline(100, color="red", linestyle="--", linewidth=1, label="target 100 MB")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel("peak RSS, MB")
        ax.legend(fontsize=8)
    ax.set_title("Scenario 5: peak RSS of a file->file backup")

    ax = axes[1][1]
    s6 = results.get("s6")
    if s6:
        labels, values, colors = [], [], []
        for mode, m in s6["modes"].items():
            for contender in ("apsw_backup", "stdlib"):
                r = m.get(contender)
                if not r:
                    continue
                labels.append(f"{mode}\n{contender}")
                finished = r["elapsed"] is not None
                values.append(r["elapsed"]["median"] if finished else s6["cap_seconds"])
                colors.append("tab:blue" if finished else "tab:gray")
        ax.bar(range(len(labels)), values, color=colors)
        for x, (v, c) in enumerate(zip(values, colors, strict=True)):
            if c == "tab:gray":
                ax.text(x, v, "did not\nfinish", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylim(0, s6["cap_seconds"] * 1.25)
        ax.set_ylabel("seconds to finish (median)")
    ax.set_title("Scenario 6: copy under constant writes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------


def report(a: argparse.Namespace) -> int:
    """The table and chart of a saved run, with this version's statistics."""
    saved = json.loads(a.report.read_text())
    meta, results = saved["meta"], saved["scenarios"]
    for key in ("s1", "s2", "s3"):
        if key in results:
            add_ratios(results[key]["contenders"])
    meta["targets"] = targets(results)
    print(table(results, meta))
    if not a.no_chart:
        a.out.mkdir(parents=True, exist_ok=True)
        note = chart(results, a.out / "results.png")
        print(note or f"wrote {a.out / 'results.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
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
        "rounds": {"s1-s3": a.copy_rounds, "s4, s6": a.rounds, "s5": a.rss_rounds},
        "destination_synchronous": a.synchronous,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    raw_c, meta["raw_c_build"] = build_raw_c(workdir)
    names, meta["contenders"] = contenders_available(raw_c)
    print(f"contenders: {', '.join(names)}", flush=True)
    for name, text in meta["contenders"].items():
        print(f"  {name:12} {text}", flush=True)

    want = set(a.scenarios)
    t = time.monotonic()
    main_db = make_db(workdir / "source.db", a.size_mb)
    sources = {"main": main_db}
    if want & {"s4", "s6"}:
        sources["journal"] = copy_db(
            workdir / "source.db", workdir / "source_journal.db", "delete"
        )
        sources["wal"] = copy_db(
            workdir / "source.db", workdir / "source_wal.db", "wal"
        )
    if "s5" in want:
        sources["big"] = make_db(workdir / "big.db", a.big_mb)
    meta["setup_seconds"] = round(time.monotonic() - t, 1)
    for s in sources.values():
        warm(s["path"])
    print(
        "databases: "
        + ", ".join(f"{k} {v['bytes'] / 1e6:.0f} MB" for k, v in sources.items())
        + f" (made in {meta['setup_seconds']} s)",
        flush=True,
    )

    run = Runner(raw_c, a.synchronous)
    dest_file = str(workdir / "dest.db")
    results = {}
    plan = [
        (
            "s1",
            lambda: scenario_backup(
                run,
                names,
                a.copy_rounds,
                "file -> file, step(-1)",
                main_db,
                dest_file,
                -1,
            ),
        ),
        (
            "s2",
            lambda: scenario_backup(
                run,
                names,
                a.copy_rounds,
                "file -> file, step(100)",
                main_db,
                dest_file,
                100,
            ),
        ),
        (
            "s3",
            lambda: scenario_backup(
                run,
                names,
                a.copy_rounds,
                "file -> :memory:, step(1)",
                main_db,
                ":memory:",
                1,
            ),
        ),
        (
            "s4",
            lambda: scenario_latency(
                run,
                a,
                {"journal": sources.get("journal"), "wal": sources.get("wal")},
                dest_file,
            ),
        ),
        (
            "s5",
            lambda: scenario_rss(
                run,
                names,
                a.rss_rounds,
                {"main": main_db, "big": sources.get("big")},
                dest_file,
            ),
        ),
        (
            "s6",
            lambda: scenario_underload(
                run,
                a,
                {"journal": sources.get("journal"), "wal": sources.get("wal")},
                dest_file,
            ),
        ),
    ]
    meta["scenario_seconds"] = {}
    for key, func in plan:
        if key not in want:
            continue
        t = time.monotonic()
        print(f"scenario {key[1]} ... ", end="", flush=True)
        results[key] = func()
        results[key]["loadavg_after"] = loadavg()
        meta["scenario_seconds"][key] = round(time.monotonic() - t, 1)
        print(f"{meta['scenario_seconds'][key]} s", flush=True)

    meta["loadavg_end"] = loadavg()
    meta["targets"] = targets(results)
    meta["total_seconds"] = round(time.monotonic() - started, 1)
    print()
    print(table(results, meta))
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    path.write_text(json.dumps({"meta": meta, "scenarios": results}, indent=1))
    print(f"\nwrote {path}")
    if not a.no_chart:
        note = chart(results, a.out / "results.png")
        print(note or f"wrote {a.out / 'results.png'}")
    print(f"total {meta['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
