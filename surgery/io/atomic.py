"""Writing an adapter's files into a directory: each file atomically, the manifest last, nothing else touched.

`write_directory` writes every file in full to a temporary file beside it (same directory, so the same file
system), fsyncs it, and renames it over the old one; the directory is fsynced before the last file (the
manifest, which names what the others must be) is renamed in, and again after. Other entries of the directory
(a log file open for appending, the user's notes, the directory itself with its mode and inode) are left alone.
An interrupted save leaves the old files, or, if it stops between renames, new data files beside the old
manifest, which a reader refuses clearly (the manifest's checksum no longer matches) rather than mixes.

Writers and readers of one directory take its lock (`directory_lock`: `flock` on the directory itself, so no
lock file is left behind): two processes saving to one directory take turns, and a load never reads a save
half-way.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

from surgery.errors import AdapterFileError

try:
    import fcntl
except ImportError:  # not on POSIX: no directory locks
    fcntl = None  # type: ignore[assignment]

LOCK_TIMEOUT_S = 120.0
"""How long a save or load waits for another process's save to the same directory before giving up."""


def _write_file(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist; mode 0666 less the umask, as any new file) holding `data`, on disk."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def directory_lock(directory: Path, exclusive: bool, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the directory's advisory lock (exclusive for writers, shared for readers) inside the block."""
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as err:
        raise AdapterFileError(f"{directory}: cannot open the directory ({err.strerror or err})") from None
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AdapterFileError(f"{directory}: another process has been {'using' if exclusive else 'writing'} "
                                           f"this adapter directory for over {timeout:.0f} s; try again later") from None
                time.sleep(0.01)
            except OSError:  # a file system without flock: go on without the lock
                break
        yield
    finally:
        os.close(fd)


def _mode_of(path: Path) -> int | None:
    try:
        return path.lstat().st_mode & 0o7777 if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None


def write_directory(directory: str | Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> bytes, the manifest last) into `directory`, creating it if needed. Each file is
    replaced atomically; every other entry of the directory is left as it is. Returns the directory."""
    directory = Path(directory)
    names = list(files)
    for name in names:
        if not name or "/" in name or name in (".", "..") or name.startswith(".surgery-"):
            raise AdapterFileError(f"{directory}: refusing to write the file name {name!r}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AdapterFileError(f"{directory}: cannot create the adapter directory ({err.strerror or err})") from None
    if not directory.is_dir():
        raise AdapterFileError(f"{directory}: exists and is not a directory")
    with directory_lock(directory, exclusive=True):
        temps: dict[str, Path] = {}
        try:
            for name in names:  # everything in full on disk before the first rename
                temp = directory / f".surgery-{uuid.uuid4().hex}.{name}.tmp"
                temps[name] = temp
                _write_file(temp, files[name])
                mode = _mode_of(directory / name)
                if mode is not None:
                    os.chmod(temp, mode)
            for index, name in enumerate(names):
                if index == len(names) - 1:
                    _fsync_dir(directory)  # the data files are in before the manifest says they are
                os.replace(temps[name], directory / name)
                del temps[name]
            _fsync_dir(directory)
        except OSError as err:
            raise AdapterFileError(f"{directory}: cannot write the adapter ({err.strerror or err}"
                                   f"{': ' + str(err.filename) if err.filename else ''})") from None
        finally:
            for temp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(temp)
    return directory
