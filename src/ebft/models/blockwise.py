"""Run a whole model block by block: each decoder block on the device only while it runs.

The model's own forward makes the first block's inputs (:func:`ebft.capture.capture_first_block_inputs`)
and turns the last block's outputs into logits (:func:`ebft.capture.head_logits`), so nothing about
the architecture is assumed; in between, the blocks run one at a time, each in its own dtype (the hidden
states between them are kept in float32, which holds a bf16 or fp16 block's outputs exactly), so the
result is the model's own forward pass. A block may also run with
another state than the one it holds (``state_for``): a copy runs, and the model is not changed. A
streamed model, whose blocks hold no weights, runs this way with every block's state read from disk.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ebft.capture import calibration_context, capture_block_kwargs, capture_first_block_inputs, head_logits
from ebft.models.adapter import DecoderBlocks
from ebft.models.blocks import call_block, move_to

__all__ = ["BlockRunner", "Observe", "StateFor"]

#: ``state_for(index)``: the state block ``index`` runs with, or None for the one it holds.
StateFor = Callable[[int], "dict[str, torch.Tensor] | None"]

#: ``observe(index, block)``: a context manager around block ``index``'s pass over every window (the
#: block that runs, holding its weights: hooks on it see its inputs).
Observe = Callable[[int, nn.Module], contextlib.AbstractContextManager]


def _own(index: int) -> None:
    return None


class BlockRunner:
    """Block-by-block forward passes of ``model`` over token windows of one length."""

    def __init__(self, model: nn.Module, blocks: DecoderBlocks, device: torch.device, batch_size: int = 8,
                 block_kwargs: list[dict[str, Any]] | None = None, example_ids: torch.Tensor | None = None) -> None:
        """``block_kwargs`` (as the walk captured them) or ``example_ids`` ([1, seqlen], to capture them)."""
        self.model, self.blocks, self.device, self.batch_size = model, blocks, device, batch_size
        if block_kwargs is None:
            assert example_ids is not None, "give block_kwargs or example_ids"
            block_kwargs = capture_block_kwargs(model, blocks, example_ids[:1])
        self.kwargs = block_kwargs

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden states entering block 0 for ``ids`` [n, seqlen]: [n, seqlen, hidden] float32 on the CPU."""
        return capture_first_block_inputs(self.model, self.blocks, ids, batch_size=self.batch_size)

    def run(self, hidden: torch.Tensor, first: int, last: int, state_for: StateFor = _own,
            observe: Observe | None = None) -> torch.Tensor:
        """``hidden`` (entering block ``first``, changed in place) after blocks ``first`` .. ``last - 1``."""
        with calibration_context(self.model):
            for index in range(first, last):
                with (self._block(index, state_for(index)) as block,
                      observe(index, block) if observe is not None else contextlib.nullcontext()):
                    dtype = next(block.parameters()).dtype
                    kwargs = move_to(self.kwargs[index], self.device)
                    for start in range(0, hidden.shape[0], self.batch_size):
                        x = hidden[start:start + self.batch_size].to(self.device, dtype)
                        hidden[start:start + self.batch_size] = call_block(block, x, kwargs).to("cpu", hidden.dtype)
        return hidden

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor,
               batch_size: int | None = None) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, logits)`` per batch of the windows ``ids``, from the last block's outputs ``hidden``.

        ``batch_size``: windows per batch (default: the runner's); the logits of a batch are
        [batch, seqlen, vocab] float, the largest tensor of the run when the vocabulary is large.
        """
        step = batch_size or self.batch_size
        with torch.no_grad():
            for start in range(0, ids.shape[0], step):
                rows = slice(start, start + step)
                yield rows, head_logits(self.model, self.blocks, ids[rows], hidden[rows].to(self.device))

    def nll(self, ids: torch.Tensor, state_for: StateFor = _own) -> tuple[float, int]:
        """Summed negative log-likelihood of ``ids``'s next tokens, and their count."""
        hidden = self.run(self.embed(ids), 0, len(self.blocks), state_for)
        total, count = 0.0, 0
        for rows, logits in self.logits(ids, hidden):
            target = ids[rows, 1:].to(logits.device)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               target.reshape(-1), reduction="sum")
            total, count = total + float(loss), count + target.numel()
        return total, count

    def perplexity(self, ids: torch.Tensor, state_for: StateFor = _own) -> float:
        total, count = self.nll(ids, state_for)
        return math.exp(total / count)

    @contextlib.contextmanager
    def _block(self, index: int, state: dict[str, torch.Tensor] | None) -> Iterator[nn.Module]:
        """Block ``index`` on the device: the model's own, or (with ``state``) a copy holding that state."""
        block = self.blocks.blocks[index]
        if state is not None:  # the model's block stays as it is
            work = copy.deepcopy(block)
            work.load_state_dict(state, assign=True)
            del state
            try:
                yield work.to(self.device)
            finally:
                del work
            return
        home = next(block.parameters()).device
        try:
            yield block.to(self.device)
        finally:
            block.to(home)
