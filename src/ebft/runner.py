"""``ebft prune`` as a library call: validate, load, calibrate, prune + repair, evaluate, save."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import ebft
from ebft.allocation import Allocated, make_allocation
from ebft.card import model_card
from ebft.checkpoint import (
    Checkpoint,
    CheckpointCallback,
    check_resumable,
    fingerprint,
    plan_run,
    publish_staged,
    read_report,
    work_dir,
)
from ebft.config import PRECISIONS, FinetuneConfig, RunConfig
from ebft.data import calibration_windows, evaluation_tokens, generate_windows, load_documents, parse_source
from ebft.data.generate import CACHE_NAME, cache_settings, read_cache, write_cache
from ebft.errors import EbftError, UsageError
from ebft.eval import perplexity
from ebft.export import DTYPES, write_model
from ebft.finetune import FINETUNERS, BlockFinetuner, ModelFinetuner, make_finetuner
from ebft.fsio import existing_ancestor, write_text
from ebft.guard import ModelGuard
from ebft.models import SUPPORTED_MODEL_TYPES, find_blocks, load_model, load_tokenizer
from ebft.models.blocks import move_non_block_modules
from ebft.models.blockwise import BlockRunner
from ebft.models.loading import load_config, resolve_model
from ebft.precision import PrecisionChoice, resolve_for_block
from ebft.pruners import PRUNERS
from ebft.results import RunReport
from ebft.sparsity import describe_pattern, mask_stats, weight_sparsity
from ebft.walk import BlockWalk, Callback, check_nm_divisible, holdout_count, make_compressor

if TYPE_CHECKING:
    from ebft.distributed import DistContext

logger = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EbftError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise EbftError("--device mps was asked for but it is not available; use --device cpu")
    return torch.device(device)


@dataclass
class Checked:
    """What the checks before the weights load found: what ``--out`` allows, and the data, tokenized."""

    plan: str | None  # see ebft.checkpoint.plan_run; None without --out
    streamed: bool = False  # the blocks are read from the checkpoint as the walk reaches them
    calib: torch.Tensor | None = None  # [nsamples, seqlen] calibration windows; None: sampled once the model loads
    eval_windows: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> [windows, seqlen]
    tokenizer: Any = None
    seconds: float = 0.0


def preflight(cfg: RunConfig, overwrite: bool = False, resume: bool = False, processes: int = 1,
              tokenizer: Any = None, windows: bool = True) -> Checked:
    """Every check that needs only the config, the tokenizer and the data, before any weight loads.

    :func:`validate_inputs`, then (with ``windows``) the tokenizer (``tokenizer``, or the model's own,
    loaded alone) cuts the calibration windows and every evaluation source's windows: a text shorter
    than a window fails here, in seconds, not after minutes of loading. A resumed run's calibration
    windows must be those it started with. Windows sampled from the model (``--calib generated``) are
    read back from a resumed run's folder; otherwise they wait for the model (``Checked.calib`` None).
    """
    start = time.perf_counter()
    validated = validate_inputs(cfg, overwrite, resume, processes, read_data=not windows)
    plan, streamed = validated.plan, validated.streamed
    if plan in ("finished", "publish") or not windows:
        return Checked(plan, streamed, seconds=time.perf_counter() - start)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if not cfg.calib.from_model:
        calib = calibration_windows(tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed,
                                    data_dir=cfg.data_dir, windows=cfg.calib.windows)
    else:
        calib = _cached_windows(cfg) if plan == "resume" else None
    eval_windows = {source: evaluation_tokens(tokenizer, source, cfg.eval.seqlen, cfg.eval.max_windows,
                                              data_dir=cfg.data_dir) for source in cfg.eval.sources}
    if plan == "resume" and calib is not None:
        check_resumable(Path(cfg.out), fingerprint(calib))  # type: ignore[arg-type]
    return Checked(plan, streamed, calib, eval_windows, tokenizer, time.perf_counter() - start)


def _cached_windows(cfg: RunConfig) -> torch.Tensor | None:
    """The windows an unfinished ``--calib generated`` run sampled, from its work folder (None if it has none)."""
    path = work_dir(Path(cfg.out)) / CACHE_NAME  # type: ignore[arg-type]
    return read_cache(path, cache_settings(cfg.model, cfg.calib)) if path.is_file() else None


def sample_calibration(cfg: RunConfig, model: nn.Module, tokenizer: Any, device: torch.device,
                       dist: DistContext | None = None) -> torch.Tensor:
    """``--calib generated``: the windows sampled from the dense ``model`` on ``device``; under torchrun every process
    samples and takes rank 0's (the same on the CPU; a GPU may round differently)."""
    calib = generate_windows(model, tokenizer, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed,
                             cfg.calib.options, device)
    if dist is not None:
        picked = calib.to(dist.device)
        dist.broadcast_([picked])
        calib = picked.cpu()
    return calib


