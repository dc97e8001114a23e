"""incremental_memory: peak memory of every incremental-backup operation as the database grows.

The issue's target is a peak under 64 MB "whatever the database size"
(docs/incremental.md, "Memory").  For each page count asked for this
builds (in --workdir) a database of that many pages -- PRAGMA page_size
--page-size (default 512: small pages give many pages cheaply, and it is the
number of pages that per-page tables grow with), one table of rows holding a
random blob of 3/4 of a page, so about one row to a page -- and runs each
operation of apsw_backup.incremental in a FRESH child process
(`python -c CODE`), which prints its own peak resident set size when the
operation is done: getrusage(RUSAGE_SELF).ru_maxrss, and on Linux VmHWM of
/proc/self/status, the figure used (Linux's ru_maxrss of a child is at
least its parent's peak when it was started; the parent's own peak is
printed, and kept under the baseline's so that both agree):

- baseline:           only `import apsw_backup, apsw_backup.incremental`
                      (the interpreter's and the imports' own cost);
- base:               incremental(SOURCE, FOLDER) into an empty folder;
- delta:              incremental(SOURCE, FOLDER) after 1 % of the rows were
                      updated (random rows); three such runs, the third
                      reported (a chain of base + 3 deltas);
- restore new:        restore(FOLDER, DEST) into a new file;
- restore overwrite:  restore(FOLDER, DEST, overwrite=True) into an existing
                      database file (a copy of the source);
- open_restore_point: open_restore_point(FOLDER), then SELECT count(*) and
                      SELECT sum(length(b)) over the table (every row read);
- verify_folder:      verify_folder(FOLDER);
- list_points:        list_points(FOLDER);
- cli restore:        `apsw-backup restore FOLDER DEST` run as
                      apsw_backup.cli.main() in the child (its imports, a few
                      MB more than the baseline's, count in its peak).

For each page count it prints a table: the peak in MB (MiB), the peak minus
the baseline, and that difference in bytes per page of the database ((peak -
baseline) * 2^20 / pages): a figure that stays put as the pages grow is a
per-page cost; one that falls towards 0 is a bounded one.  The files are in
the OS cache when each operation runs (read once just before).

    python benchmarks/incremental_memory.py --quick                  # smoke, 20,000 pages
    python benchmarks/incremental_memory.py --workdir /tmp/memb      # 200,000 and 1,000,000 pages
    python benchmarks/incremental_memory.py --workdir /tmp/memb --pages 200000,600000 --json

Exit status: 0 every operation under --limit MB (default 64); 1 some went
over it (they are listed); 2 an operation failed or timed out (--timeout
seconds a child, default 900).  The files it made in --workdir are removed
at the end unless --keep-files.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_PAGES = (200_000, 1_000_000)
QUICK_PAGES = (20_000,)
DELTAS = 3
UPDATE_SHARE = 0.01
BATCH_ROWS = 50_000
MIB = 1 << 20

# The child: argv is OP ARG...; the last line it prints is a JSON object
# with the operation's facts, "seconds", "max_rss_kib" (ru_maxrss) and, on
# Linux, "hwm_kib" (VmHWM of /proc/self/status).  The two differ in one
# way: Linux carries a process's ru_maxrss across fork and exec, so a
# child's ru_maxrss is at least its parent's peak at the moment it was
# started, while VmHWM is the peak of the child's own address space since
# its exec.  The peak reported is VmHWM where there is one; this parent
# keeps its own peak small (the default SQLite cache) so that the two agree.
CHILD = r"""
import json, resource, sys, time
op, args = sys.argv[1], sys.argv[2:]
import apsw_backup
from apsw_backup import incremental as inc
began = time.perf_counter()
out = {}
if op == "baseline":
    pass
elif op == "incremental":
    r = inc.incremental(args[0], args[1])
    out.update(kind=r.kind, page_count=r.page_count, pages_written=r.pages_written,
               chain_length=r.chain_length)
elif op == "restore":
    r = inc.restore(args[0], args[1], overwrite=args[2] == "overwrite")
    out.update(pages=r.pages, overwrote=r.overwrote)
elif op == "open_restore_point":
    with inc.open_restore_point(args[0]) as conn:
        out["rows"] = conn.execute("SELECT count(*) FROM t").fetchall()[0][0]
        out["blob_bytes"] = conn.execute("SELECT sum(length(b)) FROM t").fetchall()[0][0]
elif op == "verify_folder":
    reports = inc.verify_folder(args[0])
    out.update(ok=all(r.ok for r in reports), chains=len(reports),
               points=sum(len(r.points) for r in reports))
elif op == "list_points":
    out["points"] = len(inc.list_points(args[0]))
elif op == "cli":
    from apsw_backup.cli import main
    out["exit_code"] = main(args)
else:
    raise SystemExit("unknown op " + op)
out["seconds"] = time.perf_counter() - began
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out["max_rss_kib"] = rss // 1024 if sys.platform == "darwin" else rss
try:  # this process's own peak: ru_maxrss also counts its parent's (see above)
    with open("/proc/self/status") as f:
        out["hwm_kib"] = int(next(l for l in f if l.startswith("VmHWM:")).split()[1])
