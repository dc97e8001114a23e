"""The incremental verbs (docs/incremental.md):

    apsw-backup --incremental SOURCE FOLDER/ [--keep N] [--max-chain N]
                [--quick-check | --no-verify]
    apsw-backup restore BACKUP DEST [--at TIMESTAMP] [--overwrite]
    apsw-backup list FOLDER
    apsw-backup verify FOLDER...      (checks every chain)

Exit codes: 0 ok, 1 SQLite or file system error, 2 usage error or refusal
(nothing written), 3 a chain is broken or a point damaged (named), 130/143
interrupted: the message says what happened -- nothing kept (a restore
point or a new DEST is only ever renamed into place complete), or, for
restore --overwrite, DEST unchanged or (the signal came after SQLite
committed it) holding the restored database.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import apsw_backup
from apsw_backup import files
from apsw_backup import incremental as inc
from apsw_backup.cli import output, plan
from apsw_backup.cli.arguments import _count_arg, _Exit, _Parser, _seconds
from apsw_backup.cli.errors import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFY,
    HOLDS,
    PROG,
    Failure,
    UsageError,
    in_our_words,
)
from apsw_backup.cli.signals import Interrupted, Interrupts

VERBS = ("restore", "list")


def wants(argv: Sequence[str]) -> bool:
    """Whether argv is one of the incremental verbs."""
    if argv[:1] and argv[0] in VERBS or "--incremental" in argv:
        return True
    if argv[:1] == ["verify"]:
        paths = [a for a in argv[1:] if not a.startswith("-")]
        return any(os.path.isdir(p) or p.endswith(inc.SUFFIX) for p in paths)
    return False


def run(argv: Sequence[str], interrupts: Interrupts) -> int:
    as_json = "--json" in argv
    verify = argv[:1] == ["verify"]

    def failed(code: int, message: str, exc: BaseException | None, **extra: Any) -> int:
        if verify:  # verify --json: the same keys in every outcome
            extra = {"path": None, "files": [], "chains": [], **extra}
        kept = getattr(exc, "kept_point", None)
        if kept:  # --incremental failed after its point was put in place
            message = (
                f"the restore point {kept!r} was made and is kept, but what "
                f"came after it failed: {message}"
            )
            extra["kept_point"] = kept
        return _failed(code, message, as_json, exc, **extra)

    try:
        if argv[0] == "restore":
            return _restore(_parse_restore(argv[1:]), interrupts)
        if argv[0] == "list":
            return _list(_parse_list(argv[1:]))
        if verify:
            return _verify(_parse_verify(argv[1:]), interrupts)
        return _incremental(_parse_incremental(argv), interrupts)
    except _Exit as done:  # --help
        return done.code
    except Failure as failure:
        return failed(failure.code, failure.message, failure.error)
    except Interrupted as stop:
        return failed(
            128 + stop.signum, "interrupted: nothing was kept or put in place", stop
        )
    except inc.BrokenChainError as exc:
        return failed(EXIT_VERIFY, str(exc), exc, path=exc.path)
    except (files.SameFileError, files.StaleSideFileError) as exc:
        # refusals: nothing written
        backup = "BACKUP" if argv[0] == "restore" else "SOURCE"
        return failed(EXIT_USAGE, _words(exc, source=backup), exc)
    except (ValueError, OSError) as exc:
        refusal = _refusal_words(exc) if argv[0] == "restore" else None
        if refusal is not None:  # restore's refusals, from their facts
            return failed(EXIT_USAGE, refusal, exc)
        return _other_failure(exc, failed)
    except inc.DeadlineError as exc:
        return failed(EXIT_ERROR, f"the backup {_words(exc)}. Nothing was kept", exc)
    except inc.IncrementalError as exc:
        return failed(EXIT_ERROR, _words(exc), exc)
    except apsw_backup.Error as exc:
        return failed(EXIT_ERROR, _words(exc), exc)


def _other_failure(exc: ValueError | OSError, failed: Any) -> int:
    if isinstance(exc, ValueError):
        return int(failed(EXIT_USAGE, str(exc), exc))
    if getattr(exc, "role", None) is not None:  # the library's, from its facts
        return int(failed(EXIT_ERROR, _words(exc), exc))
    if exc.errno is None:  # a refusal whose message says it all
        return int(failed(EXIT_USAGE, str(exc), exc))
    # the OS's: name the file, the cause and the cure
    where = f"{exc.filename!r} " if exc.filename else ""
    return int(failed(EXIT_ERROR, f"{where}{files.os_cause(exc)}", exc))


def _refusal_words(exc: BaseException) -> str | None:
    """restore()'s own refusals (nothing written), worded from their facts
    (files.with_facts) in the command's terms; None for any other error."""
    role = getattr(exc, "role", None)
    path = str(getattr(exc, "path", "") or "")
    state = getattr(exc, "target_state", None)
    side = getattr(exc, "side", None)
    if role == "source" and isinstance(exc, ValueError):
        if state is not None:  # read: not a point, not a database
            return (
                f"BACKUP {path!r} is neither a restore point (*{inc.SUFFIX}) "
                "nor an SQLite database: give a restore point, a folder of "
                "them, or a backup file. Nothing was written"
            )
        return (
            f"--at chooses a point in a folder, but BACKUP {path!r} is a file: "
            "give the folder, or drop --at. Nothing was written"
        )
    if role != "target" or state not in ("unchanged", "not created"):
        return None
    if isinstance(exc, IsADirectoryError) and path.endswith(("/", os.sep)):
        return (
            f"DEST {path!r} ends with {os.sep!r}: it names a folder; give the "
            "path of a database file. Nothing was written"
        )
    if isinstance(exc, IsADirectoryError):
        return f"DEST {path!r} is a folder: give the path of a database file"
    if isinstance(exc, FileExistsError) and state == "unchanged":
        return (
            f"DEST {path!r} exists: pass --overwrite to replace its content "
            "through SQLite's own transaction. Nothing was written"
        )
    if isinstance(exc, ValueError) and side:
        return (
            f"DEST {path + side!r} is the {side} file name of the database "
            f"{path!r}: SQLite would take the restored copy for part of that "
            "database, or delete it. Choose another DEST. Nothing was written"
        )
    if isinstance(exc, ValueError) and not os.path.isfile(path):
        return (
            f"DEST {path!r} exists and is not a regular file: give the path of "
            "a database file. Nothing was written"
        )
    if isinstance(exc, ValueError):
        return (
            f"DEST {path!r} exists and is not an SQLite database (it does not "
            "start with the SQLite header): --overwrite replaces a database's "
            "content. Check the name, or move the file away first. DEST is "
            "unchanged"
        )
    return None