@dataclass
class Validated:
    """What :func:`validate_inputs` found: what ``--out`` allows, and whether the model streams."""

    plan: str | None
    streamed: bool = False


def validate_inputs(cfg: RunConfig, overwrite: bool = False, resume: bool = False, processes: int = 1,
                    read_data: bool = True) -> Validated:
    """Every check that needs no model weights and no tokenizer: output folder, flags, data sources
    (read, with ``read_data``), model config, streaming, disk space.

    ``plan`` is what ``--out`` allows (see :func:`ebft.checkpoint.plan_run`), or ``None`` without ``--out``.
    """
    plan = None
    if cfg.out is not None:
        plan = plan_run(Path(cfg.out), cfg.to_dict(), overwrite, resume)
    elif resume:
        raise UsageError("--resume needs --out, the run folder to continue")
    check_patience(cfg)
    parse_source(cfg.calib.source)
    for source in cfg.eval.sources:
        parse_source(source)
    resolve_device(cfg.device)
    if plan in ("finished", "publish"):
        return Validated(plan)
    tuner = FINETUNERS[cfg.finetune.method]
    if tuner is not None:
        tuner.check_available()
        tuner.check_calibration(cfg.finetune.options, cfg.calib.nsamples, cfg.calib.seqlen)
    config = load_config(cfg.model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EbftError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    check_context_length(config, cfg.calib.seqlen, "--seqlen")
    if cfg.eval.sources:
        check_context_length(config, cfg.eval.seqlen, "--eval-seqlen")
    if read_data and not cfg.calib.from_model:
        load_documents(cfg.calib.source, "calibration", cfg.data_dir)
        for source in cfg.eval.sources:
            load_documents(source, "evaluation", cfg.data_dir)
    skeleton = meta_model(config)
    if skeleton is not None:
        check_nm_divisible(find_blocks(skeleton), cfg.prune.nm)
    if cfg.prune.structured is not None:
        from ebft.structured import check_structured_run

        check_structured_run(cfg.prune.structured, cfg.finetune.method, skeleton, config)
    else:
        PRUNERS[cfg.prune.pruner].check_run(cfg, config, skeleton)
    streamed = decide_streaming(cfg, config, skeleton)
    if cfg.out is not None:
        dense_stream = cfg.finetune.block_targets == "dense"
        needed = estimate_out_bytes(config, cfg.calib.nsamples, cfg.calib.seqlen, skeleton,
                                    _dtype_bytes(save_dtype(cfg, config)), streams=2 if dense_stream else 1)
        if cfg.offload == "disk":  # the activation buffers (inputs, targets, the dense stream), for every process
            one = needed["activations"] // (4 if dense_stream else 2)  # the checkpoint keeps two copies per stream
            needed["offloaded activations"] = (3 if dense_stream else 2) * one * processes
        check_disk_space(Path(cfg.out), needed)
    return Validated(plan, streamed)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def source_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's config says its weights have (float32 if it says none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def save_dtype(cfg: RunConfig, config: Any) -> torch.dtype:
    """The dtype the run keeps and saves the model in: ``--save-dtype``, else the checkpoint's own (a GGUF
    file, dequantized, in float32)."""
    if cfg.save_dtype != "auto":
        return DTYPES[cfg.save_dtype]
    if resolve_model(cfg.model).gguf_file:
        return torch.float32
    return source_dtype(config)


def available_memory() -> int:
    """Bytes of memory the system can give now (MemAvailable), or 0 if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def decide_streaming(cfg: RunConfig, config: Any, skeleton: nn.Module | None) -> bool:
    """Whether the blocks are read from the checkpoint as the walk reaches them (``--stream``)."""
    if cfg.stream == "off":
        return False
    where = resolve_model(cfg.model)
    folder = Path(where.path_or_id)
    readable = where.gguf_file is None and folder.is_dir() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())
    whole_model = getattr(FINETUNERS[cfg.finetune.method], "kind", "") == "model"
    if cfg.stream == "on":
        if not readable:
            raise UsageError(f"--stream on reads a local folder of safetensors weights; {cfg.model} is not one "
                             "(a GGUF file is dequantized in memory); drop --stream")
        if whole_model:
            raise UsageError(f"--finetune {cfg.finetune.method} trains the whole model at once, which needs it in "
                             "memory; drop --stream or use a block-wise --finetune")
        if cfg.calib.from_model:
            raise UsageError(f"--calib {cfg.calib.source} samples its windows from the whole model, which needs it in "
                             "memory; drop --stream or use a text --calib")
        if cfg.out is None:
            raise UsageError("--stream writes each finished block into the run folder; give --out")
        return True
    if not readable or whole_model or cfg.calib.from_model or cfg.out is None:
        return False
    size = count_parameters(config, skeleton) * _dtype_bytes(save_dtype(cfg, config))
    available = available_memory()
    if available and size > 0.4 * available:
        logger.info("streaming the model: its %.1f GiB are more than 40%% of the %.1f GiB of memory available",
                    size / 2**30, available / 2**30)
        return True
    return False


def check_patience(cfg: RunConfig) -> None:
    """``--patience`` needs held-out windows and a tuner that trains in epochs."""
    patience = cfg.finetune.patience
    if patience is None:
        return
    method = cfg.finetune.method
    tuner = FINETUNERS[method]
    if not getattr(tuner, "supports_early_stopping", False):
        usable = ", ".join(n for n, c in FINETUNERS.items() if getattr(c, "supports_early_stopping", False))
        raise UsageError(f"--patience works only with --finetune {usable}; got --finetune {method}")
    if holdout_count(cfg.calib.nsamples, cfg.finetune.holdout_fraction) == 0:
        raise UsageError("--patience needs held-out windows: use --holdout-fraction above 0 and --nsamples 2 or more")


def meta_model(config: Any) -> nn.Module | None:
    """The model built from its configuration on the meta device (shapes, no weights), or ``None``."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - only used for estimates and early checks
        logger.debug("could not build %s on the meta device", type(config).__name__, exc_info=True)
        return None


def count_parameters(config: Any, skeleton: nn.Module | None = None) -> int:
    """The model's parameter count from its configuration alone (no weights are loaded)."""
    skeleton = skeleton if skeleton is not None else meta_model(config)
    if skeleton is not None:
        return sum(p.numel() for p in skeleton.parameters())
    hidden = int(getattr(config, "hidden_size", 0) or 0)  # the decoder formula, as an estimate
    inter = int(getattr(config, "intermediate_size", 4 * hidden) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter)


def estimate_out_bytes(config: Any, nsamples: int, seqlen: int, skeleton: nn.Module | None = None,
                       dtype_bytes: int = 4, streams: int = 1) -> dict[str, int]:
    """Disk a run with ``--out`` needs at its peak: the saved model (+10%), every block's checkpoint (its
    weights and bool masks) and its untuned state for the model guard, and two copies of the activations
    of each of the walk's ``streams`` (2 with ``--block-targets dense``; the old copy goes once the new is
    in); weights take ``dtype_bytes`` each."""
    params = count_parameters(config, skeleton)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return {
        "model": int(params * dtype_bytes * 1.1),
        "block checkpoints": params * (2 * dtype_bytes + 1),
        "activations": 2 * streams * nsamples * seqlen * hidden * 4,
    }


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_disk_space(out: Path, needed: dict[str, int]) -> None:
    """Refuse a run whose checkpoints and model would not fit on ``--out``'s file system."""
    ancestor = existing_ancestor(out.parent)
    work = work_dir(out)
    have = sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) if work.is_dir() else 0
    total = max(0, sum(needed.values()) - have)
    free = shutil.disk_usage(ancestor).free
    if free < total:
        parts = ", ".join(f"{_size(v)} {k}" for k, v in needed.items())
        raise EbftError(f"not enough disk space for --out {out}: {_size(free)} free, about {_size(total)} needed "
                        f"({parts}); free some space or choose another --out")


