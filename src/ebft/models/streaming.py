"""Streamed models: a decoder block's weights are read from the checkpoint only when the walk reaches it.

:func:`open_streamed` builds the model's skeleton with every parameter on the meta device (no memory;
buffers such as rotary tables are real), loads what lies outside the decoder blocks (embeddings, final
norm, head) and leaves each block empty. :class:`BlockStore` fills block ``i`` from the checkpoint's
safetensors files (``load``) and empties it again (``release``), so host memory holds the non-block
modules, the block in hand and the activation buffers, whatever the model's size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebft.errors import EbftError
from ebft.models.adapter import DecoderBlocks, find_blocks

logger = logging.getLogger(__name__)

__all__ = ["BlockStore", "CheckpointFiles", "open_streamed", "set_tensor"]


class CheckpointFiles:
    """The tensors of a Hugging Face safetensors checkpoint by name: one file, or shards with an index."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), "pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}
        else:
            raise EbftError(f"{folder} holds no safetensors weights (model.safetensors or an index); streaming "
                            "reads safetensors only")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, each file opened once and closed again: a mapped file's pages would
        otherwise stay in the process's resident memory for the rest of the run."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with safe_open(str(path), "pt") as f:
                for name in group:
                    out[name] = f.get_tensor(name).clone()
        return out

    def close(self) -> None:
        """Nothing stays open between reads."""


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Make parameter or buffer ``name`` of ``model`` the tensor ``value`` (no copy, no gradient)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


class BlockStore:
    """Fills and empties the decoder blocks of a streamed model from checkpoint files (``load``/``release``)."""

    def __init__(self, model: nn.Module, files: CheckpointFiles, dtype: torch.dtype | None) -> None:
        self.model = model
        self.blocks: DecoderBlocks = find_blocks(model)
        self.files = files
        self.dtype = dtype

    def names(self, index: int) -> list[str]:
        """The checkpoint names of block ``index``'s parameters."""
        prefix = self.blocks.block_name(index) + "."
        return [prefix + name for name, _ in self.blocks.blocks[index].named_parameters()]

    def checkpoint_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s weights as the checkpoint holds them (the dense ones), by name inside the block."""
        prefix = self.blocks.block_name(index) + "."
        read = self.files.get_many(self.names(index))
        return {name[len(prefix):]: value.to(self.dtype) if self.dtype is not None else value
                for name, value in read.items()}

    def is_loaded(self, index: int) -> bool:
        return all(not p.is_meta for p in self.blocks.blocks[index].parameters())

    def load(self, index: int, tensors: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        """Block ``index`` with its weights (from ``tensors`` by name inside the block, else the checkpoint)."""
        block = self.blocks.blocks[index]
        prefix = self.blocks.block_name(index) + "."
        names = self.names(index)
        if tensors is None:
            missing = [name for name in names if name not in self.files]
            if missing:
                raise EbftError(f"the checkpoint has no tensor {missing[0]!r}; it does not match the model's config")
            read = self.files.get_many(names)
            tensors = {name[len(prefix):]: value for name, value in read.items()}
        for name in names:
            local = name[len(prefix):]
            value = tensors[local]
            set_tensor(block, local, value.to(self.dtype) if self.dtype is not None else value)
        return block

    def release(self, index: int) -> None:
        """Give block ``index``'s memory back: its parameters become empty (meta) tensors of their shape."""
        block = self.blocks.blocks[index]
        for name, param in list(block.named_parameters()):
            set_tensor(block, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    @contextmanager
    def loaded(self, index: int, tensors: Mapping[str, torch.Tensor] | None = None) -> Iterator[nn.Module]:
        """Within the block, block ``index`` holds its weights; afterwards it is empty again."""
        try:
            yield self.load(index, tensors)
        finally:
            self.release(index)

    def close(self) -> None:
        self.files.close()


def open_streamed(folder: Path, config: Any, dtype: torch.dtype | None) -> tuple[nn.Module, BlockStore]:
    """The model of the safetensors folder ``folder`` with only its non-block weights in memory, and the
    store that fills its blocks. ``dtype`` (None: the checkpoint's own) is the dtype of every weight."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    files = CheckpointFiles(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    blocks = find_blocks(model)
    block_params = {id(p) for p in blocks.blocks.parameters()}
    loaded = 0
    wanted = [name for name, param in model.named_parameters(remove_duplicate=False)
              if id(param) not in block_params and name in files]  # a tied head is not in the files: tie_weights()
    for name, value in files.get_many(wanted).items():
        set_tensor(model, name, value.to(dtype) if dtype is not None else value)
        loaded += value.numel()
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and id(p) not in block_params]
    if missing:
        raise EbftError(f"the checkpoint in {folder} lacks {missing[0]!r}; it does not match its config")
    store = BlockStore(model, files, dtype)
    logger.info("streamed %s: %.1fM parameters outside the blocks loaded, %d blocks read when the walk reaches them",
                folder, loaded / 1e6, len(blocks))
    return model, store
