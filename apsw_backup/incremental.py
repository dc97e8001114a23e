"""Incremental backups: restore points chained by root hashes (docs/incremental.md).

The file format, and why each piece is there, is in docs/incremental.md.
In short: every restore point is one file, ``<stem>-<UTC time>.base.apswb``
or ``...delta.apswb``, holding a header, the pages that differ from its
parent, an index of those pages, the manifest (the hash of every page of
the database at that moment), and a trailer with the parent's root hash,
its own, and a checksum.  A base is a point whose parent is the empty
database.

- incremental(source, folder) backs the source up into the folder: a base
  when the folder holds no usable chain for this source, else a delta.  The
  ordinary backup API writes into a database that exists nowhere as a
  file (the delta shim, src/deltashim.c), which keeps only the pages whose
  hash differs from the parent's manifest.  No table that grows with the
  database is held in memory (docs/incremental.md, "Memory").
- restore(backup, dest) rebuilds a database: into a new file, page by page
  from the chain, each page checked against the manifest, then
  quick_check; into an existing database (overwrite=True), through an
  ordinary backup from the overlay (src/deltashim.c), in SQLite's own
  transaction.
- open_restore_point(backup) opens a point read-only as a Connection, over
  the overlay: nothing is restored.
- list_points(folder), verify_folder(folder).
"""

from __future__ import annotations

import array
import dataclasses
import errno
import os
import re
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, TypeVar

from apsw_backup import _apsw_backup as _c
from apsw_backup import files
from apsw_backup.copy import (
    FLUSH_EVERY,
    _cannot,
    _check_journal_name,
    _check_source_file,
    _header_of,
    copy,
)

FORMAT_VERSION = 1
MAGIC = b"APSWBKP\x00"
TRAILER_MAGIC = b"APSWBKT\x00"
END_MAGIC = b"APSWEND\x00"
ROOT_PREFIX = b"APSWROOT"
SUFFIX = ".apswb"
KINDS = ("base", "delta")
HASH = 16
ZERO_HASH = bytes(HASH)

# header: magic, version, kind, page size, data offset, page count, stored
# pages, created (microseconds since the epoch, UTC), sequence, flags,
# length of the source path; then the path (UTF-8), then zeros up to the
# data offset (a multiple of 4096).
# pages a step of copy() when a timeout is given (as the command's --pages)
TIMED_STEP_PAGES = 256
_HEADER = struct.Struct(">8sIIIIQQqQIH")
# trailer: magic, index offset, manifest offset, parent root, root,
# checksum, end magic.
_TRAILER = struct.Struct(">8sQQ16s16s16s8s")
_CHECKED_TRAILER = _TRAILER.size - HASH - 8  # what the checksum covers

STAMP = "%Y%m%dT%H%M%S.%fZ"
_NAME = re.compile(
    r"(?P<stem>.+)-(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.(?P<kind>base|delta)"
    + re.escape(SUFFIX),
    re.DOTALL,  # a stem may hold any character a file name may, \n too
)
_READ_RUN = 1 << 20  # bytes read at once when streaming pages
# entries of an index, a manifest or a recording's table read or written at
# once: what a run holds of a table that grows with the database
_WINDOW = 65536

# steps of a restore into an existing dest when progress is given
RESTORE_STEPS = 64

# Defaults of incremental(): see its docstring.
MAX_CHAIN = 30
REBASE_SHARE = 1.0  # the chain's deltas together, against the base's size
VACUUM_SHARE = 0.5  # one delta storing more of the pages than this: a base
DEST_CACHE_PAGES = -2000  # the recording's page cache (SQLite's default, 2 MB)


class BrokenChainError(Exception):
    """A restore point is missing, out of order, truncated or altered.

    ``path`` names the file at fault (or, for a missing one, the file whose
    parent is missing)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class IncrementalError(Exception):
    """The backup could not make a sound restore point (nothing was kept)."""


class FolderBusyError(IncrementalError):
    """Another incremental backup is writing into the same folder."""


@dataclasses.dataclass(frozen=True)
class RestorePoint:
    """One restore point file, as its header and trailer describe it."""

    path: str
    stem: str
    kind: str  # "base" or "delta"
    created: datetime
    size: int
    page_size: int
    page_count: int
    stored_pages: int
    sequence: int
    source: str
    root: str  # hex
    parent_root: str  # hex; all zeros for a base
    wal: bool  # page 1 says WAL mode (the source was in WAL mode)

    @property
    def database_size(self) -> int:
        return self.page_size * self.page_count


@dataclasses.dataclass
class IncrementalResult:
    path: str
    kind: str
    page_count: int
    # all the run wrote: its point, plus any base a rebase or a keep= merge
    # wrote (so a delta merged away still counts, with the base it became)
    pages_written: int
    bytes_written: int
    elapsed: float
    chain_length: int  # points from the base to this one, both included
    root: str
    reason: str  # why a base, or "" for a delta
    restarts: int = 0  # times the backup started over (writers changed the source)
    # the shim's counts: page writes, of them equal to the parent's, and
    # unkept pages SQLite read back after a restart (served poisoned)
    recording: dict[str, int] = dataclasses.field(default_factory=dict)
    deleted: list[str] = dataclasses.field(default_factory=list)
    merged: list[str] = dataclasses.field(default_factory=list)
    # the new point's stored pages were read back from the disk and checked
    # against their hashes (False: verify=False, --no-verify)
    verified: bool = True


@dataclasses.dataclass
class RestoreResult:
    point: str
    dest: str
    pages: int
    elapsed: float
    overwrote: bool
    writers_held: float  # seconds the existing DEST's write lock was held
    wal_growth: int  # bytes DEST's -wal grew (existing DEST in WAL mode)


@dataclasses.dataclass
class ChainReport:
    stem: str
    points: list[str]
    ok: bool
    problems: list[str]
    # the files the problems name, in the same order (damaged, or not
    # following the point before them)
    at_fault: list[str] = dataclasses.field(default_factory=list)
    # the database the points were made from (None: no header readable)
    source: str | None = None


# -- reading a point -------------------------------------------------------


@dataclasses.dataclass
class _Point:
    """A point as read and checked.  Its index and manifest stay in its
    file: they are read there a window at a time (docs/incremental.md,
    "Memory"), through a descriptor from open()."""

    info: RestorePoint
    data_offset: int
    parent_root: bytes
    root: bytes

    def offset_of(self, position: int) -> int:
        return self.data_offset + position * self.info.page_size

    @property
    def index_off(self) -> int:
        return self.offset_of(self.info.stored_pages)

    @property
    def manifest_off(self) -> int:
        return self.index_off + 8 * self.info.stored_pages

    def open(self) -> int:
        """A descriptor of the point's file, checked to be the file that was
        read (its size and trailer): BrokenChainError naming it if it is
        missing or changed since."""
        path = self.info.path
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise BrokenChainError(f"restore point {path!r} is missing", path) from None
        try:
            size = os.fstat(fd).st_size
            trailer = _read_exact(fd, _TRAILER.size, size - _TRAILER.size)
            root = _TRAILER.unpack(trailer)[4] if len(trailer) == _TRAILER.size else b""
            if size != self.info.size or root != self.root:
                raise _damaged(path, "changed since it was first read")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def hashes(self, fd: int, first: int, count: int) -> bytes:
        """count manifest entries from page first, read from fd."""
        data = _read_exact(fd, HASH * count, self.manifest_off + HASH * (first - 1))
        if len(data) != HASH * count:
            raise _damaged(self.info.path, "truncated")
        return data

    def positions(self, fd: int, start: int, count: int) -> array.array[int]:
        """count index entries (page numbers) from position start."""
        data = _read_exact(fd, 8 * count, self.index_off + 8 * start)
        if len(data) != 8 * count:
            raise _damaged(self.info.path, "truncated")
        return _index_from_bytes(data)

    def shrunk(self, fd: int) -> bool:
        """Whether the file behind fd is no longer the size it was read at
        (cut short or rewritten while in use)."""
        try:
            return os.fstat(fd).st_size != self.info.size
        except OSError:
            return False

    # The whole index and manifest, for the tests only: the code reads
    # windows (tests/test_incremental_memory.py proves no run calls these).
    @property
    def index(self) -> array.array[int]:
        fd = self.open()
        try:
            return self.positions(fd, 0, self.info.stored_pages)
        finally:
            os.close(fd)

    @property
    def manifest(self) -> bytes:
        fd = self.open()
        try:
            return self.hashes(fd, 1, self.info.page_count)
        finally:
            os.close(fd)


def _read_failure(exc: OSError, opened: list[tuple[_Point, int]]) -> BaseException:
    """What an OSError reading points' files (each with its descriptor)
    means: damage, naming the file, if one of them changed size since it
    was read (the OS's EIO for a file cut short under an open map); else
    the OS's error naming the first of them (never DEST or a scratch
    file, which it is not about)."""
    for point, fd in opened:
        if fd >= 0 and point.shrunk(fd):
            return _damaged(point.info.path, "changed since it was first read")
    return _named(exc, opened[0][0].info.path)


def _index_from_bytes(data: bytes) -> array.array[int]:
    """An index (big-endian u64s) as an array: 8 bytes a page, not a
    Python int's 30-odd."""
    index = array.array("Q")
    index.frombytes(data)
    if sys.byteorder == "little":
        index.byteswap()
    return index


def _index_to_bytes(index: Sequence[int]) -> bytes:
    out = array.array("Q", index)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def root_hash(page_size: int, manifest: bytes) -> bytes:
    """The root hash of a database state: of its page size, page count and
    every page's hash (docs/incremental.md)."""
    count = len(manifest) // HASH
    return _c._page_hash_parts(
        (ROOT_PREFIX + struct.pack(">IQ", page_size, count), manifest)
    )


def _file_root(fd: int, page_size: int, count: int, manifest_off: int) -> bytes:
    """root_hash() of the manifest of count pages where it lies in fd (read
    a block at a time: never all in memory)."""
    return _c._page_hash_parts(
        (
            ROOT_PREFIX + struct.pack(">IQ", page_size, count),
            (fd, manifest_off, HASH * count),
        )
    )


def _damaged(path: str, what: str) -> BrokenChainError:
    return BrokenChainError(
        f"restore point {path!r} is {what}; restore from an earlier point "
        "(apsw-backup list shows them) or make a new base",
        path,
    )


