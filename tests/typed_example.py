"""A typed use of apsw_backup, checked by `mypy --strict` (.ci/typing).

Not a test module (pytest collects only test_*.py): it is what a user's typed
code looks like, so the stubs must accept it as written.  It also runs:
`python typed_example.py` in an empty directory backs up a small database
four ways.  `rejected_by_the_stubs()` is never called: mypy must reject each
call in it (--strict reports a `type: ignore` that is not needed).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

import apsw_backup
from apsw_backup import Backup, Connection, CopyResult, Cursor


def make_source(path: Path, rows: int = 2000) -> Connection:
    source = Connection(path)
    source.execute("PRAGMA journal_mode=WAL")
    with source:
        source.execute("CREATE TABLE IF NOT EXISTS log(id INTEGER PRIMARY KEY, msg)")
        source.executemany(
            "INSERT INTO log(msg) VALUES (?)",
            [(f"entry {i:05} " + "x" * 200,) for i in range(rows)],
        )
    return source


def count_rows(db: Connection) -> int:
    row = db.execute("SELECT count(*) FROM log").fetchone()
    assert row is not None
    count = row[0]
    assert isinstance(count, int)
    return count


def backup_by_hand(source: Connection, dest_path: Path) -> int:
    """The Backup loop; returns the restarts seen."""
    dest = Connection(
        dest_path, apsw_backup.SQLITE_OPEN_READWRITE | apsw_backup.SQLITE_OPEN_CREATE
    )
    try:
        backup: Backup
        with dest.backup("main", source, "main") as backup:
            while not backup.done:
                try:
                    finished: bool = backup.step(64)
                except (apsw_backup.BusyError, apsw_backup.LockedError):
                    continue  # retryable: the backup stays usable
                remaining: int = backup.remaining
                total: int = backup.page_count
                print(f"{total - remaining}/{total} pages, finished={finished}")
            restarts: int = backup.restarts
        assert not backup  # finished by the with block
        return restarts
    finally:
        dest.close()


class Progress:
    """A progress callback with state: progress(status, remaining, total)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, status: int, remaining: int, total: int) -> None:
        self.calls.append((status, remaining, total))


def print_progress(status: int, remaining: int, total: int) -> None:
    if status == apsw_backup.SQLITE_DONE:
        print(f"done: {total} pages")


def describe(result: CopyResult) -> str:
    return (
        f"{result.pages} pages ({result.bytes} bytes of {result.page_size}) in "
        f"{result.steps} steps, {result.restarts} restarts, {result.waits} waits, "
        f"snapshot={result.snapshot}, {result.elapsed:.3f} s"
    )


async def backup_in_the_background(source: Connection, target: Path) -> CopyResult:
    progress = Progress()
    task: asyncio.Task[CopyResult] = asyncio.create_task(
        apsw_backup.acopy(source, target, pages=16, progress=progress, timeout=30.0)
    )
    result = await task
    assert progress.calls[-1][0] == apsw_backup.SQLITE_DONE
    return result


def main() -> None:
    source = make_source(Path("source.db"))
    try:
        print("restarts:", backup_by_hand(source, Path("by-hand.db")))

        result = apsw_backup.copy(
            source, "copy.db", pages=32, progress=print_progress, snapshot="auto"
        )
        print(describe(result))

        result = apsw_backup.copy("source.db", Path("from-path.db"), sleep=0.05)
        print(describe(result))

        print(describe(asyncio.run(backup_in_the_background(source, Path("async.db")))))

        for name in ("by-hand.db", "copy.db", "from-path.db", "async.db"):
            copy = Connection(name, apsw_backup.SQLITE_OPEN_READONLY)
            try:
                cursor: Cursor = copy.execute("PRAGMA integrity_check")
                assert [row for row in cursor] == [("ok",)]
                assert count_rows(copy) == count_rows(source)
            finally:
                copy.close()
    except apsw_backup.Error as exc:
        print(f"{type(exc).__name__}: {exc} (result={exc.result})")
        raise
    finally:
        source.close()
    print(apsw_backup.__version__, apsw_backup.sqlite_lib_version())


def rejected_by_the_stubs(db: Connection, backup: Backup) -> None:
    """Never called: mypy must reject every call below."""
    backup.step("10")  # type: ignore[arg-type]
    backup.done = True  # type: ignore[misc]
    db.execute("SELECT ?", [object()])  # type: ignore[list-item]
    db.backup("main", "source.db", "main")  # type: ignore[arg-type]

    def two_arguments(status: int, remaining: int) -> None: ...

    apsw_backup.copy(db, "x.db", progress=two_arguments)  # type: ignore[arg-type]
    apsw_backup.copy(db, "x.db", snapshot="always")  # type: ignore[arg-type]
    row = db.execute("SELECT 1").fetchone()
    row[0]  # type: ignore[index]


if TYPE_CHECKING:  # a TypeError at run time; mypy must say so too

    class NotAllowed(Backup):  # type: ignore[misc]
        """Backup cannot be subclassed."""


if __name__ == "__main__":
    main()
