"""The model-level guard: a repaired model is kept only where it is no worse than pruning alone.

The block guard (``--holdout-fraction``) judges each block by its own output error, but a block can
lower that and still make the model worse. So before the walk, the dense model's next-token
distribution on the guard windows (the calibration windows held out of block tuning) is recorded
compactly: per token the top-``k`` log-probabilities and their vocabulary ids, the rest of the mass
as one bucket. After the run the repaired model and the pruned-only model (the same masks, every
block as it was before tuning) are compared there by KL(dense || model) over that coarsened
distribution (a lower bound of the full KL) and by the cross-entropy of the windows' next tokens.

If the repair has the lower KL it stays. Otherwise, after a block-wise repair, blocks keep their
tuning only where that helps: from the pruned-only model, each block in order gets its tuned weights
back and keeps them only if the KL drops (the outcome is never worse than pruning alone on these
windows). After a whole-model stage the model falls back to its pruned-only weights. Each block's
untuned state is saved when it is compressed (in the run's work folder, so that a resumed run has
them) and is the only copy of the model the guard makes; evaluation runs block by block.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ebft.fsio import atomic_write
from ebft.models.blocks import move_non_block_modules
from ebft.models.blockwise import BlockRunner, StateFor
from ebft.walk import BlockWalk, Callback

logger = logging.getLogger(__name__)

#: How many of the dense model's most likely next tokens are kept per position.
TOP_K = 64

#: Windows whose full-vocabulary logits are held at once while the guard scores (one window of 256
#: tokens over a 49k vocabulary is 50 MB in float32, and its log-softmax as much again).
HEAD_BATCH = 1


@dataclass
class Reference:
    """The dense model's next-token distribution on the guard windows, kept compactly."""

    ids: torch.Tensor  # [n, seqlen] the guard windows
    top_ids: torch.Tensor  # [n, seqlen - 1, k] int64, the dense model's most likely next tokens
    top_logp: torch.Tensor  # [n, seqlen - 1, k] float32, their log-probabilities
    rest_logp: torch.Tensor  # [n, seqlen - 1] float32, log of the probability of every other token

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "top_ids": self.top_ids, "top_logp": self.top_logp, "rest_logp": self.rest_logp}


@dataclass
class Scores:
    kl: float  # mean KL(dense || model) per predicted token, over the top-k + rest coarsening
    cross_entropy: float  # mean negative log-likelihood of the windows' next tokens

    def to_dict(self) -> dict[str, float]:
        return {"kl": self.kl, "cross_entropy": self.cross_entropy}


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so that a mass of zero stays finite."""
    return torch.log(torch.clamp(-torch.expm1(torch.clamp(x, max=0.0)), min=1e-12))


def reference_from_logits(logits: torch.Tensor, ids: torch.Tensor, k: int = TOP_K) -> Reference:
    """The compact reference of ``logits`` [n, seqlen, vocab] for ``ids`` [n, seqlen]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    top_logp, top_ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return Reference(ids.cpu(), top_ids.cpu(), top_logp.cpu(), _log1mexp(torch.logsumexp(top_logp, -1)).cpu())


