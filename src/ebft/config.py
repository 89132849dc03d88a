"""Typed, validated configuration: one dataclass per concern.

Every ``__post_init__`` raises :class:`~ebft.errors.UsageError` with a message that names
the CLI flag, so the CLI and library callers get the same one-line errors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from ebft.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: Where the calibration activations live: RAM (none and cpu alike) or memory-mapped files (disk).
OFFLOADS = ("none", "cpu", "disk")
#: Methods that fine-tune the whole pruned model after pruning, not block by block (see ebft.finetune.lora).
MODEL_FINETUNERS = frozenset({"lora"})
#: LoRA's default targets: every linear layer of a decoder block (attention and MLP).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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


def _positive_int(value: int, flag: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{flag} must be a positive whole number; got {value!r}")


@dataclass
class PruneConfig:
    """Which weights to remove."""

    pruner: str = field(default="wanda", metadata={"help": "pruning criterion: magnitude, wanda or sparsegpt"})
    sparsity: float = field(
        default=0.5, metadata={"help": "fraction of each block linear layer's weights set to zero, in [0, 1)"}
    )
    nm: tuple[int, int] | None = field(
        default=None, metadata={"help": "N:M semi-structured sparsity, e.g. (2, 4); overrides sparsity"}
    )
    structured: float | None = field(
        default=None,
        metadata={"help": "remove this fraction of the blocks' linear parameters as whole attention heads and MLP "
                          "channels, in [0, 1) (ebft.structured); replaces sparsity and the pruner"},
    )
    structured_score: str = field(
        default="fluctuation", metadata={"help": "structured importance: fluctuation (FLAP) or magnitude"}
    )
    percdamp: float | None = field(
        default=None,
        metadata={"help": "sparsegpt: Hessian dampening as a fraction of its mean diagonal (None: 0.01)"},
    )

    def __post_init__(self) -> None:
        from ebft.pruners import PRUNERS

        if self.pruner not in PRUNERS:
            raise UsageError(f"--pruner {self.pruner!r} is unknown; choose one of: {', '.join(sorted(PRUNERS))}")
        if isinstance(self.nm, str):
            self.nm = parse_nm(self.nm)
        if self.structured is not None:
            self._check_structured()
        elif self.nm is not None:
            n, m = self.nm
            if m < 2 or not 1 <= n < m:
                raise UsageError(f"--nm {n}:{m}: N must satisfy 1 <= N < M (for example 2:4 or 4:8)")
            self.sparsity = 1.0 - n / m
        elif not (isinstance(self.sparsity, (int, float)) and math.isfinite(self.sparsity) and 0.0 <= self.sparsity < 1.0):
            raise UsageError(f"--sparsity must be in [0, 1) (0.5 removes half the weights); got {self.sparsity!r}")
        if self.percdamp is not None:
            if self.pruner != "sparsegpt":
                raise UsageError(f"--percdamp applies only to --pruner sparsegpt, not {self.pruner}; drop it")
            if isinstance(self.percdamp, bool) or not (
                isinstance(self.percdamp, (int, float)) and math.isfinite(self.percdamp) and self.percdamp >= 0
            ):
                raise UsageError(f"--percdamp must be a number >= 0 (0.01 is typical); got {self.percdamp!r}")

    def pruner_options(self) -> dict[str, float]:
        """Keyword arguments for the pruner's constructor beyond sparsity and N:M."""
        return {} if self.percdamp is None else {"percdamp": float(self.percdamp)}

    def _check_structured(self) -> None:
        from ebft.structured import SCORES

        ratio = self.structured
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0.0 <= ratio < 1.0):
            raise UsageError(f"--structured must be in [0, 1) (0.25 removes a quarter of the blocks' parameters); "
                             f"got {ratio!r}")
        if self.nm is not None:
            raise UsageError("--structured removes whole heads and channels; it does not combine with --sparsity "
                             "or --nm")
        if self.structured_score not in SCORES:
            raise UsageError(f"--structured-score {self.structured_score!r} is unknown; choose one of: "
                             f"{', '.join(SCORES)}")
        self.sparsity = 0.0  # no unstructured sparsity inside the kept matrices

    @property
    def label(self) -> str:
        if self.structured is not None:
            return f"structured {self.structured:.0%}"
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.sparsity:.0%}"


