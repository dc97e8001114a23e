"""Reporting success: the summary line and the --json object."""

from __future__ import annotations

import argparse
from typing import Any

from apsw_backup.cli import output
from apsw_backup.cli.dest_file import header_facts
from apsw_backup.cli.errors import EXIT_OK, PROG, _count
from apsw_backup.cli.plan import Job
from apsw_backup.cli.verification import verified_words
from apsw_backup.copy import CopyResult


def _print_json(obj: dict[str, Any]) -> None:
    output.print_json(obj)


def _report(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> None:
    if args.json:
        _print_json(_summary(job, args, result, deleted))
        return
    verified = verified_words(result.verification)
    rotated = f"; deleted {_count(len(deleted), 'older backup')}" if deleted else ""
    pages, page_size, _ = _dest_figures(job, result)
    output.out(
        f"{PROG}: copied {job.source} -> {job.dest}: {pages} pages "
        f"({pages * page_size / 1e6:.1f} MB) in {result.elapsed:.2f} s, "
        f"{_count(result.steps, 'step')}, {_count(result.restarts, 'restart')}"
        f"{', snapshot' if result.snapshot else ''}; {verified}{rotated}"
    )


def _summary(
    job: Job, args: argparse.Namespace, result: CopyResult, deleted: list[str]
) -> dict[str, Any]:
    return output.backup_object(
        ok=True,
        exit_code=EXIT_OK,
        source=job.source,
        dest=job.dest,
        dest_state=job.state(),
        folder=job.folder,
        deleted=deleted,
        **copy_fields(job, args, result),
        **job.report_fields,  # rotation: future_dated, unmarked, rotation_skipped
    )


def copy_fields(
    job: Job, args: argparse.Namespace, result: CopyResult
) -> dict[str, Any]:
    """The --json fields that describe the copy in place at DEST (also in
    the object of a run that failed after that: --keep)."""
    pages, page_size, journal_mode = _dest_figures(job, result)
    return {
        "schema": args.schema,
        "pages": pages,
        "page_size": page_size,
        "bytes": pages * page_size,
        "steps": result.steps,
        "restarts": result.restarts,
        "waits": result.waits,
        "snapshot": result.snapshot,
        "elapsed": round(result.elapsed, 6),
        "wal_growth": result.wal_growth,
        "journal_mode": journal_mode,
        "verified": True if job.verify else None,
        "integrity": ["ok"] if job.verify else None,
        "verification": result.verification.to_json() if result.verification else None,
        "pages_copied": result.pages,
        "page_count": result.pages,
    }


def _dest_figures(job: Job, result: CopyResult) -> tuple[int, int, str | None]:
    """(pages, page size, journal mode) read from DEST's own header: they
    describe the file that is there, not what the run meant to write."""
    facts = header_facts(job.dest)
    return (
        facts.get("pages", result.pages),
        facts.get("page_size", result.page_size),
        facts.get("journal_mode"),
    )