def check_context_length(config: Any, seqlen: int, flag: str) -> None:
    """A window longer than the model's context is an error, not an hour of wasted compute."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise UsageError(f"{flag} {seqlen} exceeds the model's context of {limit} tokens; use {flag} {limit} or less")


def evaluate_all(model: nn.Module, windows: dict[str, torch.Tensor], device: torch.device, label: str) -> dict[str, dict]:
    """Perplexity on every evaluation source; the model returns to the CPU afterwards."""
    results = {}
    for source, tokens in windows.items():
        results[source] = perplexity(model, tokens, device=device, desc=f"{label} {source}").to_dict()
    model.to("cpu")
    return results


def run_prune(cfg: RunConfig, overwrite: bool = False, model_and_tokenizer: tuple[nn.Module, Any] | None = None,
              resume: bool = False, windows: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
              dist: DistContext | None = None, callbacks: Sequence[Callback] = (),
              checked: Checked | None = None) -> RunReport:
    """Run the whole job described by ``cfg``; returns the report (also written to ``cfg.out``).

    ``windows``: the calibration ids and the evaluation ids by source, already built for ``cfg``
    with this tokenizer (``ebft.sweep`` builds them once for many runs); default: built here.
    ``callbacks`` join the block walk (:class:`ebft.walk.Callback`), after the checkpoint's.
    ``checked``: what :func:`preflight` returned for ``cfg`` (default: it runs here).

    With ``cfg.out``, every finished block is checkpointed next to it (``ebft.checkpoint``); a run
    that stopped for any reason continues with ``resume=True``. ``cfg.out`` appears only at the end.
    """
    t0 = time.perf_counter()
    if checked is None:
        given = model_and_tokenizer[1] if model_and_tokenizer is not None else None
        checked = preflight(cfg, overwrite, resume, processes=1 if dist is None else dist.world_size,
                            tokenizer=given, windows=windows is None)
    else:
        t0 -= checked.seconds  # the checks ran before this call; the total counts them all the same
    timings: dict[str, float] = {"checks": checked.seconds}
    plan = checked.plan
    if dist is not None:  # torchrun: every process has checked --out before rank 0 writes to it
        dist.barrier()
        if plan in ("finished", "publish") and not dist.is_main:
            return RunReport.from_dict({"config": cfg.to_dict()})
    out = Path(cfg.out) if cfg.out is not None else None
    if plan == "finished":
        logger.info("%s already holds this run, finished; nothing to resume", out)
        return RunReport.from_dict(read_report(out))  # type: ignore[arg-type]
    if plan == "publish":
        logger.info("%s: the run had finished; publishing it", out)
        return RunReport.from_dict(publish_staged(out))  # type: ignore[arg-type]
    device = resolve_device(cfg.device) if dist is None else dist.device

    store = None
    if model_and_tokenizer is not None:
        (model, tokenizer), resolved = model_and_tokenizer, cfg.model
    elif checked.streamed:
        from ebft.models.streaming import open_streamed

        resolved = resolve_model(cfg.model).path_or_id
        config = load_config(cfg.model)
        model, store = open_streamed(Path(resolved), config, source_dtype(config))
        tokenizer = checked.tokenizer if checked.tokenizer is not None else load_tokenizer(cfg.model)
    else:
        loaded = load_model(cfg.model, tokenizer=checked.tokenizer)
        model, tokenizer, resolved = loaded.model, loaded.tokenizer, loaded.resolved
    keep_dtype = DTYPES[cfg.save_dtype] if cfg.save_dtype != "auto" else _model_dtype(model)
    check_nm_divisible(find_blocks(model), cfg.prune.nm)
    tuner = make_finetuner(cfg.finetune, seed=cfg.calib.seed)
    if isinstance(tuner, ModelFinetuner):
        tuner.vocab = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
        tuner.check(model)
    timings["load"] = time.perf_counter() - t0 - checked.seconds  # loading the weights alone
    calib, eval_windows = windows if windows is not None else (checked.calib, checked.eval_windows)
    sampled = calib is None and cfg.calib.from_model  # not read back from a resumed run: sampled now, before pruning
    if sampled:
        t = time.perf_counter()
        calib = sample_calibration(cfg, model, tokenizer, device, dist)
        timings["calib_generation"] = time.perf_counter() - t

    report = RunReport(
        ebft_version=ebft.__version__,
        config=cfg.to_dict(),
        model={
            "source": cfg.model,
            "resolved": resolved,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": len(find_blocks(model)),
            "dtype": str(_model_dtype(model)).removeprefix("torch."),
            "saved_dtype": str(keep_dtype).removeprefix("torch."),
            "streamed": store is not None,
        },
        device=str(device),
        precision=None,
        host={"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        timings=timings,
    )
    if cfg.eval_dense and eval_windows and (dist is None or dist.is_main):
        t = time.perf_counter()
        if store is None:
            dense = evaluate_all(model, eval_windows, device, "dense")
        else:
            dense = _evaluate_blockwise(model, eval_windows, device, store.checkpoint_state)
        report.eval_dense = {s: r["perplexity"] for s, r in dense.items()}
        timings["eval_dense"] = time.perf_counter() - t

    checkpoint = None
    if out is not None and (dist is None or dist.is_main):
        checkpoint = Checkpoint.open(out, cfg.to_dict(), fingerprint(calib), resume=plan == "resume")
    if dist is not None:  # the work folder is ready; the other processes read a resumed run from it
        dist.barrier()
        if out is not None and not dist.is_main:
            checkpoint = Checkpoint.follow(out)
    guard = None
    if tuner is not None and cfg.finetune.model_guard:
        guard = ModelGuard(checkpoint.folder / "guard" if checkpoint is not None else None,
                           dense_state=store.checkpoint_state if store is not None else None,
                           final_state=checkpoint.block_state if store is not None else None)
    if isinstance(tuner, ModelFinetuner) and checkpoint is not None and (dist is None or dist.is_main):
        tuner.work_folder = checkpoint.folder  # what the stage samples before the walk, kept for --resume
    walk_callbacks = [*([guard] if guard is not None else []),  # before the checkpoint's: it sees the dense model
                      *([tuner] if isinstance(tuner, Callback) else []),  # a stage's teacher, from the dense model
                      *([CheckpointCallback(checkpoint, load_weights=store is None)] if checkpoint is not None
                        else []),
                      *([StreamBlocks(store)] if store is not None else []),  # after the checkpoint has saved a block
                      *callbacks]
    try:
        if checkpoint is not None and sampled:  # for --resume to read back: the windows depend on the model
            write_cache(checkpoint.folder / CACHE_NAME, calib, cache_settings(cfg.model, cfg.calib))
            logger.info("calibration: the sampled windows are kept in %s for --resume", checkpoint.folder / CACHE_NAME)
        finetune = cfg.finetune
        if tuner is not None:
            finetune = _resolve_precision(cfg, model, device, report, checkpoint, dist, store)
            tuner.config = finetune
        run = _Run(cfg, finetune, model, tokenizer, tuner, calib, eval_windows, device, report, walk_callbacks,
                   checkpoint, dist, guard, store, keep_dtype)
        model = run.prune_and_evaluate()
        if dist is not None and not dist.is_main:
            return report  # rank 0 evaluates, saves and reports
        if checkpoint is not None:
            if store is None:  # a streamed model was saved before it was evaluated
                run.save()
            timings["total"] = time.perf_counter() - t0
            write_text(checkpoint.folder / "final" / "model" / "README.md", model_card(report))
            checkpoint.publish(report.to_dict())
            logger.info("wrote %s", out)
        else:
            timings["total"] = time.perf_counter() - t0
    except BaseException:
        if checkpoint is not None:
            _keep_or_discard(checkpoint, len(find_blocks(model)))
        raise
    finally:
        if guard is not None:
            guard.close()
        if store is not None:
            store.close()
    return report


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


class StreamBlocks(Callback):
    """Fills each block from the checkpoint as the walk reaches it, and empties it once it is saved."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def on_block_start(self, walk: BlockWalk, index: int) -> None:
        self.store.load(index)

    def on_block_end(self, walk: BlockWalk, index: int, report: Any) -> None:
        self.store.release(index)


