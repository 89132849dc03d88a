"""Calibration windows sampled from the dense model itself (``--calib generated``).

Shin et al. (EMNLP 2024, arXiv 2406.15524) find that block-wise reconstruction can overfit its
calibration text, and that windows the dense model writes itself mitigate it; LLM-QAT (arXiv
2305.17888) calibrates without data the same way. Such windows need the model, so they are sampled
after it loads and before pruning (:func:`ebft.runner.run_prune`), not cut from the tokenizer's
output like the other sources.

Each window starts from the tokenizer's BOS token (without one: a token drawn uniformly among the
tokenizer's ordinary ids), and every further token is drawn from the model's next-token
distribution given the window so far, one forward of the new token per step with the KV cache:

* temperature: the probabilities are ``softmax(logits / temperature)``;
* top-p (nucleus): only the most likely tokens whose probabilities, in decreasing order, first
  reach ``top_p`` are kept (the one that crosses it included), renormalised; 1 keeps them all;
* the draw: the token in whose share of the cumulative distribution (ids in order) a uniform
  number falls (inverse CDF).

The uniform numbers are drawn up front, ``[nsamples, seqlen]`` from a CPU generator seeded by
``--seed``, one per token of each window, so a window depends on the seed and the model's
probabilities, not on the batch it was sampled in or on a device's random number generator. An EOS
token is kept like any other and sampling goes on after it; ids the tokenizer does not know (an
embedding padded beyond its vocabulary) are never drawn.

A run with ``--out`` keeps the windows in its work folder (:data:`CACHE_NAME`, with the settings
that produced them), so that ``--resume`` reads them back instead of sampling again.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ebft.data.sources import register_source
from ebft.errors import EbftError, UsageError
from ebft.fsio import atomic_write
from ebft.settings import check_finite, setting

logger = logging.getLogger(__name__)

#: The file in a run's work folder that holds its sampled windows (tensor ``ids``, metadata ``settings``).
CACHE_NAME = "calibration.safetensors"
_FORMAT = 1
#: A cached setting -> the flag that sets it, for the error that names the one that differs.
_FLAGS = {"format": "the file format", "model": "MODEL", "nsamples": "--nsamples", "seqlen": "--seqlen",
          "seed": "--seed", "temperature": "--gen-temperature", "top_p": "--gen-top-p"}


@dataclass
class GeneratedOptions:
    """``--calib generated``: how the dense model samples its own calibration windows."""

    temperature: float = setting(1.0, key="gen_temperature",
                                 help="sampling temperature, softmax(logits / T): 1 samples the model's own "
                                      "distribution, lower keeps to its likelier tokens")
    top_p: float = setting(1.0, key="gen_top_p",
                           help="nucleus sampling: draw only among the most likely tokens that together hold this "
                                "share of the probability, in (0, 1] (1: every token; 0.95 cuts the unlikely tail)")
    batch_size: int = setting(16, key="gen_batch_size", sweep="fixed", compared=False,
                              help="windows sampled together, each with its KV cache: speed and memory (a resumed run "
                                   "reads back the windows it sampled)")

    def __post_init__(self) -> None:
        check_finite(self.temperature, "--gen-temperature", "a positive number (1 samples the model's own "
                     "distribution)", low=0.0, low_open=True)
        check_finite(self.top_p, "--gen-top-p", "in (0, 1] (1 keeps every token)", low=0.0, low_open=True, high=1.0,
                     high_open=False)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise UsageError(f"--gen-batch-size must be a positive whole number; got {self.batch_size!r}")


@register_source("generated", uses_data_dir=False, from_model=True, options=GeneratedOptions)
def _no_documents(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """The windows are sampled from the model; there is no text to read."""
    raise EbftError("data source 'generated' has no documents: its windows are sampled from the dense model during "
                    "ebft prune (--calib generated); give a text source instead")


# ----------------------------------------------------------------------------- sampling (pure functions)


def temperature_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` over the last dimension, in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` [..., vocab] (rows summing to 1) cut to the nucleus: the most likely tokens whose probabilities, in
    decreasing order, first reach ``top_p`` (the token that crosses it included), renormalised; 0 elsewhere.
    ``top_p`` 1 returns ``probs`` as they are."""
    if top_p >= 1.0:
        return probs
    ordered, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    total = ordered.to(_cdf_dtype(probs)).cumsum(-1)
    before = torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)  # mass of the likelier tokens
    kept = ordered.masked_fill(before >= top_p, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, kept)
    return out / out.sum(-1, keepdim=True)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[b] ids: for each row of ``probs`` [b, vocab], the token in whose share of the cumulative distribution (ids in
    order) ``u`` [b] (uniform in [0, 1)) falls; a token of probability 0 is never drawn."""
    cdf = probs.to(_cdf_dtype(probs)).cumsum(-1)
    target = u.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    ids = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    empty = probs.gather(-1, ids[:, None])[:, 0] <= 0  # only when u * total rounds up to the total
    if bool(empty.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.int8).argmax(-1)
        ids = torch.where(empty, last, ids)
    return ids


def next_tokens(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """[b] ids drawn from ``logits`` [b, vocab] with temperature and top-p, by the uniform numbers ``u`` [b]."""
    return inverse_cdf(top_p_filter(temperature_probs(logits, temperature), top_p), u)


def _cdf_dtype(probs: torch.Tensor) -> torch.dtype:
    return torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64


def sampling_draws(nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen] uniform numbers in [0, 1) (float64, CPU generator seeded by ``seed``): column 0 draws the
    first token when the tokenizer has no BOS, column t the token at position t."""
    return torch.rand(nsamples, seqlen, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def start_tokens(tokenizer: Any, vocab: int, u: torch.Tensor) -> torch.Tensor:
    """[n] first tokens: the tokenizer's BOS, or without one a token drawn uniformly by ``u`` [n] among the ids below
    ``vocab`` that are not special tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab:
        return torch.full(u.shape, bos, dtype=torch.long)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    candidates = torch.tensor([i for i in range(vocab) if i not in special] or list(range(vocab)), dtype=torch.long)
    picks = (u * candidates.numel()).long().clamp_(max=candidates.numel() - 1)
    return candidates[picks]


# ----------------------------------------------------------------------------- the model


def sample_batch(model: nn.Module, prefix: torch.Tensor, u: torch.Tensor, vocab: int, temperature: float,
                 top_p: float) -> torch.Tensor:
    """[b, seqlen] windows: ``prefix`` [b, p] (or [b]: one first token) continued token by token (``u`` [b, seqlen]
    the uniform numbers, column t drawing the token at position t >= p), the prefix in one forward and each further
    step one forward of the new tokens with the KV cache, on the model's device; returned on the CPU."""
    device = model.get_input_embeddings().weight.device
    name = _cache_argument(model)
    prefix = prefix[:, None] if prefix.dim() == 1 else prefix
    seqlen, given = u.shape[1], prefix.shape[1]
    ids = torch.empty(prefix.shape[0], seqlen, dtype=torch.long, device=device)
    ids[:, :given] = prefix.to(device)
    cache = None  # the model makes it at the first step
    for t in range(given, seqlen):
        start = 0 if cache is None else t - 1
        out = model(input_ids=ids[:, start:t], use_cache=True, **{name: cache})
        cache = out[name]
        ids[:, t] = next_tokens(out.logits[:, -1, :vocab], u[:, t], temperature, top_p)
    return ids.cpu()


def _cache_argument(model: nn.Module) -> str:
    """The name of the KV cache in ``model``'s forward and output: ``cache`` in recent transformers, else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate_windows(model: nn.Module, tokenizer: Any, nsamples: int, seqlen: int, seed: int,
                     options: GeneratedOptions | None, device: torch.device | str) -> torch.Tensor:
    """[nsamples, seqlen] calibration windows sampled from ``model`` (see the module docstring) on ``device``, in
    batches of ``options.batch_size``; the model goes back to the CPU afterwards."""
    options = options if options is not None else GeneratedOptions()
    draws = sampling_draws(nsamples, seqlen, seed)
    vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    first = start_tokens(tokenizer, vocab, draws[:, 0])
    return continue_windows(model, first[:, None], draws, vocab, options, device, f"calibration (seed {seed})")


def continue_windows(model: nn.Module, prefix: torch.Tensor, draws: torch.Tensor, vocab: int,
                     options: GeneratedOptions, device: torch.device | str, what: str) -> torch.Tensor:
    """[n, seqlen] windows: each row of ``prefix`` [n, p] continued by ``model`` on ``device`` with the uniform numbers
    ``draws`` [n, seqlen] and ``options``' sampling, in batches of ``options.batch_size`` (logged as ``what``); the
    model goes back to the CPU afterwards."""
    from ebft.capture import calibration_context

    nsamples, seqlen = draws.shape
    windows = torch.empty(nsamples, seqlen, dtype=torch.long)
    start = time.perf_counter()
    model.to(device)
    try:
        with calibration_context(model):
            for first in range(0, nsamples, options.batch_size):
                rows = slice(first, min(first + options.batch_size, nsamples))
                windows[rows] = sample_batch(model, prefix[rows], draws[rows], vocab, options.temperature,
                                             options.top_p)
                logger.info("%s: sampled %d/%d windows of %d tokens from the model (%.1f s)", what, rows.stop,
                            nsamples, seqlen, time.perf_counter() - start)
    finally:
        model.to("cpu")
    logger.info("%s generated: %d windows of %d tokens in %.1f s (temperature %g, top-p %g)", what, nsamples, seqlen,
                time.perf_counter() - start, options.temperature, options.top_p)
    return windows


# ----------------------------------------------------------------------------- the cache in the run folder


def cache_settings(model: str, calib: Any) -> dict[str, Any]:
    """What the windows of ``calib`` (a :class:`ebft.config.CalibConfig` of ``--calib generated``) depend on, as the
    cache records and compares them."""
    options = calib.options if calib.options is not None else GeneratedOptions()
    return {"format": _FORMAT, "model": str(model), "nsamples": calib.nsamples, "seqlen": calib.seqlen,
            "seed": calib.seed, "temperature": float(options.temperature), "top_p": float(options.top_p)}


def write_cache(path: Path, ids: torch.Tensor, settings: dict[str, Any]) -> None:
    """Write the windows ``ids`` and their ``settings`` to ``path`` atomically (a temporary name, then a rename)."""
    from safetensors.torch import save_file

    tensors = {"ids": ids.detach().to("cpu", torch.int64).contiguous()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"settings": json.dumps(settings)}))


def read_cache(path: Path, settings: dict[str, Any], what: str = "calibration windows",
               flags: dict[str, str] | None = None) -> torch.Tensor:
    """The ``[settings["nsamples"], settings["seqlen"]]`` windows cached in ``path``; a one-line error if the file is
    unreadable or holds windows sampled with other ``settings`` (``what`` they are and ``flags``, the flag that sets
    each setting, word it)."""
    flags = _FLAGS if flags is None else flags
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("settings", "null"))
            ids = f.get_tensor("ids")
    except (OSError, ValueError, SafetensorError) as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EbftError(f"--resume: the sampled {what} in {path} are not readable ({detail}); pass --overwrite "
                        "to start over") from None
    stored = stored if isinstance(stored, dict) else {}
    for key, value in settings.items():
        if stored.get(key) != value:
            was = repr(stored[key]) if key in stored else "<unset>"
            raise UsageError(f"--resume: {path} holds {what} sampled with other settings ({flags.get(key, key)} "
                             f"was {was}, now {value!r}); pass --overwrite to start over")
    if tuple(ids.shape) != (settings["nsamples"], settings["seqlen"]) or ids.dtype != torch.int64:
        raise EbftError(f"--resume: {path} holds {list(ids.shape)} windows, not {settings['nsamples']} of "
                        f"{settings['seqlen']} tokens; pass --overwrite to start over")
    logger.info("%s: %d windows of %d tokens read back from %s (sampled when the run started)", what, ids.shape[0],
                ids.shape[1], path)
    return ids
