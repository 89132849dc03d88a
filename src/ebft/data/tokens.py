"""Turn data sources into token windows for calibration and perplexity evaluation.

Tokenization protocols:

* evaluation: the source's documents joined into one text (``"\\n\\n"`` for WikiText-2, pydoc
  and JSON Lines; C4 uses the SparseGPT/Wanda protocol ``" ".join(docs[:1100])`` and keeps at
  most ``256 * seqlen`` tokens), tokenized in one call *with* the tokenizer's default special
  tokens, as the standard perplexity scripts do (a Llama tokenizer adds one BOS at position 0,
  SmolLM2 adds nothing). Windows are non-overlapping; the last partial window is dropped.
* calibration: *no* special tokens, windows drawn with a seeded generator in one of two ways
  (:data:`CALIB_WINDOWS`):

  - ``stream`` (the default): window starts drawn uniformly over one token stream. Stream sources
    (C4, JSON Lines) tokenize each document alone and put the EOS token between documents, so a
    window may span documents; the others tokenize the joined text.
  - ``document`` (the Wanda / SparseGPT / llm-compressor protocol): each window lies inside one
    document, drawn uniformly among the documents of at least ``seqlen`` tokens, at a uniform start.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ebft.data.sources import SOURCES, Source, load_documents, parse_source
from ebft.errors import EbftError, UsageError

logger = logging.getLogger(__name__)

#: How calibration windows are drawn (``--calib-windows``): see the module docstring.
CALIB_WINDOWS = ("stream", "document")


def _encode(tokenizer: Any, texts: str | list[str], add_special_tokens: bool) -> Any:
    """``input_ids`` of ``texts``; long inputs are fine (no max-length warning)."""
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _check_positive(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive whole number; got {value!r}")


def calibration_stream(tokenizer: Any, spec: str, data_dir: str | Path | None = None) -> torch.Tensor:
    """The 1-D token stream that calibration windows are cut from (no special tokens)."""
    source: Source = SOURCES[parse_source(spec).name]
    documents = load_documents(spec, "calibration", data_dir)
    if not source.calibration_stream:
        return torch.tensor(_encode(tokenizer, source.joiner.join(documents), False), dtype=torch.long)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        logger.warning("tokenizer has no EOS token; calibration documents of %s are concatenated without one", spec)
    ids: list[int] = []
    for index, doc_ids in enumerate(_encode(tokenizer, documents, False)):
        if index and eos is not None:
            ids.append(int(eos))
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(
    tokenizer: Any,
    spec: str,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | Path | None = None,
    windows: str = "stream",
) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows at seeded uniform offsets of the calibration stream, or of
    single documents (``windows="document"``)."""
    _check_positive(nsamples, "--nsamples")
    _check_positive(seqlen, "--seqlen")
    if windows not in CALIB_WINDOWS:
        raise UsageError(f"--calib-windows {windows!r} is unknown; choose one of: {', '.join(CALIB_WINDOWS)}")
    if windows == "document":
        return _document_windows(tokenizer, spec, nsamples, seqlen, seed, data_dir)
    stream = calibration_stream(tokenizer, spec, data_dir)
    ntokens = int(stream.numel())
    if ntokens < seqlen:
        raise EbftError(
            f"calibration source {spec!r} has {ntokens} tokens, fewer than one window of --seqlen {seqlen}; "
            "use a longer text or a smaller --seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ntokens - seqlen + 1, (nsamples,), generator=generator)
    windows = stream[starts[:, None] + torch.arange(seqlen)[None, :]]
    logger.info(
        "calibration %s: %d tokens, %d windows of %d (seed %d)", spec, ntokens, nsamples, seqlen, seed
    )
    return windows


def _document_windows(tokenizer: Any, spec: str, nsamples: int, seqlen: int, seed: int,
                      data_dir: str | Path | None) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows, each inside one document of at least ``seqlen`` tokens."""
    documents = load_documents(spec, "calibration", data_dir)
    encoded = _encode(tokenizer, documents, False)
    long_enough = [torch.tensor(ids, dtype=torch.long) for ids in encoded if len(ids) >= seqlen]
    if not long_enough:
        longest = max((len(ids) for ids in encoded), default=0)
        raise EbftError(
            f"calibration source {spec!r} has no document of --seqlen {seqlen} tokens (the longest has {longest}); "
            "use a smaller --seqlen or --calib-windows stream"
        )
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(long_enough), (nsamples,), generator=generator)
    rows = []
    for pick in picks.tolist():
        doc = long_enough[pick]
        start = int(torch.randint(0, doc.numel() - seqlen + 1, (1,), generator=generator))
        rows.append(doc[start:start + seqlen])
    logger.info("calibration %s: %d of %d documents have %d tokens or more; %d windows, each inside one (seed %d)",
                spec, len(long_enough), len(encoded), seqlen, nsamples, seed)
    return torch.stack(rows)


def evaluation_stream(
    tokenizer: Any, spec: str, seqlen: int, data_dir: str | Path | None = None
) -> torch.Tensor:
    """The 1-D evaluation token stream, before it is cut into windows (protocol caps applied)."""
    source: Source = SOURCES[parse_source(spec).name]
    documents = load_documents(spec, "evaluation", data_dir)
    if source.evaluation_max_documents is not None:
        documents = documents[: source.evaluation_max_documents]
    ids = torch.tensor(_encode(tokenizer, source.joiner.join(documents), True), dtype=torch.long)
    if source.evaluation_max_windows is not None:
        ids = ids[: source.evaluation_max_windows * seqlen]
    return ids


def evaluation_tokens(
    tokenizer: Any,
    spec: str,
    seqlen: int,
    max_windows: int | None = None,
    data_dir: str | Path | None = None,
) -> torch.Tensor:
    """``[windows, seqlen]`` consecutive non-overlapping windows; the last partial one is dropped."""
    _check_positive(seqlen, "--eval-seqlen")
    if max_windows is not None:
        _check_positive(max_windows, "the maximum number of evaluation windows")
    stream = evaluation_stream(tokenizer, spec, seqlen, data_dir)
    ntokens = int(stream.numel())
    nwindows = ntokens // seqlen
    if nwindows == 0:
        raise EbftError(
            f"evaluation source {spec!r} has {ntokens} tokens, fewer than one window of {seqlen}; "
            "use a longer text or smaller evaluation windows (--eval-seqlen for prune, --seqlen for eval)"
        )
    if max_windows is not None:
        nwindows = min(nwindows, max_windows)
    windows = stream[: nwindows * seqlen].view(nwindows, seqlen)
    logger.info("evaluation %s: %d tokens, %d windows of %d", spec, ntokens, nwindows, seqlen)
    return windows
