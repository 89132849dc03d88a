"""Run decoder blocks on calibration activations: forward passes in batches, input recording, placement.

These are the few operations that the walk, the pruners, the fine-tuners and the structured
compressor share; they know nothing of pruning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ebft.models.adapter import DecoderBlocks

__all__ = ["BlockChain", "block_device", "call_block", "move_non_block_modules", "move_to", "record_inputs", "run_block"]


def block_device(block: nn.Module) -> torch.device:
    return next(block.parameters()).device


def call_block(block: nn.Module, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
    out = block(hidden, **block_kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockChain(nn.Module):
    """Consecutive decoder blocks run as one: each with its own keyword arguments (its attention mask,
    rotary embeddings, ...), so the chain is called with the hidden states alone. Its parameters are
    named ``"{position}.{name inside the block}"``."""

    def __init__(self, blocks: list[nn.Module], block_kwargs: list[dict[str, Any]]) -> None:
        super().__init__()
        for position, block in enumerate(blocks):
            self.add_module(str(position), block)
        self.block_kwargs = block_kwargs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block, kwargs in zip(self.children(), self.block_kwargs):
            hidden = call_block(block, hidden, kwargs)
        return hidden


@torch.no_grad()
def run_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict[str, Any],
    batch_size: int,
    out: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
) -> float | None:
    """Run ``block`` over all of ``inputs`` in batches, writing to ``out``.

    Returns the mean squared error against ``targets`` when given. Batches are independent and
    each batch is compared before it is written, so ``out`` may be ``inputs`` or ``targets``.
    """
    device = block_device(block)
    sq_sum = 0.0
    count = 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = call_block(block, x, block_kwargs).float()
        if targets is not None:
            t = targets[start : start + batch_size].to(device)
            sq_sum += float((y - t).double().pow(2).sum())
            count += y.numel()
        if out is not None:
            out[start : start + batch_size] = y.to(out.device, out.dtype)
    return sq_sum / count if targets is not None else None


def record_inputs(modules: Mapping[str, nn.Module],
                  sink: Callable[[str, torch.Tensor], None]) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``sink(name, x)`` gets every forward input ``x`` of ``modules[name]`` (detached).

    The activation statistics of pruners, DSnoT and structured pruning all come through here; the
    hooks are always removed on exit.
    """
    return _recording(modules, sink, outputs=False)


def record_outputs(modules: Mapping[str, nn.Module],
                   sink: Callable[[str, torch.Tensor], None]) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``sink(name, y)`` gets every forward output ``y`` of ``modules[name]`` (its first
    element for a block that returns a tuple), not detached: a loss on it trains the module."""
    return _recording(modules, sink, outputs=True)


@contextlib.contextmanager
def _recording(modules: Mapping[str, nn.Module], sink: Callable[[str, torch.Tensor], None],
               outputs: bool) -> Iterator[None]:
    handles = []
    for name, module in modules.items():
        if outputs:
            def out_hook(mod: nn.Module, args: tuple, out: Any, _name: str = name) -> None:
                sink(_name, out[0] if isinstance(out, (tuple, list)) else out)

            handles.append(module.register_forward_hook(out_hook))
        else:
            def in_hook(mod: nn.Module, args: tuple, _name: str = name) -> None:
                sink(_name, args[0].detach())

            handles.append(module.register_forward_pre_hook(in_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def move_to(value: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def move_non_block_modules(model: nn.Module, blocks: DecoderBlocks, device: torch.device | str) -> None:
    """Move everything except the decoder blocks (embeddings, rotary tables, norm, head)."""
    block_params = {id(p) for p in blocks.blocks.parameters()}
    block_buffers = {id(b) for b in blocks.blocks.buffers()}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in block_params and param.device != torch.device(device):
                param.data = param.data.to(device)
        for name, buf in module.named_buffers(recurse=False):
            if id(buf) not in block_buffers and buf.device != torch.device(device):
                module._buffers[name] = buf.to(device)