def _resolve_precision(cfg: RunConfig, model: nn.Module, device: torch.device, report: RunReport,
                       checkpoint: Checkpoint | None, dist: DistContext | None, store: Any = None) -> FinetuneConfig:
    """``cfg.finetune`` with ``--precision auto`` decided (by timing the blocks' GEMMs on the CPU), into
    the report; a resumed run keeps the choice it started with, and under torchrun every process takes
    rank 0's."""
    previous = checkpoint.state.get("precision") if checkpoint is not None else None
    if previous is not None:
        choice = PrecisionChoice(previous["precision"], f"{previous['reason']} (when the run started)",
                                 previous.get("gflops", {}))
        finetune = dataclasses.replace(cfg.finetune, precision=choice.precision)
    else:  # the GEMM shapes of the first block (a streamed block's shapes are there without its weights)
        finetune, choice = resolve_for_block(cfg.finetune, find_blocks(model).blocks[0], device, cfg.calib.seqlen)
    if dist is not None:
        picked = torch.tensor([PRECISIONS.index(finetune.precision)], device=dist.device)
        dist.broadcast_([picked])
        if PRECISIONS[int(picked)] != finetune.precision:
            choice = PrecisionChoice(PRECISIONS[int(picked)], "rank 0's choice")
            finetune = dataclasses.replace(cfg.finetune, precision=choice.precision)
    if checkpoint is not None and previous is None:
        checkpoint.remember("precision", choice.to_dict())
    report.precision, report.precision_choice = choice.precision, choice.to_dict()
    return finetune


