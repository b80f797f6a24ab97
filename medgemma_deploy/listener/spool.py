"""The listener's durable spool: every accepted instance is on disk, fsync'd, before Success goes back.

Layout under the spool root (one listener process per spool, enforced by :meth:`Spool.lock`)::

    jobs.sqlite            job store (SQLite, WAL), see :mod:`medgemma_deploy.listener.jobstore`
    audit.jsonl            audit log, see :mod:`medgemma_deploy.listener.audit`
    studies/<study>/<sop>.<sha>.dcm   received instances (DICOM Part 10 files)
    quarantine/<time>-<sop>.dcm       instances that could not be decoded (stored and reported)
    work/<study>/v<N>/input/          hard links to the instances of study version N
    work/<study>/v<N>/output/         what the pipeline wrote for version N (SR, SEG, results.json)

File names never come straight from the network: a UID is used as a name only when it is a valid
UID (digits and dots, at most 64 characters), anything else becomes ``x-<sha256>``. A write goes to
a temporary file in the target folder, is fsync'd, renamed into place, and the folder is fsync'd,
so after a crash a file is either complete or absent.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PendingFile", "Spool", "SpoolFullError", "SpoolLockedError", "StoredFile", "safe_uid_name"]

logger = logging.getLogger(__name__)

_VALID_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """Not enough free space (or a write failed with ENOSPC/EDQUOT/EFBIG): answer out-of-resources."""


class SpoolLockedError(RuntimeError):
    """Another listener process holds this spool."""


def safe_uid_name(uid: str) -> str:
    """A file-name-safe form of ``uid``: the UID itself when valid, else ``x-<sha256 prefix>``.

    Valid means DICOM PS3.5 §9.1: digits separated by single dots, at most 64 characters. Anything
    else (path separators, ``..``, spaces, padding) is hashed, so no received value reaches the
    file system as a name.
    """
    text = str(uid)
    if len(text) <= 64 and _VALID_UID.match(text):
        return text
    return "x-" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@dataclass(frozen=True)
class StoredFile:
    """A file the spool wrote: its path relative to the spool root, size and SHA-256."""

    relative_path: str
    size: int
    sha256: str


@dataclass
class PendingFile:
    """A file written to its temporary name but not yet durable (see :meth:`Spool.write_pending`).

    ``fd`` stays open until :meth:`Spool.make_durable` fsyncs it: an fsync on a descriptor opened
    later might not report a write-back error that happened before.
    """

    stored: StoredFile
    target: Path
    tmp: Path
    fd: int | None


class Spool:
    """Durable file storage under one root folder.

    Parameters
    ----------
    root:
        The spool folder; created (with its sub-folders) if missing.
    min_free_bytes:
        Writes are refused with :class:`SpoolFullError` when the file system would be left with
        less free space than this (the database and audit log need room too).
    """

    def __init__(self, root: Path, *, min_free_bytes: int = 256 * 1024 * 1024) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.root = Path(root).absolute()
        self.min_free_bytes = int(min_free_bytes)
        self._lock_fd: int | None = None
        self._dir_lock = threading.Lock()
        for sub in ("studies", "quarantine", "work"):
            self._make_dirs(self.root / sub)

    # -- process lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the spool's exclusive lock (released by :meth:`unlock` or when the process dies).

        Raises
        ------
        SpoolLockedError
            Another process (a second listener on the same spool) holds it.
        """
        fd = os.open(self.root / "listener.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise SpoolLockedError(
                f"spool {self.root} is in use by another listener process (lock file listener.lock)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- paths ----------------------------------------------------------------------------------

    def path(self, relative_path: str) -> Path:
        """Absolute path of a spool-relative path (refuses paths that leave the spool)."""
        candidate = (self.root / relative_path).resolve()
        if not candidate.is_relative_to(self.root.resolve()):
            raise ValueError(f"{relative_path!r} is not inside the spool {self.root}")
        return candidate

    def instance_path(self, study_instance_uid: str, sop_instance_uid: str, sha256: str) -> str:
        """Spool-relative path of an instance; the content hash keeps two versions apart."""
        return (
            f"studies/{safe_uid_name(study_instance_uid)}/{safe_uid_name(sop_instance_uid)}.{sha256[:16]}.dcm"
        )

    def work_dir(self, study_instance_uid: str, version: int) -> Path:
        return self.root / "work" / safe_uid_name(study_instance_uid) / f"v{int(version)}"

    # -- writes ---------------------------------------------------------------------------------

    def check_free_space(self, incoming_bytes: int) -> None:
        """Raise :class:`SpoolFullError` if writing ``incoming_bytes`` would cross ``min_free_bytes``."""
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            raise SpoolFullError(
                errno.ENOSPC,
                f"spool {self.root}: {free // 2**20} MiB free, {incoming_bytes} bytes incoming, "
                f"{self.min_free_bytes // 2**20} MiB must stay free",
            )

    def write(self, relative_path: str, chunks: Iterable[bytes]) -> StoredFile:
        """Write ``chunks`` durably to ``relative_path`` (temp file, fsync, rename, fsync folder).

        Raises
        ------
        SpoolFullError
            The file system is full (ENOSPC), a quota is exceeded (EDQUOT) or a file-size limit is
            hit (EFBIG); the partial temporary file is removed.
        OSError
            Any other write failure, likewise cleaned up.
        """
        pending = self.write_pending(relative_path, chunks)
        self.make_durable([pending])
        return pending.stored

    def write_pending(self, relative_path: str, chunks: Iterable[bytes]) -> PendingFile:
        """Write ``chunks`` to a temporary file beside ``relative_path``, without fsync.

        Nothing is durable or visible under the final name until :meth:`make_durable`, which
        several writers' files can share (one folder fsync for all of them). The caller must pass
        the result to :meth:`make_durable` or :meth:`discard`, or the descriptor leaks.

        Raises
        ------
        SpoolFullError, OSError
            As :meth:`write`; the partial temporary file is removed.
        """
        target = self.path(relative_path)
        self._make_dirs(target.parent)
        tmp = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        digest = hashlib.sha256()
        size = 0
        fd: int | None = None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                digest.update(chunk)
                size += len(chunk)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            _remove_quietly(tmp)
            if _means_full(exc):
                raise SpoolFullError(exc.errno, f"{target}: {os.strerror(exc.errno)}") from exc
            raise
        stored = StoredFile(relative_path=relative_path, size=size, sha256=digest.hexdigest())
        return PendingFile(stored=stored, target=target, tmp=tmp, fd=fd)

    def make_durable(self, pending: Sequence[PendingFile]) -> None:
        """fsync each file, rename it into place, then fsync each folder once.

        After this returns every file is complete under its final name and survives a crash.
        If anything fails, every descriptor is closed and every temporary file not yet renamed
        is removed, and the error is raised for all of them: the caller must treat none of the
        files as durable (a file already renamed may exist, but its folder entry may not be on disk).

        Raises
        ------
        SpoolFullError, OSError
            As :meth:`write`.
        """
        try:
            for item in pending:
                fd, item.fd = item.fd, None
                if fd is None:
                    raise ValueError(f"{item.tmp} was already made durable or discarded")
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            folders: dict[Path, None] = {}
            for item in pending:
                os.replace(item.tmp, item.target)
                folders[item.target.parent] = None
            for folder in folders:
                _fsync_dir(folder)
        except OSError as exc:
            self.discard(pending)
            if _means_full(exc):
                raise SpoolFullError(
                    exc.errno, f"{exc.filename or self.root}: {os.strerror(exc.errno)}"
                ) from exc
            raise
        except BaseException:
            self.discard(pending)
            raise

    def discard(self, pending: Sequence[PendingFile]) -> None:
        """Close and remove files that will not be made durable (their temporary names only)."""
        for item in pending:
            fd, item.fd = item.fd, None
            if fd is not None:
                os.close(fd)
            if item.tmp.exists():
                _remove_quietly(item.tmp)

    def quarantine(self, sop_instance_uid: str, data: bytes) -> StoredFile:
        """Keep an instance that could not be decoded, for a person to look at."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        digest = hashlib.sha256(data).hexdigest()
        name = f"quarantine/{stamp}-{safe_uid_name(sop_instance_uid or 'unknown')}.{digest[:16]}.dcm"
        return self.write(name, [data])

    def remove(self, relative_path: str) -> None:
        _remove_quietly(self.path(relative_path))

    def link_inputs(self, relative_paths: Iterable[str], input_dir: Path) -> int:
        """Fill ``input_dir`` (emptied first) with hard links to the given spool files.

        Hard links make the folder an unchanging snapshot of one study version even if a later
        version replaces an instance; where the file system refuses links, files are copied.

        Returns
        -------
        int
            How many files the folder holds.

        Raises
        ------
        FileNotFoundError
            A spool file recorded in the job store is missing (the spool was tampered with).
        """
        if input_dir.exists():
            shutil.rmtree(input_dir)
        input_dir.mkdir(parents=True)
        count = 0
        for relative in relative_paths:
            source = self.path(relative)
            target = input_dir / source.name
            try:
                os.link(source, target)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    raise FileNotFoundError(
                        f"spool file {source} recorded for this study is missing"
                    ) from exc
                shutil.copy2(source, target)
            count += 1
        return count

    def remove_tree(self, path: Path) -> None:
        """Remove a folder inside the spool (work folders, studies past retention)."""
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()) or resolved == self.root.resolve():
            raise ValueError(f"{path} is not a folder inside the spool {self.root}")
        shutil.rmtree(resolved, ignore_errors=False)

    def _make_dirs(self, directory: Path) -> None:
        """Create ``directory`` and fsync each new folder's parent, so the entry survives a crash."""
        if directory.is_dir():
            return
        with self._dir_lock:
            missing = []
            current = directory
            while not current.exists():
                missing.append(current)
                current = current.parent
            for folder in reversed(missing):
                folder.mkdir(exist_ok=True)
                _fsync_dir(folder.parent)


def _means_full(exc: OSError) -> bool:
    """ENOSPC, EDQUOT or EFBIG: the spool cannot take more (answer out-of-resources)."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        logger.debug("%s already gone", path)