def _words(exc: BaseException, source: str = "SOURCE", locked: str = "SOURCE") -> str:
    """exc in the command's words: the library's errors from their facts
    (errors.in_our_words), SQLite's own as they are (their message names
    the cause and cure), without the Python class name in front."""
    words = in_our_words(exc, source, locked)
    return words if words is not None else str(exc)


def _error_object(message: str, exc: BaseException | None) -> dict[str, Any]:
    """The --json "error" object, with the keys of the plain command's
    (output.ERROR_KEYS; docs/cli.md)."""
    number = getattr(exc, "errno", None)
    result = getattr(exc, "result", None)
    extended = getattr(exc, "extendedresult", None)
    return {
        "class": type(exc).__name__ if exc is not None else "UsageError",
        "message": message,
        "result": result if isinstance(result, int) else None,
        "extendedresult": extended if isinstance(extended, int) else None,
        "errno": number if isinstance(number, int) else None,
    }


def _failed(
    code: int,
    message: str,
    as_json: bool,
    exc: BaseException | None = None,
    **extra: Any,
) -> int:
    if as_json:
        error = _error_object(message, exc)
        _print({"ok": False, "exit_code": code, "error": error, **extra})
    output.err(f"{PROG}: {message}")
    return code


def _print(obj: dict[str, Any]) -> None:
    # Through output.py: a reader gone or a closed stream never changes the
    # exit code (docs/cli.md#exit-codes).
    output.out(json.dumps(obj, default=str))


