"""Reporting success: the summary line and the --json object."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from apsw_backup.cli.errors import EXIT_OK, PROG, _count
from apsw_backup.cli.plan import Job
from apsw_backup.cli.verification import verified_words
from apsw_backup.copy import CopyResult


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj))
    sys.stdout.flush()


def _report(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> None:
    if args.json:
        _print_json(_summary(job, args, result, deleted))
        return
    verified = verified_words(result.verification)
    rotated = f"; deleted {_count(len(deleted), 'older backup')}" if deleted else ""
    print(
        f"{PROG}: copied {job.source} -> {job.dest}: {result.pages} pages "
        f"({result.bytes / 1e6:.1f} MB) in {result.elapsed:.2f} s, "
        f"{_count(result.steps, 'step')}, {_count(result.restarts, 'restart')}"
        f"{', snapshot' if result.snapshot else ''}; {verified}{rotated}"
    )


def _summary(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> dict[str, Any]:
    return {
        "ok": True,
        "exit_code": EXIT_OK,
        "source": job.source,
        "dest": job.dest,
        "dest_state": job.state(),
        "folder": job.folder,
        "schema": args.schema,
        "pages": result.pages,
        "page_size": result.page_size,
        "bytes": result.bytes,
        "steps": result.steps,
        "restarts": result.restarts,
        "waits": result.waits,
        "snapshot": result.snapshot,
        "elapsed": round(result.elapsed, 6),
        "wal_growth": getattr(result, "wal_growth", 0),
        "journal_mode": "wal" if args.keep_wal and _is_wal(job.dest) else "delete",
        "verified": True if job.verify else None,
        "integrity": ["ok"] if job.verify else None,
        "verification": (
            result.verification.to_json() if result.verification else None
        ),
        "deleted": deleted,
    }


def _is_wal(path: str) -> bool:
    """Whether the file's header says WAL mode (read and write version 2)."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header[18:20] == b"\x02\x02"
