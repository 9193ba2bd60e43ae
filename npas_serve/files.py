"""Atomic writes: a reader (or a resumed run) never sees half a file, nor half a directory."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which is then renamed onto it.

    Beside, not in /tmp: a rename is only atomic within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomic(path: Path, fill: Callable[[Path], None]) -> None:
    """`fill(tmp)` writes a directory beside `path`, which then replaces `path` in one step.

    Files already in `path` that `fill` does not write are carried over (hard links, no copy),
    so `fill` must replace a file (`write_atomic`), never write into one.
    Where the kernel can swap two directories atomically (Linux renameat2 RENAME_EXCHANGE) a
    reader sees the old directory or the new one, never a mix; elsewhere the old one is moved
    aside first, so for an instant there is none, but still never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        if path.is_dir():
            for entry in path.iterdir():
                if entry.is_file() and not entry.is_symlink():
                    os.link(entry, tmp / entry.name)
                elif entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, copy_function=os.link)
        fill(tmp)
        _fsync_dir(tmp)
        if path.exists():
            if not _exchange(tmp, path):
                aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
                os.replace(path, aside / path.name)
                os.replace(tmp, path)
                tmp = aside
        else:
            os.replace(tmp, path)
            tmp = None
        _fsync_dir(path.parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)      # the new files on failure, the old ones on success


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