# -- parsers ---------------------------------------------------------------


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"{PROG} {prog}".strip(), description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _parse_incremental(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser("--incremental", "Back SOURCE up into FOLDER as a restore point.")
    add = parser.add_argument
    add("--incremental", action="store_true", required=True)
    add("source", metavar="SOURCE", help="database to back up")
    add("folder", metavar="FOLDER/", help="folder of restore points")
    add(
        "--keep",
        type=_count_arg,
        default=None,
        metavar="N",
        help="keep N restore points of SOURCE (never breaks a chain)",
    )
    add(
        "--max-chain",
        type=int,
        default=inc.MAX_CHAIN,
        metavar="N",
        help=f"a new base after N deltas ({inc.MAX_CHAIN})",
    )
    add(
        "--quick-check",
        action="store_true",
        help="also run quick_check on the state the new point stands for "
        "(a full backup's cost; every point is checked by its hashes anyway)",
    )
    add(
        "--no-verify",
        action="store_true",
        help="do not read the new point's pages back from the disk (the chain "
        "it extends is still checked)",
    )
    add(
        "--rebase-share",
        type=float,
        default=inc.REBASE_SHARE,
        metavar="F",
        help=f"a new base when the deltas exceed F of the base ({inc.REBASE_SHARE})",
    )
    add(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up after S seconds (default: no limit)",
    )
    return parser.parse_args(argv)  # fmt: skip


def _parse_restore(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser("restore", "Rebuild a database from a restore point.")
    add = parser.add_argument
    add(
        "backup",
        metavar="BACKUP",
        help="a restore point file, a folder of them, or a plain backup file",
    )
    add("dest", metavar="DEST", help="the database to write")
    add(
        "--at",
        metavar="TIMESTAMP",
        default=None,
        help="the newest point at or before this time (ISO 8601, UTC by default)",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace an existing DEST through SQLite's own transaction",
    )
    add(
        "--keep-wal",
        action="store_true",
        help="leave the copy of a WAL database in WAL mode",
    )
    add(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="S",
        help="give up after S seconds (existing DEST)",
    )
    return parser.parse_args(argv)  # fmt: skip


def _parse_list(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser("list", "List the restore points of FOLDER.")
    parser.add_argument("folder", metavar="FOLDER")
    return parser.parse_args(argv)


def _parse_verify(argv: Sequence[str]) -> argparse.Namespace:
    parser = _parser(
        "verify",
        "Check every chain of restore points in FOLDER (or the chain up to a "
        "restore point file).",
    )
    parser.add_argument("folders", nargs="+", metavar="FOLDER")
    return parser.parse_args(argv)


# -- the verbs -------------------------------------------------------------


def _incremental(args: argparse.Namespace, interrupts: Interrupts) -> int:
    if args.max_chain < 0:
        raise Failure(EXIT_USAGE, "--max-chain must be >= 0", UsageError())
    if args.quick_check and args.no_verify:
        raise Failure(
            EXIT_USAGE,
            "--no-verify contradicts --quick-check (a verification): give one",
            UsageError(),
        )

    def progress(status: int, remaining: int, total: int) -> None:
        interrupts.check()

    if os.path.exists(args.source):  # a missing one: incremental()'s refusal
        # the plain backup's words for a SOURCE that is a folder, a FIFO, an
        # unreadable file or not a database (cli/plan.py)
        plan.check_source(args.source)
    interrupts.check()
    result = inc.incremental(
        args.source,
        args.folder,
        max_chain=args.max_chain,
        rebase_share=args.rebase_share,
        keep=args.keep,
        timeout=args.timeout,
        progress=progress,
        quick_check=args.quick_check,
        verify=not args.no_verify,
    )
    if interrupts.signum:  # arrived once the point was in place (a merge)
        stop = Interrupted(interrupts.signum)
        stop.kept_point = result.path  # type: ignore[attr-defined]
        done = "".join(
            f"; {what} {', '.join(map(repr, paths))}"
            for what, paths in (("deleted", result.deleted), ("merged", result.merged))
            if paths
        )
        raise Failure(
            128 + interrupts.signum,
            f"interrupted after it was put in place (any rebase or --keep "
            f"work under way was finished first){done}",
            stop,
        )
    if args.json:
        _print({"ok": True, "exit_code": EXIT_OK, "error": None, **vars(result)})
    else:
        why = f" ({result.reason})" if result.reason else ""
        unread = "" if result.verified else "; not read back (--no-verify)"
        output.err(
            f"{result.kind} {result.path}: {result.pages_written} of "
            f"{result.page_count} pages, {result.bytes_written} bytes written "
            f"in {result.elapsed:.2f} s; chain of {result.chain_length}{why}"
            f"{unread}"
        )
        for path in result.deleted:
            output.err(f"deleted {path}")
        for path in result.merged:
            output.err(f"merged {path} into a new base")
    return EXIT_OK


def _restore(args: argparse.Namespace, interrupts: Interrupts) -> int:
    # What DEST holds after a signal is read from what happened: an existing
    # DEST is written by copy(), whose last progress call (all pages done)
    # comes after SQLite committed it; a new DEST is only renamed into place
    # once restore() returns.
    existed = os.path.lexists(args.dest)
    committed = False

    def progress(done: int, total: int) -> None:
        nonlocal committed
        if existed and total > 0 and done >= total:
            committed = True  # DEST holds the restored database: no raise
            return
        interrupts.check()

    interrupts.check()
    try:
        result = inc.restore(
            args.backup,
            args.dest,
            at=args.at,
            overwrite=args.overwrite,
            keep_wal=args.keep_wal,
            timeout=args.timeout,
            progress=progress,
        )
    except Interrupted as stop:
        state = "unchanged" if existed else "not created"
        raise Failure(
            128 + stop.signum,
            f"interrupted: nothing was put in place; {HOLDS[state]} ({args.dest!r})",
            stop,
        ) from stop
    except apsw_backup.Error as exc:
        raise Failure(EXIT_ERROR, _restore_failed(args.dest, exc), exc) from exc
    if interrupts.signum:  # arrived once DEST held the restored database
        raise Failure(
            128 + interrupts.signum,
            f"interrupted after the restore was put in place: DEST "
            f"{args.dest!r} holds the restored database of {result.point}",
            Interrupted(interrupts.signum),
        )
    if args.json:
        _print({"ok": True, "exit_code": EXIT_OK, "error": None, **vars(result)})
    else:
        held = (
            f"; writers of DEST held {result.writers_held:.2f} s, its -wal grew "
            f"{result.wal_growth} bytes"
            if result.overwrote
            else ""
        )
        output.err(
            f"restored {result.point} into {result.dest}: {result.pages} pages "
            f"in {result.elapsed:.2f} s{held}"
        )
    return EXIT_OK


def _restore_failed(dest: str, exc: BaseException) -> str:
    """A failure of restore in the command's words: DEST named, the cause
    and cure, and what DEST holds when the library says."""
    text = _words(exc, source="BACKUP", locked="BACKUP or DEST")
    holds = HOLDS.get(getattr(exc, "target_state", None) or "")
    if holds:
        text = f"{text}. {holds}"
    return f"restore into DEST {dest!r} failed: {text}"


def _list(args: argparse.Namespace) -> int:
    folder = args.folder
    if not os.path.isdir(folder):
        raise Failure(EXIT_USAGE, f"{folder!r} is not a folder", UsageError())
    points = inc.list_points(folder)
    rows = []
    # A base starts a chain; a delta is of its parent's chain (the point of
    # its stem and source whose root is its parent root): points of two
    # sources sharing the folder interleave in time, not in chains.
    chain_no = 0
    chain_of: dict[tuple[str, str, str], int] = {}
    for p in points:
        key = (p.stem, p.source)
        parent = chain_of.get((*key, p.parent_root)) if p.kind != "base" else None
        if parent is None:
            chain_no += 1
            parent = chain_no
        chain_of[(*key, p.root)] = parent
        rows.append(
            {
                "path": p.path,
                "time": p.created.isoformat().replace("+00:00", "Z"),
                "kind": p.kind,
                "size": p.size,
                "database_size": p.database_size,
                "pages_stored": p.stored_pages,
                "chain": parent,
                "sequence": p.sequence,
                "root": p.root,
                "parent_root": p.parent_root,
                "source": p.source,
                "problem": None,
            }
        )
    # Every file named like a point is shown: one that cannot be read as
    # one is a row of its own, kind "?", with the problem (verify says more).
    for path, problem in inc._unlisted(folder):
        stamp = inc._parse_name(path)["stamp"]  # type: ignore[index]
        try:
            size: int | None = os.lstat(path).st_size
        except OSError:
            size = None
        rows.append(
            {
                "path": path,
                "time": datetime.strptime(stamp, inc.STAMP)
                .replace(tzinfo=timezone.utc)
                .isoformat()
                .replace("+00:00", "Z"),
                "kind": "?",
                "size": size,
                "database_size": None,
                "pages_stored": None,
                "chain": None,
                "sequence": None,
                "root": None,
                "parent_root": None,
                "source": None,
                "problem": problem,
            }
        )
    rows.sort(key=lambda r: (str(r["time"]), str(r["path"])))
    if args.json:
        _print({"ok": True, "exit_code": EXIT_OK, "error": None, "points": rows})
        return EXIT_OK
    output.out(f"{'time (UTC)':27} {'kind':5} {'size':>12} {'chain':>5}  file")
    for r in rows:
        shown = {k: "?" if r[k] is None else str(r[k]) for k in ("size", "chain")}
        output.out(
            f"{r['time']:27} {r['kind']:5} {shown['size']:>12} {shown['chain']:>5}  "
            f"{os.path.basename(str(r['path']))}"
        )
        if r["problem"]:
            output.out(f"{'':27} ^ not listed as a restore point: {r['problem']}")
    return EXIT_OK


def _verify(args: argparse.Namespace, interrupts: Interrupts) -> int:
    reports = []
    for folder in args.folders:
        interrupts.check()
        if os.path.isfile(folder) and folder.endswith(inc.SUFFIX):
            reports.append(inc.verify_point(folder))
            continue
        if not os.path.isdir(folder):
            raise Failure(
                EXIT_USAGE,
                f"{folder!r} is not a folder of restore points (verify FILE "
                "checks plain backups; do not mix the two)",
                UsageError(),
            )
        found = inc.verify_folder(folder)
        if not found:
            raise Failure(
                EXIT_USAGE,
                f"{folder!r} holds no restore points (*{inc.SUFFIX}); "
                "verify FILE checks plain backups",
                UsageError(),
            )
        reports.extend(found)
    ok = all(r.ok for r in reports)
    code = EXIT_OK if ok else EXIT_VERIFY
    if args.json:
        _print(_verify_object(reports, code))
    else:
        for r in reports:
            state = "ok" if r.ok else "BROKEN"
            of = f" (of {r.source})" if r.source else ""
            output.err(f"{r.stem}{of}: {len(r.points)} restore points, {state}")
            for problem in r.problems:
                output.err(f"  {problem}")
    return code


def _verify_object(reports: list[inc.ChainReport], code: int) -> dict[str, Any]:
    """verify --json FOLDER (docs/incremental.md): the keys of verify FILE's
    object (ok, exit_code, error, files) plus path (the first file at
    fault, or null) and chains (one object per chain of a source)."""
    faults = [
        (path, problem)
        for r in reports
        for path, problem in zip(r.at_fault, r.problems, strict=False)
    ]
    error = None
    if faults:
        error = _error_object(faults[0][1], inc.BrokenChainError(faults[0][1]))
    fault_of: dict[str, str] = {}
    for path, problem in faults:
        fault_of.setdefault(path, problem)
    items = []
    for r in reports:
        for path in r.points:
            found: str | None = fault_of.get(path)
            items.append(
                {
                    "file": path,
                    "exit_code": EXIT_VERIFY if found else EXIT_OK,
                    "verified": found is None,
                    "integrity": None,
                    "verification": None,
                    "error": _error_object(found, inc.BrokenChainError(found))
                    if found
                    else None,
                }
            )
    return {
        "ok": code == EXIT_OK,
        "exit_code": code,
        "error": error,
        "path": faults[0][0] if faults else None,
        "files": items,
        "chains": [vars(r) for r in reports],
    }
