"""One measurement in a fresh process; run.py starts it and reads its JSON.

    python worker.py backup    CONTENDER SOURCE DEST PAGES SYNCHRONOUS
    python worker.py latency   CONTENDER SOURCE DEST PAGES SECONDS INTERVAL [PAUSE]
    python worker.py underload CONTENDER SOURCE DEST PAGES CAP INTERVAL

A fresh process per measurement keeps runs independent (heap, caches, peak
RSS) and keeps APSW, which bundles its own SQLite, out of any process that
loads the system libsqlite3: two copies of SQLite in one process break POSIX
locking.  Only the contender being measured is imported.

Each mode prints one JSON object on the last line of stdout.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import threading
import time

CONTENDERS = ("apsw_backup", "stdlib", "apsw")


def maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- backup: one timed backup, init .. finish, like raw_backup.c -------------


def _backup_apsw_style(module, source: str, dest: str, pages: int, sync: str) -> dict:
    """The user's loop on an APSW-style API (apsw_backup and APSW share it)."""
    src = module.Connection(source, module.SQLITE_OPEN_READONLY)
    dst = module.Connection(dest)
    dst.execute(f"PRAGMA synchronous={sync}").fetchall()
    rss0 = maxrss_kb()
    start, cpu = time.perf_counter(), time.process_time()
    b = dst.backup("main", src, "main")
    step = b.step
    while not step(pages):
        pass
    total = b.page_count
    b.finish()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    dst.close()
    src.close()
    return _result(elapsed, cpu, total, pages, rss0, module.sqlite_lib_version())


def backup_apsw_backup(source: str, dest: str, pages: int, sync: str) -> dict:
    import apsw_backup

    return _backup_apsw_style(apsw_backup, source, dest, pages, sync)


def backup_stdlib(source: str, dest: str, pages: int, sync: str) -> dict:
    import pathlib
    import sqlite3

    uri = pathlib.Path(source).absolute().as_uri() + "?mode=ro"
    src = sqlite3.connect(uri, uri=True)
    dst = sqlite3.connect(dest)
    dst.execute(f"PRAGMA synchronous={sync}")
    rss0 = maxrss_kb()
    start, cpu = time.perf_counter(), time.process_time()
    # The standard library loops over sqlite3_backup_step in C.
    src.backup(dst, pages=pages)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    total = dst.execute("PRAGMA page_count").fetchone()[0]
    dst.close()
    src.close()
    return _result(elapsed, cpu, total, pages, rss0, sqlite3.sqlite_version)


def backup_apsw(source: str, dest: str, pages: int, sync: str) -> dict:
    import apsw

    return _backup_apsw_style(apsw, source, dest, pages, sync)


