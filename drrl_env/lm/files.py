"""Files that survive kills and show corruption: atomic writes, checksums, and cleanup of stale temporaries.

Every package writes through :func:`write_atomic`: the content goes to a hidden temporary file
beside the target (``.NAME.XXXXXXXX.SUFFIX``) and is renamed into place, so a reader sees the old
file or the new one, never half of one. A kill between the write and the rename leaves the
temporary behind; :func:`remove_stale_temporaries` deletes those of a folder when a run resumes.
:func:`sha256_of` is the checksum datasets and checkpoints record when they write a file and
verify when they read it back; :class:`ChecksumLedger` keeps those of a folder's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

CHUNK_BYTES = 1 << 20


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call ``write(temporary_path)``, then rename the file to ``path`` (atomic on one file system).

    The temporary file sits beside ``path`` and ends with the same suffix, so writers that add a
    missing suffix (SB3's ``save``) keep its name. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for a text file."""
    return write_atomic(path, lambda temporary: Path(temporary).write_text(text))


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete what a killed :func:`write_atomic` left in ``folder`` for targets matching the globs ``names``.

    Call it only when no other process writes to ``folder`` (a run resuming owns its folder).
    Returns the files removed.
    """
    folder = Path(folder)
    removed = []
    for name in names:
        for stale in folder.glob(f".{name}.*"):
            if stale.is_file():
                stale.unlink()
                removed.append(stale)
    return removed


class ChecksumLedger:
    """The SHA-256 of files under one folder, kept as JSON in ``folder/name`` and rewritten atomically.

    A writer calls :meth:`record` after each file it has written; a reader calls :meth:`status`
    for each file it is about to trust. Paths are stored relative to ``folder``.
    """

    def __init__(self, folder: str | os.PathLike, name: str = "checksums.json") -> None:
        self.folder, self.path = Path(folder), Path(folder) / name
        self._sums: dict[str, str] | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def sums(self) -> dict[str, str]:
        """The recorded checksums (empty if none); ``ValueError`` naming the ledger if it is unreadable."""
        if self._sums is None:
            self._sums = {}
            if self.exists:
                try:
                    loaded = json.loads(self.path.read_text())
                except (OSError, ValueError) as error:
                    raise ValueError(f"{self.path} is unreadable ({error}); it may be truncated") from None
                if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
                    raise ValueError(f"{self.path} is not a JSON object of checksums")
                self._sums = loaded
        return self._sums

    def clear(self) -> None:
        """Forget every checksum (the ledger file is rewritten at the next :meth:`record`)."""
        self._sums = {}

    def record(self, *paths: str | os.PathLike) -> None:
        """Compute and store the checksums of ``paths``, then rewrite the ledger."""
        sums = self.sums()
        for path in paths:
            sums[Path(path).relative_to(self.folder).as_posix()] = sha256_of(path)
        write_text_atomic(self.path, json.dumps(sums, indent=2, sort_keys=True))

    def status(self, path: str | os.PathLike) -> str:
        """``"ok"``, ``"unrecorded"`` (no checksum stored) or ``"mismatch"`` (the file changed since it was written)."""
        expected = self.sums().get(Path(path).relative_to(self.folder).as_posix())
        if expected is None:
            return "unrecorded"
        return "ok" if sha256_of(path) == expected else "mismatch"


def check_output_folder(path: str | os.PathLike, option: str) -> Path:
    """``path`` as a folder a command may create or write into; else a ``ValueError`` that names ``option``.

    Refused: an empty path (which would mean the current folder), a path that is a file, a path
    under a file, and a folder (or the nearest existing parent of a new one) that is not writable.
    """
    if not str(path).strip():
        raise ValueError(f"{option} must name a folder, got {str(path)!r}")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file, not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{option} {str(path)!r} lies under {str(existing)!r}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: {str(existing)!r} is not writable")
    return folder


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type's name when it has none (for one-line errors)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class FolderInUseError(ValueError):
    """Another process holds the folder's lock (:func:`lock_folder`)."""


def lock_folder(folder: str | os.PathLike, what: str = "run folder") -> IO[str]:
    """Take ``folder/.lock`` for this process (released when the process ends or the file is closed).

    Raises:
        FolderInUseError: another process holds it; the message names that process.
    """
    import fcntl

    path = Path(folder) / ".lock"
    handle = open(path, "a+")  # noqa: SIM115 - held open for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUseError(f"{what} {folder} is in use by {holder}; wait for it, or use another folder") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}")
    handle.flush()
    return handle


def read_cache_entry(path: str | os.PathLike, load: Callable[[Path], T], what: str) -> T | None:
    """``load(path)`` of a cache entry; None when it is missing, or when it does not load or validate.

    ``load`` raises (any exception) for an entry that is truncated, unreadable or invalid (NaN, a wrong shape);
    such an entry is named in a warning and deleted, so the caller rebuilds it instead of failing on every run.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except Exception as error:  # noqa: BLE001 - whatever a damaged file raises, the remedy is the same
        reason = first_line(error)
        print(
            f"warning: the cached {what} {path} does not load ({reason}); deleting and rebuilding it", file=sys.stderr
        )
        path.unlink(missing_ok=True)
        return None