def kl_and_ce(logits: torch.Tensor, ref: Reference, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted token [b, seqlen - 1]: KL(dense || model) over ``ref``'s top-k + rest coarsening, and the
    negative log-likelihood of the next token, for ``logits`` [b, seqlen, vocab] of ``ref``'s windows ``rows``
    (differentiable: the distillation stage trains on it)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    device = logp.device
    ids = ref.ids[rows, 1:].to(device)
    top_ids, top_logp, rest_logp = (t[rows].to(device) for t in (ref.top_ids, ref.top_logp, ref.rest_logp))
    model_top = logp.gather(-1, top_ids)
    model_rest = _log1mexp(torch.logsumexp(model_top, -1))
    kl = (top_logp.exp() * (top_logp - model_top)).sum(-1) + rest_logp.exp() * (rest_logp - model_rest)
    ce = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return kl, ce


def score_sums(logits: torch.Tensor, ref: Reference, rows: slice) -> tuple[float, float, int]:
    """Summed KL and cross-entropy of ``logits`` [b, seqlen, vocab] against ``ref``'s windows ``rows``."""
    kl, ce = kl_and_ce(logits, ref, rows)
    return float(kl.double().sum()), float(ce.double().sum()), ce.numel()


def dense_reference(runner: BlockRunner, ids: torch.Tensor, k: int = TOP_K,
                    state_for: StateFor = lambda index: None) -> Reference:
    """The compact reference of the model ``runner`` runs (with ``state_for``'s blocks) on ``ids``, one
    window of logits at a time."""
    return reference_from_hidden(runner, ids, runner.run(runner.embed(ids), 0, len(runner.blocks), state_for), k)


def reference_from_hidden(runner: BlockRunner, ids: torch.Tensor, hidden: torch.Tensor, k: int = TOP_K) -> Reference:
    """The compact reference of the logits the head of ``runner``'s model gives for ``hidden`` (the last
    block's outputs on ``ids``), one window of logits at a time."""
    parts = [reference_from_logits(logits, ids[rows], k) for rows, logits in runner.logits(ids, hidden, HEAD_BATCH)]
    return Reference(**{name: torch.cat([getattr(p, name) for p in parts])
                        for name in ("ids", "top_ids", "top_logp", "rest_logp")})


def _scores(runner: BlockRunner, hidden: torch.Tensor, ref: Reference) -> Scores:
    """KL and cross-entropy of the logits the head gives for ``hidden`` (the last block's outputs)."""
    kl = ce = 0.0
    count = 0
    for rows, logits in runner.logits(ref.ids, hidden, HEAD_BATCH):
        k, c, n = score_sums(logits, ref, rows)
        kl, ce, count = kl + k, ce + c, count + n
    return Scores(kl / count, ce / count)


# ----------------------------------------------------------------------------- the guard


@dataclass
class GuardReport:
    """What the model-level guard measured and decided (``report.json``'s ``model_guard``)."""

    windows: int
    tokens: int
    top_k: int
    repaired: dict[str, float] = field(default_factory=dict)  # Scores of the model the run made
    pruned: dict[str, float] = field(default_factory=dict)  # Scores of the pruned-only model
    kept: dict[str, float] = field(default_factory=dict)  # Scores of the model the guard kept
    decision: str = ""
    tuned_blocks: list[int] = field(default_factory=list)  # blocks whose tuning was kept
    reverted_blocks: list[int] = field(default_factory=list)  # blocks given back their pruned-only weights
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class ModelGuard(Callback):
    """The walk's side of the guard: the dense reference at the start, each block's untuned state.

    It must come before the checkpoint's callback, so that it sees the dense model before a resumed
    run's finished blocks are loaded. ``folder`` keeps the reference and the untuned states (the run's
    work folder; default: a temporary folder, removed by :meth:`close`).
    """

    def __init__(self, folder: Path | None = None, top_k: int = TOP_K, dense_state: StateFor | None = None,
                 final_state: StateFor | None = None) -> None:
        """``dense_state`` / ``final_state``: where a streamed model's blocks are read from, dense (the
        checkpoint) and as the run left them; None: the blocks hold their weights."""
        self.dense_state = dense_state or (lambda index: None)
        self.final_state = final_state or (lambda index: None)
        self._tmp = None if folder is not None else tempfile.mkdtemp(prefix="ebft-guard-")
        self.folder = Path(folder) if folder is not None else Path(self._tmp)  # type: ignore[arg-type]
        self.top_k = top_k
        self.reference: Reference | None = None
        self.walk: BlockWalk | None = None
        self.stage_state: dict[str, torch.Tensor] | None = None

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _state_file(self, index: int) -> Path:
        return self.folder / f"untuned-{index:05d}.safetensors"

    def on_walk_start(self, walk: BlockWalk) -> None:
        self.walk = walk
        if not walk.is_main or walk.n_train >= walk.calib_ids.shape[0]:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "reference.safetensors"
        ids = walk.calib_ids[walk.n_train:]
        if path.is_file():
            self.reference = Reference(**load_file(str(path)))
            return
        start = time.perf_counter()
        self.reference = dense_reference(self._runner(walk.model), ids, self.top_k, self.dense_state)
        atomic_write(path, lambda tmp: save_file(self.reference.to_tensors(), str(tmp)))  # type: ignore[union-attr]
        logger.info("model guard: the dense model's top-%d next tokens on %d held-out windows recorded in %.1f s",
                    self.top_k, ids.shape[0], time.perf_counter() - start)

    def on_compressed(self, walk: BlockWalk, index: int) -> None:
        if self.reference is None:
            return
        kept_in = walk.current_store or torch.float32
        state = {k: v.detach().to("cpu", kept_in if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in walk.block.state_dict().items()}  # type: ignore[union-attr]
        atomic_write(self._state_file(index), lambda tmp: save_file(state, str(tmp)))

    def before_model_stage(self, model: nn.Module) -> None:
        """Keep the parts outside the blocks, which a whole-model stage may change, to fall back to."""
        if self.reference is None or self.walk is None:
            return
        block_params = {id(p) for p in self.walk.blocks.blocks.parameters()}
        self.stage_state = {name: p.detach().to("cpu").clone() for name, p in model.named_parameters()
                            if id(p) not in block_params}

    def check(self, model: nn.Module, whole_model: bool = False) -> GuardReport | None:
        """Compare the model as the run left it with its pruned-only weights; keep the better (see above).

        Returns what was measured and decided, or None when there were no held-out windows.
        """
        if self.reference is None or self.walk is None:
            return None
        start = time.perf_counter()
        walk, ref = self.walk, self.reference
        nblocks = len(walk.blocks)
        move_non_block_modules(model, walk.blocks, walk.device)
        try:
            runner = self._runner(model)
            untuned = self._untuned
            with self._stage_weights(model, use_pruned=False):
                repaired = _scores(runner, runner.run(runner.embed(ref.ids), 0, nblocks, self.final_state), ref)
            with self._stage_weights(model, use_pruned=True):
                pruned = _scores(runner, runner.run(runner.embed(ref.ids), 0, nblocks, untuned), ref)
            result = GuardReport(ref.ids.shape[0], ref.top_ids.shape[0] * ref.top_ids.shape[1], ref.top_ids.shape[-1],
                                 repaired.to_dict(), pruned.to_dict())
            if repaired.kl <= pruned.kl:
                result.decision = "kept the repair: it is closer to the dense model than pruning alone"
                result.tuned_blocks, kept = list(range(nblocks)), repaired
            elif whole_model:
                for index in range(nblocks):
                    self._revert(index)
                if self.stage_state is not None:
                    model.load_state_dict(self.stage_state, strict=False)
                result.decision = "fell back to the pruned weights: the whole-model stage made the model worse"
                result.reverted_blocks, kept = list(range(nblocks)), pruned
            else:
                tuned, kept = self._greedy(runner, ref, pruned)
                for index in range(nblocks):
                    if index not in tuned:
                        self._revert(index)
                result.tuned_blocks = tuned
                result.reverted_blocks = [i for i in range(nblocks) if i not in tuned]
                result.decision = ("kept the tuning of the blocks where it helps the model; the others went back to "
                                   "their pruned weights")
            result.kept = kept.to_dict()
        finally:
            move_non_block_modules(model, walk.blocks, "cpu")
        result.seconds = time.perf_counter() - start
        logger.info("model guard: KL to the dense model %.5g repaired, %.5g pruned only: %s (%.1f s)",
                    repaired.kl, pruned.kl, result.decision, result.seconds)
        return result

    def untuned_file(self, index: int) -> Path:
        """Block ``index``'s untuned state (what a reverted block's weights become)."""
        return self._state_file(index)

    def _untuned(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._state_file(index)))

    def _revert(self, index: int) -> None:
        """Block ``index`` gets its untuned weights back (a streamed model's block holds none: its saved
        output comes from :meth:`untuned_file` instead)."""
        block = self.walk.blocks.blocks[index]  # type: ignore[union-attr]
        if not any(p.is_meta for p in block.parameters()):
            block.load_state_dict(self._untuned(index))

    def _runner(self, model: nn.Module) -> BlockRunner:
        walk = self.walk
        return BlockRunner(model, walk.blocks, walk.device, walk.batch_size, block_kwargs=walk.block_kwargs)

    def _greedy(self, runner: BlockRunner, ref: Reference, pruned: Scores) -> tuple[list[int], Scores]:
        """From the pruned-only model, give each block in order its tuned weights back where that lowers the KL."""
        nblocks = len(runner.blocks)
        tuned: list[int] = []
        best = pruned
        hidden = runner.embed(ref.ids)  # entering block i under the choices made so far

        def decided(i: int) -> dict[str, torch.Tensor] | None:
            return self.final_state(i) if i in tuned else self._untuned(i)

        for index in range(nblocks):
            def state_for(i: int, _index: int = index) -> dict[str, torch.Tensor] | None:
                return self.final_state(i) if i == _index else decided(i)

            trial = _scores(runner, runner.run(hidden.clone(), index, nblocks, state_for), ref)
            if trial.kl < best.kl:
                tuned.append(index)
                best = trial
            runner.run(hidden, index, index + 1, decided)
        return tuned, best

    @contextlib.contextmanager
    def _stage_weights(self, model: nn.Module, use_pruned: bool) -> Iterator[None]:
        """Within the block, the non-block weights are the pruned-only ones (``use_pruned``) or the model's own."""
        saved = None
        if use_pruned and self.stage_state is not None:
            names = set(self.stage_state)
            saved = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
            model.load_state_dict(self.stage_state, strict=False)
        try:
            yield
        finally:
            if saved is not None:
                model.load_state_dict(saved, strict=False)


def kept_blocks_text(report: dict[str, Any]) -> Iterator[str]:
    """The console lines for a report's ``model_guard``."""
    repaired, pruned = report["repaired"], report["pruned"]
    yield (f"model guard: KL to the dense model {repaired['kl']:.4g} repaired vs {pruned['kl']:.4g} pruned only "
           f"(cross-entropy {repaired['cross_entropy']:.4f} vs {pruned['cross_entropy']:.4f}); {report['decision']}")
    if report["reverted_blocks"]:
        yield f"  blocks given back their pruned weights: {', '.join(map(str, report['reverted_blocks']))}"


__all__ = ["GuardReport", "ModelGuard", "Reference", "Scores", "dense_reference", "kl_and_ce", "reference_from_logits",
           "score_sums"]
