"""Recording the file-system calls of a run, and injecting a fault into one
of them, with strace (Debian package `strace`).

strace counts a syscall's invocations per syscall and per tracee (thread):
`-e inject=openat:error=EIO:when=7` fails the 7th openat of *every* thread.
So a call is addressed as (syscall, its number among the main thread's calls
of that syscall); calls made by other threads (the verification thread's
stats) cannot be addressed without also hitting the main thread's call of
that number (made at interpreter start-up): they are recorded and counted,
not injected.
"""

import os
import re
import shutil
import subprocess

# The calls recorded: every call that takes a path (%file), and the calls
# that write, sync, truncate, lock or mark an open file.
SYSCALLS = (
    "%file,write,pwrite64,pwritev,pwritev2,fsync,fdatasync,ftruncate,fallocate,"
    "rename,renameat,renameat2,link,linkat,unlink,unlinkat,openat,flock,"
    "fsetxattr,fgetxattr"
)
# The calls that open or create a file: EACCES applies to them.
OPENS = {"open", "openat", "openat2", "creat", "mkdir", "mkdirat"}

_CALL = re.compile(r"^(?P<pid>\d+) +(?P<name>\w+)\((?P<rest>.*)$")
_PATHS = re.compile(r'"((?:[^"\\]|\\.)*)"|<([^<>]*)>')
_AT_FDCWD = re.compile(r"AT_FDCWD<[^>]*>")


def available():
    """None when strace can trace and inject here, else why not."""
    exe = shutil.which("strace")
    if exe is None:
        return "strace is not installed (apt-get install -y strace)"
    try:
        proc = subprocess.run(
            [exe, "-f", "-qq", "-o", os.devnull, "-e", "trace=openat",
             "-e", "inject=openat:error=EIO:when=1", "true"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"strace cannot run: {exc}"
    if proc.returncode == 0:
        # true failed to open ld.so.cache and still ran: injection works.
        return None
    text = proc.stderr.decode(errors="replace").strip()
    if "Operation not permitted" in text or "ptrace" in text:
        return f"strace cannot trace here (ptrace not permitted): {text}"
    return None


class Call:
    """One recorded call: its index in the run's list of calls on the
    scenario's files, the syscall, its number among the main thread's calls
    of that syscall (strace's `when`), and the normalised text naming it."""

    def __init__(self, index, name, when, key, line, thread):
        self.index = index
        self.name = name
        self.when = when
        self.key = key
        self.line = line
        self.thread = thread  # made by a thread other than the main one

    def __repr__(self):
        return f"#{self.index} {self.key} (when={self.when})"


def normalise(text, root):
    """The call's text without what differs between runs: the run folder,
    temporary names' pid and token (the shims' names too: .virtual for
    the delta shim's, .overlay for a restore point's), backup timestamps,
    fd numbers, and the inode numbers strace -y shows for a file without a
    name (O_TMPFILE: "FOLDER/#1234"; the scratch files of
    docs/incremental.md, which the kernel may number differently each run)."""
    text = text.replace(str(root), "ROOT")
    text = re.sub(r"/#\d+$", "/#INODE", text)
    text = re.sub(
        r"\.apsw-backup-\d+-[0-9a-f]+\.(partial|virtual|overlay)",
        r".apsw-backup-P.\1",
        text,
    )
    text = re.sub(r"\d{8}T\d{6}\.\d{6}Z", "STAMP", text)
    return text


def call_key(name, rest, root):
    """syscall(path, path...) of the paths (and descriptors' paths) in a
    call's arguments, normalised."""
    rest = _AT_FDCWD.sub("AT_FDCWD", rest.split(") = ")[0])
    paths = [a or b for a, b in _PATHS.findall(rest)]
    paths = [normalise(p, root) for p in paths if p.startswith(str(root))]
    return f"{name}({', '.join(paths)})"


def parse(trace_text, root, prefix):
    """The calls of a `strace -f -y` trace that name a file under prefix
    (a folder in root): [Call], in order."""
    prefix = str(prefix)
    counts = {}
    main = None
    calls = []
    for line in trace_text.splitlines():
        match = _CALL.match(line)
        if not match:
            continue
        pid, name, rest = match["pid"], match["name"], match["rest"]
        if main is None:
            main = pid
        counts[pid, name] = counts.get((pid, name), 0) + 1
        if name.startswith("execve"):
            continue
        args = _AT_FDCWD.sub("AT_FDCWD", rest.split(") = ")[0])
        if prefix not in args:
            continue
        calls.append(
            Call(
                index=len(calls),
                name=name,
                when=counts[pid, name],
                key=call_key(name, rest, root),
                line=line,
                thread=pid != main,
            )
        )
    return calls


def command(argv, trace_file, inject=None, name=None):
    """strace + argv: record every call of SYSCALLS into trace_file, or
    (inject: 'error=EIO' / 'signal=KILL') fault the `when`-th call `name`
    of each thread and record that syscall's calls only."""
    exe = shutil.which("strace") or "strace"
    if inject is None:
        return [exe, "-f", "-qq", "-y", "-o", str(trace_file),
                "-e", f"trace={SYSCALLS}", *argv]  # fmt: skip
    what, when = inject
    return [exe, "-f", "-qq", "-y", "-o", str(trace_file), "-e", f"trace={name}",
            "-e", f"inject={name}:{what}:when={when}", *argv]  # fmt: skip


def injected_key(trace_text, root, name, what):
    """The normalised key of the call that was faulted in an injection
    run's trace (None if none was)."""
    main = None
    last = None
    for line in trace_text.splitlines():
        match = _CALL.match(line)
        if not match:
            continue
        if main is None:
            main = match["pid"]
        if match["pid"] != main or match["name"] != name:
            continue
        if what.startswith("error=") and "(INJECTED)" in line:
            return call_key(name, match["rest"], root)
        last = match
    if what.startswith("signal=") and last is not None:
        return call_key(name, last["rest"], root)
    return None
