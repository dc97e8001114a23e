"""verify_speed: what verification costs next to the copy itself (docs/verification.md).

Builds (once, in --workdir) an indexed database like the issue's: two
tables, 2.2 million rows, three indexes, >= 400 MB (--mb scales it), and
reports in one run, each measurement in a fresh process, contenders
interleaved and rotated over --rounds rounds, the file in the OS cache:

- shell: `sqlite3 SOURCE ".backup DEST"` (the system shell on the system
  libsqlite3), timed from start to exit;
- copy: Connection.backup(), step(-1), into a new DEST, then close -- no
  shim, no verification;
- copy+shim: the same through a PageRecorder's VFS (every page hashed);
- copy+shim+verify: the same, then verify(DEST, "default", recorder=...):
  the read-back from the disk (cache dropped) in parallel with quick_check;
- cli: the whole command, `python -m apsw_backup SOURCE DEST` (the default
  verification: copy() with its flushes, the byte check and quick_check,
  the fsync and rename), timed from outside like the shell, start-up
  included (the package's bytecode compiled first, as pip does when it
  installs it); cli --no-verify beside it;
- then, on one copy: PRAGMA integrity_check on one connection, against
  verify(DEST, "full") with 2 threads; quick_check alone for reference, and
  integrity_check+cache: one integrity_check with the page cache the full
  level gives its connections (verify.LOOKUP_CACHE_KIB), to tell that
  gain from the one of using both cores;
- the page hash's speed on one core: page_hash() of a 64 MiB buffer (the
  long-input loop), and of one 4 KiB page at a time from Python.

The Python contenders are timed inside their process from the first
open to the end (the command line will add its start-up, ~30 ms, next
round); the shell from outside, start-up included (a few ms).  Each
contender's DEST is removed and `sync` run before every measurement.

Targets (docs/verification.md): cli (the default verified backup) <= 1.5x
shell; full verify >= 1.7x
faster than integrity_check on 2 cores; the shim adds <= 5% to a copy;
page hash >= 4 GB/s.  Ratios are medians of per-round ratios (paired).

    python benchmarks/verify_speed.py               # 400+ MB, 3 rounds
    python benchmarks/verify_speed.py --mb 40 --rounds 1 --checks 1   # smoke
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = 2_200_000  # at --mb 400: 800,000 customers and 1,400,000 orders


def build(path: Path, mb: int) -> None:
    """customers(..., email UNIQUE) with an index on (city, name), and
    orders(...) with an index on customer_id: two tables, three indexes."""
    scale = mb / 400
    customers = int(800_000 * scale)
    orders = int(1_400_000 * scale)
    rnd = random.Random(400)
    tmp = path.with_suffix(".building")
    if tmp.exists():
        tmp.unlink()
    db = sqlite3.connect(str(tmp))
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-200000")
    db.executescript(
        """
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL,
            email TEXT NOT NULL UNIQUE, city TEXT, created INTEGER, notes TEXT);
        CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL,
            created INTEGER, total REAL, status TEXT, lines TEXT);
        """
    )
    cities = [f"city {i:04d}" for i in range(2000)]
    words = [f"w{i}" for i in range(5000)]

    def text(n: int) -> str:
        return " ".join(rnd.choice(words) for _ in range(n))

    db.executemany(
        "INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)",
        (
            (
                i,
                f"{text(2)} {i}",
                f"c{rnd.getrandbits(40):x}.{i}@example.org",
                rnd.choice(cities),
                rnd.randrange(10**9),
                text(rnd.randrange(10, 18)),
            )
            for i in range(1, customers + 1)
        ),
    )
    db.executemany(
        "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
        (
            (
                i,
                rnd.randrange(1, customers + 1),
                rnd.randrange(10**9),
                rnd.random() * 500,
                rnd.choice(("new", "paid", "shipped", "returned")),
                text(rnd.randrange(14, 28)),
            )
            for i in range(1, orders + 1)
        ),
    )
    db.execute("CREATE INDEX customers_city ON customers(city, name)")
    db.execute("CREATE INDEX orders_customer ON orders(customer_id)")
    db.commit()
    db.execute("PRAGMA journal_mode=DELETE")
    db.close()
    tmp.rename(path)


# -- children: one measurement each, printed as JSON --------------------------


def child_copy(source: str, dest: str, shim: bool, check: bool) -> dict:
    import resource

    import apsw_backup
    from apsw_backup import verify

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    cpu0 = cpu()
    begun = time.perf_counter()
    rec = apsw_backup.PageRecorder(dest) if shim else None
    src = apsw_backup.Connection(source, apsw_backup.SQLITE_OPEN_READONLY)
    dst = apsw_backup.Connection(dest, vfs=rec.vfs if rec else None)
    with dst.backup("main", src, "main") as b:
        b.step(-1)
    dst.close()
    src.close()
    copied = time.perf_counter() - begun
    out: dict = {"copy": copied, "copy_cpu": cpu() - cpu0}
    if check:
        assert rec is not None
        result = verify.verify(dest, "default", recorder=rec)
        assert result.ok, result
        out["checks"] = {c.name: c.seconds for c in result.checks}
    if rec is not None:
        rec.close()
    out["seconds"] = time.perf_counter() - begun
    return out


def child_check(path: str, how: str, threads: int) -> dict:
    import resource

    import apsw_backup
    from apsw_backup import verify

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    cpu0 = cpu()
    begun = time.perf_counter()
    if how == "full":
        result = verify.verify(path, "full", threads=threads)
        assert result.ok, result
        checks = {c.name: round(c.seconds, 3) for c in result.checks}
    else:
        conn = apsw_backup.Connection(path, apsw_backup.SQLITE_OPEN_READONLY)
        if how.endswith("+cache"):  # the page cache the full level's checks get
            how = how.removesuffix("+cache")
            conn.execute(f"PRAGMA cache_size=-{verify.LOOKUP_CACHE_KIB}").fetchall()
        rows = conn.execute(f"PRAGMA {how}").fetchall()
        conn.close()
        assert rows == [("ok",)], rows
        checks = {}
    return {
        "seconds": time.perf_counter() - begun,
        "cpu": cpu() - cpu0,
        "checks": checks,
    }


def child_hash() -> dict:
    import apsw_backup

    big = os.urandom(64 << 20)
    best = min(_timed(lambda: apsw_backup.page_hash(big)) for _ in range(5))
    page = os.urandom(4096)
    n = 200_000
    t = _timed(lambda: [apsw_backup.page_hash(page) for _ in range(n)])
    return {
        "gbps_long": len(big) / best / 1e9,
        "gbps_4k_from_python": n * 4096 / t / 1e9,
    }


def _timed(fn) -> float:
    begun = time.perf_counter()
    fn()
    return time.perf_counter() - begun


# -- the parent ----------------------------------------------------------------


def run_child(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__)), "--child", *args],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_shell(shell: str, source: str, dest: str) -> dict:
    begun = time.perf_counter()
    subprocess.run([shell, source, f'.backup "{dest}"'], check=True, timeout=1800)
    return {"seconds": time.perf_counter() - begun}


def run_cli(source: str, dest: str, *options: str) -> dict:
    command = [sys.executable, "-m", "apsw_backup", "--json", *options, source, dest]
    begun = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - begun
    if proc.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    checks = (report.get("verification") or {}).get("checks", [])
    return {"seconds": seconds, "checks": {c["name"]: c["seconds"] for c in checks}}


def fresh(dest: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        p = Path(str(dest) + suffix)
        if p.exists():
            p.unlink()
    os.sync()


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=400, help="database size (400)")
    ap.add_argument("--rounds", type=int, default=3, help="copy rounds (3)")
    ap.add_argument("--checks", type=int, default=2, help="integrity_check rounds (2)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the full check")
    ap.add_argument("--workdir", default=None, help="where the databases live")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=str(HERE / "out" / "verify_speed.json"))
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "copy":
            out = child_copy(rest[0], rest[1], rest[2] == "1", rest[3] == "1")
        elif kind == "check":
            out = child_check(rest[0], rest[1], int(rest[2]))
        else:
            out = child_hash()
        print(json.dumps(out))
        return 0

    import apsw_backup

    # The package's bytecode, compiled as pip compiles it at install: the
    # command's start-up is then an installed command's, not that of a
    # checkout run with PYTHONDONTWRITEBYTECODE=1, which compiles every
    # module from source at each start (40-70 ms here).
    compileall.compile_dir(str(Path(apsw_backup.__file__).parent), quiet=1)

    work = Path(a.workdir or tempfile.gettempdir()) / "apsw_backup-verify-speed"
    work.mkdir(parents=True, exist_ok=True)
    source = work / f"source-{a.mb}mb.db"
    if not source.exists():
        print(f"building {source} ...", flush=True)
        t = _timed(lambda: build(source, a.mb))
        print(f"built in {t:.0f} s", flush=True)
    size = source.stat().st_size
    db = sqlite3.connect(str(source))
    tables = db.execute(
        "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM orders), "
        "(SELECT count(*) FROM sqlite_master WHERE type='index')"
    ).fetchone()
    db.close()
    print(
        f"source: {size / 1e6:.0f} MB, {tables[0]:,} + {tables[1]:,} rows, "
        f"{tables[2]} indexes; SQLite {apsw_backup.sqlite_lib_version()}; "
        f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    dest = work / "dest.db"
    shell = shutil.which("sqlite3")
    contenders = {
        "copy": ("copy", "0", "0"),
        "copy+shim": ("copy", "1", "0"),
        "copy+shim+verify": ("copy", "1", "1"),
    }
    clis = {"cli --no-verify": ("--no-verify",), "cli": ()}
    names = (["shell"] if shell else []) + list(contenders) + list(clis)
    times: dict[str, list[float]] = {n: [] for n in names}
    # The 1-minute load average after each measurement: other processes'
    # work on this machine, which moves every figure (read the ratios of
    # the quiet runs).
    loads: list[float] = []
    detail: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fresh(dest)
            warm(source)
            if name == "shell":
                out = run_shell(shell, str(source), str(dest))
            elif name in clis:
                out = run_cli(str(source), str(dest), *clis[name])
            else:
                kind, shim, check = contenders[name]
                out = run_child(kind, str(source), str(dest), shim, check)
            out["load"] = os.getloadavg()[0]
            loads.append(out["load"])
            times[name].append(out["seconds"])
            detail[name].append(out)
            print(
                f"round {r + 1} {name}: {out['seconds']:.3f} s (load {out['load']:.2f})",
                flush=True,
            )

    # the checks, on one verified copy
    fresh(dest)
    run_child("copy", str(source), str(dest), "0", "0")
    warm(dest)
    cpus: dict[str, list[float]] = {}
    checks: dict[str, list[float]] = {
        "integrity_check": [],
        "integrity_check+cache": [],
        "full": [],
        "full (1 thread)": [],
        "quick_check": [],
    }
    check_detail: list[dict] = []
    alone: list[dict] = []
    for r in range(a.checks):
        for how in checks:
            threads = 1 if how == "full (1 thread)" else a.threads
            kind = "full" if how.startswith("full") else how
            out = run_child("check", str(dest), kind, str(threads))
            checks[how].append(out["seconds"])
            cpus.setdefault(how, []).append(out["cpu"])
            loads.append(os.getloadavg()[0])
            if how == "full":
                check_detail.append(out["checks"])
            elif threads == 1 and kind == "full":
                alone.append(out["checks"])
            print(f"check round {r + 1} {how}: {out['seconds']:.3f} s", flush=True)
    hashing = run_child("hash")
    fresh(dest)

    def med(xs: list[float]) -> float:
        return statistics.median(xs)

    def paired(a_: str, b_: str) -> float:
        return med([x / y for x, y in zip(times[a_], times[b_], strict=True)])

    report: dict = {
        "mb": round(size / 1e6),
        "rows": tables[0] + tables[1],
        "sqlite": apsw_backup.sqlite_lib_version(),
        "times": times,
        "detail": detail,
        "checks": checks,
        "check_cpu": cpus,
        "load": os.getloadavg(),
        "loads": loads,
        "full_check_tasks": check_detail,
        "hash": hashing,
    }
    print()
    print("| measurement | median s | runs |")
    print("| --- | --- | --- |")
    for name in names:
        print(
            f"| {name} | {med(times[name]):.3f} | {', '.join(f'{t:.2f}' for t in times[name])} |"
        )
    for how, xs in checks.items():
        print(
            f"| {how} | {med(xs):.3f} | {', '.join(f'{t:.2f}' for t in xs)} "
            f"(CPU {', '.join(f'{t:.2f}' for t in cpus[how])}) |"
        )
    print(
        f"\nload average (1 min) after each measurement: {min(loads):.2f}-"
        f"{max(loads):.2f}, median {med(loads):.2f}"
    )
    verdicts = []

    def verdict(label: str, value: float, ok: bool, target: str) -> None:
        verdicts.append({"target": label, "value": round(value, 3), "met": ok})
        print(f"- {label}: {value:.3f} ({target}) {'met' if ok else 'MISSED'}")

    print()
    if shell:
        r = paired("cli", "shell")
        verdict(
            "apsw-backup (default verification) / shell .backup",
            r,
            r <= 1.5,
            "target <= 1.5",
        )
        for name in ("copy+shim+verify", "cli --no-verify", "copy"):
            verdict(
                f"{name} / shell .backup", paired(name, "shell"), True, "for reference"
            )
    r = paired("copy+shim", "copy")
    verdict("copy+shim / copy", r, r <= 1.05, "target <= 1.05")
    cpu_ratio = med([d["copy_cpu"] for d in detail["copy+shim"]]) / med(
        [d["copy_cpu"] for d in detail["copy"]]
    )
    print(f"  (CPU time of the copy, user+system, shim / none: {cpu_ratio:.3f})")
    report["shim_cpu_ratio"] = cpu_ratio
    if a.checks:
        speedup = med(checks["integrity_check"]) / med(checks["full"])
        verdict(
            f"integrity_check / full check ({a.threads} threads)",
            speedup,
            speedup >= 1.7,
            "target >= 1.7",
        )
        # SQLite checks one table (with all its indexes) at the least, so no
        # split can beat the sum of the tasks over the largest one.
        tasks = alone[-1]
        costs = [v for k, v in tasks.items() if k != "read_back"]
        bound = min(a.threads, sum(costs) / max(costs))
        print(
            f"  per-table split bound on {a.threads} cores: {bound:.2f}x "
            f"(tasks alone, s: {tasks})"
        )
        report["split_bound"] = bound
        # How many cores the full check really had: its CPU time over its
        # wall-clock time (a loaded machine leaves it less than --threads).
        used = med(cpus["full"]) / med(checks["full"])
        extra = med(cpus["full"]) / med(cpus["integrity_check"])
        print(
            f"  full check: {used:.2f} cores used on average; CPU time "
            f"{extra:.2f}x one integrity_check's"
        )
        report["full_cores_used"] = used
        report["full_cpu_ratio"] = extra
        report["tasks_alone"] = tasks
    g = hashing["gbps_long"]
    verdict("page hash GB/s, one core", g, g >= 4, "target >= 4")
    print(
        f"  (one 4 KiB page per call from Python: {hashing['gbps_4k_from_python']:.2f} GB/s)"
    )
    if check_detail:
        print(f"  full check tasks (s): {check_detail[-1]}")
    report["verdicts"] = verdicts
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1))
    print(f"\nwritten {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
