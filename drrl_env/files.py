"""Files that survive kills and show corruption: atomic writes, checksums, and cleanup of stale temporaries.

Every package writes through :func:`write_atomic`: the content goes to a hidden temporary file
beside the target (``.NAME.XXXXXXXX.SUFFIX``) and is renamed into place, so a reader sees the old
file or the new one, never half of one. A kill between the write and the rename leaves the
temporary behind; :func:`remove_stale_temporaries` deletes those of a folder when a run resumes.
:func:`sha256_of` is the checksum datasets and checkpoints record when they write a file and
verify when they read it back.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

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
