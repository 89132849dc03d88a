"""Files and folders that are either old or new, never half-written.

Every writer here writes to a temporary name beside its target, fsyncs it, renames it into place and
fsyncs the folder, so a crash at any moment leaves the previous version (or nothing) behind.
:func:`atomic_dir` does the same for a whole folder; :func:`replace_dir` is the rename at its end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ebft.errors import UsageError

__all__ = [
    "atomic_dir",
    "atomic_write",
    "check_out_dir",
    "check_out_path",
    "existing_ancestor",
    "fsync_path",
    "fsync_tree",
    "replace_dir",
    "write_json",
    "write_text",
]


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return  # some file systems do not open folders; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder``, then the folders themselves."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)``, fsync, rename to ``path``, fsync the folder: ``path`` is old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; returns ``path``."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return Path(path)


def write_json(path: Path, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (NaN and infinities allowed) atomically; returns ``path``."""
    return write_text(path, json.dumps(data, indent=indent, allow_nan=True) + "\n")


def existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_out_path(out: Path) -> None:
    """Refuse an ``--out`` that is a file or lies under one."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder path")
    ancestor = existing_ancestor(out.parent)
    if not ancestor.is_dir():
        raise UsageError(f"--out {out} cannot be created: {ancestor} is a file; choose a folder path")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that holds something already, unless ``overwrite``."""
    check_out_path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} already exists and is not empty; choose another folder or pass --overwrite")


def replace_dir(new: Path, out: Path) -> None:
    """Rename the complete folder ``new`` to ``out`` (moving an old ``out`` aside first, then removing it)."""
    new, out = Path(new), Path(out)
    fsync_tree(new)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    fsync_path(out.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