@dataclass
class _Run:
    """The part of ``run_prune`` after the checks and the loading: walk, whole-model stage, guard, save, evaluate."""

    cfg: RunConfig
    finetune: FinetuneConfig
    model: nn.Module
    tokenizer: Any
    tuner: Any
    calib: torch.Tensor
    eval_windows: dict[str, torch.Tensor]
    device: torch.device
    report: RunReport
    callbacks: list[Callback]
    checkpoint: Checkpoint | None
    dist: DistContext | None
    guard: ModelGuard | None
    store: Any
    keep_dtype: torch.dtype

    def allocate(self) -> Allocated | None:
        """Each block's sparsity from the dense model (``--allocation``), into the report; None for uniform.

        A resumed run reuses the sparsities it started with; under torchrun every process takes rank 0's.
        """
        cfg, checkpoint, dist = self.cfg, self.checkpoint, self.dist
        allocation = make_allocation(cfg.prune.allocation, cfg.prune.allocation_options)
        if allocation is None:
            return None
        previous = checkpoint.state.get("allocation") if checkpoint is not None else None
        if previous is not None:
            allocated = Allocated(**previous)
        else:
            blocks = find_blocks(self.model)
            move_non_block_modules(self.model, blocks, self.device)
            try:
                runner = BlockRunner(self.model, blocks, self.device, example_ids=self.calib[:1])
                dense = self.store.checkpoint_state if self.store is not None else (lambda index: None)
                allocated = allocation.allocate(runner, self.calib, cfg.prune.sparsity, dense)
            finally:
                move_non_block_modules(self.model, blocks, "cpu")
        if dist is not None:
            picked = torch.tensor(allocated.sparsities, dtype=torch.float64, device=dist.device)
            dist.broadcast_([picked])
            allocated.sparsities = picked.cpu().tolist()
        if checkpoint is not None and previous is None:
            checkpoint.remember("allocation", allocated.to_dict())
        logger.info("%s allocation: block sparsities %.4f to %.4f (mean %.4f) in %.1f s", allocated.method,
                    min(allocated.sparsities), max(allocated.sparsities),
                    sum(allocated.sparsities) / len(allocated.sparsities), allocated.seconds)
        self.report.allocation = allocated.to_dict()
        self.report.timings["allocation"] = allocated.seconds
        return allocated

    def prune_and_evaluate(self) -> nn.Module:
        """The block walk (+ a whole-model stage), the guard, sparsity statistics and evaluation, into the report
        (a streamed model is saved first: it is evaluated from what was saved)."""
        cfg, report, timings, model = self.cfg, self.report, self.report.timings, self.model
        t = time.perf_counter()
        torch.manual_seed(cfg.calib.seed)
        block_tuner = (self.tuner if isinstance(self.tuner, BlockFinetuner) else
                       self.tuner.block_finetuner() if isinstance(self.tuner, ModelFinetuner) else None)
        allocated = self.allocate()
        sparsities = allocated.sparsities if allocated is not None else None
        walk = BlockWalk(model, self.calib, make_compressor(model, cfg.prune, sparsities), block_tuner, self.finetune,
                         self.device, seed=cfg.calib.seed, callbacks=self.callbacks, dist=self.dist, offload_dir=_offload_dir(cfg),
                         store_dtype=self.keep_dtype)
        result = walk.run()
        report.structured = result.summary if cfg.prune.structured is not None else None
        if self.dist is not None and not self.dist.is_main:
            return model
        timings["prune_finetune"] = time.perf_counter() - t
        report.blocks = result.blocks
        if self.checkpoint is not None and self.checkpoint.resumes:
            report.resumed = self.checkpoint.resumes  # finished blocks at each resume
        if self.store is None and _model_dtype(model) != self.keep_dtype:
            model.to(self.keep_dtype)  # the blocks were kept in it already
        if isinstance(self.tuner, ModelFinetuner):
            t = time.perf_counter()
            if self.guard is not None and not self.tuner.changes_only_blocks:
                self.guard.before_model_stage(model)
            model, stage = self.tuner.tune_model(model, self.calib, result.masks, self.device)
            self.model = model
            timings[self.tuner.name] = time.perf_counter() - t
            report.model_stage = stage.to_dict()
        if self.guard is not None:
            t = time.perf_counter()
            decided = self.guard.check(model, whole_model=isinstance(self.tuner, ModelFinetuner)
                                       and not self.tuner.changes_only_blocks)
            report.model_guard = decided.to_dict() if decided is not None else None
            timings["model_guard"] = time.perf_counter() - t
        stats = {**mask_stats(result.masks), **describe_pattern(result.masks)}
        if self.store is None:
            linears = find_blocks(model).all_linears()
            zeros = sum(weight_sparsity(linears[n].weight.data) * linears[n].weight.numel() for n in linears)
            stats["weights_zero"] = zeros / sum(l.weight.numel() for l in linears.values())
        else:
            written = self.save()
            blocks = find_blocks(model)
            counted = {n: c for n, c in written["zeros"].items() if n.startswith(blocks.prefix + ".")}
            stats["weights_zero"] = sum(counted.values()) / sum(
                find_blocks(model).all_linears()[n.removesuffix(".weight")].weight.numel() for n in counted)
        report.sparsity = stats

        t = time.perf_counter()
        if not self.eval_windows:
            details = {}
        elif self.store is None:
            details = evaluate_all(model, self.eval_windows, self.device, "pruned")
        else:
            details = _evaluate_blockwise(model, self.eval_windows, self.device, self._final_state)
        report.eval = {s: r["perplexity"] for s, r in details.items()}
        report.eval_details = details
        timings["eval"] = time.perf_counter() - t
        return model

    def _final_state(self, index: int) -> dict[str, torch.Tensor]:
        """A streamed block as the run leaves it: its checkpoint, or its untuned state if the guard reverted it."""
        reverted = (self.report.model_guard or {}).get("reverted_blocks", [])
        if self.guard is not None and index in reverted:
            from safetensors.torch import load_file

            return load_file(str(self.guard.untuned_file(index)))
        return self.checkpoint.block_state(index)  # type: ignore[union-attr]

    def save(self) -> dict[str, Any]:
        """Write the model into the run's staging folder (in memory, or a streamed one block file at a time)."""
        t = time.perf_counter()
        tensor_for = None
        if self.store is not None:
            tensor_for = _BlockTensors(find_blocks(self.model), self._final_state)
        written = self.checkpoint.stage_model(  # type: ignore[union-attr]
            lambda folder: write_model(folder, self.model, self.tokenizer, self.keep_dtype, tensor_for))
        self.report.saved_bytes = written["bytes"]
        self.report.timings["save"] = time.perf_counter() - t
        return written


