"""Peak memory of restore(..., overwrite=True) into a WAL-mode DEST, split
by kind (docs/incremental.md, "Memory": the one exception to the 64 MB
bound, SQLite's WAL index).

For each size: a source of 512-byte pages (about a row a page), a base of
it, and a WAL-mode DEST restored over from that base, in a fresh process
that samples /proc/self/status every 5 ms while the restore runs: RssFile
(file-backed mappings: DEST's -shm, the WAL index, 8 bytes a frame),
RssAnon (the process's own memory) and VmHWM.  Linux only.

    python benchmarks/incremental_wal_dest_memory.py --pages 250000,2500000 \\
        --workdir /tmp/walmem
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time


def child(pages: int, work: str) -> dict[str, int]:
    from apsw_backup import incremental as inc

    src, bk, dest = (os.path.join(work, n) for n in ("src.db", "bk", "dest.db"))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(bk)
    db = sqlite3.connect(src)
    db.execute("PRAGMA page_size=512")
    db.execute("CREATE TABLE t(b)")
    db.executemany("INSERT INTO t VALUES (randomblob(400))", [()] * pages)
    db.commit()
    db.close()
    inc.incremental(src, bk)
    live = sqlite3.connect(dest)  # DEST's other connection, kept open
    live.execute("PRAGMA page_size=512")
    live.execute("PRAGMA journal_mode=WAL")
    live.execute("CREATE TABLE x(a)")
    live.commit()
    peak = dict.fromkeys(("RssAnon", "RssFile", "VmRSS"), 0)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = inc.restore(bk, dest, overwrite=True)
    finally:
        done.set()
        sampler.join()
        live.close()
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    shutil.rmtree(work, ignore_errors=True)
    return {**peak, "VmHWM": hwm, "wal_growth": result.wal_growth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", default="250000,2500000")
    parser.add_argument("--workdir", default="/tmp/walmem")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return
    print(f"{'pages':>10} {'RssAnon MB':>11} {'RssFile MB':>11} {'VmHWM MB':>9} "
          f"{'-wal grew MB':>13}")  # fmt: skip
    for pages in (int(p) for p in args.pages.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(pages), "--workdir",
             os.path.join(args.workdir, str(pages))],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{pages:>10,} {r['RssAnon'] / 1024:>11.1f} {r['RssFile'] / 1024:>11.1f} "
              f"{r['VmHWM'] / 1024:>9.1f} {r['wal_growth'] / 1e6:>13.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