def _read_exact(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def _parse_name(path: str) -> re.Match[str] | None:
    """The parts of a restore point's name, or None: a name whose time is
    no time (month 13, February 30) is not one -- it takes no part in any
    listing, naming or choice, like any other file."""
    name = _NAME.fullmatch(os.path.basename(path))
    if name is None:
        return None
    try:
        datetime.strptime(name["stamp"], STAMP)
    except ValueError:
        return None
    return name


def _read_point(path: str) -> _Point:
    """Header, index, manifest and trailer of path, checked (not the pages):
    BrokenChainError naming the file for anything wrong."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise BrokenChainError(f"restore point {path!r} is missing", path) from None
    except (PermissionError, IsADirectoryError) as exc:  # named, as unreadable
        error = BrokenChainError(
            f"restore point {path!r} cannot be read: it {files.os_cause(exc)}",
            path,
        )
        # a list or a check goes on past it; restoring from it is an OS
        # error (exit 1), not a damaged chain: _chain_for_reading()
        error.os_error = exc  # type: ignore[attr-defined]
        raise error from None
    try:
        return _read_open_point(path, fd)
    finally:
        os.close(fd)


def _read_open_point(path: str, fd: int) -> _Point:
    """_read_point's work on its open descriptor."""
    size = os.fstat(fd).st_size
    head = _read_exact(fd, _HEADER.size, 0)
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise _damaged(path, "not a restore point (no header), or truncated")
    (_, version, kind, page_size, data_offset, page_count, stored, created,
     sequence, flags, path_len) = _HEADER.unpack(head)  # fmt: skip
    if version != FORMAT_VERSION:
        raise BrokenChainError(
            f"restore point {path!r} has format version {version}; this "
            f"apsw_backup reads version {FORMAT_VERSION}: use a newer one",
            path,
        )
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise _damaged(
            path, f"damaged (its page size, {page_size}, is none SQLite has)"
        )
    if data_offset < _HEADER.size + path_len or data_offset % 4096:
        raise _damaged(path, "damaged (its header's data offset is wrong)")
    if size < data_offset + _TRAILER.size:
        raise _damaged(path, "truncated")
    header = _read_exact(fd, data_offset, 0)
    trailer = _read_exact(fd, _TRAILER.size, size - _TRAILER.size)
    (tmagic, index_off, manifest_off, parent_root, root, checksum,
     end) = _TRAILER.unpack(trailer)  # fmt: skip
    expected_index = data_offset + stored * page_size
    if (
        tmagic != TRAILER_MAGIC
        or end != END_MAGIC
        or index_off != expected_index
        or manifest_off != index_off + 8 * stored
        or size != manifest_off + HASH * page_count + _TRAILER.size
    ):
        raise _damaged(path, "truncated or damaged (its trailer does not match)")
    # index and manifest hashed where they lie, a block at a time
    digest = _c._page_hash_parts(
        (
            header,
            (fd, index_off, 8 * stored),
            (fd, manifest_off, HASH * page_count),
            trailer[:_CHECKED_TRAILER],
        )
    )
    if digest != checksum:
        raise _damaged(path, "altered or damaged (its checksum does not match)")
    if _file_root(fd, page_size, page_count, manifest_off) != root:
        raise _damaged(path, "altered (its root hash does not match its manifest)")
    if kind > 1 or (kind == 0) != (parent_root == ZERO_HASH):
        raise _damaged(path, "damaged (its kind and parent disagree)")
    for start in range(0, stored, _WINDOW):
        part = _index_from_bytes(
            _read_exact(fd, 8 * min(_WINDOW, stored - start), index_off + 8 * start)
        )
        if part and (min(part) < 1 or max(part) > page_count):
            raise _damaged(path, "damaged (its index names a page it does not have)")
    source = os.fsdecode(header[_HEADER.size : _HEADER.size + path_len])
    name = _parse_name(path)
    try:
        made = datetime.fromtimestamp(created / 1e6, timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise _damaged(path, "damaged (its time is none a clock has)") from None
    if "\0" in source:
        raise _damaged(path, "damaged (its recorded source path)")
    info = RestorePoint(
        path=path,
        stem=name["stem"] if name else Path(source).stem,
        kind=KINDS[kind],
        created=made,
        size=size,
        page_size=page_size,
        page_count=page_count,
        stored_pages=stored,
        sequence=sequence,
        source=source,
        root=root.hex(),
        parent_root=parent_root.hex(),
        wal=bool(flags & 1),
    )
    if name is not None and name["kind"] != info.kind:
        raise _damaged(path, f"a {info.kind} named as a {name['kind']}")
    if name is not None and name["stamp"] != info.created.strftime(STAMP):
        raise BrokenChainError(
            f"restore point {path!r} was made at "
            f"{info.created.strftime(STAMP)}, not at the time its name says: "
            "it was renamed (points out of order); give it back its name",
            path,
        )
    return _Point(info, data_offset, parent_root, root)


def _is_ours(path: str) -> bool:
    """Whether a file named like a restore point is one, as far as a glance
    tells: it begins with the format's magic or ends with its end marker.  A
    point damaged by a flipped bit or truncated keeps one of the two (and is
    reported as damaged); an empty file, or another program's file given
    such a name, has neither: it is not a restore point, and takes no part
    in naming, choosing a parent, restore, list or rotation -- only verify
    reports it.  A file that cannot be read counts as ours (reported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(MAGIC), 0)
        tail = os.pread(fd, len(END_MAGIC), max(0, size - len(END_MAGIC)))
    except OSError:
        return True
    finally:
        os.close(fd)
    return head == MAGIC or tail == END_MAGIC


def _point_files(folder: str, everything: bool = False) -> list[str]:
    """The restore points in folder, in name (time) order; everything: also
    the files only named like one (verify reports them)."""
    found = []
    for entry in os.scandir(folder):
        if (
            _parse_name(entry.name)
            and entry.is_file(follow_symlinks=False)
            and (everything or _is_ours(entry.path))
        ):
            found.append(entry.path)
    return sorted(found, key=lambda p: (_parse_name(p)["stamp"], p))  # type: ignore[index]


def _stems(folder: str, everything: bool = False) -> dict[str, list[str]]:
    by_stem: dict[str, list[str]] = {}
    for path in _point_files(folder, everything):
        by_stem.setdefault(_parse_name(path)["stem"], []).append(path)  # type: ignore[index]
    return by_stem


def _point_source(path: str) -> str | None:
    """The source path a point's header records (absolute), or None when
    its header cannot be read (verify and restore name what is wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        head = _read_exact(fd, _HEADER.size, 0)
        if len(head) < _HEADER.size or head[:8] != MAGIC:
            return None
        path_len = _HEADER.unpack(head)[-1]
        raw = _read_exact(fd, path_len, _HEADER.size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if b"\0" in raw or len(raw) < path_len:
        return None  # damaged (a flipped bit in the length): said by its checks
    # As recorded: a point records its source's real path (symbolic links
    # resolved when it was made), so one database named through a link and
    # by its own path is one source.  Never resolved again here: a link
    # made or removed later must not move a point to another source (a
    # delta made through a link left behind by a move would lose its base).
    return os.path.abspath(os.fsdecode(raw))


def _sources(paths: list[str]) -> dict[str, str | None]:
    """The source each point's header records; None for a point whose
    header cannot be read, or -- when the points name several sources --
    one whose checks fail: a flipped bit in its recorded path must not
    make it another database's point (reading its manifest costs 16 bytes
    a page, paid only where a folder holds several sources)."""
    found = {p: _point_source(p) for p in paths}
    if len({s for s in found.values() if s is not None}) > 1:
        for path, source in found.items():
            if source is not None:
                try:
                    _read_point(path)
                except BrokenChainError:
                    found[path] = None
    return found


def _of_source(paths: list[str], source: str) -> list[str]:
    """The points of paths made from source: two databases of the same
    name (s1/app.db, s2/app.db) may share a folder, and each has its own
    chains, its own --keep.  A point whose source cannot be told stays in
    (_chains and _chain_to report it as damaged only where the chain does
    not link without it; rotation never deletes it)."""
    source = os.path.abspath(source)
    found = _sources(paths)
    return [p for p in paths if found[p] in (source, None)]


def _by_source(paths: list[str]) -> dict[str | None, list[str]]:
    groups: dict[str | None, list[str]] = {}
    found = _sources(paths)
    for path in paths:
        groups.setdefault(found[path], []).append(path)
    unknown = groups.pop(None, [])
    if unknown and groups:
        for source in groups:  # read with every source's chains
            groups[source] = sorted(groups[source] + unknown, key=paths.index)
    elif unknown:
        groups[None] = unknown
    return groups


def _chains(
    paths: list[str],
) -> tuple[list[list[_Point]], list[BrokenChainError], list[str]]:
    """The chains the points of one stem form, oldest first; the problems
    found; and the deltas a
    base of the same moment and root stands for (left by a merge or a
    rebase that was interrupted before it removed them)."""
    chains: list[list[_Point]] = []
    problems: list[BrokenChainError] = []
    entries: list[_Point | BrokenChainError] = []
    for path in paths:
        try:
            entries.append(_read_point(path))
        except BrokenChainError as exc:
            entries.append(exc)
    bases_at = {
        (p.info.created, p.root)
        for p in entries
        if isinstance(p, _Point) and p.info.kind == "base"
    }
    twins = []
    # Files that cannot be read wait: if the next point links to the tip
    # all the same, they were not of this chain (another source's, or an
    # interrupted merge's): reported as strays (exc.stray), which break
    # nothing; otherwise the first of them is the chain's problem.
    unread: list[BrokenChainError] = []
    # The last delta of a broken chain: deltas that follow it are of that
    # broken chain, not each a new problem (the break is said once).
    dangling: _Point | None = None
    for p in entries:
        if isinstance(p, BrokenChainError):
            unread.append(p)
            continue
        if p.info.kind == "base":
            chains.append([p])
            dangling = None
            # A base links to nothing: it does not show that a file before
            # it was not the older chain's newest point (unreadable, cut
            # short), whose parents rotation must then keep.
            _settle_unread(unread, problems, linked=False)
            continue
        if (p.info.created, p.root) in bases_at:
            twins.append(p.info.path)
            continue
        tip = chains[-1][-1] if chains and chains[-1] else None
        if (
            tip is None
            or tip.root != p.parent_root
            or tip.info.sequence + 1 != p.info.sequence
        ):
            if (
                tip is None
                and not unread
                and dangling is not None
                and dangling.root == p.parent_root
                and dangling.info.sequence + 1 == p.info.sequence
            ):
                dangling = p  # follows the broken chain: already said
                continue
            dangling = p
            if unread:  # the missing link is the file that cannot be read
                _settle_unread(unread, problems, linked=False)
                chains.append([])
                continue
            before = (
                f"the point before it, {tip.info.path!r}"
                if tip
                else "nothing before it"
            )
            message = (
                f"restore point {p.info.path!r} does not follow {before}: its "
                "parent is missing, or the points are out of order (a file was "
                "removed, renamed or replaced); restore from a point before it, "
                "or make a new base"
            )
            problems.append(BrokenChainError(message, p.info.path))
            chains.append([])
            continue
        _settle_unread(unread, problems, linked=True)
        chains[-1].append(p)
    problems.extend(unread)  # the newest files: nothing tells they are not ours
    return [c for c in chains if c], problems, twins


def _settle_unread(
    unread: list[BrokenChainError], problems: list[BrokenChainError], linked: bool
) -> None:
    """_chains' files that could not be read, once it is known whether the
    chain linked without them (strays) or broke where they are."""
    for i, exc in enumerate(unread):
        exc.stray = linked or i > 0  # type: ignore[attr-defined]
        problems.append(exc)
    unread.clear()


def _a_folder(folder: str | os.PathLike[str]) -> str:
    """A reader's folder of restore points, as given (bytes as the OS gives
    names too), or the error naming it and the cure."""
    path = os.fsdecode(os.fspath(folder))
    if not path:
        raise ValueError("the folder is an empty name: name a folder of restore points")
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise NotADirectoryError(
                errno.ENOTDIR,
                f"{path!r} is not a folder: name the folder of restore points "
                "(restore and verify also take a point's file)",
                path,
            )
        raise FileNotFoundError(
            errno.ENOENT,
            f"the folder {path!r} does not exist: check the path",
            path,
        )
    return path


def list_points(folder: str | os.PathLike[str]) -> list[RestorePoint]:
    """Every restore point in folder, oldest first, as its header says; a
    point that cannot be read is left out (verify_folder() names it)."""
    folder = _a_folder(folder)
    out = []
    for path in _point_files(folder):
        try:
            out.append(_read_point(path).info)
        except BrokenChainError:
            continue
    return out


def _unlisted(folder: str) -> list[tuple[str, str]]:
    """The files of folder named like restore points that list_points()
    leaves out, in name order, each with why: a point that cannot be read
    (damaged, or not readable for want of permission), or a file that is
    not one at all (empty, zeros, another program's).  `list` shows them
    too, so that no file named as a point goes unseen."""
    out = []
    for path in _point_files(folder, everything=True):
        if not _is_ours(path):
            out.append((path, "named like a restore point but is not one "
                        "(empty, or not in the format)"))  # fmt: skip
            continue
        try:
            _read_point(path)
        except BrokenChainError as exc:
            out.append((path, str(exc)))
    return out


def _stamp(path: str) -> str:
    name = _parse_name(path)
    return name["stamp"] if name else ""


def _chain_to(point_path: str, folder: str) -> list[_Point]:
    """The chain from its base up to point_path, every link checked: the
    first file at fault is named (BrokenChainError)."""
    name = _parse_name(point_path)
    if name is None:
        raise ValueError(
            f"{point_path!r} is not a restore point's name "
            f"(<stem>-<UTC time>.base{SUFFIX} or .delta{SUFFIX})"
        )
    target = os.path.abspath(point_path)
    chain = [_read_point(target)]
    older = [
        p
        for p in _of_source(_stems(folder).get(name["stem"], []), chain[0].info.source)
        if os.path.abspath(p) != target and _stamp(p) < name["stamp"]
    ]
    twin = _twin_base(target)
    if chain[0].info.kind == "delta" and os.path.exists(twin):
        try:  # an interrupted merge: the base stands for it -- if it is one
            base: _Point | None = _read_point(twin)
        except BrokenChainError:
            base = None  # another file at that name: the delta is the point
        if base is not None and base.root == chain[0].root:
            chain = [base]
    unread: BrokenChainError | None = None
    while chain[0].info.kind != "base":
        child = chain[0]
        if not older:
            if unread is not None:
                raise unread
            raise BrokenChainError(
                f"the parent of restore point {child.info.path!r} is missing "
                f"(no point before it has root {child.parent_root.hex()}): "
                "restore from an earlier chain, or make a new base",
                child.info.path,
            )
        path = older.pop()
        if (
            older
            and _stamp(older[-1]) == _stamp(path)
            and older[-1].endswith(".base" + SUFFIX)
        ):
            # A merge's base stands for the delta of its time -- if it is
            # one: it reads as a point and links as that delta would.  Any
            # other file at that name is passed over for the delta.
            twin_path = older.pop()
            try:
                merged: _Point | None = _read_point(twin_path)
            except BrokenChainError:
                merged = None
            if (
                merged is not None
                and merged.root == child.parent_root
                and merged.info.sequence + 1 == child.info.sequence
            ):
                chain.insert(0, merged)
                unread = None
                continue
        try:
            parent = _read_point(path)
        except BrokenChainError as exc:
            # A file that cannot be read or is damaged (another database's
            # point, a copy made by hand under another name): the chain goes
            # on without it if an older point links -- as _chains() and so
            # verify and the next run see it; if none does, this file is the
            # one to name.
            unread = unread or exc
            continue
        if (
            parent.root != child.parent_root
            or parent.info.sequence + 1 != child.info.sequence
        ):
            if unread is not None:
                raise unread
            raise BrokenChainError(
                f"restore point {child.info.path!r} does not follow "
                f"{path!r}: its parent is missing, or the points are out of "
                "order (a file was removed, renamed or replaced); restore from "
                "a point before it, or make a new base",
                child.info.path,
            )
        chain.insert(0, parent)
        unread = None  # linked past it: not of this chain
    return chain


def _chain_for_reading(point: str) -> list[_Point]:
    """_chain_to() for a restore or open_restore_point(): a point of the
    chain that cannot be read for want of permission is the OSError it met
    (exit 1, naming the file), not a broken chain (exit 3): nothing says it
    is damaged."""
    try:
        return _chain_to(point, os.path.dirname(point))
    except BrokenChainError as exc:
        os_error = getattr(exc, "os_error", None)
        if os_error is None:
            raise
        raise os_error from None


def _resolve(backup: str | os.PathLike[str], at: datetime | str | None) -> str:
    """The restore point a BACKUP argument names: a point file, or the
    newest point of a folder (at or before `at`)."""
    path = os.path.abspath(os.fspath(backup))
    if os.path.isdir(path):
        when = _parse_time(at) if at is not None else None
        stems = _stems(path)
        if not stems:
            raise FileNotFoundError(f"the folder {path!r} holds no restore points")
        if len(stems) > 1:
            raise ValueError(
                f"the folder {path!r} holds restore points of several databases "
                f"({', '.join(sorted(stems))}): name a restore point file"
            )
        candidates = next(iter(stems.values()))
        sources = [source for source in _by_source(candidates) if source is not None]
        if len(sources) > 1:
            # One stem, several databases (s1/app.db, s2/app.db): the newest
            # point of the folder may be another database's.
            raise ValueError(
                f"the folder {path!r} holds restore points of several databases "
                f"({', '.join(sorted(sources))}): name a restore point file"
            )
        if when is not None:
            candidates = [
                p
                for p in candidates
                if datetime.strptime(_parse_name(p)["stamp"], STAMP).replace(  # type: ignore[index]
                    tzinfo=timezone.utc
                )
                <= when
            ]
            if not candidates:
                raise FileNotFoundError(
                    f"no restore point in {path!r} is at or before {when.isoformat()}"
                )
        return candidates[-1]
    if at is not None:
        raise files.with_facts(
            ValueError("at= chooses a point in a folder; backup is a file"),
            role="source",
            path=path,
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no restore point or folder {path!r}")
    return path


def _parse_time(value: datetime | str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str):
        raise TypeError(
            "at must be a datetime, or a time as text (ISO 8601, e.g. "
            f"'2026-12-01T00:00:00Z', or a point's stamp), not "
            f"{type(value).__name__}"
        )
    text = value.strip()
    try:
        return datetime.strptime(text, STAMP).replace(tzinfo=timezone.utc)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"cannot read the time {value!r}: give an ISO 8601 time "
            "(2026-12-04T15:00:00Z, UTC unless an offset is given) or a "
            "restore point's stamp (20261204T150000.000000Z)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


# -- streaming a chain's pages ---------------------------------------------


def _scratch_error(exc: OSError, folder: str | None) -> OSError:
    """exc, from writing a scratch file (a full disk), naming its folder:
    the scratch file has no name of its own."""
    if exc.errno is None or exc.filename is not None:
        return exc
    where = folder if folder is not None else tempfile.gettempdir()
    return OSError(exc.errno, exc.strerror, where)


def _scratch(folder: str | None) -> IO[bytes]:
    """An unnamed file of our own for a table that grows with the database
    (src/table.h): in folder -- the folder the run makes its file in -- or
    in the system's temporary folder (None: a reader, or a restore into an
    existing DEST, which makes no file).  It has no name (O_TMPFILE
    where the file system has it, else removed at once), so a crash leaves
    nothing, and it is gone when closed."""
    try:
        return tempfile.TemporaryFile(dir=folder, prefix=".apsw-backup-scratch-")
    except OSError as exc:
        raise _scratch_error(exc, folder) from exc


class _ChainFiles:
    """Open descriptors of a chain's files (each checked to be the file that
    was read) and the chain's page map (src/deltashim.h, ChainMap: where
    the newest version of each page lives), kept in a scratch file in
    scratch_dir (_scratch())."""

    def __init__(self, chain: list[_Point], scratch_dir: str | None) -> None:
        tip = chain[-1]
        self.chain = chain
        self.page_size = tip.info.page_size
        self.page_count = tip.info.page_count
        self.fds: list[int] = []
        self.map: Any = None
        self.scratch: IO[bytes] | None = None
        try:
            for point in chain:
                if point.info.page_size != self.page_size:
                    raise _damaged(
                        point.info.path, "of another page size than its chain"
                    )
                self.fds.append(point.open())
            self.scratch = _scratch(scratch_dir)
            try:
                self.map, missing = _c._chain_open(
                    self.page_size,
                    self.page_count,
                    tuple(
                        (fd, p.data_offset, p.index_off, p.info.stored_pages)
                        for fd, p in zip(self.fds, chain, strict=True)
                    ),
                    tip.manifest_off,
                    self.scratch.fileno(),
                )
            except ValueError:  # an index naming page 0: _read_point refuses it
                raise _damaged(
                    tip.info.path, "damaged (an index names page 0)"
                ) from None
            except OSError as exc:  # its scratch file's folder (full): name it
                raise _scratch_error(exc, scratch_dir) from exc
        except BaseException:
            self.close()
            raise
        if missing:
            self.close()
            raise _damaged(
                tip.info.path,
                f"incomplete (no file of its chain holds page {missing})",
            )

    @property
    def tip_fd(self) -> int:
        return self.fds[-1]

    def close(self) -> None:
        chain_map, self.map = self.map, None
        if chain_map is not None:
            _c._chain_close(chain_map)
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)
        scratch, self.scratch = self.scratch, None
        if scratch is not None:
            scratch.close()

    def file_of(self, pgno: int) -> str:
        """The path of the chain's file holding page pgno."""
        return self.chain[_c._chain_file_of(self.map, pgno)].info.path

    def runs(self, check: bool = False) -> Any:
        """(first page, count, bytes) over the whole database, in chunks of
        about _READ_RUN bytes, each page from the newest file holding it (a
        run of pages adjacent in one file read at once); the lock-byte page
        (never stored) as zeros.  check: each page against the tip's
        manifest."""
        P = self.page_size
        per_chunk = max(1, _READ_RUN // P)
        for first in range(1, self.page_count + 1, per_chunk):
            n = min(per_chunk, self.page_count - first + 1)
            try:
                data, bad = _c._chain_gather(self.map, first, n, check)
            except OSError as exc:  # a file of the chain, not DEST
                opened = list(zip(self.chain, self.fds, strict=True))
                raise _read_failure(exc, opened[::-1]) from exc
            if bad >= 0:
                pgno = first + bad
                raise _damaged(
                    self.file_of(pgno),
                    f"altered, damaged or truncated (page {pgno} does not "
                    "match its hash)",
                )
            yield first, n, data

    def checked_runs(self) -> Any:
        """runs(), each page checked against the tip's manifest."""
        return self.runs(check=True)


def _first_bad(data: bytes, page_size: int, first: int, expected: bytes) -> int | None:
    """The first page (pages first.. held in that order in data) whose hash
    is not its entry in expected (their manifest entries), or None; the
    lock-byte page's zero hash is skipped.  A short read counts as a
    mismatch of the first page missing."""
    count = len(data) // page_size
    wanted = len(expected) // HASH
    if count < wanted:
        return first + count
    i = _c._check_pages(data, page_size, expected)
    return None if i < 0 else first + i


def _lock_byte_page(page_size: int) -> int:
    return 0x40000000 // page_size + 1


# -- writing a point -------------------------------------------------------


def _final_name(folder: str, stem: str, kind: str, created: datetime) -> str:
    return os.path.join(folder, f"{stem}-{created.strftime(STAMP)}.{kind}{SUFFIX}")


def _header(kind: str, page_size: int, data_offset: int, page_count: int,
            stored: int, created: datetime, sequence: int, wal: bool,
            source: str) -> bytes:  # fmt: skip
    encoded = os.fsencode(source)
    micros = int(created.timestamp() * 1_000_000)
    micros = (micros // 1_000_000) * 1_000_000 + created.microsecond
    head = _HEADER.pack(
        MAGIC, FORMAT_VERSION, KINDS.index(kind), page_size, data_offset,
        page_count, stored, micros, sequence, 1 if wal else 0, len(encoded),
    )  # fmt: skip
    return (head + encoded).ljust(data_offset, b"\0")


def _data_offset(source: str) -> int:
    need = _HEADER.size + len(os.fsencode(source))
    return (need + 4095) // 4096 * 4096


def _finish_file(fd: int, header: bytes, stored: int, page_count: int,
                 parent_root: bytes, page_size: int) -> tuple[bytes, int]:  # fmt: skip
    """Write header and trailer around the pages, index and manifest already
    in the file (stored pages from the data offset, then the index, then the
    manifest of page_count pages); returns (root, file size).  The root hash
    and the checksum are of what the file holds, read back a block at a
    time."""
    files.check_owned()
    data_offset = len(header)
    index_off = data_offset + stored * page_size
    manifest_off = index_off + 8 * stored
    root = _file_root(fd, page_size, page_count, manifest_off)
    head = struct.pack(
        ">8sQQ16s16s", TRAILER_MAGIC, index_off, manifest_off, parent_root, root
    )
    checksum = _c._page_hash_parts(
        (
            header,
            (fd, index_off, 8 * stored),
            (fd, manifest_off, HASH * page_count),
            head,
        )
    )
    trailer = head + checksum + END_MAGIC
    _write_all(fd, header, 0)
    size = manifest_off + HASH * page_count + len(trailer)
    _write_all(fd, trailer, size - len(trailer))
    os.ftruncate(fd, size)
    return root, size


def _write_all(fd: int, data: bytes, offset: int) -> None:
    files.check_owned()
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _slot_windows(capsule: Any, slots: int) -> Any:
    """(start, the pages data slots start.. hold) a window at a time."""
    for start in range(0, slots, _WINDOW):
        part = array.array("q")
        part.frombytes(_c._delta_slots(capsule, start, min(_WINDOW, slots - start)))
        yield start, part


def _compact(capsule: Any, fd: int, data_offset: int, page_size: int,
             slots: int) -> tuple[int, int]:  # fmt: skip
    """Move the pages of live slots over the dead ones (a restart left
    them), then write the index (the page of each, in file order) after
    them; returns (pages stored, position of page 1 or -1).  Two passes
    over the recording's slot table, a window at a time: the index is
    written once no page remains to move below where it goes."""
    out = 0
    for start, part in _slot_windows(capsule, slots):
        if out == start and 0 not in part:  # nothing dead so far: none moves
            out += len(part)
            continue
        for k, pgno in enumerate(part):
            if not pgno:
                continue
            position = start + k
            if position != out:
                data = _read_exact(fd, page_size, data_offset + position * page_size)
                _write_all(fd, data, data_offset + out * page_size)
            out += 1
    stored, written, page1 = out, 0, -1
    index_off = data_offset + stored * page_size
    for _, part in _slot_windows(capsule, slots):
        live = array.array("Q", part if 0 not in part else (p for p in part if p))
        if 1 in live:
            page1 = written + live.index(1)
        _write_all(fd, _index_to_bytes(live), index_off + 8 * written)
        written += len(live)
    return stored, page1


def _write_manifest(capsule: Any, fd: int, manifest_off: int, count: int) -> None:
    """The recording's manifest into the file, a window at a time."""
    for first in range(1, count + 1, _WINDOW):
        n = min(_WINDOW, count - first + 1)
        _write_all(
            fd, _c._delta_manifest(capsule, first, n), manifest_off + HASH * (first - 1)
        )


def _read_back(point_fd: int, geometry: _Point, path: str,
               opts: _RunOptions | None = None) -> None:  # fmt: skip
    """Re-read the stored pages from the disk and check them against the
    manifest (the default verification of a restore point): fsynced, the
    pages dropped from the cache, then read a run at a time, the index and
    manifest where they lie in the file."""
    os.fsync(point_fd)
    P, stored = geometry.info.page_size, geometry.info.stored_pages
    if hasattr(os, "posix_fadvise") and stored:
        os.posix_fadvise(
            point_fd, geometry.data_offset, stored * P, os.POSIX_FADV_DONTNEED
        )
    per_run = max(1, _READ_RUN // P)
    for start in range(0, stored, per_run):
        if opts is not None:
            opts.check("reading the restore point back")
        bad = _c._check_stored(
            point_fd, geometry.index_off, geometry.data_offset, P,
            geometry.manifest_off, geometry.info.page_count, start,
            min(per_run, stored - start),
        )  # fmt: skip
        if bad >= 0:
            pgno = geometry.positions(point_fd, bad, 1)[0]
            raise IncrementalError(
                f"the restore point {path!r} did not read back as written "
                f"(page {pgno}): the disk or the file system lost data; it "
                "was not kept"
            )


@dataclasses.dataclass
class _RunOptions:
    pages: int
    timeout: float | None
    progress: Any
    started: float = dataclasses.field(default_factory=time.monotonic)
    # the run's new point read back from the disk (incremental(verify=))
    read_back: bool = True

    def left(self) -> float | None:
        """Seconds left before the run's deadline (None: no timeout)."""
        if self.timeout is None:
            return None
        return max(0.0, self.started + self.timeout - time.monotonic())

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0

    def check(self, doing: str = "writing the restore point") -> None:
        """IncrementalError once the deadline has passed: the timeout bounds
        the whole run, not only the copy of the pages."""
        if self.expired():
            raise DeadlineError(self, doing)


class DeadlineError(IncrementalError):
    """The run's timeout passed before the restore point was complete.

    Facts (files.with_facts): gave_up (a files.GaveUp: the run's elapsed
    seconds and timeout; the lock waits, restarts and pages of copy()'s
    give-up when it was copy() that gave up)."""

    def __init__(
        self, opts: _RunOptions, doing: str, cause: BaseException | None = None
    ) -> None:
        assert opts.timeout is not None
        copied = getattr(cause, "gave_up", None)
        gave_up = files.GaveUp(
            elapsed=time.monotonic() - opts.started,
            timeout=opts.timeout,
            pages_copied=copied.pages_copied if copied else None,
            page_count=copied.page_count if copied else None,
            waits=copied.waits if copied else 0,
            restarts=copied.restarts if copied else 0,
        )
        files.with_facts(self, gave_up=gave_up)
        why = f" ({str(cause).rstrip('.')})" if cause is not None else ""
        super().__init__(
            f"the incremental backup gave up after {gave_up.elapsed:.2f} s "
            f"while {doing}: its timeout ({gave_up.timeout:g} s) passed, and "
            f"nothing was kept{why}. To finish it: retry with a longer "
            "timeout, or None"
        )


def _named(exc: OSError, path: str) -> OSError:
    """exc with path as its file name if it has none (the shims' errors)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, path)


class _Recording:
    """One run of the backup API into the delta shim."""

    def __init__(
        self,
        folder: str,
        fd: int,
        data_offset: int,
        page_size: int,
        parent: tuple[int, int, int] | None,
    ) -> None:
        """parent: (fd, manifest offset, pages) of the parent's file, or
        None for a base.  The recording's page and slot tables live in two
        scratch files in folder (_scratch()); close() lets go of them."""
        delta_vfs, _ = _c._incremental_vfs_names()
        self.path = os.path.join(
            folder, f".apsw-backup-{os.getpid()}-{os.urandom(4).hex()}.virtual"
        )
        self.capsule: Any = None
        self.tables = [_scratch(folder)]
        try:
            self.tables.append(_scratch(folder))
            self.capsule = _c._delta_open(
                self.path, fd, data_offset, page_size, parent,
                self.tables[0].fileno(), self.tables[1].fileno(),
            )  # fmt: skip
        except OSError as exc:  # its path could not be resolved: name it
            self.close()
            raise _named(exc, folder) from None
        except BaseException:
            self.close()
            raise
        self.vfs = delta_vfs
        self.page_size = page_size

    def close(self) -> None:
        capsule, self.capsule = self.capsule, None
        if capsule is not None:
            _c._delta_close(capsule)
        tables, self.tables = self.tables, []
        for table in tables:
            table.close()

    def run(
        self, source: _c.Connection, opts: _RunOptions, direct: bool = False
    ) -> dict[str, Any]:
        if direct:
            outcome = self._read_directly(source, opts)
            if outcome is not None:
                return outcome
        dest = _c.Connection(self.path, vfs=self.vfs)
        try:
            # No journal file beside a file that does not exist; a small
            # cache bounds the memory (spilled pages come to the shim).
            dest.execute("PRAGMA journal_mode=MEMORY").fetchall()
            dest.execute(f"PRAGMA cache_size={DEST_CACHE_PAGES}").fetchall()
            done = copy(
                source,
                dest,
                # with a timeout: steps, so that the deadline is seen
                # while the pages are read, not only once all are
                pages=opts.pages
                if opts.timeout is None or opts.pages > 0
                else TIMED_STEP_PAGES,
                timeout=opts.left(),  # copy()'s deadline: the run's
                progress=opts.progress,
            )
        except DeadlineError:
            raise
        except _c.Error as exc:
            if opts.expired():  # copy()'s deadline: the run's
                raise DeadlineError(opts, "copying the pages", exc) from exc
            # the shim's own failure (writing the restore point) is the
            # cause to report, not SQLite's generic "disk I/O error"
            why = _c._delta_result(self.capsule)
            if why["failed"]:
                raise _shim_failure(why) from exc
            raise
        finally:
            dest.close()
        outcome = dict(_c._delta_result(self.capsule))
        outcome["restarts"] = done.restarts
        return outcome

    def _read_directly(
        self, source: _c.Connection, opts: _RunOptions
    ) -> dict[str, Any] | None:
        """The fast path (docs/incremental.md): the source's pages read in
        runs through SQLite's own file handle, inside one read transaction,
        and recorded as the backup API would have written them -- none of
        the backup's page-by-page work.  Only for a database in rollback-
        journal mode (its file is the whole database while the read lock is
        held; in WAL mode newer pages may be in the -wal).  None when it
        does not apply or the read lock is not had at once: the backup API
        then does the copy, with its retries, the same way as always."""
        try:
            source.execute("BEGIN").fetchall()
        except _c.ForkingViolationError:
            raise
        except _c.Error:
            return None
        try:
            count = self._read_in_transaction(source, opts)
        except BaseException:
            if not source.get_autocommit():
                try:
                    source.execute("ROLLBACK").fetchall()
                except _c.Error:
                    pass  # the first failure is the one to report
            raise
        if not source.get_autocommit():  # SQLite may have ended it (no memory)
            source.execute("COMMIT").fetchall()
        if count is None:
            return None
        if opts.progress is not None:  # copy()'s one call of a whole-copy step
            opts.progress(_c.SQLITE_DONE, 0, count)
        outcome = dict(_c._delta_result(self.capsule))
        outcome["restarts"] = 0
        return outcome

    def _read_in_transaction(
        self, source: _c.Connection, opts: _RunOptions
    ) -> int | None:
        """_read_directly's reads, in its transaction: the page count, or
        None when the backup API is to do the copy."""
        try:
            source.execute("SELECT 1 FROM main.sqlite_master LIMIT 1").fetchall()
            header = source.file_header()
            count = int(source.execute("PRAGMA main.page_count").fetchall()[0][0] or 0)
            size = _page_size_of(source)
        except _c.ForkingViolationError:
            raise
        except _c.Error:
            return None  # busy, a hot journal...: the backup API's way
        if files.header_is_wal(header) or not count or size != self.page_size:
            return None
        per_run = max(1, _READ_RUN // size)
        for first in range(1, count + 1, per_run):
            opts.check("copying the pages")
            try:
                _c._delta_read_source(
                    self.capsule, source, first, min(per_run, count - first + 1), count
                )
            except _c.Error as exc:
                why = _c._delta_result(self.capsule)
                if why["failed"]:
                    raise _shim_failure(why) from exc
                raise
        return int(count)


def _shim_failure(why: dict[str, Any]) -> Exception:
    """The delta shim's own failure, which is the cause to report rather
    than SQLite's generic "disk I/O error": an OSError with the OS's cause
    when writing the point's file failed (a full disk is said as one, and
    _write_point names the point's file), IncrementalError otherwise."""
    if why.get("errno"):
        return OSError(why["errno"], os.strerror(why["errno"]))
    return IncrementalError(
        f"the incremental backup failed: {why['message']}; nothing was kept"
    )


def _write_point(source: _c.Connection, source_name: str, folder: str, stem: str,
                 parent: _Point | None, sequence: int, page_size: int,
                 opts: _RunOptions, direct: bool = False,
                 before_publish: Callable[[_Point, str], None] | None = None,
                 ) -> tuple[_Point, int, int, int, dict[str, int]]:  # fmt: skip
    """Back source up as a point whose parent is `parent` (None: a base);
    returns the point, bytes written, pages written and restarts.  direct:
    source is our own connection, read in one transaction (the fast path
    of _Recording).  before_publish(point, temporary path) runs last before
    the point is put in place (the check of the chain it extends,
    quick_check): if it raises, nothing is kept."""
    created = _after_every_point(folder, stem, datetime.now(timezone.utc))
    kind = "delta" if parent is not None else "base"
    final = _final_name(folder, stem, kind, created)
    while any(os.path.lexists(_final_name(folder, stem, k, created)) for k in KINDS):
        created += timedelta(microseconds=1)
        final = _final_name(folder, stem, kind, created)
    # a delta's name is the longer: checked on every run, a first base is
    # not made when the deltas to follow could never be named
    _check_name_length(_final_name(folder, stem, "delta", created), stem)
    data_offset = _data_offset(source_name)
    new = files.NewFile(final)
    try:
        new.create()
    except OSError as exc:  # the folder's problem, never the temporary name's
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, folder) from exc
    parent_fd = -1
    rec: _Recording | None = None
    try:
        if parent is not None:
            parent_fd = parent.open()
        rec = _Recording(
            folder,
            new.fd,
            data_offset,
            page_size,
            (parent_fd, parent.manifest_off, parent.info.page_count)
            if parent
            else None,
        )
        outcome = rec.run(source, opts, direct)
        if outcome["failed"] and outcome.get("errno"):
            raise _shim_failure(outcome)
        problem = _recording_problem(outcome, page_size)
        if problem:
            raise IncrementalError(problem)
        stored, page1 = _compact(
            rec.capsule, new.fd, data_offset, page_size, outcome["slots"]
        )
        count = int(outcome["page_count"])
        manifest_off = data_offset + stored * (page_size + 8)
        _write_manifest(rec.capsule, new.fd, manifest_off, count)
        rec.close()  # its tables: all is in the file now
        if page1 >= 0:
            head = _read_exact(new.fd, 100, data_offset + page1 * page_size)
            wal = head[18:20] == b"\x02\x02"
        else:
            wal = parent is not None and parent.info.wal
        header = _header(kind, page_size, data_offset, count, stored,
                         created, sequence, wal, source_name)  # fmt: skip
        parent_root = parent.root if parent else ZERO_HASH
        root, size = _finish_file(new.fd, header, stored, count, parent_root, page_size)
        opts.check("writing the restore point")
        point = _read_written(new.path, final)
        if opts.read_back:
            _read_back(new.fd, point, final, opts)
            opts.check("reading the restore point back")
        written = stored
        if before_publish is not None:
            before_publish(point, new.path)
        new.publish()
    except OSError as exc:  # a full disk...: name the point being written
        new.discard()
        raise _as_written(exc, new.path, final) from exc
    except BaseException:
        new.discard()
        raise
    finally:
        if rec is not None:
            rec.close()
        if parent_fd >= 0:
            os.close(parent_fd)
    counts = {k: int(outcome[k]) for k in ("writes", "unchanged", "unkept_reads")}
    return point, size, written, int(outcome["restarts"]), counts


def _restore_step(page_count: int, progress: object) -> int:
    """Pages a step of copy() into an existing dest: one whole-copy step
    without progress; with it, RESTORE_STEPS steps, so that its calls come
    while the copy can still be rolled back."""
    if progress is None or page_count <= 1:
        return -1
    return max(1, -(-page_count // RESTORE_STEPS))


def _twin_base(delta_path: str) -> str:
    """The name of the base a merge makes of a delta (the same moment)."""
    return delta_path[: -len(".delta" + SUFFIX)] + ".base" + SUFFIX


def _after_every_point(folder: str, stem: str, now: datetime) -> datetime:
    """now, or just after the newest point of stem in folder if that one
    is not older: name order is chain order, so a new point is never named
    before one already there -- whatever the clock did (stepped back by
    NTP, a VM resumed, a clock that ran ahead for one run).  Its name and
    header then say that moment, not the clock's."""
    newest = None
    newest_path = ""
    for path in _stems(folder).get(stem, []):
        name = _parse_name(path)
        if name is not None:
            stamp = datetime.strptime(name["stamp"], STAMP).replace(tzinfo=timezone.utc)
            if newest is None or stamp > newest:
                newest, newest_path = stamp, path
    if newest is not None and now <= newest:
        try:
            return newest + timedelta(microseconds=1)
        except OverflowError:  # 9999-12-31T23:59:59.999999Z: nothing after it
            raise IncrementalError(
                f"{newest_path!r} is named at the last moment a name can say "
                "(year 9999): no restore point can be named after it, and "
                "names keep chain order. Move that file out of the folder, "
                "then run again; nothing was kept"
            ) from None
    return now


def _check_name_length(final: str, stem: str) -> None:
    """Refuse a restore point name longer than the folder's file system
    allows (its file name is SOURCE's stem plus a 36-byte time and kind)."""
    folder, name = os.path.split(final)
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(name))
    if size > limit:
        raise ValueError(
            f"the restore points' file names would be {size} bytes long, more "
            f"than the {limit} bytes a file name may have in {folder!r} "
            f"(ENAMETOOLONG): it is SOURCE's name without its suffix ({stem!r}) "
            "plus its time and kind. Back up a copy or a link of SOURCE with a "
            "shorter name"
        )


def _recording_problem(outcome: dict[str, Any], page_size: int) -> str:
    if outcome["failed"]:
        return f"the incremental backup failed: {outcome['message']}"
    if outcome["page_size"] != page_size or outcome["page_count"] == 0:
        return "the incremental backup wrote no database"
    if outcome["poisoned"]:
        return (
            f"SQLite read back page {outcome['first_poisoned']} of the copy, which "
            "was equal to its parent's and so not kept, and did not write it "
            "again: the restore point would be wrong, so it was not kept "
            "(please report this)"
        )
    if outcome["missing"]:
        return (
            f"the backup never wrote page {outcome['first_missing']} of "
            f"{outcome['page_count']}: the restore point was not kept"
        )
    return ""


def _materialize(chain: list[_Point], folder: str, stem: str) -> _Point:
    """A base holding the state of chain[-1] (same time, sequence and root),
    written from the chain's files; chain[-1] itself is left for the caller
    to remove."""
    tip = chain[-1]
    final = _final_name(folder, stem, "base", tip.info.created)
    data_offset = _data_offset(tip.info.source)
    new = files.NewFile(final)
    pages = _ChainFiles(chain, folder)
    try:
        new.create()
        P, count = pages.page_size, pages.page_count
        lock = _lock_byte_page(P)
        # every page but the lock-byte page (the chain holds all others:
        # _ChainFiles refuses a chain missing one), in page order
        stored = count - (1 if lock <= count else 0)
        out = data_offset
        for pgno, n, data in pages.checked_runs():
            if pgno <= lock < pgno + n:  # the lock-byte page is not stored
                k = lock - pgno
                data = data[: k * P] + data[(k + 1) * P :]
            _write_all(new.fd, data, out)
            out += len(data)
        index_off = data_offset + stored * P
        for start in range(0, stored, _WINDOW):
            # positions start.. hold pages start+1.., one more past the
            # lock-byte page
            end = start + min(_WINDOW, stored - start)
            part = array.array("Q", range(start + 1, min(end, lock - 1) + 1))
            part.extend(range(max(start, lock - 1) + 2, end + 2))
            _write_all(new.fd, _index_to_bytes(part), index_off + 8 * start)
        manifest_off = index_off + 8 * stored
        for first in range(1, count + 1, _WINDOW):
            n = min(_WINDOW, count - first + 1)
            _write_all(
                new.fd,
                tip.hashes(pages.tip_fd, first, n),
                manifest_off + HASH * (first - 1),
            )
        header = _header("base", P, data_offset, count, stored,
                         tip.info.created, tip.info.sequence, tip.info.wal, tip.info.source)  # fmt: skip
        root, _ = _finish_file(new.fd, header, stored, count, ZERO_HASH, P)
        if root != tip.root:  # the manifest copied is the one that was checked
            raise _damaged(tip.info.path, "changed since it was first read")
        point = _read_written(new.path, final)
        _read_back(new.fd, point, final)
        new.publish()
    except FileExistsError as exc:  # a file of another's at the base's name
        new.discard()
        raise IncrementalError(
            f"the base that would stand for {tip.info.path!r} cannot be put in "
            f"place: {final!r} already exists and is not that base (a file "
            "made by hand or another program); nothing was overwritten or "
            "deleted -- move that file away, then run again"
        ) from exc
    except OSError as exc:  # a full disk...: name the point being written
        new.discard()
        raise _as_written(exc, new.path, final) from exc
    except BaseException:
        new.discard()
        raise
    finally:
        pages.close()
    return point


def _as_written(exc: OSError, temporary: str, final: str) -> OSError:
    """exc naming final, the file being written, where it names none or
    only final's temporary name (files.NewFile), which nobody gave."""
    if exc.errno is None or exc.filename not in (None, temporary):
        return exc
    return OSError(exc.errno, exc.strerror, final)


def _read_written(path: str, final: str) -> _Point:
    """The point just written to path, read and checked as any point is,
    described under its final name: before it is renamed into place, so
    that once it is there nothing can fail but the folder's fsync.  The
    file cannot be opened (EACCES, EISDIR): the OS's error naming final --
    a failure of this run, not a damaged chain."""
    try:
        point = _read_point(path)
    except BrokenChainError as exc:
        cause = getattr(exc, "os_error", None)
        if cause is None:
            raise
        raise _as_written(cause, path, final) from None
    point.info = dataclasses.replace(point.info, path=final)
    return point


def _remove(path: str) -> None:
    files.check_owned()
    os.remove(path)
    files.fsync_folder(os.path.dirname(path))


# -- incremental() ---------------------------------------------------------


@files.owned
def _check_shared_arguments(timeout: Any, progress: Any) -> None:
    """copy()'s rules for the arguments incremental() and restore() share
    with it, applied before anything is made (a timeout of -1 is not a
    deadline that passed)."""
    if timeout is not None and (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not timeout >= 0
    ):
        raise ValueError(f"timeout must be None or a number >= 0, not {timeout!r}")
    if progress is not None and not callable(progress):
        raise TypeError("progress must be callable or None")


def incremental(
    source: str | os.PathLike[str] | _c.Connection,
    folder: str | os.PathLike[str],
    *,
    max_chain: int = MAX_CHAIN,
    rebase_share: float = REBASE_SHARE,
    keep: int | None = None,
    timeout: float | None = None,
    progress: Callable[[int, int, int], Any] | None = None,
    pages: int = -1,
    quick_check: bool = False,
    verify: bool = True,
) -> IncrementalResult:
    """Back source up into folder as one new restore point.

    A base (every page) when the folder has no usable chain for this source
    (none yet, its newest point damaged, another page size), or when the
    chain already has max_chain deltas; otherwise a delta holding only the
    pages whose hash differs from the newest point's manifest.  A delta
    holding more than half the database's pages (a VACUUM), or one after
    which the chain's deltas together exceed rebase_share of the base's
    size, is turned into a base at once (from the chain's files, not from
    the source).
    keep: the number of restore points of this source to keep; older ones
    are deleted whole chains first, and the oldest delta of the current
    chain is merged into a new base rather than leaving a chain without its
    base.  Each file is written under a temporary name, fsynced, read back
    and checked, renamed into place, and the folder fsynced.
    pages, timeout and progress are copy()'s (pages per step: -1 reads the
    source in one step, under one read transaction).
    Every point is verified by its hashes: its pages read back from the
    disk, the chain it extends checked page by page.  quick_check: also run
    PRAGMA quick_check on the database state the point stands for (through
    the overlay) before it is put in place -- a structural check of the
    source as it was read, at the cost of a full backup's quick_check
    (docs/incremental.md, "Verification").
    verify=False: the new point's pages are not read back from the disk (as
    copy() without verify does not re-read its copy); the chain it extends
    is still checked, since that decides whether a delta can be made.
    """
    for name, flag in (("verify", verify), ("quick_check", quick_check)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, not {flag!r}")
    for name, count in (("max_chain", max_chain), ("keep", keep)):
        if isinstance(count, bool) or not isinstance(count, (int, type(None))):
            raise TypeError(
                f"{name} must be an int, not {type(count).__name__}"
                + (" (keep=None keeps every point)" if name == "keep" else "")
            )
    if isinstance(rebase_share, bool) or not isinstance(rebase_share, (int, float)):
        raise TypeError(
            "rebase_share must be a number (the share of the base's size the "
            f"deltas may reach), not {type(rebase_share).__name__}"
        )
    if quick_check and not verify:
        raise ValueError(
            "quick_check=True is a verification, and verify=False asks for "
            "none: give one of them"
        )
    if not isinstance(max_chain, int) or max_chain < 0:
        raise ValueError(f"max_chain must be an int >= 0, not {max_chain!r}")
    if not 0 < rebase_share or rebase_share != rebase_share:
        raise ValueError(f"rebase_share must be > 0, not {rebase_share!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, not {keep!r}")
    _check_shared_arguments(timeout, progress)
    if not isinstance(pages, int) or isinstance(pages, bool):
        raise TypeError(
            f"pages must be an int (pages per step; <= 0: all at once), not "
            f"{type(pages).__name__}"
        )
    started = time.monotonic()
    opts = _RunOptions(pages, timeout, progress, started, verify)
    folder = os.fsdecode(os.fspath(folder))  # bytes as the OS gives names too
    if not folder:
        raise ValueError(
            "the folder is an empty name: name the folder for the restore "
            "points ('.' for the current one)"
        )
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise NotADirectoryError(
                f"the folder {folder!r} is a file, not a folder (ENOTDIR): "
                "check the path, or name a folder for the restore points"
            )
        raise FileNotFoundError(
            f"the folder {folder!r} does not exist: create it first"
        )
    lock = _lock_folder(folder)
    try:
        files.remove_stale(folder)
        own = not isinstance(source, _c.Connection)
        if own:
            # bytes as the OS gives names too (os.fsdecode: round-trips)
            source_name = os.path.abspath(os.fsdecode(os.fspath(source)))  # type: ignore[arg-type]
            _check_source_path(source_name)
            # SQLite resolves symbolic links: its side files are beside the
            # real file (copy()'s rule, from the name SQLite reports).
            real = os.path.realpath(source_name)
            _check_wal_readable(real)
            conn = _c.Connection(source_name, _c.SQLITE_OPEN_READONLY)
            real = conn.filename or real
            # the source is its real file (_point_source): the same chain
            # whichever symbolic link names it; the points' names keep the
            # name given (a link of another name: another stem)
            stem = Path(source_name).stem
            source_name = real
            side_existed = any(map(os.path.lexists, files.side_paths(real)))
        else:
            conn = source  # type: ignore[assignment]
            if isinstance(conn, RestorePointConnection):
                raise ValueError(
                    "a restore point opened with open_restore_point() cannot be "
                    "the SOURCE of incremental(): it is not a database file "
                    "(its points would record a name that never exists). "
                    "restore() it into a file and back that up, or copy() it"
                )
            source_name = conn.filename
            stem = Path(source_name).stem
            if not source_name:
                raise ValueError(
                    "an in-memory database has no file to back up incrementally"
                )
        try:
            chain, reason, finished = _usable_chain(folder, stem, source_name, opts)
            damaged: BrokenChainError | None = None  # found by the chain check
            page_size = _page_size_of(conn)
            if chain and chain[-1].info.page_size != page_size:
                chain, reason = [], f"the page size changed to {page_size}"
            if chain and len(chain) - 1 >= max_chain:
                chain, reason = [], f"the chain reached max_chain ({max_chain} deltas)"
            parent = chain[-1] if chain else None
            sequence = (
                parent.info.sequence + 1
                if parent
                else _next_sequence(folder, stem, source_name)
            )
            direct = own and opts.pages < 0
            # The chain the delta extends is checked while the source is read
            # (a thread of its own: its reads and hashes release the GIL);
            # the delta is put in place only once the chain is found sound.
            checker = _ChainCheck(chain, opts) if parent is not None else None
            before = _before_publish(chain, checker, quick_check, opts)
            try:
                point, written, pages, restarts, counts = _write_point(
                    conn, source_name, folder, stem, parent, sequence, page_size,
                    opts, direct, before,
                )  # fmt: skip
            except _DamagedChain as exc:
                damaged = exc.cause
                chain, parent = [], None
                reason = f"the newest chain is damaged, a new base instead: {exc.cause}"
                sequence = _next_sequence(folder, stem, source_name)
                point, written, pages, restarts, counts = _write_point(
                    conn, source_name, folder, stem, None, sequence, page_size,
                    opts, direct, _before_publish([], None, quick_check, opts),
                )  # fmt: skip
            except IncrementalError:
                new_size = _page_size_of(conn)
                if new_size == page_size:
                    raise
                chain, parent, reason = [], None, f"the page size changed to {new_size}"
                point, written, pages, restarts, counts = _write_point(
                    conn, source_name, folder, stem, None, sequence, new_size,
                    opts, False, _before_publish([], None, quick_check, opts),
                )  # fmt: skip
            finally:
                if checker is not None:
                    checker.abandon()
        finally:
            if own:
                conn.close()
                if not side_existed:
                    _leave_no_side_files(real)
        result = IncrementalResult(
            path=point.info.path,
            kind=point.info.kind,
            page_count=point.info.page_count,
            pages_written=pages,
            bytes_written=written,
            elapsed=0.0,
            chain_length=len(chain) + 1,
            root=point.root.hex(),
            reason=reason if parent is None else "",
            restarts=restarts,
            recording=counts,
            verified=verify,
            # an interrupted merge's deltas, removed: their base stands for them
            merged=finished,
        )
        # The point is in place: a failure from here on (the rebase, --keep)
        # leaves it there, complete, and says so (exc.kept_point).
        kept = point.info.path
        try:
            if parent is not None:
                chain = chain + [point]
                why = _rebase_reason(chain, max_chain, rebase_share)
                if why:
                    base = _materialize(chain, folder, stem)
                    kept = base.info.path  # it stands for the point from now
                    _remove(point.info.path)
                    result.path, result.kind, result.reason = (
                        base.info.path,
                        "base",
                        why,
                    )
                    # what the run wrote: its delta, and this base
                    result.bytes_written += base.info.size
                    result.pages_written += base.info.stored_pages
                    result.chain_length = 1
            if keep is not None:
                deleted, merged, bases = _rotate(
                    folder, stem, source_name, keep, damaged
                )
                result.deleted += deleted
                result.merged += merged
                for base in bases:  # each merge wrote a whole base
                    result.bytes_written += base.info.size
                    result.pages_written += base.info.stored_pages
                if result.path in result.merged:
                    # merged into a base of the same moment, which stands
                    # for it from now on: the result names that file
                    result.path = _twin_base(result.path)
                    result.kind = "base"
                    kept = result.path
                if result.merged:
                    # a point it cannot read now (EACCES) is the OSError it
                    # met (exit 1, kept_point), not a broken chain
                    result.chain_length = len(_chain_for_reading(result.path))
        except BaseException as exc:
            exc.kept_point = kept  # type: ignore[attr-defined]
            raise
        result.elapsed = time.monotonic() - started
        return result
    finally:
        lock.release()


def _before_publish(
    chain: list[_Point],
    checker: _ChainCheck | None,
    quick_check: bool,
    opts: _RunOptions,
) -> Callable[[_Point, str], None]:
    """What must hold before a new point on chain is put in place: the
    chain found sound (checker), and with quick_check the state the new
    point stands for passing PRAGMA quick_check, read through the overlay
    (the chain's files and the new one under its temporary name)."""

    def check(point: _Point, temporary: str) -> None:
        if checker is not None:
            try:
                checker.result()
            except BrokenChainError as exc:
                raise _DamagedChain(exc) from None
        if not quick_check:
            return
        opts.check("running quick_check on the restore point")
        here = dataclasses.replace(
            point, info=dataclasses.replace(point.info, path=temporary)
        )
        overlay = _Overlay(
            [here] if point.info.kind == "base" else [*chain, here],
            os.path.dirname(temporary),
        )
        with overlay as conn:
            try:
                rows = [
                    r[0] for r in conn.execute("PRAGMA main.quick_check").fetchall()
                ]
            except _c.Error as exc:
                if exc.result not in (_c.SQLITE_CORRUPT, _c.SQLITE_NOTADB):
                    raise
                rows = [str(exc)]  # too damaged for quick_check to go on
        _quick_check_result(rows, point.info.path, "the restore point")

    return check


class _DamagedChain(Exception):
    """The chain a delta was to extend is damaged: a base instead."""

    def __init__(self, cause: BrokenChainError) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _ChainCheck:
    """_check_chain() of a chain in a thread of its own (its reads and
    hashes release the GIL): the chain a new delta extends while the source
    is read, the chain a restore reads while DEST is written.  Its memory
    is a few windows, whatever the chain's size ("Memory" in
    docs/incremental.md)."""

    def __init__(self, chain: list[_Point], opts: _RunOptions | None) -> None:
        self.error: BaseException | None = None
        self.stop = False
        self.thread = threading.Thread(
            target=self._run, args=(chain, opts), name="apsw-backup chain check"
        )
        self.thread.start()

    def _run(self, chain: list[_Point], opts: _RunOptions | None) -> None:
        try:
            _check_chain(chain, opts, stop=lambda: self.stop)
        except BaseException as exc:  # raised by the caller's thread
            self.error = exc

    def result(self) -> None:
        """Wait for the check; raise its failure: BrokenChainError naming the
        damaged file, or the check's own (its deadline passed, an OSError)."""
        self.thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """The check's failure if it has already failed (while it runs)."""
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        self.stop = True
        self.thread.join()


def _check_source_path(path: str) -> None:
    """copy()'s rules for a source path (a folder, a FIFO, an unreadable
    file: CantOpenError naming it, the cause and the cure), and a file that
    is not an SQLite database refused by its header (read through SQLite's
    own handle), before anything is made from it."""
    _check_source_file(path)  # a missing one too: copy()'s CantOpenError, facts
    try:
        header = files.read_header(path, 16)
    except OSError:
        return  # opening it names what is wrong
    if header and header != b"SQLite format 3\x00":
        error = _c.NotADBError(
            f"the source {path!r} is not an SQLite database (it does not begin "
            "with the SQLite header): name the database file to back up; "
            "nothing was kept"
        )
        error.result = error.extendedresult = _c.SQLITE_NOTADB
        error.__cause__ = _c.NotADBError("file is not a database")
        raise files.with_facts(error, role="source", path=path)


def _check_wal_readable(path: str) -> None:
    """A WAL database without its -shm is read by creating the -shm beside
    it: in a folder that cannot be written to (a read-only file system, or
    no write permission) SQLite could only say "unable to open database
    file"; say why, and what to do, before trying."""
    if not files.header_is_wal(_header_of(path)):
        return
    if os.path.lexists(path + "-shm"):
        return
    folder = os.path.dirname(path)
    read_only = False
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        pass
    if read_only or not os.access(folder, os.W_OK):
        cause = (
            "its file system is read-only (EROFS)"
            if read_only
            else "this user may not write to it (EACCES)"
        )
        raise IncrementalError(
            f"the source database {path!r} is in WAL mode, and reading it "
            f"needs its -shm file created in {folder!r}, but {cause}: mount "
            "it read-write, run as a user who may write there, or back up a "
            "copy of the database",
        )


def _leave_no_side_files(path: str) -> None:
    """copy()'s rule (copy.py, _leave_no_side_files): a read-only connection
    cannot checkpoint, so closing it on a WAL database leaves -wal and -shm
    beside it.  They were not there before the run: a read-write connection
    opened and closed now removes them -- only if it is the last one, as
    SQLite decides under its own locks."""
    if not files.header_is_wal(_header_of(path)):
        return
    if not any(os.path.lexists(p) for p in files.side_paths(path)):
        return
    files.close_as_last_connection(path)


def _page_size_of(conn: _c.Connection) -> int:
    value = conn.execute("PRAGMA main.page_size").fetchall()[0][0]
    if not isinstance(value, int):
        raise TypeError(f"PRAGMA page_size answered {value!r}")
    return value


def _lock_folder(folder: str) -> files.FolderLock:
    """The folder's lock (files.FolderLock), exclusive, for the whole run:
    two runs at once would both write a child of the same point (a fork in
    the chain that the next run would take for damage); a plain backup's
    rotation in the same folder takes turns with it too."""
    lock = files.FolderLock(folder)
    if not lock.acquire(True, 0.0):
        raise FolderBusyError(
            f"another backup is writing into {folder!r} (it holds the "
            "folder's lock): try again once it has finished"
        )
    return lock


def _rebase_reason(chain: list[_Point], max_chain: int, share: float) -> str:
    tip = chain[-1]
    if tip.info.stored_pages > VACUUM_SHARE * tip.info.page_count:
        return (
            f"{tip.info.stored_pages} of {tip.info.page_count} pages changed "
            f"(a VACUUM?): more than {VACUUM_SHARE:.0%} of the database"
        )
    base = chain[0]
    deltas = sum(p.info.size for p in chain[1:])
    if deltas > share * base.info.size:
        return f"the deltas since the base exceed rebase_share ({share}) of it"
    return ""


def _next_sequence(folder: str, stem: str, source: str) -> int:
    highest = -1
    for path in _of_source(_stems(folder).get(stem, []), source):
        try:
            highest = max(highest, _read_point(path).info.sequence)
        except BrokenChainError:
            continue
    return highest + 1


def _usable_chain(
    folder: str, stem: str, source_name: str, opts: _RunOptions | None = None
) -> tuple[list[_Point], str, list[str]]:
    """The chain a new delta would extend (or [] and why not), and the
    deltas of an interrupted merge this call removed (a base of the same
    moment stands for each: the run reports them merged)."""
    paths = _of_source(_stems(folder).get(stem, []), source_name)
    if not paths:
        return [], "no restore point of this source yet", []
    chains, problems, twins = _chains(paths)
    finished = []
    for twin in twins:
        # Its base is in place: finish the interrupted merge -- once that
        # base is found sound page by page.  A damaged one is no stand-in:
        # the delta stays (with its parents, the chain it is a link of).
        try:
            _verify_pages(_read_point(_twin_base(twin)), None)
        except BrokenChainError:
            continue
        _remove(twin)
        finished.append(twin)
    newest = [p for p in paths if p not in twins][-1]
    if not chains or chains[-1][-1].info.path != newest:
        return (
            [],
            f"the newest restore point is unusable ({problems[-1] if problems else newest})",
            finished,
        )
    chain = chains[-1]
    if os.path.abspath(chain[0].info.source) != os.path.abspath(source_name):
        return (
            [],
            f"the newest chain is of another source ({chain[0].info.source})",
            finished,
        )
    # Every page of the chain is checked against its manifest before a
    # delta is put in place on it (_ChainCheck, while the source is read): a
    # delta on a damaged parent could never be restored.
    return chain, "", finished


def _rotate(
    folder: str, stem: str, source: str, keep: int,
    damaged: BrokenChainError | None = None,
) -> tuple[list[str], list[str], list[_Point]]:  # fmt: skip
    """Delete the oldest points of stem so that `keep` remain, never
    breaking a chain: whole older chains first, then the current chain's
    base merged into its first delta.  Nothing while a chain is broken
    (IncrementalError): a file that cannot be read or a missing link, or --
    damaged -- a damaged page this run's check of the chain found.
    (deleted, merged, the bases its merges wrote: each counts in what the
    run wrote, the ones a later merge of the run took in turn too.)"""
    deleted: list[str] = []
    merged: list[str] = []
    written: list[_Point] = []  # the bases its merges wrote
    paths = _of_source(_stems(folder).get(stem, []), source)
    chains, problems, twins = _chains(paths)
    total = sum(len(c) for c in chains)
    # A chain broken at a file (unreadable, missing a link) may still need
    # the points before it -- an unreadable delta is its base's: rotation
    # then deletes nothing, and says why.  Counted as --keep counts: every
    # point of the source in the folder, the broken chain's too (a damaged
    # older chain is no reason to keep more than N points in silence).
    broken = [p for p in problems if not getattr(p, "stray", False)]
    if damaged is not None:  # a page of it found damaged by this run's check
        broken.insert(0, damaged)
    strays = sum(1 for p in problems if getattr(p, "stray", False))
    present = len(paths) - strays - len(twins)
    if broken and max(total, present) > keep:
        raise IncrementalError(
            f"--keep {keep} deleted nothing: the points of {stem!r} hold a "
            f"broken chain, and rotation never deletes what it may still need "
            f"({broken[0]}); repair or remove {broken[0].path!r}, then run again"
        )
    while total > keep and len(chains) > 1:
        oldest = chains.pop(0)
        if total - len(oldest) < keep:
            chains.insert(0, oldest)
            break
        for p in reversed(oldest):  # the base last: never a delta without it
            _remove(p.info.path)
            deleted.append(p.info.path)
        total -= len(oldest)
    while total > keep:
        chain = chains[0]
        if len(chain) < 2:
            _remove(chain[0].info.path)
            deleted.append(chain[0].info.path)
            chains.pop(0)
            total -= 1
            continue
        base = _materialize(chain[:2], folder, stem)
        written.append(base)
        _remove(chain[0].info.path)
        _remove(chain[1].info.path)
        deleted.append(chain[0].info.path)
        merged.append(chain[1].info.path)
        chains[0] = [base] + chain[2:]
        total -= 1
    return deleted, merged, written


# -- restore() and friends -------------------------------------------------


@files.owned
def restore(
    backup: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    at: datetime | str | None = None,
    overwrite: bool = False,
    keep_wal: bool = False,
    timeout: float | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> RestoreResult:
    """Rebuild the database of a restore point into dest.

    backup: a restore point file, or a folder (its newest point, or the
    newest at or before `at`), or a plain backup (an SQLite database file:
    it is copied with copy(), a new dest checked with quick_check).  Every file of the chain is checked (its
    checksum, root hash, and link to its parent) before anything is
    written; a missing, reordered, truncated or altered file raises
    BrokenChainError naming it.

    A new dest is written page by page from the chain under a temporary
    name, each page checked against the point's manifest, read back from
    the disk and checked again, checked with quick_check, put in rollback-
    journal mode (one file) unless keep_wal, fsynced and renamed into place:
    byte for byte the file a full backup of that moment would be.  An
    existing dest needs overwrite=True: it is written by an ordinary backup
    from the point (a read-only overlay of the chain), inside SQLite's own
    transaction, so its other connections see the old database, then the
    new one; writers_held in the result is how long that transaction held
    their lock (the whole copy), wal_growth how much its -wal grew.
    progress(pages_done, pages_total) is called as the work goes (some
    RESTORE_STEPS times into an existing dest); if it raises, nothing
    is put in place (an existing dest is rolled back) and the exception
    comes out -- except from the last call into an existing dest,
    (pages_total, pages_total), which comes once SQLite has committed the
    restore: too late to undo it, the exception comes out and dest holds
    the restored database.
    """
    _check_shared_arguments(timeout, progress)
    for name, flag in (("overwrite", overwrite), ("keep_wal", keep_wal)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, not {type(flag).__name__}")
    if at is not None and not isinstance(at, (datetime, str)):
        _parse_time(at)  # its TypeError, before anything
    backup = os.fsdecode(os.fspath(backup))  # bytes as the OS gives names too
    return _while_points_stay(
        _folder_of(backup),
        lambda: _restore(backup, dest, at, overwrite, keep_wal, timeout, progress),
    )


def _restore(
    backup: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    at: datetime | str | None,
    overwrite: bool,
    keep_wal: bool,
    timeout: float | None,
    progress: Callable[[int, int], Any] | None,
) -> RestoreResult:
    started = time.monotonic()
    point = _resolve(backup, at)
    given = os.fsdecode(os.fspath(dest))
    target = os.path.abspath(given)
    if given.endswith(("/", os.sep)) and not os.path.isdir(target):
        raise files.with_facts(
            IsADirectoryError(
                f"dest {given!r} ends with {os.sep!r}: it names a folder; give "
                "the path of a database file (nothing was written)"
            ),
            role="target",
            path=given,
            target_state="not created",
        )
    if os.path.isdir(target):
        raise files.with_facts(
            IsADirectoryError(
                f"dest {target!r} is a folder: give the path of a database file"
            ),
            role="target",
            path=target,
            target_state="unchanged",
        )
    _check_not_side_file(point, target)
    exists = os.path.lexists(target)
    if exists and not os.path.isfile(target):
        # said first: --overwrite would not help (a dangling link, a FIFO)
        _check_dest_is_a_database(target)
    if exists and not overwrite:
        raise files.with_facts(
            FileExistsError(
                f"dest {target!r} exists: pass overwrite=True to replace its "
                "content through SQLite's own transaction"
            ),
            role="target",
            path=target,
            target_state="unchanged",
        )
    if exists:
        _check_dest_is_a_database(target)
    else:  # the plain backup's rule
        files.check_no_stale_side_files(target)
    if _parse_name(point) is None and not point.endswith(SUFFIX):
        return _restore_plain(point, target, exists, keep_wal, timeout, progress)
    chain = _chain_for_reading(point)
    if exists:
        _check_chain(chain)
        return _restore_into_existing(chain, target, started, timeout, progress)
    _restore_new(chain, target, keep_wal, progress)  # checks the chain as it goes
    return RestoreResult(
        point=point,
        dest=target,
        pages=chain[-1].info.page_count,
        elapsed=time.monotonic() - started,
        overwrote=False,
        writers_held=0.0,
        wal_growth=0,
    )


def _check_dest_is_a_database(target: str) -> None:
    """--overwrite replaces a database's content: an existing DEST that is
    not an SQLite database (a text file, a typo) is refused, named."""
    if not os.path.isfile(target):
        what = (
            "is a symbolic link to nothing"
            if os.path.islink(target) and not os.path.exists(target)
            else "exists and is not a regular file"
        )
        raise files.with_facts(
            ValueError(f"dest {target!r} {what}: give the path of a database file"),
            role="target",
            path=target,
            target_state="unchanged",
        )
    header = files.read_header(target, 16)
    if header and header != b"SQLite format 3\0":
        raise files.with_facts(
            ValueError(
                f"dest {target!r} exists and is not an SQLite database (it does "
                "not start with the SQLite header): overwrite=True replaces a "
                "database's content. Check the name, or move the file away first"
            ),
            role="target",
            path=target,
            target_state="unchanged",
        )


def _check_not_side_file(point: str, target: str) -> None:
    """The plain backup's rules for DEST (files.py): not the backup's own
    file nor one of its side files, and not named as another database's
    side file (other.db-wal): opening that database would take the restored
    copy for part of it, or delete it."""
    files.check_distinct(point, target)
    try:
        files.check_not_named_as_side_file(target)  # the one rule (files.py)
    except ValueError as exc:
        owner, suffix = exc.path, exc.side  # type: ignore[attr-defined]
        raise files.with_facts(
            ValueError(
                f"dest {target!r} is the {suffix} file name of the database "
                f"{owner!r}: SQLite would take the restored copy for part "
                "of that database, or delete it. Choose another dest"
            ),
            role="target",
            path=owner,
            side=suffix,
            target_state="not created",
        ) from None


def _restore_plain(
    path: str,
    target: str,
    exists: bool,
    keep_wal: bool,
    timeout: float | None,
    progress: Callable[[int, int], Any] | None,
) -> RestoreResult:
    """BACKUP is a plain backup (an SQLite database file, as `apsw-backup
    SOURCE DEST` makes): copy() it, a new DEST checked with quick_check
    before it is renamed into place."""
    started = time.monotonic()
    if files.read_header(path, 16) != b"SQLite format 3\0":
        raise files.with_facts(
            ValueError(
                f"{path!r} is neither a restore point (*{SUFFIX}) nor an SQLite "
                "database: give a restore point, a folder of them, or a backup "
                "file"
            ),
            role="source",
            path=path,
            target_state="unchanged" if exists else "not created",
        )

    def check(copied: str) -> None:
        conn = _c.Connection(copied, _c.SQLITE_OPEN_READONLY)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
        _quick_check_result(rows, target)

    step = None
    if progress is not None:
        report = progress

        def step(status: int, remaining: int, total: int) -> None:
            report(total - remaining, total)

    wal = target + "-wal"
    before = os.stat(wal).st_size if exists and os.path.exists(wal) else 0
    result = copy(
        path,
        target,
        pages=_restore_step(
            int.from_bytes(files.read_header(path, 32)[28:32], "big"), progress
        ),
        timeout=timeout,
        keep_wal=keep_wal,
        progress=step,
        verify=None if exists else check,
    )
    after = os.stat(wal).st_size if exists and os.path.exists(wal) else 0
    return RestoreResult(
        point=path,
        dest=target,
        pages=result.pages,
        elapsed=time.monotonic() - started,
        overwrote=exists,
        writers_held=result.elapsed if exists else 0.0,
        wal_growth=max(0, after - before),
    )


def _restore_new(
    chain: list[_Point],
    target: str,
    keep_wal: bool,
    progress: Callable[[int, int], Any] | None,
) -> None:
    files.remove_stale(os.path.dirname(target))
    _check_journal_name(target)  # the plain restore's rule (copy())
    new = files.NewFile(target)
    try:
        new.create()
    except OSError as exc:  # copy()'s words: DEST, or DEST's folder
        if exc.errno == errno.ENAMETOOLONG:
            raise _cannot("target", target, exc) from exc
        raise _cannot("target's folder", os.path.dirname(target), exc) from exc
    pages: _ChainFiles | None = None
    chain_check: _ChainCheck | None = None
    checker: _RestoreChecker | None = None
    structure: _StructureCheck | None = None
    reporting = False  # the caller's progress() runs
    try:
        # inside: a failure opening the chain's files (EMFILE) discards the
        # temporary file too
        pages = _ChainFiles(chain, os.path.dirname(target))
        P = pages.page_size
        # Four things at once, one thread each.  This one writes the pages
        # in order, each page from the newest file holding it and checked
        # against the point's manifest.  _ChainCheck checks the whole chain
        # (every stored page of every file against its manifest, the pages
        # later points replaced too, and every unstored page's hash against
        # its parent's).  _RestoreChecker reads back from the disk, and
        # checks, each slice of DEST once it has been written out.
        # _StructureCheck runs quick_check of the point through the
        # overlay, which serves only pages matching the manifest: the same
        # bytes DEST is proven to hold ("Restoring" in docs/incremental.md).
        # Written out as it goes, as copy() does (files.Flusher): a restore
        # never queues more than a few MiB of dirty data in front of other
        # processes' fsyncs.
        flusher = files.Flusher(new.fd, FLUSH_EVERY)
        chain_check = _ChainCheck(chain, None)
        checker = _RestoreChecker(chain, new.fd, P, target)
        structure = _StructureCheck(chain, os.path.dirname(target), target)
        for pgno, n, data in pages.checked_runs():
            chain_check.raise_if_failed()
            checker.raise_if_failed()
            _write_all(new.fd, data, (pgno - 1) * P)
            flusher.flush_if_grown()
            checker.written_out(flusher.flushed)
            if progress is not None:
                reporting = True
                progress(pgno + n - 1, pages.page_count)
                reporting = False
        files.check_owned()
        os.ftruncate(new.fd, pages.page_count * P)
        os.fsync(new.fd)
        checker.written_out(pages.page_count * P)
        chain_check.result()  # a damaged file of the chain is said first
        checker.finish()
        if chain[-1].info.wal and not keep_wal:  # page 1 rewritten: in turn
            _say_rollback_journal(new.fd)
        structure.finish()
        _publish_restored(new, target)
    except BaseException as exc:
        if structure is not None:
            structure.abandon()
        if checker is not None:
            checker.abandon()
        if chain_check is not None:
            chain_check.abandon()
        new.discard()
        if pages is not None:
            pages.close()
        damage = None if reporting else _damage_behind(exc, chain)
        if damage is not None:
            raise damage from exc
        if isinstance(exc, OSError) and getattr(exc, "role", None) is None:
            raise _dest_error(exc, new.path, target) from exc
        raise
    finally:
        if pages is not None:
            pages.close()


def _damage_behind(exc: BaseException, chain: list[_Point]) -> BrokenChainError | None:
    """The damage of the chain behind a restore's failure exc, if any.  A
    damaged file surfaces in many forms -- SQLite's CorruptError from the
    overlay, the OS's EIO from a file cut short, quick_check's complaint --
    so a restore that fails for any reason but an interrupt, its deadline
    or timeout, the chain's own verdict, a failure that names DEST (its
    lock, its disk) or the caller's progress() checks the whole
    chain again from the start (as it stands now) and reports the file it
    finds damaged: BrokenChainError naming it, exit 3, rather than an
    error that names DEST or no file.  None: the chain is sound (the
    failure is what it says), or could not be checked either."""
    if (
        not isinstance(exc, Exception)
        or isinstance(exc, (BrokenChainError, DeadlineError))
        or getattr(exc, "gave_up", None) is not None  # its timeout: no more
        or getattr(exc, "role", None) == "target"  # DEST's own failure
    ):
        return None
    try:
        _check_chain(chain)
    except BrokenChainError as damage:
        return damage
    except Exception:  # no better verdict than exc's
        return None
    return None


def _publish_restored(new: files.NewFile, target: str) -> None:
    """new.publish(), a DEST that appeared meanwhile said as copy() says it
    (role/path facts: the command's "another file appeared at DEST")."""
    try:
        new.publish()
    except files.StaleSideFileError:
        raise
    except FileExistsError as exc:
        error = FileExistsError(
            exc.errno,
            f"dest {target!r} was created by someone else while the restore "
            "was made: the restored copy was not put in its place (nothing "
            "was overwritten); remove that file or choose another dest",
            target,
        )
        raise files.with_facts(
            error,
            role="target",
            path=target,
            os_errno=exc.errno,
            target_state="not created",
        ) from exc


def _dest_error(exc: OSError, temporary: str, target: str) -> OSError:
    """An OS failure writing a new dest (ENOSPC, EIO...) naming dest, not
    its temporary name, with copy()'s facts: nothing was put in place."""
    named = _as_written(exc, temporary, target)
    if named is exc:
        return exc
    return files.with_facts(
        named,
        role="target",
        path=target,
        os_errno=exc.errno,
        target_state="not created",
    )


class _RestoreChecker:
    """The read-back of a restore into a new DEST, beside the writing
    (_restore_new): DEST read back from the disk slice by slice as it is
    written out, each page against the point's manifest."""

    def __init__(
        self,
        chain: list[_Point],
        fd: int,
        page_size: int,
        target: str,
    ) -> None:
        self.chain, self.fd, self.page_size = chain, fd, page_size
        self.target = target
        # the point's manifest, read where it lies a slice at a time
        self.tip_fd = chain[-1].open()
        self.error: BaseException | None = None
        self.verified = 0  # bytes of DEST read back and checked
        self.ready = 0  # bytes of DEST written out to the disk
        self.final = False
        self.stop = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(
            target=self._run, name="apsw-backup restore check"
        )
        try:
            self.thread.start()
        except BaseException:
            os.close(self.tip_fd)
            raise

    def written_out(self, upto: int) -> None:
        with self.cond:
            self.ready = max(self.ready, upto)
            self.cond.notify()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            self.abandon()
            raise self.error

    def finish(self) -> None:
        """Wait for the checks to end (after the last written_out()); raise
        their failure."""
        with self.cond:
            self.final = True
            self.cond.notify()
        self._join()
        self.raise_if_failed()

    def abandon(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()
        self._join()

    def _join(self) -> None:
        self.thread.join()
        fd, self.tip_fd = self.tip_fd, -1
        if fd >= 0:
            os.close(fd)

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while (
                        not self.stop and not self.final and self.ready <= self.verified
                    ):
                        self.cond.wait()
                    if self.stop:
                        return
                    upto, final = self.ready, self.final
                if upto > self.verified:
                    self._read_back(self.verified, upto)
                    self.verified = upto
                elif final:
                    return
        except BaseException as exc:  # raised by the writing thread
            self.error = exc

    def _read_back(self, start: int, end: int) -> None:
        """DEST's bytes [start, end), written out to the disk, dropped from
        the cache and read back from the disk, against the manifest."""
        P = self.page_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, start, end - start, os.POSIX_FADV_DONTNEED)
        per_run = max(1, _READ_RUN // P) * P
        for offset in range(start, end, per_run):
            if self.stop:
                return
            n = min(per_run, end - offset) // P
            first = offset // P + 1
            data = _read_exact(self.fd, n * P, offset)
            expected = self.chain[-1].hashes(self.tip_fd, first, n)
            bad = _first_bad(data, P, first, expected)
            if bad is not None:
                raise IncrementalError(
                    f"the restored copy of {self.target!r} did not read back as "
                    f"written (page {bad}); nothing was put in place"
                )


class _StructureCheck:
    """PRAGMA quick_check of a chain's tip, through the overlay, in a thread
    of its own (SQLite releases the GIL) while the restore is written.  The
    overlay serves only pages that match the point's manifest, and DEST is
    read back and checked against the same manifest: quick_check of the
    overlay is quick_check of DEST's bytes (bytes 18 and 19 of page 1, the
    journal mode, aside), without waiting for DEST to be complete."""

    def __init__(self, chain: list[_Point], scratch_dir: str, target: str) -> None:
        self.target = target
        self.rows: list[Any] = []
        self.error: BaseException | None = None
        self.conn = _open_overlay(chain, scratch_dir)
        try:
            self.thread = threading.Thread(
                target=self._run, name="apsw-backup restore quick_check"
            )
            self.thread.start()
        except BaseException:  # no thread: the overlay is let go here
            self.conn.close()
            raise

    def _run(self) -> None:
        try:
            self.rows = [
                r[0] for r in self.conn.execute("PRAGMA main.quick_check").fetchall()
            ]
        except BaseException as exc:  # reported by the caller's thread
            self.error = exc

    def _join(self) -> None:
        self.thread.join()
        self.conn.close()

    def finish(self) -> None:
        """Wait for quick_check; raise its failure, or IncrementalError for
        anything but "ok"."""
        self._join()
        if self.error is not None:
            raise self.error
        _quick_check_result(self.rows, self.target)

    def abandon(self) -> None:
        """Stop quick_check (an interrupt lands only once its statement has
        begun: again until the thread has ended) and let go of the overlay."""
        while self.thread.is_alive():
            self.conn.interrupt()
            self.thread.join(0.01)
        self._join()


_UNREADABLE = re.compile(r"unable to get the page\. error code=(\d+)")
_CODE_WORDS = {7: "out of memory", 10: "a disk I/O error", 13: "the disk is full"}


def _quick_check_result(
    rows: list[Any], target: str, what: str = "the restored copy of"
) -> None:
    """Raise for anything but "ok": a page quick_check could not read (an
    I/O error, no memory) is a failure to check, not damage."""
    for row in rows:
        found = _UNREADABLE.search(str(row))
        if found:
            code = int(found[1])
            words = _CODE_WORDS.get(code & 0xFF, f"SQLite error code {code}")
            raise IncrementalError(
                f"{what} {target!r} could not be checked: "
                f"quick_check could not read a page ({words}); nothing was "
                "put in place"
            )
    if rows != ["ok"]:
        raise IncrementalError(
            f"{what} {target!r} fails quick_check: "
            f"{'; '.join(map(str, rows[:5]))}; nothing was put in place"
        )


def _say_rollback_journal(fd: int) -> None:
    """Page 1 of a restored WAL database, saying rollback-journal mode (its
    bytes 18 and 19 set to 1), as copy() writes a copy of a WAL source (its
    rollback shim, docs/journal-mode.md): the restore is then byte-identical
    to copy()'s, one file, with no mode switch (a commit that would change
    the file change counter).  fd: the new file's, ours alone; written,
    synced and read back."""
    files.check_owned()
    if os.pwrite(fd, b"\x01\x01", 18) != 2:
        raise OSError(errno.EIO, "short write of page 1's journal mode")
    os.fsync(fd)
    if os.pread(fd, 2, 18) != b"\x01\x01":
        raise OSError(errno.EIO, "page 1's journal mode did not read back")


def _restore_into_existing(
    chain: list[_Point],
    target: str,
    started: float,
    timeout: float | None,
    progress: Callable[[int, int], Any] | None,
) -> RestoreResult:
    wal = target + "-wal"
    before = os.stat(wal).st_size if os.path.exists(wal) else 0
    reporting = [False]  # the caller's progress() runs
    try:
        with _Overlay(chain) as conn:  # creates no file: the temporary folder
            # the backup holds DEST's write lock from its first step to the end
            step = None
            if progress is not None:
                report = progress

                def step(status: int, remaining: int, total: int) -> None:
                    reporting[0] = True
                    report(total - remaining, total)
                    reporting[0] = False

            # In steps when progress is given: its calls then come while the
            # copy is in SQLite's transaction, where raising rolls DEST back
            # (one whole-copy step would call it only once DEST is replaced).
            result = copy(
                conn,
                target,
                pages=_restore_step(chain[-1].info.page_count, progress),
                timeout=timeout,
                snapshot=False,
                progress=step,
            )
    except BaseException as exc:
        damage = None if reporting[0] else _damage_behind(exc, chain)
        if damage is not None:
            raise damage from exc
        raise
    after = os.stat(wal).st_size if os.path.exists(wal) else 0
    if not after and _says_wal(target):
        # The restore's connection was DEST's last: closing it, SQLite
        # checkpointed and removed the -wal, whose size is no longer to be
        # seen.  Every page passed through it in one transaction: a header
        # of 32 bytes, a frame of 24 + page size bytes a page.
        P = chain[-1].info.page_size
        after = 32 + result.pages * (24 + P)
    return RestoreResult(
        point=chain[-1].info.path,
        dest=target,
        pages=chain[-1].info.page_count,
        elapsed=time.monotonic() - started,
        overwrote=True,
        writers_held=result.elapsed,
        wal_growth=max(0, after - before),
    )


def _says_wal(path: str) -> bool:
    """Whether the database file's header says WAL mode, read through
    SQLite's own file handle (never a descriptor of ours: another
    connection of this process may have it open); False if it cannot be
    read."""
    try:
        conn = _c.Connection(path, _c.SQLITE_OPEN_READONLY)
    except _c.Error:
        return False
    try:
        return files.header_is_wal(conn.file_header())
    except _c.Error:
        return False
    finally:
        conn.close()


class RestorePointConnection(_c.Connection):
    """A read-only Connection of a restore point (open_restore_point()).

    Reads go to the chain's files through the overlay VFS; nothing is
    restored.  close() also releases the files."""

    _overlay_capsule: Any = None
    point: str = ""

    def close(self, force: bool = False) -> None:
        try:
            super().close(force)
        finally:
            capsule, self._overlay_capsule = self._overlay_capsule, None
            if capsule is not None:
                _c._overlay_close(capsule)

    def __enter__(self) -> RestorePointConnection:
        return self

    def __exit__(self, *exc: object) -> None:  # type: ignore[override]
        self.close()


def _open_overlay(
    chain: list[_Point], scratch_dir: str | None
) -> RestorePointConnection:
    """A read-only connection over the chain's overlay; its page map lives
    in a scratch file in scratch_dir (_scratch()), which the overlay keeps
    open (a descriptor of its own) until the connection is closed."""
    pages = _ChainFiles(chain, scratch_dir)
    _, overlay_vfs = _c._incremental_vfs_names()
    path = (
        chain[-1].info.path
        + f".apsw-backup-{os.getpid()}-{os.urandom(4).hex()}.overlay"
    )
    try:
        capsule = _c._overlay_open(path, pages.map)
    except OSError as exc:  # its path could not be resolved: name it
        raise _named(exc, os.path.dirname(path)) from None
    finally:
        pages.close()
    try:
        conn = RestorePointConnection(path, _c.SQLITE_OPEN_READONLY, overlay_vfs)
    except BaseException:
        _c._overlay_close(capsule)
        raise
    conn._overlay_capsule = capsule
    conn.point = chain[-1].info.path
    return conn


class _Overlay:
    def __init__(self, chain: list[_Point], scratch_dir: str | None = None) -> None:
        self.conn = _open_overlay(chain, scratch_dir)

    def __enter__(self) -> RestorePointConnection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def open_restore_point(
    backup: str | os.PathLike[str], *, at: datetime | str | None = None
) -> RestorePointConnection:
    """Open a restore point read-only, as a Connection (see restore() for
    backup and at).  The chain is checked as for restore(); pages are read
    from its files as SQLite asks for them.  Close it when done."""

    backup = os.fsdecode(os.fspath(backup))  # bytes as the OS gives names too

    def open_it() -> RestorePointConnection:
        point = _resolve(backup, at)
        chain = _chain_for_reading(point)
        _check_chain(chain)
        return _open_overlay(chain, None)  # a reader: the temporary folder

    return _while_points_stay(_folder_of(backup), open_it)


def _folder_of(backup: str | os.PathLike[str]) -> str:
    path = os.path.abspath(os.fspath(backup))
    return path if os.path.isdir(path) else os.path.dirname(path)


def _listing(folder: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if _parse_name(e.name))
    except OSError:
        return []


_T = TypeVar("_T")
READ_TRIES = 3


def _while_points_stay(folder: str, work: Callable[[], _T]) -> _T:
    """work(), again (up to READ_TRIES times) when it met a point file
    that is gone and the folder's points changed meanwhile: a run's --keep
    merged or deleted points while this read them (readers take no lock,
    so they never hold up a scheduled run).  Whatever failed had not
    written anything yet, or rolled it back."""
    for attempt in range(READ_TRIES):
        before = _listing(folder)
        try:
            return work()
        except (BrokenChainError, FileNotFoundError) as exc:
            gone = getattr(exc, "path", None) or getattr(exc, "filename", None)
            if (
                attempt + 1 < READ_TRIES
                and gone
                and str(gone).endswith(SUFFIX)
                and not os.path.exists(gone)
                and _listing(folder) != before
            ):
                continue
            raise
    raise AssertionError("unreachable")


# -- verify ----------------------------------------------------------------


def verify_folder(folder: str | os.PathLike[str]) -> list[ChainReport]:
    """Check every restore point of folder and every chain they form: each
    file's checksum and root hash, every stored page against its manifest,
    every unstored page's hash against its parent's, and each link.  A
    check that met a point removed meanwhile by a run's --keep is made
    again (up to READ_TRIES times)."""
    folder = os.path.abspath(_a_folder(folder))
    for attempt in range(READ_TRIES):
        before = _listing(folder)
        reports = _verify_folder(folder)
        gone = [
            f
            for r in reports
            for f in r.at_fault
            if f.endswith(SUFFIX) and not os.path.exists(f)
        ]
        if not gone or _listing(folder) == before or attempt + 1 == READ_TRIES:
            return reports
    raise AssertionError("unreachable")


def _verify_folder(folder: str) -> list[ChainReport]:
    reports = []
    groups = [
        (stem, source, group)
        for stem, paths in sorted(_stems(folder, everything=True).items())
        for source, group in sorted(_by_source(paths).items(), key=repr)
    ]
    strays: dict[str, tuple[str, BrokenChainError]] = {}
    for stem, source, paths in groups:
        chains, found, _ = _chains(paths)
        problems = []
        for problem in found:
            if getattr(problem, "stray", False):
                strays.setdefault(problem.path or "", (stem, problem))
            else:
                problems.append(problem)
        for chain in chains:
            try:
                _check_chain(chain)
            except BrokenChainError as exc:
                problems.append(exc)
        reports.append(
            ChainReport(
                stem=stem,
                points=paths,
                ok=not problems,
                problems=[str(p) for p in problems],
                at_fault=[p.path or "" for p in problems],
                source=source,
            )
        )
    for path, (stem, stray) in sorted(strays.items()):
        # a point that belongs to no chain it could be read with
        reports.append(
            ChainReport(
                stem=stem,
                points=[path],
                ok=False,
                problems=[str(stray)],
                at_fault=[path],
                source=None,
            )
        )
    return reports


def verify_point(point: str | os.PathLike[str]) -> ChainReport:
    """Check one restore point and the chain from its base up to it, as
    restore() does before writing anything."""
    path = os.path.abspath(os.fspath(point))
    name = _parse_name(path)
    stem = name["stem"] if name else ""
    try:
        chain = _chain_to(path, os.path.dirname(path))
        _check_chain(chain)
    except BrokenChainError as exc:
        return ChainReport(
            stem=stem,
            points=[path],
            ok=False,
            problems=[str(exc)],
            at_fault=[exc.path or path],
        )
    return ChainReport(
        stem=stem, points=[p.info.path for p in chain], ok=True, problems=[]
    )


def _verify_pages(
    point: _Point,
    parent: _Point | None,
    opts: _RunOptions | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Every stored page of point against its manifest, every unstored one's
    hash against its parent's: BrokenChainError naming the file.  stop():
    give up quietly (the caller no longer needs the answer).  The index and
    both manifests are read where they lie, a window at a time; the set of
    stored pages is a bitmap in a scratch file of the temporary folder (a
    check is a reader: it writes nothing beside the points)."""
    P = point.info.page_size
    fd = point.open()
    parent_fd = -1
    try:
        # the manifest is still the one the root hash was checked against
        try:
            root = _file_root(fd, P, point.info.page_count, point.manifest_off)
        except OSError as exc:
            raise _read_failure(exc, [(point, fd)]) from exc
        if root != point.root:
            raise _damaged(point.info.path, "changed since it was first read")
        stored = point.info.stored_pages
        per_run = max(1, _READ_RUN // P)
        for start in range(0, stored, per_run):
            if opts is not None:
                opts.check("checking the chain the new point extends")
            if stop is not None and stop():
                return
            count = min(per_run, stored - start)
            try:
                bad = _c._check_stored(
                    fd, point.index_off, point.data_offset, P, point.manifest_off,
                    point.info.page_count, start, count,
                )  # fmt: skip
            except OSError as exc:
                raise _read_failure(exc, [(point, fd)]) from exc
            if bad >= 0:
                pgno = point.positions(fd, bad, 1)[0]
                raise _damaged(
                    point.info.path,
                    f"altered or damaged (page {pgno} does not match its hash)",
                )
        # Every page not stored is its parent's (compared in C, both
        # manifests where they lie).
        theirs = None
        if parent is not None:
            parent_fd = parent.open()
            theirs = (parent_fd, parent.manifest_off, parent.info.page_count)
        with _scratch(None) as bits:
            try:
                what, pgno = _c._check_inherited(
                    fd, point.manifest_off, point.info.page_count, point.index_off,
                    stored, theirs, P, bits.fileno(),
                )  # fmt: skip
            except OSError as exc:  # a point cut short, or the scratch file
                opened = [(point, fd)] + ([(parent, parent_fd)] if parent else [])
                if any(p.shrunk(f) for p, f in opened):
                    raise _read_failure(exc, opened) from exc
                raise _scratch_error(exc, None) from exc
    finally:
        os.close(fd)
        if parent_fd >= 0:
            os.close(parent_fd)
    if what == 1:
        raise _damaged(point.info.path, f"damaged (page {pgno} stored twice)")
    if what:
        raise _damaged(
            point.info.path,
            f"inconsistent (page {pgno} is neither stored nor its parent's)",
        )


def _check_chain(
    chain: list[_Point],
    opts: _RunOptions | None = None,
    stop: Callable[[], bool] | None = None,
) -> None:
    for i, point in enumerate(chain):
        if stop is not None and stop():
            return
        _verify_pages(point, chain[i - 1] if i else None, opts, stop)
