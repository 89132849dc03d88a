"""Block walk, then a model-level distillation stage (``--finetune kd``).

The walk repairs each block as ``--kd-block`` says (``ebft``, the default, with the common training
settings; or ``none``). Then the whole model trains end to end against the dense model's next-token
distribution on the calibration windows:

- **the teacher** is recorded before any block is pruned (this class is also a walk callback): per
  token the dense model's top-``--kd-top-k`` log-probabilities and their ids, the rest of the mass as
  one bucket (:mod:`ebft.guard`'s compact reference), so it costs ``k`` numbers per token, not the
  vocabulary;
- **the loss** is KL(teacher || model) over that coarsening, plus ``--kd-ce-weight`` times the
  causal-LM loss, plus ``--kd-hidden-weight`` times the blocks' hidden-state loss (each block's output
  against the dense model's, recorded with the teacher: per token the squared error over the dense
  output's squared norm, averaged over tokens and blocks, a per-token form of SquareHead, Kurtic et al.
  2023, so that the few tokens with very large activations do not dominate it); AdamW over every
  decoder-block parameter (the embeddings and the head stay), with
  the learning rate ``--kd-lr`` over ``--kd-epochs`` passes (or ``--kd-steps`` steps) and the common
  warm-up, decay, clipping, batch size and precision. Gradients of pruned weights are zeroed and the
  masks re-applied after every step: a pruned weight is exactly 0.0 throughout;
- **windows the dense model writes** (``--kd-gen-windows N``, 0 by default): before pruning, the dense
  model continues ``--kd-gen-prefix`` consecutive tokens of training window j (mod their count, from an
  offset drawn under the seed) at temperature 1, for j < N; the teacher is recorded on these too and the
  stage trains on them beside the training windows, so that it has more than the calibration's few
  windows to match the dense model on (the held-out windows stay the calibration's own); a run with ``--out``
  keeps them in its work folder, so that ``--resume`` reads them back instead of sampling again;
- **activation checkpointing** (``--kd-checkpointing``, on) recomputes each block's activations in the
  backward pass, so that memory holds one block's activations at a time besides the model, its
  gradients and the optimizer's two moments;
- **never worse on the held-out windows:** the stage trains on the windows the blocks trained on; if
  it does not lower the KL on the held-out ones, the blocks get back the weights the walk gave them
  (kept in memory for that: one copy of the blocks' parameters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ebft.capture import ActivationBuffers
from ebft.errors import EbftError, UsageError
from ebft.finetune.base import BlockFinetuner, ModelFinetuner, ModelResult, register_finetuner
from ebft.finetune.ebft import EBFT, check_lr_search
from ebft.finetune.loop import planned_steps, train_steps
from ebft.finetune.lora import apply_masks
from ebft.guard import Reference, dense_reference, kl_and_ce, reference_from_hidden
from ebft.models.adapter import find_blocks
from ebft.models.blocks import record_outputs
from ebft.models.blockwise import BlockRunner
from ebft.precision import autocast_context, block_shapes, resolve_precision
from ebft.settings import check_finite, setting
from ebft.walk import BlockWalk, Callback, holdout_count

logger = logging.getLogger(__name__)


@dataclass
class KDOptions:
    """What only ``--finetune kd`` reads."""

    block: str = setting("ebft", choices=lambda: ("ebft", "none"),
                         help="the block fine-tuner of the walk before the stage: ebft (with the common training "
                              "settings) or none")
    block_lr_search: tuple[float, ...] = setting((), kind="floats", metavar="FACTORS",
                                                 help="--ebft-lr-search for the walk's ebft blocks")
    block_lr_trial_steps: int | None = setting(None, kind="int",
                                               help="--ebft-lr-trial-steps for the walk's ebft blocks")
    lr: float = setting(1e-5, help="peak AdamW learning rate of the model-level stage")
    epochs: int = setting(1, help="passes of the model-level stage over the training windows")
    steps: int | None = setting(None, kind="int", help="optimizer steps of the model-level stage instead of "
                                                       "--kd-epochs")
    top_k: int = setting(64, help="the dense model's most likely next tokens kept per position as the teacher")
    ce_weight: float = setting(0.0, help="weight of the causal-LM loss added to the KL (0: KL alone)")
    hidden_weight: float = setting(0.0, help="weight of the blocks' hidden-state loss added to the KL: each block's "
                                             "output against the dense model's, per token the squared error over "
                                             "the dense output's squared norm, averaged over tokens and blocks (0: "
                                             "off; more: the dense block outputs are kept in bf16, on disk with "
                                             "--offload disk)")
    checkpointing: bool = setting(True, help="recompute each block's activations in the backward pass (less "
                                             "memory, about a third more time)")
    gen_windows: int = setting(0, help="windows the dense model writes itself, before pruning, that the stage trains "
                                       "on beside the calibration's training windows (0: none): each continues a "
                                       "piece of a training window (--kd-gen-prefix tokens from a seeded offset), "
                                       "sampled at temperature 1; the held-out windows stay the calibration's")
    gen_prefix: int = setting(16, help="tokens of a training window each --kd-gen-windows window starts from, the "
                                       "rest sampled (1 to --seqlen - 1)")

    def __post_init__(self) -> None:
        if self.block not in ("ebft", "none"):
            raise UsageError(f"--kd-block {self.block!r} is unknown; choose one of: ebft, none")
        self.block_lr_search = check_lr_search(self.block_lr_search, self.block_lr_trial_steps, "--kd-block-")
        check_finite(self.lr, "--kd-lr", "a positive number", low=0.0, low_open=True)
        for value, flag in ((self.epochs, "--kd-epochs"), (self.top_k, "--kd-top-k"),
                            (self.gen_prefix, "--kd-gen-prefix")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} must be a positive whole number; got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise UsageError(f"--kd-steps must be a positive whole number; got {self.steps!r}")
        if isinstance(self.gen_windows, bool) or not isinstance(self.gen_windows, int) or self.gen_windows < 0:
            raise UsageError(f"--kd-gen-windows must be a whole number >= 0 (0: none); got {self.gen_windows!r}")
        check_finite(self.ce_weight, "--kd-ce-weight", ">= 0", low=0.0)
        check_finite(self.hidden_weight, "--kd-hidden-weight", ">= 0 (0: off)", low=0.0)
        if not isinstance(self.checkpointing, bool):
            raise UsageError(f"--kd-checkpointing is on or off; got {self.checkpointing!r}")


@register_finetuner("kd", options=KDOptions)
class KD(ModelFinetuner, Callback):
    """The walk's block tuner, then end-to-end distillation from the dense model (see the module docstring)."""

    changes_only_blocks = True  # the guard may judge the result block by block

    @classmethod
    def takes_windows(cls, options: Any) -> bool:
        return options.block == "ebft"  # the walk's EBFT tunes the windows

    @classmethod
    def check_calibration(cls, options: Any, nsamples: int, seqlen: int) -> None:
        if options is not None and options.gen_windows and options.gen_prefix >= seqlen:
            raise UsageError(f"--kd-gen-prefix {options.gen_prefix} leaves nothing to sample in windows of {seqlen} "
                             f"tokens; give at most {seqlen - 1}")

    def __init__(self, config: Any, seed: int = 0, **option_values: Any) -> None:
        super().__init__(config, seed, **option_values)
        self.teacher: Reference | None = None
        #: with --kd-hidden-weight: the dense model's block outputs, [blocks, windows, seqlen, hidden] bf16
        self.teacher_hidden: torch.Tensor | None = None
        self._buffers: ActivationBuffers | None = None

    def block_finetuner(self) -> BlockFinetuner | None:
        if self.options.block == "none":
            return None
        return EBFT(self.config, seed=self.seed, lr_search=self.options.block_lr_search,
                    lr_trial_steps=self.options.block_lr_trial_steps)

    def on_walk_start(self, walk: BlockWalk) -> None:
        """The dense model's compact next-token distribution on every calibration window (before any pruning)."""
        ids = walk.calib_ids
        if self.options.gen_windows:
            ids = torch.cat([ids, self._written(walk)])
        start = time.perf_counter()
        runner = BlockRunner(walk.model, walk.blocks, walk.device, walk.batch_size, block_kwargs=walk.block_kwargs)
        if not self.options.hidden_weight:
            self.teacher = dense_reference(runner, ids, self.options.top_k)
        else:  # block by block, keeping every block's outputs
            hidden = runner.embed(ids)
            self.close()
            self._buffers = ActivationBuffers(walk.offload_dir, prefix="kd-teacher")
            self.teacher_hidden = self._buffers.new((len(walk.blocks), *hidden.shape), torch.bfloat16)
            for index in range(len(walk.blocks)):
                self.teacher_hidden[index].copy_(runner.run(hidden, index, index + 1))
            self.teacher = reference_from_hidden(runner, ids, hidden, self.options.top_k)
            logger.info("kd: the dense model's block outputs kept for the hidden-state loss: %.0f MiB (bf16, %s)",
                        self.teacher_hidden.numel() * 2 / 2**20,
                        "in RAM" if walk.offload_dir is None else f"memory-mapped in {walk.offload_dir}")
        logger.info("kd: the dense model's top-%d next tokens on %d windows recorded in %.1f s", self.options.top_k,
                    ids.shape[0], time.perf_counter() - start)

    def _written(self, walk: BlockWalk) -> torch.Tensor:
        """The ``--kd-gen-windows`` windows: read back from the run's work folder when an earlier start of this run
        sampled them (``--resume``), else sampled now and kept there."""
        from ebft.data.generate import read_cache, write_cache

        settings = {"format": 1, "nsamples": self.options.gen_windows, "seqlen": walk.calib_ids.shape[1],
                    "prefix": self.options.gen_prefix, "seed": self.seed}
        path = self.work_folder / WRITTEN_NAME if self.work_folder is not None else None
        if path is not None and path.is_file():
            return read_cache(path, settings, "windows the dense model wrote for the distillation stage", _FLAGS)
        windows = self._generate(walk)
        if path is not None:
            write_cache(path, windows, settings)
            logger.info("kd: the written windows are kept in %s for --resume", path)
        return windows

    def _generate(self, walk: BlockWalk) -> torch.Tensor:
        """``--kd-gen-windows`` windows of the calibration's length, sampled from the dense model: window j continues
        ``--kd-gen-prefix`` tokens of training window j mod n_train from an offset drawn under the seed."""
        from ebft.data.generate import GeneratedOptions, continue_windows

        count, size = self.options.gen_windows, self.options.gen_prefix
        n_train, seqlen = walk.n_train, walk.calib_ids.shape[1]
        self.check_calibration(self.options, walk.calib_ids.shape[0], seqlen)
        generator = torch.Generator().manual_seed(self.seed + 7919)  # apart from the calibration's own draws
        offsets = torch.randint(0, seqlen - size + 1, (count,), generator=generator)
        rows = torch.arange(count) % n_train
        prefix = torch.stack([walk.calib_ids[r, o:o + size] for r, o in zip(rows.tolist(), offsets.tolist())])
        draws = torch.rand(count, seqlen, generator=generator, dtype=torch.float64)
        vocab = self.vocab or walk.model.get_input_embeddings().num_embeddings  # never a padded embedding row
        with autocast_context(walk.device, self.config.precision if self.config.precision != "auto" else "fp32"):
            return continue_windows(walk.model, prefix, draws, vocab, GeneratedOptions(batch_size=_gen_batch(
                walk.model.config, seqlen)), walk.device, "kd windows")

    def close(self) -> None:
        """Free the dense block outputs (and their files)."""
        self.teacher_hidden = None
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None

    def tune_model(self, model: nn.Module, calib_ids: torch.Tensor, masks: Mapping[str, torch.Tensor],
                   device: torch.device) -> tuple[nn.Module, ModelResult]:
        nsamples = calib_ids.shape[0]
        if self.teacher is None or not torch.equal(self.teacher.ids[:nsamples], calib_ids.cpu()):
            raise EbftError("kd: the teacher was not recorded on these windows before the walk")
        opts = self.options
        cfg = dataclasses.replace(self.config, lr=opts.lr, epochs=opts.epochs, steps=opts.steps)
        n_train = calib_ids.shape[0] - holdout_count(calib_ids.shape[0], cfg.holdout_fraction)
        blocks = find_blocks(model)
        params = dict(blocks.blocks.named_parameters())
        prefix = blocks.prefix + "."
        param_masks = {name[len(prefix):] + ".weight": mask for name, mask in masks.items()}
        unknown = set(param_masks) - set(params)
        if unknown:
            raise EbftError(f"kd: masks name layers the model does not have: {sorted(unknown)[:3]}")
        trainable = [p for p in params.values() if p.is_floating_point()]
        precision = resolve_precision(cfg.precision, device, block_shapes(blocks.blocks[0]),
                                      cfg.batch_size * calib_ids.shape[1])
        result = ModelResult("kd", "KL to the dense model",
                             details={"trainable_parameters": sum(p.numel() for p in trainable), "top_k": opts.top_k,
                                      "training_windows": n_train, "precision": precision,
                                      "generated_windows": self.teacher.ids.shape[0] - nsamples,
                                      "hidden_weight": opts.hidden_weight})
        if opts.hidden_weight and (self.teacher_hidden is None or self.teacher_hidden.shape[0] != len(blocks)):
            raise EbftError("kd: the dense model's block outputs were not recorded before the walk")
        # each block's latest output (a recomputation in the backward pass under activation checkpointing
        # overwrites it, after the loss has used it)
        outputs: dict[str, torch.Tensor] = {}
        recorded = {str(index): block for index, block in enumerate(blocks.blocks)} if opts.hidden_weight else {}
        start = time.perf_counter()
        model.requires_grad_(False)
        model.to(device)
        device_masks = {name: mask.to(device) for name, mask in param_masks.items()}
        train_rows = torch.cat([torch.arange(n_train), torch.arange(nsamples, self.teacher.ids.shape[0])])
        held_rows = torch.arange(n_train, nsamples)
        result.init_loss = self._kl(model, train_rows, device, cfg.batch_size)
        held_before = self._kl(model, held_rows, device, cfg.batch_size) if len(held_rows) else None
        saved = {name: p.detach().clone() for name, p in params.items()} if held_before is not None else None

        def step_loss(idx: torch.Tensor) -> tuple[torch.Tensor, int]:
            rows = train_rows[idx]
            ids = self.teacher.ids[rows].to(device)  # type: ignore[union-attr]
            with autocast_context(device, precision):
                logits = model(input_ids=ids, use_cache=False).logits
            kl, ce = kl_and_ce(logits, self.teacher, rows)  # type: ignore[arg-type]
            loss = kl.mean() + opts.ce_weight * ce.mean() if opts.ce_weight else kl.mean()
            if opts.hidden_weight:
                terms = [hidden_loss(outputs[str(index)], self.teacher_hidden[index, rows].to(device))  # type: ignore
                         for index in range(len(blocks))]
                loss = loss + opts.hidden_weight * torch.stack(terms).mean()
                outputs.clear()
            return loss, ids.numel()

        def mask_grads() -> None:
            for name, mask in device_masks.items():
                if params[name].grad is not None:
                    params[name].grad.mul_(mask)

        @torch.no_grad()
        def reapply_masks() -> None:
            for name, mask in device_masks.items():
                params[name].mul_(mask)

        n_fit = len(train_rows)  # the calibration's training windows, then any the dense model wrote
        epochs = planned_steps(cfg, n_fit)[2]
        for p in trainable:
            p.requires_grad_(True)
        try:
            with _training(model, opts.checkpointing), record_outputs(recorded, outputs.__setitem__):
                train_steps(trainable, cfg, device, precision, n_fit, self.seed, step_loss, result, desc="kd",
                            on_grads=mask_grads, after_step=reapply_masks, dist=self.dist,
                            on_epoch_end=lambda epoch, loss: _log_epoch(epoch, epochs, loss))
        finally:
            for p in trainable:
                p.requires_grad_(False)
            self.close()
        if result.restored is None and held_before is not None:
            held_after = self._kl(model, held_rows, device, cfg.batch_size)
            result.details.update(holdout_kl_before=held_before, holdout_kl_after=held_after)
            if not held_after < held_before:
                result.restored = f"the stage did not lower the held-out KL ({held_after:.4g} >= {held_before:.4g})"
        if result.restored is not None and saved is not None:
            logger.warning("kd: %s; the blocks keep the weights the walk gave them", result.restored)
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        apply_masks(model, masks, after="the distillation stage")
        result.final_loss = self._kl(model, train_rows, device, cfg.batch_size)
        model.to("cpu")
        result.seconds = time.perf_counter() - start
        logger.info("kd: KL to the dense model %.4g -> %.4g on the training windows in %.1f s", result.init_loss,
                    result.final_loss, result.seconds)
        if not math.isfinite(result.final_loss):
            raise EbftError("the distilled model gives a non-finite loss; try a lower --kd-lr")
        return model, result

    @torch.no_grad()
    def _kl(self, model: nn.Module, rows: torch.Tensor, device: torch.device, batch_size: int) -> float:
        """Mean KL to the teacher per predicted token on the windows ``rows`` (fp32, eval mode)."""
        total, count = 0.0, 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            logits = model(input_ids=self.teacher.ids[chunk].to(device), use_cache=False).logits  # type: ignore
            kl, _ = kl_and_ce(logits, self.teacher, chunk)  # type: ignore[arg-type]
            total, count = total + float(kl.double().sum()), count + kl.numel()
        return total / count


