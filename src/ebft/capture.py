"""Capture what the decoder blocks receive: the first block's hidden states and every block's kwargs.

Every block's ``forward`` is temporarily replaced by a stub that records its inputs and passes the
hidden states through unchanged, so one cheap forward of the model yields the first block's inputs
and the keyword arguments each block is called with (attention mask, position ids, rotary
``position_embeddings``; models that alternate sliding and global attention give blocks different
ones). The last stub stops the forward, so the norm and the head never run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebft.models.adapter import DecoderBlocks

logger = logging.getLogger(__name__)

# kwargs that must not be replayed: caches belong to one forward, and we never want one.
_DROP_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


class _StopForward(Exception):
    """Raised inside the last block's stub to end the model's forward early."""


@contextlib.contextmanager
def calibration_context(model: nn.Module) -> Iterator[None]:
    """Eval mode, no autograd and no KV cache; restores the model's state afterwards."""
    was_training = model.training
    config = getattr(model, "config", None)
    old_use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        if config is not None:
            config.use_cache = old_use_cache
        model.train(was_training)


@contextlib.contextmanager
def _forwards_replaced(blocks: DecoderBlocks, forwards: list[Callable[..., Any]]) -> Iterator[None]:
    """Within, block ``i``'s forward is ``forwards[i]``; the blocks' own forwards always come back."""
    originals = [block.__dict__.get("forward") for block in blocks.blocks]
    for block, forward in zip(blocks.blocks, forwards):
        block.forward = forward
    try:
        yield
    finally:
        for block, original in zip(blocks.blocks, originals):
            if original is None:
                del block.forward
            else:
                block.forward = original


def _stubbed_blocks(blocks: DecoderBlocks, on_call) -> contextlib.AbstractContextManager:
    """Replace every block's forward with ``on_call(index, hidden_states, kwargs)``; always restores."""
    last = len(blocks) - 1

    def stub(*args: Any, _index: int, **kwargs: Any) -> torch.Tensor:
        if args:
            hidden, rest = args[0], args[1:]
            if rest:
                raise RuntimeError("decoder block called with extra positional arguments; unsupported model")
        else:
            hidden = kwargs.pop("hidden_states")
        on_call(_index, hidden, kwargs)
        if _index == last:
            raise _StopForward
        return hidden

    return _forwards_replaced(blocks, [functools.partial(stub, _index=i) for i in range(len(blocks))])


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in kwargs.items():
        if key in _DROP_KWARGS:
            out[key] = None
        elif key == "use_cache":
            out[key] = False
        else:
            out[key] = _to_cpu(value)
    return out


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu")
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def capture_block_kwargs(model: nn.Module, blocks: DecoderBlocks, input_ids: torch.Tensor) -> list[dict[str, Any]]:
    """Each block's keyword arguments for one window of ``input_ids`` ([1, seqlen]), on the CPU.

    They are recorded for a batch of one, so their tensors broadcast over any batch size.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape [1, seqlen], got {tuple(input_ids.shape)}")
    recorded: list[dict[str, Any] | None] = [None] * len(blocks)

    def on_call(index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        recorded[index] = _clean_kwargs(kwargs)

    device = _input_device(model)
    with calibration_context(model), _stubbed_blocks(blocks, on_call), contextlib.suppress(_StopForward):
        model(input_ids=input_ids.to(device), use_cache=False)
    missing = [i for i, r in enumerate(recorded) if r is None]
    if missing:
        raise RuntimeError(f"blocks {missing} were never called during capture; unsupported model layout")
    return recorded  # type: ignore[return-value]


def capture_first_block_inputs(
    model: nn.Module,
    blocks: DecoderBlocks,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hidden states entering block 0 for every calibration window: [nsamples, seqlen, hidden], CPU.

    ``alloc(shape, dtype)`` makes the buffer (default ``torch.empty``), e.g. :meth:`ActivationBuffers.new`.
    """
    nsamples, seqlen = input_ids.shape
    out: torch.Tensor | None = None
    alloc = alloc if alloc is not None else (lambda shape, dt: torch.empty(shape, dtype=dt))
    current: dict[str, torch.Tensor] = {}

    def on_call(index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        if index == 0:
            current["hidden"] = hidden
            raise _StopForward

    device = _input_device(model)
    with calibration_context(model), _stubbed_blocks(blocks, on_call):
        for start in range(0, nsamples, batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
            hidden = current.pop("hidden")
            if out is None:
                out = alloc((nsamples, seqlen, hidden.shape[-1]), dtype)
            out[start : start + batch.shape[0]] = hidden.to("cpu", dtype)
    assert out is not None
    return out


def head_logits(model: nn.Module, blocks: DecoderBlocks, input_ids: torch.Tensor, last_hidden: torch.Tensor
                ) -> torch.Tensor:
    """The model's logits for ``input_ids`` [b, seqlen], given what its last block returned for them.

    The model's own forward runs with every block replaced by a pass-through (block 0 hands on
    ``last_hidden``), so the final norm, the head and any logit processing are the architecture's
    own; the blocks themselves need not be on the device, so a model is evaluated block by block.
    """
    def stub(*args: Any, _first: bool = False, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs["hidden_states"]
        return last_hidden.to(hidden.device, hidden.dtype) if _first else hidden

    with _forwards_replaced(blocks, [functools.partial(stub, _first=i == 0) for i in range(len(blocks))]), \
            calibration_context(model):
        return model(input_ids=input_ids.to(_input_device(model)), use_cache=False).logits


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


class ActivationBuffers:
    """Makes the calibration activation buffers: in RAM, or (``folder``) in memory-mapped files.

    A file-backed buffer behaves like any CPU tensor; its pages belong to the page cache, which the
    kernel can write back and drop under memory pressure instead of holding them in the process's
    anonymous memory. :meth:`close` (or leaving the ``with`` block) unmaps and removes the files.
    """

    def __init__(self, folder: Path | None = None, prefix: str = "activations") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.prefix = prefix
        self.files: list[Path] = []
        self._tensors: list[torch.Tensor] = []

    def new(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised (RAM) or zero-filled (file) CPU tensor of ``shape``."""
        if self.folder is None:
            return torch.empty(shape, dtype=dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}-{len(self.files)}.bin"
        path.unlink(missing_ok=True)
        numel = math.prod(shape)
        self.files.append(path)
        tensor = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
        self._tensors.append(tensor)
        logger.debug("activation buffer %s: %s in %s", tuple(shape), dtype, path)
        return tensor

    def close(self) -> None:
        """Remove the files (the mappings stay valid until the last tensor using them is freed)."""
        self._tensors.clear()
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()
        if self.folder is not None:
            with contextlib.suppress(OSError):
                self.folder.rmdir()

    def __enter__(self) -> ActivationBuffers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