class _BlockTensors:
    """``tensor_for`` of :func:`ebft.export.write_model` for a streamed model: a block's tensors from its
    state (read one block at a time), everything else from the model."""

    def __init__(self, blocks: Any, state: Any) -> None:
        self.prefix, self.state = blocks.prefix + ".", state
        self.index: int | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor | None:
        if not name.startswith(self.prefix):
            return None
        index_text, _, local = name[len(self.prefix):].partition(".")
        index = int(index_text)
        if index != self.index:
            self.index, self.tensors = index, self.state(index)
        return self.tensors[local]


def _evaluate_blockwise(model: nn.Module, windows: dict[str, torch.Tensor], device: torch.device,
                        state_for: Any) -> dict[str, dict]:
    """Perplexity on every source, the model run block by block with each block's state from ``state_for``."""
    blocks = find_blocks(model)
    move_non_block_modules(model, blocks, device)
    results = {}
    try:
        for source, ids in windows.items():
            start = time.perf_counter()
            runner = BlockRunner(model, blocks, device, batch_size=1, example_ids=ids[:1])
            nll, count = runner.nll(ids, state_for)
            results[source] = {"perplexity": math.exp(nll / count), "tokens": count, "windows": ids.shape[0]}
            logger.info("pruned %s: %.3f over %d tokens (%d windows, block by block) in %.1f s", source,
                        results[source]["perplexity"], count, ids.shape[0], time.perf_counter() - start)
    finally:
        move_non_block_modules(model, blocks, "cpu")
    return results


def _offload_dir(cfg: RunConfig) -> Path | None:
    """Where ``--offload disk`` keeps the activation buffers: inside the run's work folder."""
    if cfg.offload != "disk":
        return None
    if cfg.out is None:
        raise UsageError("--offload disk needs --out: its buffers live in the run's work folder")
    return work_dir(Path(cfg.out)) / "offload"


def _keep_or_discard(checkpoint: Checkpoint, nblocks: int) -> None:
    """After a failure: keep a work folder that holds finished blocks (and say how to go on), else remove it."""
    if checkpoint.done == 0:
        checkpoint.discard()
        return
    checkpoint.close()
    logger.warning("the unfinished run is kept in %s (%d of %d blocks done); rerun with --resume to continue "
                   "or --overwrite to start over", checkpoint.folder, checkpoint.done, nblocks)