def _result(elapsed, cpu, total, pages, rss0, version) -> dict:
    # The timed loops do not count their steps (that would be Python work raw
    # C does not do); without a restart there is one per `pages` pages.
    return {
        "elapsed": elapsed,
        "cpu": cpu,
        "pages": total,
        "steps": 1 if pages <= 0 else -(-total // pages),
        "maxrss_kb_before": rss0,
        "maxrss_kb": maxrss_kb(),
        "sqlite_version": version,
    }


# -- the writer of scenarios 4 and 6 ----------------------------------------


class Writer(threading.Thread):
    """Commits one small row on its own connection every `interval` seconds.

    It uses the standard library's sqlite3, i.e. the same system libsqlite3
    as apsw_backup (one SQLite in the process), with the standard library's
    default 5 s busy timeout.  Latency is the time of one autocommit INSERT.
    """

    def __init__(self, path: str, interval: float) -> None:
        super().__init__(daemon=True)
        import sqlite3

        self.db = sqlite3.connect(
            path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS bench_log(id INTEGER PRIMARY KEY, "
            "at REAL, note TEXT)"
        )
        self.interval = interval
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0

    def run(self) -> None:
        clock, note = time.perf_counter, "x" * 100
        while not self.stop.is_set():
            start = clock()
            try:
                self.db.execute(
                    "INSERT INTO bench_log(at, note) VALUES (?, ?)", (start, note)
                )
            except Exception:  # noqa: BLE001 - counted: "database is locked"
                self.errors += 1
            self.latencies.append(clock() - start)
            if self.interval:
                time.sleep(self.interval)

    def finish(self) -> dict:
        self.stop.set()
        self.join()
        self.db.close()
        return latency_summary(self.latencies) | {"errors": self.errors}


def latency_summary(latencies: list[float]) -> dict:
    if not latencies:
        return {"commits": 0}
    ordered = sorted(latencies)
    return {
        "commits": len(ordered),
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
        "latencies_ms": [round(1000 * x, 4) for x in latencies],
    }


# -- latency: scenario 4 -----------------------------------------------------


def latency(
    contender: str,
    source: str,
    dest: str,
    pages: int,
    seconds: float,
    interval: float,
    pause: float = 0.0,
) -> dict:
    """Writer commit latency for `seconds`, with a stepped backup or none.

    The backup starts again whenever it completes (the writer usually keeps
    it restarting); its loop retries BUSY/LOCKED after 1 ms and sleeps
    `pause` seconds after every step (0: steps back to back).
    """
    stop = threading.Event()
    stats = {"backups_completed": 0, "steps": 0, "restarts": 0}
    run = {
        "none": _no_backup,
        "apsw_backup": _stepped_apsw_backup,
        "stdlib": _stepped_stdlib,
    }[contender]
    writer = Writer(source, interval)
    timer = threading.Timer(seconds, stop.set)
    writer.start()
    timer.start()
    run(source, dest, pages, stop, stats, pause)
    timer.join()
    return writer.finish() | stats


def _no_backup(source, dest, pages, stop, stats, pause) -> None:
    stop.wait()


def _stepped_apsw_backup(source, dest, pages, stop, stats, pause) -> None:
    import apsw_backup

    src = apsw_backup.Connection(source, apsw_backup.SQLITE_OPEN_READONLY)
    src.set_busy_timeout(5000)
    dst = apsw_backup.Connection(dest)
    dst.execute("PRAGMA synchronous=OFF").fetchall()
    retry = (apsw_backup.BusyError, apsw_backup.LockedError)
    while not stop.is_set():
        with dst.backup("main", src, "main") as b:
            while not stop.is_set():
                try:
                    done = b.step(pages)
                except retry:
                    time.sleep(0.001)
                    continue
                finally:
                    stats["steps"] += 1
                if done:
                    stats["backups_completed"] += 1
                    break
                if pause:
                    time.sleep(pause)
            stats["restarts"] += b.restarts
    dst.close()
    src.close()


class Progress:
    """Counts the standard library's steps and restarts from its progress calls.

    A restart is a successful step after which fewer pages are copied than
    there would be had the copy moved forward (as Backup.restarts counts).
    """

    def __init__(self, pages: int, stats: dict) -> None:
        self.pages, self.stats, self.copied = pages, stats, 0

    def __call__(self, status: int, remaining: int, total: int) -> None:
        self.stats["steps"] += 1
        copied = total - remaining
        if status == 0 and copied < min(self.copied + self.pages, total):
            self.stats["restarts"] += 1
        self.copied = copied


def _stepped_stdlib(source, dest, pages, stop, stats, pause) -> None:
    import sqlite3

    class Stop(Exception):
        pass

    src = sqlite3.connect(source, timeout=5.0)
    dst = sqlite3.connect(dest)
    dst.execute("PRAGMA synchronous=OFF")
    seen = Progress(pages, stats)

    def progress(status, remaining, total):
        seen(status, remaining, total)
        if stop.is_set():
            raise Stop
        if pause and remaining:
            time.sleep(pause)

    while not stop.is_set():
        seen.copied = 0
        try:
            src.backup(dst, pages=pages, progress=progress, sleep=0.001)
        except Stop:
            break
        stats["backups_completed"] += 1
    dst.close()
    src.close()


# -- underload: scenario 6 ---------------------------------------------------


def underload(
    contender: str, source: str, dest: str, pages: int, cap: float, interval: float
) -> dict:
    """Time to complete a stepped copy while a writer commits every interval."""
    writer = Writer(source, interval)
    writer.start()
    time.sleep(0.05)  # the writer is committing before the copy starts
    run = {"apsw_backup": _copy_apsw_backup, "stdlib": _copy_stdlib}[contender]
    start = time.perf_counter()
    outcome = run(source, dest, pages, cap)
    elapsed = time.perf_counter() - start
    writes = writer.finish()
    writes.pop("latencies_ms", None)
    return {
        "elapsed": elapsed,
        "finished": outcome.pop("finished"),
        "writer": writes,
    } | outcome


def _copy_apsw_backup(source, dest, pages, cap) -> dict:
    import apsw_backup

    src = apsw_backup.Connection(source, apsw_backup.SQLITE_OPEN_READONLY)
    src.set_busy_timeout(5000)  # as the standard library's connect()
    dst = apsw_backup.Connection(dest)
    dst.execute("PRAGMA synchronous=OFF").fetchall()
    try:
        result = apsw_backup.copy(
            src, dst, pages=pages, snapshot="auto", timeout=cap, sleep=0.01
        )
    except apsw_backup.BusyError as exc:
        return {"finished": False, "message": str(exc)}
    finally:
        dst.close()
        src.close()
    return {
        "finished": True,
        "pages": result.pages,
        "steps": result.steps,
        "restarts": result.restarts,
        "snapshot": result.snapshot,
    }


def _copy_stdlib(source, dest, pages, cap) -> dict:
    import sqlite3

    class GiveUp(Exception):
        pass

    src = sqlite3.connect(source, timeout=5.0)
    dst = sqlite3.connect(dest)
    dst.execute("PRAGMA synchronous=OFF")
    deadline = time.perf_counter() + cap
    count = {"steps": 0, "restarts": 0}
    seen = Progress(pages, count)

    def progress(status, remaining, total):
        seen(status, remaining, total)
        if time.perf_counter() > deadline:
            raise GiveUp

    try:
        src.backup(dst, pages=pages, progress=progress, sleep=0.01)
        finished = True
    except GiveUp:
        finished = False
    finally:
        dst.close()
        src.close()
    return {
        "finished": finished,
        "steps": count["steps"],
        "restarts": count["restarts"],
    }


# ---------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    mode, contender, source, dest, pages, *rest = argv
    if contender not in CONTENDERS + ("none",):
        raise SystemExit(f"unknown contender {contender!r}")
    pages = int(pages)
    if mode == "backup":
        run = globals()[f"backup_{contender}"]
        out = run(source, dest, pages, rest[0])
    elif mode == "latency":
        out = latency(contender, source, dest, pages, *map(float, rest))
    elif mode == "underload":
        out = underload(contender, source, dest, pages, float(rest[0]), float(rest[1]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
