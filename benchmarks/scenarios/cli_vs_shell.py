"""cli_vs_shell: `apsw-backup --no-verify` against the sqlite3 shell's `.backup`.

A quiescent database of `--cli-mb` (300; quick 8), in the OS cache, copied
to a new file by whole processes, timed from start to exit, interleaved and
rotated, 7 rounds (quick 1):

- shell: `sqlite3 SRC ".backup DEST"` (the sqlite3 command-line shell);
- apsw-backup --no-verify: `apsw-backup --no-verify --no-progress SRC DEST`;
- apsw-backup (verify): the same with `PRAGMA integrity_check` of DEST;
- python -c 'import apsw_backup': the interpreter's start-up, the fixed
  cost the CLI has and the shell has not.

Then, on one copy, the verification on its own, in a fresh process each:
`PRAGMA integrity_check` and the cheaper `PRAGMA quick_check` (which skips
checking that every index matches its table), 3 runs each (quick 1).

The shell is the system's: when it cannot start against the SQLite this
process loads (.ci/sqlite-versions points LD_LIBRARY_PATH at another build,
which may lack symbols the system shell links to), it is reported as
unusable here, with its error, and the ratio is not measured.  Both SQLite
versions are recorded, since the ratio compares the two builds.
Target (docs/performance.md): apsw-backup --no-verify <= 1.1x the shell (paired median).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import Context, child, paired, remove_db, rotated, summary, target

KEY = "cli_vs_shell"
SHELL = "sqlite3 shell .backup"


def commands(source: str, dest: str) -> dict[str, list[str] | None]:
    script = Path(sys.executable).with_name("apsw-backup")
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "apsw_backup"]
    shell = shutil.which("sqlite3")
    return {
        "sqlite3 shell .backup": [shell, source, f'.backup "{dest}"']
        if shell
        else None,
        "apsw-backup --no-verify": cli + ["--no-verify", "--no-progress", source, dest],
        "apsw-backup (verify)": cli + ["--no-progress", source, dest],
        "python -c 'import apsw_backup'": [sys.executable, "-c", "import apsw_backup"],
    }


def shell_sqlite_version(shell: str) -> tuple[str | None, str | None]:
    """(the shell's SQLite version, None) or (None, why it cannot run here)."""
    proc = subprocess.run(
        [shell, ":memory:", "SELECT sqlite_version()"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        return None, (proc.stderr or proc.stdout).strip()[-300:]
    return proc.stdout.strip(), None


def run(ctx: Context) -> dict:
    import apsw_backup

    mb = getattr(ctx.a, "cli_mb", None) or (8 if ctx.quick else 300)
    source = ctx.database("cli", mb, "delete")
    rounds = ctx.rounds(7, 1)
    cmds = {k: v for k, v in commands(source["path"], ctx.dest).items() if v}
    unusable = {}
    shell_version = None
    if SHELL in cmds:
        shell_version, why = shell_sqlite_version(cmds[SHELL][0])
        if why is not None:
            unusable[SHELL] = why
            del cmds[SHELL]
    result = {
        "title": "whole-process backup to a new file",
        "source": source,
        "rounds": rounds,
        "sqlite": {
            "apsw-backup": apsw_backup.sqlite_lib_version(),
            SHELL: shell_version,
        },
        "commands": {k: " ".join(v) for k, v in cmds.items()},
        "missing": [k for k, v in commands("S", "D").items() if not v],
        "unusable": unusable,
        "runs": {k: [] for k in cmds},
        "errors": {},
    }
    for r in range(rounds):
        for name in rotated(list(cmds), r):
            remove_db(ctx.dest)
            start = time.perf_counter()
            proc = subprocess.run(
                cmds[name], capture_output=True, text=True, timeout=600
            )
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                result["errors"][name] = proc.stderr[-500:]
                continue
            result["runs"][name].append(elapsed)
    remove_db(ctx.dest)
    # one copy to verify
    subprocess.run(cmds["apsw-backup --no-verify"], check=True, capture_output=True)
    checks = {"integrity_check": [], "quick_check": []}
    for r in range(3 if not ctx.quick else 1):
        for pragma in rotated(list(checks), r):
            out = child(KEY, "check", 600, path=ctx.dest, pragma=pragma)
            checks[pragma].append(out["elapsed"])
    remove_db(ctx.dest)
    result["checks"] = {k: summary(v) for k, v in checks.items()}
    result["summary"] = {k: summary(v) for k, v in result["runs"].items() if v}
    shell = result["summary"].get("sqlite3 shell .backup")
    for s in result["summary"].values():
        if shell:
            s["paired_vs_shell"] = paired(s, shell)
            s["median_vs_shell"] = s["median"] / shell["median"]
    return result


def check(path: str, pragma: str) -> dict:
    """Child: time PRAGMA integrity_check / quick_check on path."""
    import apsw_backup

    db = apsw_backup.Connection(path, apsw_backup.SQLITE_OPEN_READONLY)
    start = time.perf_counter()
    rows = db.execute(f"PRAGMA {pragma}").fetchall()
    elapsed = time.perf_counter() - start
    db.close()
    return {"elapsed": elapsed, "ok": rows == [("ok",)]}


def targets(s: dict) -> list[dict]:
    out = []
    r = s["summary"].get("apsw-backup --no-verify")
    if r and r.get("paired_vs_shell") is not None:
        out.append(
            target(
                "cli_vs_shell: apsw-backup --no-verify <= 1.1x sqlite3 .backup",
                f"{r['paired_vs_shell']:.3f} (medians {r['median']:.3f} / "
                f"{s['summary']['sqlite3 shell .backup']['median']:.3f} s)",
                r["paired_vs_shell"] <= 1.1,
            )
        )
    elif SHELL in s["missing"]:
        out.append(target("cli_vs_shell: no sqlite3 shell on PATH", "-", None))
    elif SHELL in s.get("unusable", {}):
        why = s["unusable"][SHELL].splitlines()[-1]
        out.append(
            target(
                f"cli_vs_shell: the sqlite3 shell cannot run here ({why})", "-", None
            )
        )
    ic = s["checks"]["integrity_check"]["median"]
    qc = s["checks"]["quick_check"]["median"]
    out.append(
        target(
            "cli_vs_shell: verification cost (reported)",
            f"integrity_check {ic:.3f} s, quick_check {qc:.3f} s",
            None,
        )
    )
    return out


def table(s: dict) -> list[str]:
    lines = [
        f"[cli_vs_shell] {s['title']}: {s['source']['bytes'] / 1e6:.0f} MB, "
        f"{s['rounds']} rounds, interleaved"
    ]
    w = lines.append
    w(f"  {'command':32} {'median s':>9} {'min':>7} {'max':>7} {'paired x shell':>14}")
    for name, r in s["summary"].items():
        ratio = r.get("paired_vs_shell")
        w(
            f"  {name:32} {r['median']:>9.3f} {r['min']:>7.3f} {r['max']:>7.3f} "
            f"{'-' if ratio is None else f'{ratio:.3f}':>14}"
        )
    for name, c in s["checks"].items():
        w(f"  PRAGMA {name:25} {c['median']:>9.3f} {c['min']:>7.3f} {c['max']:>7.3f}")
    for name, cmd in s["commands"].items():
        w(f"  {name}: {cmd}")
    for name, version in s.get("sqlite", {}).items():
        if version:
            w(f"  {name}: SQLite {version}")
    for name in s["missing"]:
        w(f"  {name}: not available")
    for name, why in s.get("unusable", {}).items():
        w(f"  {name}: cannot run against the SQLite loaded here: {why}")
    for name, err in s["errors"].items():
        w(f"  {name}: ERROR {err}")
    return lines