#: the file in a run's work folder that keeps the ``--kd-gen-windows`` windows for ``--resume``
WRITTEN_NAME = "kd-windows.safetensors"
#: a cached setting of those windows -> the flag that sets it
_FLAGS = {"format": "the file format", "nsamples": "--kd-gen-windows", "seqlen": "--seqlen",
          "prefix": "--kd-gen-prefix", "seed": "--seed"}

#: the KV cache the extra windows are sampled with may take about this much memory (bf16), in batches of at most 128
_GEN_CACHE_BYTES = 2**30


def _gen_batch(config: Any, seqlen: int) -> int:
    """Windows sampled together: as many as keep their KV cache (every layer's keys and values over ``seqlen``
    tokens, 2 bytes each) within :data:`_GEN_CACHE_BYTES`, between 1 and 128 (larger batches amortise each
    step's fixed costs)."""
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    per_window = 2 * config.num_hidden_layers * kv * head_dim * seqlen * 2
    return max(1, min(128, _GEN_CACHE_BYTES // per_window))


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per token ``|student - teacher|^2 / |teacher|^2`` over the hidden features, averaged over the tokens
    (fp32; ``[batch, seqlen, hidden]`` each)."""
    student, teacher = student.float(), teacher.float()
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)).mean()


@contextlib.contextmanager
def _training(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """Within the block, ``model`` is in training mode, with activation checkpointing per block if asked."""
    was_training = model.training
    if checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise EbftError(f"{type(model).__name__} does not support activation checkpointing; use --no-kd-checkpointing")
    # transformers 5 names them activation_checkpointing_*, earlier releases gradient_checkpointing_*
    new_names = hasattr(model, "activation_checkpointing_enable")
    disable = model.activation_checkpointing_disable if new_names else model.gradient_checkpointing_disable
    if checkpointing:
        if new_names:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(True)
    try:
        yield
    finally:
        model.train(was_training)
        if checkpointing:
            disable()


def _log_epoch(epoch: int, epochs: int, loss: float) -> bool:
    logger.info("kd epoch %d/%d: mean loss %.5g", epoch + 1, epochs, loss)
    return False
