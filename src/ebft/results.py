"""What a run reports, typed: per block (:class:`BlockReport`) and for the whole run (:class:`RunReport`).

``RunReport.to_dict()`` is what ``report.json`` holds; :meth:`RunReport.from_dict` reads it back (and
what older runs wrote), so the CLI, ``ebft report`` and the sweep read attributes, not string keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BlockReport:
    """One block of the walk. Losses are the MSE to the dense block's outputs on all calibration windows."""

    index: int
    init_loss: float  # the compressed, untuned block
    final_loss: float  # after tuning (equal to init_loss without it)
    seconds: float  # wall time of the whole block: targets, compression, tuning, propagation
    train_seconds: float = 0.0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    restored: str | None = None  # why the untuned weights came back, if they did
    holdout_init_loss: float | None = None  # init_loss on the held-out windows only (None: no held-out windows)
    holdout_final_loss: float | None = None  # final_loss on the held-out windows only
    holdout_epoch_losses: list[float] = field(default_factory=list)  # after each epoch, with --patience
    best_epoch: int | None = None  # with --patience: the epoch whose weights were kept (0: none beat the untuned block)
    compression: dict[str, Any] = field(default_factory=dict)  # what the compressor chose (structured: kept heads)
    lr: float | None = None  # the learning rate the tuner chose for the block (--ebft-lr-search)
    lr_trials: dict[str, float | None] = field(default_factory=dict)  # tried lr -> held-out loss after its trial
    window: list[int] | None = None  # [first, last] of the blocks tuned together with it (--block-window), if any

    @property
    def improved(self) -> bool:
        return self.final_loss < self.init_loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockReport:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        legacy = {k: data[k] for k in ("kept_heads", "kept_kv_heads") if k in data}  # before "compression"
        if legacy and not values.get("compression"):
            values["compression"] = legacy
        return cls(**values)


#: RunReport fields that ``to_dict`` leaves out while they are None, as report.json always has.
_OPTIONAL = ("eval_dense", "resumed", "structured", "model_stage", "precision_choice", "model_guard", "allocation")


@dataclass
class RunReport:
    """Everything ``ebft prune`` writes to ``report.json``."""

    ebft_version: str
    config: dict[str, Any]  # RunConfig.to_dict()
    model: dict[str, Any]  # source, resolved, class, parameters, blocks
    device: str
    precision: str | None  # the resolved training precision (None: nothing was trained)
    host: dict[str, Any]
    precision_choice: dict[str, Any] | None = None  # how --precision was resolved (auto: the measured rates)
    blocks: list[BlockReport] = field(default_factory=list)
    sparsity: dict[str, Any] = field(default_factory=dict)  # overall, per_layer, weights_zero
    eval: dict[str, float] = field(default_factory=dict)  # source -> perplexity
    eval_details: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> perplexity, tokens, windows
    timings: dict[str, float] = field(default_factory=dict)
    saved_bytes: int | None = None  # the saved model's safetensors files
    eval_dense: dict[str, float] | None = None  # with --eval-dense
    resumed: list[int] | None = None  # finished blocks at each resume
    structured: dict[str, Any] | None = None  # the structured plan and its parameter counts
    model_stage: dict[str, Any] | None = None  # a whole-model fine-tuner's ModelResult
    model_guard: dict[str, Any] | None = None  # what the model-level guard measured and decided
    allocation: dict[str, Any] | None = None  # --allocation other than uniform: each block's sparsity and why

    @property
    def method(self) -> str:
        return self.config["finetune"]["method"]

    @property
    def improved_blocks(self) -> int:
        return sum(b.improved for b in self.blocks)

    @property
    def restored_blocks(self) -> list[int]:
        return [b.index for b in self.blocks if b.restored]

    def block_dicts(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.blocks]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _OPTIONAL and value is None:
                continue
            out[f.name] = [b.to_dict() for b in value] if f.name == "blocks" else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["blocks"] = [BlockReport.from_dict(b) for b in data.get("blocks", [])]
        if "lora" in data and "model_stage" not in data:  # written before whole-model stages were general
            values["model_stage"] = {"method": "lora", "loss": "causal-LM loss", **data["lora"]}
        for name in ("ebft_version", "device", "precision"):
            values.setdefault(name, None)
        values.setdefault("config", {})
        values.setdefault("model", {})
        values.setdefault("host", {})
        return cls(**values)
