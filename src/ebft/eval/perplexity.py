"""Perplexity by the standard protocol: the split joined and tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens, each window scored independently.

Perplexity = exp(total negative log-likelihood / number of predicted tokens), where every window
predicts its tokens 2..seqlen from the ones before them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.capture import calibration_context
from ebft.errors import EbftError

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {"perplexity": self.perplexity, "tokens": self.tokens, "windows": self.windows}


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,  # [nwindows, seqlen] token ids
    batch_size: int = 1,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``model`` over ``windows``; the model stays where it is unless ``device`` is given."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise EbftError("nothing to evaluate: need at least one window of two or more tokens")
    if device is not None:
        model.to(device)
    device = model.get_input_embeddings().weight.device
    start = time.perf_counter()
    nll_sum = 0.0
    count = 0
    with calibration_context(model):
        for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, leave=False, disable=None):
            ids = windows[i : i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # logits [b, seqlen, vocab] predict ids shifted by one
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"
            )
            nll_sum += float(loss)
            count += ids[:, 1:].numel()
    if not math.isfinite(nll_sum):
        raise EbftError("the model produced non-finite log-likelihoods; its weights are broken (NaN/inf)")
    mean_nll = nll_sum / count
    seconds = time.perf_counter() - start
    result = PerplexityResult(math.exp(mean_nll), mean_nll, count, windows.shape[0], seconds)
    logger.info("%s: %.3f over %d tokens (%d windows) in %.1f s", desc, result.perplexity, count, result.windows, seconds)
    return result
