"""Atomic writes of a set of files into a directory: a reader sees either all the old files or all the new."""
from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory(directory: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> bytes) into `directory` atomically. Other files already in the directory are kept.

    The new contents are written in full to a sibling temporary directory first, then swapped in with one
    atomic exchange, so an interrupted save leaves the old files or the new, never a mix.
    """
    directory = Path(directory).resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.saving-", dir=directory.parent))
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        if directory.exists():
            for entry in directory.iterdir():
                if entry.name not in files:
                    target = staging / entry.name
                    if entry.is_dir():
                        shutil.copytree(entry, target, symlinks=True)
                    else:
                        shutil.copy2(entry, target, follow_symlinks=False)
        _fsync_dir(staging)
        if not directory.exists():
            os.rename(staging, directory)
        elif not _exchange(staging, directory):
            for name in files:  # no atomic exchange on this system: replace file by file, in the order given
                os.replace(staging / name, directory / name)
        _fsync_dir(directory.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory
