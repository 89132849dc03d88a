"""Typed, validated configuration: one dataclass per concern, each field a setting of the schema.

Every field is declared once, with its default and help, through :func:`ebft.settings.setting`; the
command-line flags, sweep keys, resume check and docs table come from these declarations. Each
pruner and fine-tuner keeps its own options (``PruneConfig.options``, ``FinetuneConfig.options``)
in a dataclass registered with it. Every ``__post_init__`` raises :class:`~ebft.errors.UsageError`
with a message that names the flag, so the CLI and library callers get the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebft.errors import UsageError
from ebft.registry import resolve_options
from ebft.settings import check_finite, options_field, section, setting

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``--block-targets``: what each block trains towards (see :class:`ebft.walk.BlockWalk`)
BLOCK_TARGETS = ("repaired", "dense")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Where the calibration activations live: RAM (none and cpu alike) or memory-mapped files (disk).
OFFLOADS = ("none", "cpu", "disk")
#: Whether the model is read block by block from its checkpoint (see ebft.models.streaming).
STREAMS = ("auto", "on", "off")
#: The dtype the pruned model is saved in (auto: the input's own).
SAVE_DTYPES = ("auto", "fp32", "bf16", "fp16")


def parse_nm(text: str | None) -> tuple[int, int] | None:
    """Parse ``"2:4"`` into ``(2, 4)``: at most N non-zero weights in every M consecutive inputs."""
    if text is None or text == "":
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--nm expects N:M with whole numbers, such as 2:4; got {text!r}")
    n, m = (int(p) for p in parts)
    if m < 2 or not 1 <= n < m:
        raise UsageError(f"--nm {text}: N must satisfy 1 <= N < M (for example 2:4 or 4:8)")
    return n, m


def _names(what: str) -> list[str]:
    """The registered names of ``what``, for help texts."""
    if what == "pruners":
        from ebft.pruners import PRUNERS

        return sorted(PRUNERS)
    if what == "finetuners":
        from ebft.finetune import FINETUNERS

        return sorted(FINETUNERS)
    if what == "presets":
        from ebft.presets import preset_names

        return preset_names()
    if what == "allocations":
        from ebft.allocation import ALLOCATIONS

        return list(ALLOCATIONS)
    if what == "sources":
        from ebft.data import source_choices

        return source_choices().split(", ")
    from ebft.structured import SCORES

    return list(SCORES)


def _calib_windows() -> tuple[str, ...]:
    from ebft.data.tokens import CALIB_WINDOWS

    return CALIB_WINDOWS


def _positive_int(value: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} must be a positive whole number; got {value!r}")


def check_combinations(given: Collection[str], pruner: str | None = None) -> None:
    """Refuse settings given together that exclude each other: the command line and sweep cells alike."""
    if pruner is not None and ("sparsity" in given or "nm" in given):
        from ebft.pruners import PRUNERS

        if pruner in PRUNERS and not PRUNERS[pruner].sets_sparsity:
            raise UsageError(f"--pruner {pruner} takes its masks from another model; drop --sparsity and --nm")
    if "structured" in given:
        if "sparsity" in given or "nm" in given:
            raise UsageError("--structured removes whole heads and channels; it does not combine with --sparsity "
                             "or --nm")
        if "pruner" in given:
            raise UsageError("--structured chooses heads and channels by --structured-score, not --pruner; "
                             "drop --pruner")
    elif "structured_score" in given:
        raise UsageError("--structured-score needs --structured RATIO")
    if "steps" in given and "epochs" in given:
        raise UsageError("--steps and --epochs exclude each other (--steps N takes N optimizer steps whatever the "
                         "number of windows); give one of them")
    if "sparsity" in given and "nm" in given:
        raise UsageError("--sparsity and --nm exclude each other (--nm N:M prunes 1 - N/M of the weights); "
                         "give one of them")


@dataclass
class PruneConfig:
    """Which weights to remove."""

    pruner: str = setting("wanda", help="pruning criterion", choices=lambda: _names("pruners"))
    sparsity: float = setting(0.5, help="fraction of each decoder-block linear layer's weights set to zero, in "
                                        "[0, 1)")
    nm: tuple[int, int] | None = setting(None, kind="nm", metavar="N:M", sweep=None,
                                         help="N:M semi-structured sparsity instead of --sparsity, e.g. 2:4 or 4:8 "
                                              "(a sweep writes it as sparsity: \"2:4\")")
    structured: float | None = setting(None, kind="float", metavar="RATIO",
                                       help="instead of --sparsity/--nm: remove this fraction of the blocks' linear "
                                            "parameters as whole attention heads and MLP channels, giving smaller "
                                            "matrices (e.g. 0.25)")
    structured_score: str = setting("fluctuation", choices=lambda: _names("structured scores"),
                                    help="--structured importance: fluctuation (FLAP: input variance x weight column "
                                         "norm) or magnitude (column norms alone)")
    allocation: str = setting("uniform", choices=lambda: _names("allocations"),
                              help="how --sparsity is shared out among the blocks: uniform (each at --sparsity) or owl "
                                   "(blocks with more outlier weights pruned less, the average kept; unstructured "
                                   "only)")
    options: Any = options_field()  # the pruner's own options (its registered dataclass)
    allocation_options: Any = options_field()  # the allocation's own options

    def __post_init__(self) -> None:
        from ebft.allocation import ALLOCATIONS
        from ebft.pruners import PRUNERS

        self.options = resolve_options(PRUNERS, "--pruner", self.pruner, self.options)
        self.allocation_options = resolve_options(ALLOCATIONS, "--allocation", self.allocation,
                                                  self.allocation_options)
        if isinstance(self.nm, str):
            self.nm = parse_nm(self.nm)
        elif isinstance(self.nm, list):
            self.nm = tuple(self.nm)  # type: ignore[assignment]
        if self.structured is not None:
            self._check_structured()
        elif self.nm is not None:
            n, m = self.nm
            if m < 2 or not 1 <= n < m:
                raise UsageError(f"--nm {n}:{m}: N must satisfy 1 <= N < M (for example 2:4 or 4:8)")
            self.sparsity = 1.0 - n / m
        elif not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise UsageError(f"--sparsity must be in [0, 1) (0.5 removes half the weights); got {self.sparsity!r}")
        if self.allocation != "uniform":
            self._check_allocation()

    def _check_allocation(self) -> None:
        from ebft.pruners import PRUNERS

        if self.structured is not None or self.nm is not None:
            what = "--structured" if self.structured is not None else f"--nm {self.nm[0]}:{self.nm[1]}"  # type: ignore[index]
            raise UsageError(f"--allocation {self.allocation} shares out unstructured --sparsity; {what} prunes every "
                             "block alike: drop --allocation or use --sparsity")
        if self.pruner in PRUNERS and not PRUNERS[self.pruner].sets_sparsity:
            raise UsageError(f"--allocation {self.allocation} needs a pruner that sets the sparsity, not --pruner "
                             f"{self.pruner}")
        check = getattr(self.allocation_options, "check_target", None)
        if check is not None:
            check(self.sparsity)

    def _check_structured(self) -> None:
        from ebft.structured import SCORES

        check_finite(self.structured, "--structured", "in [0, 1) (0.25 removes a quarter of the blocks' parameters)",
                     low=0.0, high=1.0)
        if self.nm is not None:
            raise UsageError("--structured removes whole heads and channels; it does not combine with --sparsity "
                             "or --nm")
        if self.structured_score not in SCORES:
            raise UsageError(f"--structured-score {self.structured_score!r} is unknown; choose one of: "
                             f"{', '.join(SCORES)}")
        self.sparsity = 0.0  # no unstructured sparsity inside the kept matrices

    @property
    def label(self) -> str:
        from ebft.pruners import PRUNERS

        if self.structured is not None:
            return f"structured {self.structured:.0%}"
        if not PRUNERS[self.pruner].sets_sparsity:
            return "given masks"
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.0%}"


@dataclass
class CalibConfig:
    """Where the calibration windows come from: a text source, or the dense model itself (``generated``)."""

    source: str = setting("c4", key="calib", metavar="SOURCE", choices=lambda: _names("sources"),
                          help="calibration source (see Data sources in the README)")
    nsamples: int = setting(256, help="calibration windows")
    seqlen: int = setting(1024, help="tokens per calibration window")
    seed: int = setting(0, help="seed for calibration sampling and training order")
    windows: str = setting("stream", key="calib_windows", choices=lambda: _calib_windows(),
                           help="how windows are drawn: stream (anywhere in the documents joined by EOS) or document "
                                "(each inside one document, the Wanda/SparseGPT protocol)")
    options: Any = options_field()  # the source's own options (--calib generated: ebft.data.generate.GeneratedOptions)

    def __post_init__(self) -> None:
        from ebft.data import SOURCES, parse_source

        name = parse_source(self.source).name
        self.options = resolve_options(SOURCES, "--calib", name, self.options)
        _positive_int(self.nsamples, "--nsamples")
        _positive_int(self.seqlen, "--seqlen")
        if self.seqlen < 2:
            raise UsageError("--seqlen must be at least 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative whole number; got {self.seed!r}")
        if self.windows not in _calib_windows():
            raise UsageError(f"--calib-windows {self.windows!r} is unknown; choose one of: "
                             f"{', '.join(_calib_windows())}")
        if self.from_model and self.windows != "stream":
            raise UsageError(f"--calib-windows {self.windows} cuts windows out of documents, and --calib {name} samples "
                             "them from the model; drop --calib-windows")

    @property
    def from_model(self) -> bool:
        """Whether the windows are sampled from the dense model (``--calib generated``) rather than read."""
        from ebft.data import SOURCES, parse_source

        return SOURCES[parse_source(self.source).name].from_model


@dataclass
class FinetuneConfig:
    """How the pruned model is repaired: block by block (ebft, dsnot, ...) or end to end (lora).

    The training settings here are common to the methods that train; ``options`` holds the chosen
    method's own ones (its registered dataclass: ``--lora-rank`` is ``LoraOptions.rank``).
    """

    preset: str | None = setting(None, kind="str", choices=lambda: _names("presets"),
                                 help="a named repair recipe that sets --finetune and its settings (flags given "
                                      "explicitly override it): paper (EBFT as published), best-block (the best "
                                      "found that holds one block at a time), best (the best found; whole model)")
    method: str = setting("ebft", key="finetune", choices=lambda: _names("finetuners"),
                          help="repair method: none (pruning alone), a block fine-tuner (ebft: the remaining weights; "
                               "ebft-mask: the mask; dsnot: training-free mask refinement) or a whole-model one (lora: "
                               "the baseline that fine-tunes the whole pruned model with LoRA, merges and re-masks it)")
    epochs: int = setting(10, training=True,
                          help="passes over the calibration windows per block (for a whole-model method: over all of "
                               "them)")
    lr: float = setting(2e-4, training=True, help="peak AdamW learning rate, decayed linearly to 0")
    batch_size: int = setting(8, training=True, help="calibration windows per optimizer step")
    betas: tuple[float, float] = setting((0.9, 0.95), kind="floats", training=True, metavar="B1,B2",
                                         help="AdamW betas")
    steps: int | None = setting(None, kind="int", training=True,
                                help="optimizer steps per block (for a whole-model method: in all), whatever the "
                                     "number of windows, instead of --epochs (the last pass stops part way)")
    warmup: float = setting(0.0, training=True,
                            help="fraction of the steps over which the learning rate rises linearly to --lr before "
                                 "its linear decay to 0, in [0, 1)")
    weight_decay: float = setting(0.0, training=True, help="AdamW weight decay")
    grad_clip: float = setting(1.0, training=True, help="gradient norm clip; 0 disables")
    precision: str = setting("auto", training=True, choices=lambda: PRECISIONS,
                             help="training precision (autocast over fp32 master weights)")
    block_window: int = setting(1, training=True,
                                help="consecutive blocks tuned together against the dense output of the last of them "
                                     "(1: block by block, as in the paper; more: more memory, see the README)")
    block_targets: str = setting("repaired", training=True, choices=lambda: BLOCK_TARGETS,
                                 help="what each block is trained towards: repaired (the dense block's output on the "
                                      "repaired model's activations, as in the paper) or dense (the dense model's own "
                                      "activations after that block, so a block also makes up for the error of those "
                                      "before it; one more activation buffer)")
    holdout_fraction: float = setting(0.125, training=True,
                                      help="calibration windows held out of block tuning; a block that tuning makes "
                                           "worse on them gets its untuned weights back (0 disables)")
    patience: int | None = setting(None, kind="int", training=True,
                                   help="stop a block's tuning after this many epochs without held-out improvement, "
                                        "keeping the best epoch (none: off)")
    model_guard: bool = setting(True, training=True,
                                help="judge the repaired model against the pruned-only one on the held-out windows "
                                     "(KL to the dense model) and keep the repair only where it helps "
                                     "(--no-model-guard: keep it all)")
    options: Any = options_field()  # the method's own options (its registered dataclass)

    def __post_init__(self) -> None:
        from ebft.finetune import FINETUNERS

        self.options = resolve_options(FINETUNERS, "--finetune", self.method, self.options)
        if self.preset is not None and self.preset not in _names("presets"):
            raise UsageError(f"--preset {self.preset!r} is unknown; choose one of: {', '.join(_names('presets'))}")
        _positive_int(self.epochs, "--epochs")
        _positive_int(self.batch_size, "--batch-size")
        check_finite(self.lr, "--lr", "a positive number", low=0.0, low_open=True)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise UsageError(f"--betas must be two numbers, each in [0, 1), such as 0.9,0.95; got {self.betas!r}")
        if self.steps is not None:
            _positive_int(self.steps, "--steps")
        check_finite(self.warmup, "--warmup", "in [0, 1) (0: no warm-up)", low=0.0, high=1.0)
        check_finite(self.weight_decay, "--weight-decay", ">= 0", low=0.0)
        check_finite(self.grad_clip, "--grad-clip", ">= 0 (0 disables clipping)", low=0.0)
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}")
        check_finite(self.holdout_fraction, "--holdout-fraction", "in [0, 1) (0 disables the held-out check)",
                     low=0.0, high=1.0)
        if self.patience is not None:
            _positive_int(self.patience, "--patience")
        _positive_int(self.block_window, "--block-window")
        method = FINETUNERS[self.method]
        trains_blocks = method is not None and method.takes_windows(self.options)
        if self.block_window > 1 and not trains_blocks:
            raise UsageError(f"--block-window {self.block_window} needs a method that tunes blocks by training "
                             f"(--finetune ebft or kd), not {self.method}; drop it or use --block-window 1")
        if self.block_targets not in BLOCK_TARGETS:
            raise UsageError(f"--block-targets {self.block_targets!r} is unknown; choose one of: "
                             f"{', '.join(BLOCK_TARGETS)}")
        if self.block_targets == "dense":
            if not trains_blocks:
                raise UsageError(f"--block-targets dense needs a method that tunes blocks by training (--finetune ebft "
                                 f"or kd), not {self.method}; drop it")
            if self.block_window > 1:
                raise UsageError("--block-targets dense tunes block by block; drop --block-window or use "
                                 "--block-targets repaired")
        if not isinstance(self.model_guard, bool):
            raise UsageError(f"--model-guard is on or off (true or false in a sweep); got {self.model_guard!r}")


@dataclass
class EvalConfig:
    """Perplexity evaluation after pruning."""

    sources: list[str] = setting(default_factory=list, key="eval", kind="names", repeat=True, sweep="fixed",
                                 compared=False, metavar="SOURCE",
                                 help="evaluate perplexity on SOURCE after pruning (repeatable), e.g. wikitext2")
    seqlen: int = setting(1024, key="eval_seqlen", sweep="fixed", compared=False, help="tokens per evaluation window")
    max_windows: int | None = setting(None, kind="int", sweep="fixed", compared=False,
                                      help="evaluate only the first N windows (none: all)")

    def __post_init__(self) -> None:
        from ebft.data import check_evaluation_source

        self.sources = list(self.sources)
        for source in self.sources:
            check_evaluation_source(source, "--eval")
        _positive_int(self.seqlen, "--eval-seqlen")
        if self.seqlen < 2:
            raise UsageError("--eval-seqlen must be at least 2")
        if self.max_windows is not None:
            _positive_int(self.max_windows, "--max-windows")


@dataclass
class RunConfig:
    """Everything ``ebft prune`` needs."""

    model: str = setting(help="the model: a hub id, a local folder, a .gguf file or an alias such as smollm2-135m",
                         flag="MODEL", cli=False, metavar="MODEL")
    out: Path | None = None
    prune: PruneConfig = section(PruneConfig)
    calib: CalibConfig = section(CalibConfig)
    finetune: FinetuneConfig = section(FinetuneConfig)
    eval: EvalConfig = section(EvalConfig)
    device: str = setting("auto", choices=lambda: DEVICES, help="compute device (auto: CUDA if present, else the CPU)")
    data_dir: Path | None = setting(None, kind="str", sweep="fixed", compared=False, metavar="DIR",
                                    help="local data mirror (wikitext2/, c4/, zeroshot/ like the project's shared "
                                         "data); default $EBFT_DATA_DIR, else the Hugging Face hub")
    eval_dense: bool = setting(False, sweep=None, compared=False, help="also evaluate the model before pruning")
    offload: str = setting("none", compared=False, choices=lambda: OFFLOADS,
                           help="calibration activations: none or cpu (in RAM) or disk (memory-mapped files in the "
                                "run's work folder, removed at the end)")
    stream: str = setting("auto", compared=False, choices=lambda: STREAMS,
                          help="read each decoder block from the checkpoint only when the walk reaches it and write it "
                               "out when it is done (a local safetensors folder; auto: when the model would take more "
                               "than 40% of the available memory)")
    save_dtype: str = setting("auto", choices=lambda: SAVE_DTYPES,
                              help="the dtype the pruned model is saved in (auto: the input model's; a GGUF file, "
                                   "dequantized, is float32)")

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r} is unknown; choose one of: {', '.join(DEVICES)}")
        if self.offload not in OFFLOADS:
            raise UsageError(f"--offload {self.offload!r} is unknown; choose one of: {', '.join(OFFLOADS)}")
        if self.stream not in STREAMS:
            raise UsageError(f"--stream {self.stream!r} is unknown; choose one of: {', '.join(STREAMS)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"--save-dtype {self.save_dtype!r} is unknown; choose one of: {', '.join(SAVE_DTYPES)}")
        if isinstance(self.data_dir, str):
            self.data_dir = Path(self.data_dir)
        if isinstance(self.out, str):
            self.out = Path(self.out)

    def to_dict(self) -> dict:
        """A JSON-ready copy (paths as strings, tuples as lists)."""
        return _asdict(self)


def _asdict(obj: Any) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _asdict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