@dataclass
class CalibConfig:
    """Where the calibration windows come from."""

    source: str = field(default="c4", metadata={"help": "data source, e.g. c4, wikitext2, text:PATH, jsonl:PATH"})
    nsamples: int = field(default=256, metadata={"help": "number of calibration windows"})
    seqlen: int = field(default=1024, metadata={"help": "tokens per calibration window"})
    seed: int = field(default=0, metadata={"help": "seed for window sampling and fine-tuning order"})

    def __post_init__(self) -> None:
        _positive_int(self.nsamples, "--nsamples")
        _positive_int(self.seqlen, "--seqlen")
        if self.seqlen < 2:
            raise UsageError("--seqlen must be at least 2")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UsageError(f"--seed must be a non-negative whole number; got {self.seed!r}")


@dataclass
class FinetuneConfig:
    """How the pruned model is repaired: block by block (ebft, dsnot, ...) or end to end (lora)."""

    method: str = field(
        default="ebft",
        metadata={"help": "none, ebft (weights), ebft-mask (mask tuning), dsnot (training-free mask refinement) or lora (whole-model baseline)"},
    )
    epochs: int = field(
        default=10, metadata={"help": "passes over the calibration windows per block (lora: over the whole set)"}
    )
    lr: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate (linearly decayed to 0)"})
    batch_size: int = field(default=8, metadata={"help": "calibration windows per optimizer step"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip; 0 disables"})
    precision: str = field(
        default="auto", metadata={"help": "training precision: auto, fp32, bf16 or fp16 (autocast, fp32 master weights)"}
    )
    holdout_fraction: float = field(
        default=0.125,
        metadata={"help": "fraction of the calibration windows held out of block tuning to judge it (0 disables)"},
    )
    patience: int | None = field(
        default=None, metadata={"help": "stop a block's tuning after this many epochs without held-out improvement"}
    )
    lora_rank: int = field(default=8, metadata={"help": "lora: rank of the adapters"})
    lora_alpha: float = field(default=16.0, metadata={"help": "lora: scaling numerator (the update is alpha/rank * BA)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "lora: dropout on the adapters' inputs, in [0, 1)"})
    lora_targets: tuple[str, ...] = field(
        default=LORA_TARGETS, metadata={"help": "lora: names of the decoder-block linear layers that get adapters"}
    )
    compile: bool = field(
        default=False,
        metadata={"help": "ebft: torch.compile each block's forward (and backward) while it trains"},
    )
    dsnot_cycles: int | None = field(
        default=None, metadata={"help": "dsnot: most prune-and-grow swaps per output row (None: 50)"}
    )
    dsnot_threshold: float | None = field(
        default=None,
        metadata={"help": "dsnot: a row stops once |its expected output error| falls below this (None: 0.1)"},
    )

    def __post_init__(self) -> None:
        from ebft.finetune import FINETUNERS

        if self.method not in FINETUNERS and self.method not in MODEL_FINETUNERS:
            known = ", ".join(sorted({*FINETUNERS, *MODEL_FINETUNERS}))
            raise UsageError(f"--finetune {self.method!r} is unknown; choose one of: {known}")
        _positive_int(self.epochs, "--epochs")
        _positive_int(self.batch_size, "--batch-size")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a positive number; got {self.lr!r}")
        b1, b2 = self.betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise UsageError(f"--betas must each lie in [0, 1); got {self.betas!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay must be >= 0; got {self.weight_decay!r}")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UsageError(f"--grad-clip must be >= 0 (0 disables clipping); got {self.grad_clip!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is unknown; choose one of: {', '.join(PRECISIONS)}")
        if isinstance(self.holdout_fraction, bool) or not (
            isinstance(self.holdout_fraction, (int, float)) and 0.0 <= self.holdout_fraction < 1.0
        ):
            raise UsageError(
                f"--holdout-fraction must be in [0, 1) (0 disables the held-out check); got {self.holdout_fraction!r}"
            )
        if self.patience is not None:
            _positive_int(self.patience, "--patience")
        _positive_int(self.lora_rank, "--lora-rank")
        if isinstance(self.lora_alpha, bool) or not (
            isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0
        ):
            raise UsageError(f"--lora-alpha must be a positive number; got {self.lora_alpha!r}")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            raise UsageError(f"--lora-dropout must be in [0, 1); got {self.lora_dropout!r}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = tuple(t.strip() for t in self.lora_targets.split(","))
        if isinstance(self.lora_targets, (list, tuple)):
            self.lora_targets = tuple(self.lora_targets)
        if not isinstance(self.lora_targets, tuple) or not self.lora_targets or not all(isinstance(t, str) and t.strip() and "," not in t for t in self.lora_targets):
            raise UsageError(
                f"--lora-targets expects comma-separated layer names such as q_proj,v_proj; got {self.lora_targets!r}"
            )
        if not isinstance(self.compile, bool):
            raise UsageError(f"compile must be true or false; got {self.compile!r}")
        if self.compile and self.method != "ebft":
            raise UsageError(f"--compile applies only to --finetune ebft, not {self.method}; drop it")
        for flag, value in (("--dsnot-cycles", self.dsnot_cycles), ("--dsnot-threshold", self.dsnot_threshold)):
            if value is not None and self.method != "dsnot":
                raise UsageError(f"{flag} applies only to --finetune dsnot, not {self.method}; drop it")
        if self.dsnot_cycles is not None:
            _positive_int(self.dsnot_cycles, "--dsnot-cycles")
        if self.dsnot_threshold is not None and (isinstance(self.dsnot_threshold, bool) or not (
            isinstance(self.dsnot_threshold, (int, float)) and math.isfinite(self.dsnot_threshold)
            and self.dsnot_threshold >= 0
        )):
            raise UsageError(f"--dsnot-threshold must be a number >= 0; got {self.dsnot_threshold!r}")


@dataclass
class EvalConfig:
    """Perplexity evaluation after pruning."""

    sources: list[str] = field(default_factory=list, metadata={"help": "data sources to evaluate on"})
    seqlen: int = field(default=1024, metadata={"help": "tokens per evaluation window"})
    max_windows: int | None = field(default=None, metadata={"help": "evaluate only the first N windows"})

    def __post_init__(self) -> None:
        _positive_int(self.seqlen, "--eval-seqlen")
        if self.seqlen < 2:
            raise UsageError("--eval-seqlen must be at least 2")
        if self.max_windows is not None:
            _positive_int(self.max_windows, "--max-windows")


@dataclass
class RunConfig:
    """Everything ``ebft prune`` needs."""

    model: str
    out: Path | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    device: str = "auto"
    data_dir: Path | None = None
    eval_dense: bool = False
    offload: str = field(default="none", metadata={"help": "calibration activations in RAM (none, cpu) or in "
                                                           "memory-mapped files in the run's work folder (disk)"})

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UsageError(f"--device {self.device!r} is unknown; choose one of: {', '.join(DEVICES)}")
        if self.offload not in OFFLOADS:
            raise UsageError(f"--offload {self.offload!r} is unknown; choose one of: {', '.join(OFFLOADS)}")

    def to_dict(self) -> dict:
        """A JSON-ready copy (paths as strings, tuples as lists)."""
        return _asdict(self)


def _asdict(obj) -> dict:
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
