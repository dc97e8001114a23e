"""The progress line on stderr."""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

import apsw_backup
from apsw_backup.cli import output
from apsw_backup.cli.errors import _count
from apsw_backup.cli.plan import Job, _locked
from apsw_backup.copy import CopyResult
from apsw_backup.verify import Progress

REDRAW_EVERY = 0.1  # seconds between two redraws of the progress line


def _progress_line(wanted: bool | None, job: Job) -> ProgressLine | None:
    if sys.stderr is None:
        return None  # closed when the command started
    try:
        show = wanted if wanted is not None else sys.stderr.isatty()
    except (OSError, ValueError):
        show = False
    return ProgressLine(sys.stderr, job) if show else None


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal stream writes to, asked afresh each time
    (the user may resize it): $COLUMNS if set, else the terminal's, else
    shutil's answer (80 when there is no terminal)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    if columns <= 0:
        columns = shutil.get_terminal_size().columns
    return max(columns, 1)


def fit(forms: list[list[str]], width: int) -> str:
    """The first of forms (the same parts, each form terser than the one
    before) whose parts, joined by two spaces, make a line shorter than
    width (a line as long as the terminal may wrap); else the tersest form
    with its last parts left out, cut at the width at worst."""
    for parts in forms:
        text = "  ".join(parts)
        if len(text) < width:
            return text
    parts = forms[-1]
    while len(parts) > 1 and len("  ".join(parts)) >= width:
        parts = parts[:-1]
    text = "  ".join(parts)
    return text if len(text) < width else text[: max(0, width - 1)]


