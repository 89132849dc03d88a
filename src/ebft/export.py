"""Run folders and JSON, written atomically.

``ebft prune`` itself works in a resumable sibling folder (:mod:`ebft.checkpoint`); ``atomic_dir``
is the one-shot variant (a pid-named sibling, removed on failure) for callers that need no resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ebft.errors import UsageError


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
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """Save in Hugging Face format (safetensors) with the tokenizer, loadable by ``from_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
