"""Running the apsw-backup command as a real process, for the test_cli*.py
files: every run goes through ``sys.executable -m apsw_backup`` with a
timeout (the console script is the same main(), checked in test_cli.py)."""

import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

TIMEOUT = 60  # seconds any one command may take before it counts as a hang
PAUSE = "APSW_BACKUP_TEST_PAUSE"  # the command's test-only pause hook


def command(*args):
    return [sys.executable, "-m", "apsw_backup", *map(str, args)]


def run(*args, text=True, env=None, **kwargs):
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=text,
        timeout=TIMEOUT,
        check=False,
        env=env,
        **kwargs,
    )


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def wait_for(predicate, what, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def paused_env(phase, marker):
    """The environment that makes the command stop in `phase`: it creates
    `marker` there and waits for a signal."""
    return {**os.environ, PAUSE: f"{phase}:{marker}"}


def interrupt_in(phase, args, tmp_path, signum=signal.SIGINT):
    """Run the command until it reaches `phase`, send it `signum` there;
    (returncode, stdout, stderr)."""
    marker = marker_path(tmp_path, phase)
    proc = subprocess.Popen(
        command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=paused_env(phase, marker),
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, phase)
        assert marker.exists(), f"never reached {phase}: {proc.communicate()}"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
    return proc.returncode, stdout, stderr


def marker_path(tmp_path, phase):
    """Where the pause hook marks `phase` reached: in a folder of its own,
    which leftovers() does not count."""
    folder = tmp_path / MARKERS
    folder.mkdir(exist_ok=True)
    return folder / f"reached-{phase}"


MARKERS = "markers"


def leftovers(folder, keep=()):
    """Files in folder other than `keep` (names) and the markers folder."""
    return sorted(set(os.listdir(folder)) - {*keep, MARKERS})


def json_of(proc):
    """The one JSON object the command printed on stdout."""
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


class Terminal:
    """The command with stderr on a pseudo-terminal of a given width."""

    def __init__(self, args, columns=80, env=None):
        self.primary, secondary = pty.openpty()
        fcntl.ioctl(
            secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0)
        )
        environ = {k: v for k, v in (env or os.environ).items() if k != "COLUMNS"}
        self.proc = subprocess.Popen(
            command(*args), stdout=subprocess.PIPE, stderr=secondary, env=environ
        )
        os.close(secondary)
        self.chunks = []
        self.stdout = ""

    def read_until(self, predicate, what):
        """Read until predicate(everything written so far) holds."""
        deadline = time.monotonic() + TIMEOUT
        while not predicate(self.text()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            assert self.proc.poll() is None, f"exited before {what}: {self.text()}"
            if select.select([self.primary], [], [], 0.05)[0]:
                self.chunks.append(os.read(self.primary, 65536))

    def text(self):
        return b"".join(self.chunks).decode()

    def read_until_exit(self):
        """(returncode, everything written to the terminal)."""
        deadline = time.monotonic() + TIMEOUT
        try:
            while time.monotonic() < deadline:
                if select.select([self.primary], [], [], 0.05)[0]:
                    try:
                        chunk = os.read(self.primary, 65536)
                    except OSError:  # EIO: the command closed the terminal
                        break
                    if not chunk:
                        break
                    self.chunks.append(chunk)
                elif self.proc.poll() is not None:
                    break
            self.stdout = self.proc.stdout.read().decode()
            return self.proc.wait(TIMEOUT), self.text()
        finally:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            self.proc.stdout.close()
            os.close(self.primary)


def redraws(screen_text):
    """The successive states of the progress line: each \\r starts one."""
    return [part for part in screen_text.replace("\n", "\r").split("\r") if part]


def without_preload():
    """The environment for unshare/setpriv/sh: a sanitizer runtime preloaded
    for the tests is handed on to the Python child only (see in_mount)."""
    env = dict(os.environ)
    env["CHILD_PRELOAD"] = env.pop("LD_PRELOAD", "")
    return env


# Mount a tmpfs ("$1", options "$2") in a private mount namespace, then run
# the rest of the arguments there.
MOUNT_AND_RUN = r"""
set -e
mount -t tmpfs -o "$2" tmpfs "$1"
folder=$1; shift 2
if [ -n "$SETUP" ]; then eval "$SETUP"; fi
if [ -n "$REMOUNT" ]; then mount -o "remount,$REMOUNT" "$folder"; fi
LD_PRELOAD=$CHILD_PRELOAD exec "$@"
"""


def can_mount(probe):
    """Whether a tmpfs can be mounted in a private mount namespace here."""
    if shutil.which("unshare") is None:
        return False
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size=64k tmpfs "{probe}"'],
        capture_output=True, env=without_preload(), timeout=TIMEOUT, check=False,
    )  # fmt: skip
    return proc.returncode == 0


def in_mount(folder, options, args, setup="", remount=""):
    """Run the command with a tmpfs (mount options) on folder, in a private
    mount namespace; `setup` is shell run there first (before `remount`)."""
    env = {**without_preload(), "SETUP": setup, "REMOUNT": remount}
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         MOUNT_AND_RUN, "sh", str(folder), options, *command(*args)],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False,
    )  # fmt: skip


def without_privileges(args):
    """Run the command as root without the capabilities that let root read
    and write any file, so that file permissions apply to it."""
    return subprocess.run(
        ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "sh", "-c",
         'LD_PRELOAD=$CHILD_PRELOAD exec "$@"', "sh", *command(*args)],
        capture_output=True, text=True, env=without_preload(), timeout=TIMEOUT,
        check=False,
    )  # fmt: skip


def resize(terminal, columns):
    """Make the terminal `columns` wide, as a user dragging its edge does."""
    fcntl.ioctl(
        terminal.primary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0)
    )