class ProgressLine:
    """The progress line on stderr: the phase (copying, waiting for a lock,
    restarted N times, verifying), percent, pages, MB/s, ETA.

    Redrawn in place at most every REDRAW_EVERY seconds, and at once when the
    phase changes; fitted to the terminal's width at every redraw, so that it
    never wraps (a wrapped line cannot be redrawn in place: each redraw would
    leave a stale line above).  end() draws the final line and ends it.
    """

    def __init__(
        self, stream: TextIO, job: Job, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream
        self._job = job
        self._clock = clock
        self._start = clock()
        self._drawn_at = -math.inf
        self._width = 0  # characters drawn by the last redraw
        self._phase = "starting"
        self._since = self._start  # when the phase began
        self._label = "verifying"
        self._verify: Progress | None = None  # the last verify() report
        self._copying_since = 0.0  # when the first pages were copied
        self._broken = False  # the stream failed: nothing more is written

    def step(self, status: int) -> None:
        """After a step: redraw (the job has taken the step in)."""
        if not self._copying_since and self._job.copied:
            self._copying_since = self._clock()
        if status == apsw_backup.SQLITE_DONE:
            self._set("copied")
        elif _locked(status):
            self._set("waiting")
        else:
            self._set("copying")

    def verifying(self, label: str = "verifying") -> None:
        """The verify phase begins."""
        self._label = label
        self._verify = None
        self._set("verifying")

    def verify_tick(self, progress: Progress) -> None:
        """verify()'s report: redraw with its fraction and ETA if it is time,
        and at once for the first report (it names the level) and the last."""
        last = self._verify
        self._verify = progress
        if last is None or progress.fraction >= 1.0 > last.fraction:
            self._draw(self.parts())
        else:
            self.tick()

    def tick(self) -> None:
        """Redraw if it is time (the clocks in the line move on)."""
        if self._clock() - self._drawn_at >= REDRAW_EVERY:
            self._draw(self.parts())

    def _set(self, phase: str) -> None:
        if phase == self._phase:
            self.tick()
            return
        self._phase, self._since = phase, self._clock()
        self._draw(self.parts())

    def parts(self) -> list[str]:
        """The line as it stands, most important part first."""
        job, now = self._job, self._clock()
        in_phase = now - self._since
        if self._phase == "verifying":
            return self._verify_parts(in_phase)
        done = self._phase == "copied"
        percent = 100.0 if done else 100.0 * job.copied / job.total if job.total else 0
        phase = {
            "waiting": f"waiting for a lock {in_phase:.1f} s",
            "copied": "copied",
        }.get(self._phase, "copying")
        if job.restarts:
            phase += f" (restarted {_count(job.restarts, 'time')})"
        if not job.total and not done:
            return [phase]  # no step has got far enough to count the pages
        parts = [phase, f"{percent:.1f}%", f"{job.copied}/{job.total} pages"]
        if self._phase != "waiting":
            parts += self._speed(now)
        return parts

    def _verify_parts(self, in_phase: float) -> list[str]:
        """verifying (full) 2.1 s  45%  ETA 0:03  integrity_check(orders)"""
        p = self._verify
        level = p.phase.partition("(")[2].rstrip(")") if p is not None else ""
        head = f"{self._label} ({level})" if level else self._label
        parts = [f"{head} {in_phase:.1f} s"]
        if p is None:
            return parts
        parts.append(f"{100 * p.fraction:.0f}%")
        parts.append(f"ETA {_duration(p.eta) if p.eta is not None else '--'}")
        if p.running:
            parts.append(", ".join(p.running))
        return parts

    def terse(self, parts: list[str]) -> list[str]:
        """parts in fewer words, for a narrow terminal."""
        words = {" (restarted ": ", ", " times)": " restarts", " time)": " restart"}
        terse = []
        for part in parts:
            for long, short in words.items():
                part = part.replace(long, short)
            terse.append(part.removesuffix(" pages"))
        if terse and terse[0].startswith("verifying"):
            terse = [part.replace("integrity_check", "ic") for part in terse]
        if terse and terse[0].startswith("waiting for a lock "):
            terse[0] = "lock wait " + terse[0].removeprefix("waiting for a lock ")
        return terse

    def _speed(self, now: float) -> list[str]:
        job = self._job
        done = self._phase == "copied"
        parts = []
        # The rate since the first pages were copied (a lock wait before
        # them would make it look slow); too early to tell from one step.
        elapsed = now - (self._copying_since or now)
        rate = job.written / elapsed if elapsed >= REDRAW_EVERY else 0.0
        if job.page_size and rate:
            parts.append(f"{rate * job.page_size / 1e6:.1f} MB/s")
        if not done:
            left = job.total - job.copied
            parts.append(f"ETA {_duration(left / rate) if rate else '--'}")
        return parts

    def done_parts(self, result: CopyResult) -> list[str]:
        """The final line of a backup that succeeded."""
        return [
            f"done: {result.pages} pages ({result.bytes / 1e6:.1f} MB)",
            f"verified ({result.verification.level})"
            if result.verification is not None
            else "verified"
            if self._job.verify
            else "not verified",
            f"{result.elapsed:.2f} s",
            _count(result.restarts, "restart"),
        ]

    def stopped_parts(self, why: str) -> list[str]:
        """The final line of a backup that failed or was interrupted."""
        job = self._job
        if not job.total:
            return [f"stopped: {why}"]
        return [f"stopped: {why}", f"{job.copied}/{job.total} pages"]

    def _draw(self, parts: list[str]) -> None:
        self._drawn_at = self._clock()
        width = terminal_columns(self._stream)
        line = fit([parts, self.terse(parts)], width)
        # Blank out what is left of a longer previous line, within the width,
        # and the two columns after it, where the terminal echoes "^C".
        text = "\r" + line.ljust(min(self._width + 2, width - 1))
        self._width = len(line)
        self._write(text)

    def _write(self, text: str) -> None:
        # A progress line that cannot be written (stderr closed, EPIPE) is
        # given up: it must never stop the copy nor change its outcome.
        if not self._broken and not output.write_to(self._stream, text):
            self._broken = True

    def end(self, parts: list[str]) -> None:
        """Draw the final line and end it."""
        self._draw(parts)
        self._write("\n")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"