except (OSError, StopIteration):
    pass
print(json.dumps(out))
"""


# -- the database ------------------------------------------------------------


def blob_size(page_size: int) -> int:
    """A blob so that one row fills a table leaf: over half the page (two
    cells never fit), under the local payload limit (no overflow page)."""
    return page_size * 3 // 4


def page_count(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA page_count").fetchone()[0])


def build(path: Path, pages: int, page_size: int) -> int:
    """Make path a database of at least `pages` pages; its row count."""
    tmp = path.with_suffix(".building")
    for p in (path, tmp):
        p.unlink(missing_ok=True)
    db = sqlite3.connect(str(tmp), isolation_level=None)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    rows, size = 0, blob_size(page_size)
    while (need := pages - page_count(db)) > 0:
        n = max(1, min(BATCH_ROWS, need - need // 32))  # interior pages add ~2 %
        db.executemany(
            "INSERT INTO t(id, b) VALUES (?, randomblob(?))",
            ((i, size) for i in range(rows + 1, rows + n + 1)),
        )
        rows += n
    db.execute("COMMIT")
    db.close()
    tmp.rename(path)
    return rows


def update_rows(path: Path, rows: int, page_size: int, seed: int) -> int:
    """Give 1 % of the rows (chosen at random) a new random blob."""
    ids = random.Random(seed).sample(
        range(1, rows + 1), max(1, int(rows * UPDATE_SHARE))
    )
    db = sqlite3.connect(str(path))
    with db:
        db.executemany(
            "UPDATE t SET b = randomblob(?) WHERE id = ?",
            ((blob_size(page_size), i) for i in ids),
        )
    db.close()
    return len(ids)


def database_pages(path: Path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return page_count(db)
    finally:
        db.close()


def warm(*paths: Path) -> None:
    """Read files (a folder: its files) once, so the OS cache holds them
    (through one small buffer: this process's peak must stay small)."""
    buf = bytearray(1 << 20)
    for path in paths:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


# -- one child ---------------------------------------------------------------


def run_child(op: str, args: list[str], timeout: float) -> dict[str, Any]:
    """Run CHILD for op in a fresh interpreter; its JSON, or {"error": ...}."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, op, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return dict(json.loads(lines[-1]))


def peak_mb(out: dict[str, Any]) -> float | None:
    """The child's own peak: VmHWM where there is one, else ru_maxrss."""
    kib = out.get("hwm_kib", out.get("max_rss_kib"))
    return None if kib is None else kib / 1024


def problem(op: str, out: dict[str, Any]) -> str | None:
    """What is wrong with an operation's result, if anything."""
    if "error" in out:
        return str(out["error"])
    if op == "base" and out.get("kind") != "base":
        return f"made a {out.get('kind')}, not a base"
    if op == "delta" and out.get("kind") != "delta":
        return f"made a {out.get('kind')}, not a delta"
    if op == "verify_folder" and not out.get("ok"):
        return "the folder did not verify"
    if op == "cli restore" and out.get("exit_code") != 0:
        return f"the command exited {out.get('exit_code')}"
    return None


# -- one database size ---------------------------------------------------------


def measure_size(
    work: Path, pages: int, page_size: int, timeout: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """Build a database of `pages` pages in work and measure every operation."""
    work.mkdir(parents=True, exist_ok=True)
    src, folder = work / "source.db", work / "points"
    new_dest, existing = work / "restored.db", work / "existing.db"
    cli_dest = work / "restored-cli.db"
    began = time.perf_counter()
    rows = build(src, pages, page_size)
    log(
        f"built {src}: {database_pages(src):,} pages, {rows:,} rows "
        f"in {time.perf_counter() - began:.1f} s"
    )
    folder.mkdir()
    ops: dict[str, dict[str, Any]] = {}

    def op(name: str, child_op: str, *args: Path | str) -> None:
        out = run_child(child_op, [str(a) for a in args], timeout)
        ops[name] = out
        log(
            f"  {name}: {peak_mb(out) or 0:.1f} MB"
            + (f"  ({out['error']})" if "error" in out else "")
        )

    op("baseline", "baseline")
    warm(src)
    op("base", "incremental", src, folder)
    for k in range(1, DELTAS + 1):
        update_rows(src, rows, page_size, seed=pages + k)
        warm(src)
        op("delta" if k == DELTAS else f"delta {k}", "incremental", src, folder)
    warm(folder)
    op("restore new", "restore", folder, new_dest, "new")
    shutil.copyfile(src, existing)  # an existing database to overwrite
    op("restore overwrite", "restore", folder, existing, "overwrite")
    op("open_restore_point", "open_restore_point", folder)
    op("verify_folder", "verify_folder", folder)
    op("list_points", "list_points", folder)
    op("cli restore", "cli", "restore", folder, cli_dest)
    return {
        "pages": database_pages(src),
        "page_size": page_size,
        "rows": rows,
        "database_bytes": src.stat().st_size,
        "ops": ops,
    }


def summarize(result: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    """One row an operation: peak, peak - baseline, bytes a page, problems."""
    ops = result["ops"]
    base_mb = peak_mb(ops["baseline"]) or 0.0
    out = []
    for name, o in ops.items():
        peak = peak_mb(o)
        over = None if peak is None or name == "baseline" else peak - base_mb
        out.append(
            {
                "op": name,
                "peak_mb": peak,
                "ru_maxrss_mb": o["max_rss_kib"] / 1024 if "max_rss_kib" in o else None,
                "over_baseline_mb": over,
                "bytes_per_page": None
                if over is None
                else over * MIB / result["pages"],
                "seconds": o.get("seconds"),
                "over_limit": peak is not None and peak > limit,
                "problem": problem(name, o),
            }
        )
    return out


def print_table(result: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    def f(v: float | None, fmt: str) -> str:
        return format("-", ">" + fmt.split(".")[0]) if v is None else format(v, fmt)

    print(
        f"\n{result['pages']:,} pages of {result['page_size']} B "
        f"({result['database_bytes'] / 1e6:.1f} MB, {result['rows']:,} rows)"
    )
    print(
        f"{'operation':20} {'peak MB':>8} {'- baseline':>10} {'B/page':>7} {'s':>7}"
        f" {'ru_maxrss':>9}"
    )
    for r in rows:
        note = ("  OVER LIMIT" if r["over_limit"] else "") + (
            f"  FAILED: {r['problem']}" if r["problem"] else ""
        )
        print(
            f"{r['op']:20} {f(r['peak_mb'], '8.1f')} {f(r['over_baseline_mb'], '10.1f')}"
            f" {f(r['bytes_per_page'], '7.1f')} {f(r['seconds'], '7.2f')}"
            f" {f(r['ru_maxrss_mb'], '9.1f')}{note}"
        )


def parent_peak_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / MIB if sys.platform == "darwin" else rss / 1024


# -- main ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        default=None,
        help="where the databases and points go (default: a new temporary folder)",
    )
    parser.add_argument(
        "--pages",
        default=",".join(map(str, DEFAULT_PAGES)),
        help="page counts, comma-separated (default %(default)s)",
    )
    parser.add_argument("--page-size", type=int, default=512)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_PAGES[0]:,} pages (overrides --pages)",
    )
    parser.add_argument("--limit", type=float, default=64.0, help="MB (default 64)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a child")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--keep-files", action="store_true")
    opts = parser.parse_args(argv)
    opts.page_counts = (
        list(QUICK_PAGES)
        if opts.quick
        else [int(p.replace("_", "")) for p in opts.pages.split(",") if p.strip()]
    )
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    made_workdir = opts.workdir is None or not Path(opts.workdir).exists()
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="incr-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    log = (
        (lambda msg: print(msg, file=sys.stderr, flush=True))
        if opts.json
        else (lambda msg: print(msg, flush=True))
    )
    results, made = [], []
    try:
        for pages in opts.page_counts:
            sub = work / f"mem-{pages}p-{opts.page_size}b"
            if sub.exists():
                shutil.rmtree(sub)
            made.append(sub)
            result = measure_size(sub, pages, opts.page_size, opts.timeout, log)
            result["table"] = summarize(result, opts.limit)
            results.append(result)
    finally:
        if not opts.keep_files:
            for sub in made:
                shutil.rmtree(sub, ignore_errors=True)
            if made_workdir:
                shutil.rmtree(work, ignore_errors=True)
    over = [(r["pages"], x) for r in results for x in r["table"] if x["over_limit"]]
    failed = [(r["pages"], x) for r in results for x in r["table"] if x["problem"]]
    if opts.json:
        print(
            json.dumps(
                {
                    "page_size": opts.page_size,
                    "limit_mb": opts.limit,
                    "parent_max_rss_mb": parent_peak_mb(),
                    "sizes": [
                        {k: v for k, v in r.items() if k != "ops"} | {"raw": r["ops"]}
                        for r in results
                    ],
                    "over_limit": [
                        {"pages": p, "op": x["op"], "peak_mb": x["peak_mb"]}
                        for p, x in over
                    ],
                    "failed": [
                        {"pages": p, "op": x["op"], "problem": x["problem"]}
                        for p, x in failed
                    ],
                },
                indent=1,
            )
        )
    else:
        for r in results:
            print_table(r, r["table"])
        print(f"\nthis process's own peak (ru_maxrss): {parent_peak_mb():.1f} MB")
        if over:
            print(f"over the {opts.limit:g} MB limit:")
            for p, x in over:
                print(f"  {p:,} pages: {x['op']} {x['peak_mb']:.1f} MB")
        else:
            print(f"every operation under {opts.limit:g} MB")
        for p, x in failed:
            print(f"FAILED at {p:,} pages: {x['op']}: {x['problem']}")
    return 2 if failed else 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
