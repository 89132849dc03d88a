"""Write a model in Hugging Face format: safetensors shards (with the standard index), config, tokenizer.

One writer serves the model in memory and the streamed model alike, so the two give the same bytes:
the tensors go out in the model's ``state_dict`` order (a tied weight once), cast to the save dtype,
in shards of at most ``max_shard_bytes`` (one shard is ``model.safetensors``; more are
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``). A shard is built and
written at a time, so writing a streamed model holds one shard in memory, not the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ebft.fsio import atomic_write, write_text

logger = logging.getLogger(__name__)

#: The largest shard the writer makes.
MAX_SHARD_BYTES = 2 * 2**30

#: ``tensor_for(name)``: the tensor to write for parameter ``name``, or None for the model's own.
TensorFor = Callable[[str], "torch.Tensor | None"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def saved_names(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of everything ``save_pretrained`` writes, in order: a tied tensor under its first name
    only. The tensors may be empty (meta) ones: only their shapes and dtypes are read here."""
    seen: set[int] = set()
    out = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    persistent = {n for n, _ in model.named_parameters()} | {
        f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._buffers
        if b not in mod._non_persistent_buffers_set}
    return [(n, t) for n, t in out if n in persistent]


def _shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_model(folder: Path, model: nn.Module, tokenizer: Any, dtype: torch.dtype | None = None,
                tensor_for: TensorFor | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
    """Write ``model`` (its weights cast to ``dtype``; None: as they are) with its config and tokenizer to
    ``folder``. ``tensor_for(name)`` gives the tensors the model does not hold (a streamed model's
    blocks). Returns ``{"bytes": ..., "files": [...], "zeros": {name: count}}``: the weight files' size on
    disk, their names, and the exact zeros of every 2-D weight."""
    folder.mkdir(parents=True, exist_ok=True)
    names = saved_names(model)
    cast = {n: (dtype if dtype is not None and t.is_floating_point() else t.dtype) for n, t in names}
    sizes = [(n, t.numel() * torch.empty(0, dtype=cast[n]).element_size()) for n, t in names]
    plan = _shards(sizes, max_shard_bytes)
    single = len(plan) == 1
    files = ["model.safetensors"] if single else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                                  for i in range(len(plan))]
    tensors = dict(names)
    weight_map: dict[str, str] = {}
    zeros: dict[str, int] = {}
    total = 0
    for file, shard in zip(files, plan):
        out: dict[str, torch.Tensor] = {}
        for name in shard:
            value = tensor_for(name) if tensor_for is not None else None
            if value is None:
                value = tensors[name]
                if value.is_meta:
                    raise ValueError(f"{name} holds no weights and tensor_for gave none")
            value = value.detach().to("cpu", cast[name]).contiguous()
            if name.endswith(".weight") and value.dim() == 2:
                zeros[name] = int((value == 0).sum())
            out[name] = value
            weight_map[name] = file
            total += value.numel() * value.element_size()
        atomic_write(folder / file, lambda tmp, out=out: save_file(out, str(tmp), metadata={"format": "pt"}))
        del out
    if not single:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = model.config
    config.architectures = [type(model).__name__]
    saved_dtype = dtype or next((t.dtype for _, t in names if t.is_floating_point()), torch.float32)
    config.dtype = str(saved_dtype).removeprefix("torch.")
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    on_disk = sum((folder / file).stat().st_size for file in files)
    logger.info("wrote %s: %d tensors in %d file(s), %.1f MiB", folder, len(weight_map), len(files), on_disk / 2**20)
    return {"bytes": on_disk, "files": files, "zeros": zeros}


def save_model(model: nn.Module, tokenizer: Any, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Save in Hugging Face format (safetensors) with the tokenizer, loadable by ``from_pretrained``."""
    write_model(Path(folder), model, tokenizer, dtype)
