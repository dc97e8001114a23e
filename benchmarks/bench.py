"""What the scenarios share on the runner's side (benchmarks/run.py).

`Context` carries the options, the work directory and the databases a run
makes (each made once, when a scenario first asks for it); `Runner` starts
one measurement in a fresh process.  The rest are small helpers: rotated
orders, summaries, paired ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "worker.py"
RAW_C = HERE / "raw_backup.c"
BACKUP_CONTENDERS = ("raw_c", "apsw_backup", "stdlib", "apsw")


# -- the machine -------------------------------------------------------------


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


# -- databases ---------------------------------------------------------------


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
    db.close()
    return describe(path, journal_mode)


def copy_db(src: Path, dst: Path, journal_mode: str) -> dict:
    """A copy of src (made by make_db, quiescent) in another journal mode."""
    remove_db(str(dst))
    shutil.copyfile(src, dst)
    db = sqlite3.connect(dst, isolation_level=None)
    db.execute(f"PRAGMA journal_mode={journal_mode}")
    db.close()
    return describe(dst, journal_mode)


def describe(path: Path, journal_mode: str) -> dict:
    db = sqlite3.connect(path)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.close()
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
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


class Context:
    """One run: its options, folder, contenders and databases.

    database(label, megabytes, journal_mode) makes a database the first time
    a scenario asks for it (rows of random bytes, see make_db), reads it once
    so it is in the OS cache, and hands the same one to later scenarios.
    Scenarios that write to their source ask for a fresh one (fresh=True)
    or for their own label.
    """

    def __init__(self, a: argparse.Namespace, workdir: Path) -> None:
        self.a, self.quick, self.workdir = a, a.quick, workdir
        self.raw_c, self.raw_c_build = build_raw_c(workdir)
        self.names, self.contenders = contenders_available(self.raw_c)
        self.runner = Runner(self.raw_c, a.synchronous)
        self.dest = str(workdir / "dest.db")
        self._made: dict[str, dict] = {}
        self.setup_seconds = 0.0

    def rounds(self, default: int, quick: int) -> int:
        return self.a.rounds or (quick if self.quick else default)

    def database(
        self, label: str, megabytes: float, journal_mode: str = "delete"
    ) -> dict:
        key = f"{label}-{megabytes:g}-{journal_mode}"
        if key not in self._made:
            import time

            start = time.monotonic()
            base = f"base-{megabytes:g}"
            if base not in self._made:
                self._made[base] = make_db(
                    self.workdir / f"{base}.db", megabytes, "delete"
                )
            path = self.workdir / f"{key}.db"
            self._made[key] = copy_db(
                Path(self._made[base]["path"]), path, journal_mode
            )
            warm(str(path))
            self.setup_seconds += time.monotonic() - start
        return self._made[key]

    def fresh(self, source: dict, name: str = "work") -> dict:
        """A copy of source that a scenario may write to (made anew each call)."""
        path = self.workdir / f"{name}.db"
        return copy_db(Path(source["path"]), path, source["journal_mode"])


# -- one measurement in a fresh process --------------------------------------


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
                out = run_cmd(cmd, 900).split()
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
        return run_json([sys.executable, str(WORKER), *map(str, args)], timeout)


def run_cmd(cmd: list[str], timeout: float) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        )
    return proc.stdout


def run_json(cmd: list[str], timeout: float) -> dict:
    """Run cmd; the JSON object on the last line of its stdout."""
    return json.loads(run_cmd(cmd, timeout).splitlines()[-1])


def child(scenario: str, function: str, kill_after: float, **kwargs) -> dict:
    """scenarios.<scenario>.<function>(**kwargs) in a fresh process (child.py)."""
    cmd = [sys.executable, str(HERE / "child.py"), scenario, function]
    return run_json(cmd + [json.dumps(kwargs)], kill_after)


# -- statistics ---------------------------------------------------------------


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


def target(name: str, value, ok: bool | None, note: str = "") -> dict:
    """One line of the Targets list: met, MISSED, or '-' (not measured)."""
    verdict = "-" if ok is None else ("met" if ok else "MISSED")
    out = {"target": name, "value": value, "verdict": verdict}
    if note:
        out["note"] = note
    return out


def fmt_s(x: float) -> str:
    return f"{x:.3f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
