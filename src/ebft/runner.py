"""``ebft prune`` as a library call: validate, load, calibrate, prune + repair, evaluate, save."""

from __future__ import annotations

import dataclasses
import logging
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
from ebft.data import calibration_windows, evaluation_tokens, load_documents, parse_source
from ebft.errors import EbftError, UsageError
from ebft.eval import perplexity
from ebft.export import save_model
from ebft.finetune import FINETUNERS, BlockFinetuner, ModelFinetuner, make_finetuner
from ebft.fsio import existing_ancestor
from ebft.guard import ModelGuard
from ebft.models import SUPPORTED_MODEL_TYPES, find_blocks, load_model, load_tokenizer
from ebft.models.loading import load_config
from ebft.precision import PrecisionChoice, resolve_for_block
from ebft.results import RunReport
from ebft.sparsity import mask_stats, weight_sparsity
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
    calib: torch.Tensor | None = None  # [nsamples, seqlen] calibration windows
    eval_windows: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> [windows, seqlen]
    tokenizer: Any = None
    seconds: float = 0.0


def preflight(cfg: RunConfig, overwrite: bool = False, resume: bool = False, processes: int = 1,
              tokenizer: Any = None, windows: bool = True) -> Checked:
    """Every check that needs only the config, the tokenizer and the data, before any weight loads.

    :func:`validate_inputs`, then (with ``windows``) the tokenizer (``tokenizer``, or the model's own,
    loaded alone) cuts the calibration windows and every evaluation source's windows: a text shorter
    than a window fails here, in seconds, not after minutes of loading. A resumed run's calibration
    windows must be those it started with.
    """
    start = time.perf_counter()
    plan = validate_inputs(cfg, overwrite, resume, processes, read_data=not windows)
    if plan in ("finished", "publish") or not windows:
        return Checked(plan, seconds=time.perf_counter() - start)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    calib = calibration_windows(tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed,
                                data_dir=cfg.data_dir)
    eval_windows = {source: evaluation_tokens(tokenizer, source, cfg.eval.seqlen, cfg.eval.max_windows,
                                              data_dir=cfg.data_dir) for source in cfg.eval.sources}
    if plan == "resume":
        check_resumable(Path(cfg.out), fingerprint(calib))  # type: ignore[arg-type]
    return Checked(plan, calib, eval_windows, tokenizer, time.perf_counter() - start)


def validate_inputs(cfg: RunConfig, overwrite: bool = False, resume: bool = False, processes: int = 1,
                    read_data: bool = True) -> str | None:
    """Every check that needs no model weights and no tokenizer: output folder, flags, data sources
    (read, with ``read_data``), model config, disk space.

    Returns what ``--out`` allows (see :func:`ebft.checkpoint.plan_run`), or ``None`` without ``--out``.
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
        return plan
    tuner = FINETUNERS[cfg.finetune.method]
    if tuner is not None:
        tuner.check_available()
    config = load_config(cfg.model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EbftError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    check_context_length(config, cfg.calib.seqlen, "--seqlen")
    if cfg.eval.sources:
        check_context_length(config, cfg.eval.seqlen, "--eval-seqlen")
    if read_data:
        load_documents(cfg.calib.source, "calibration", cfg.data_dir)
        for source in cfg.eval.sources:
            load_documents(source, "evaluation", cfg.data_dir)
    skeleton = meta_model(config)
    if skeleton is not None:
        check_nm_divisible(find_blocks(skeleton), cfg.prune.nm)
    if cfg.prune.structured is not None:
        from ebft.structured import check_structured_run

        check_structured_run(cfg.prune.structured, cfg.finetune.method, skeleton, config)
    if cfg.out is not None:
        needed = estimate_out_bytes(config, cfg.calib.nsamples, cfg.calib.seqlen, skeleton)
        if cfg.offload == "disk":  # both activation buffers, for every process of a torchrun job
            needed["offloaded activations"] = needed["activations"] * processes
        check_disk_space(Path(cfg.out), needed)
    return plan


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


def estimate_out_bytes(config: Any, nsamples: int, seqlen: int, skeleton: nn.Module | None = None) -> dict[str, int]:
    """Disk a run with ``--out`` needs at its peak: the fp32 model (+10%), every block's checkpoint
    (fp32 weights + bool masks), and two copies of the activations (the old one goes once the new is in)."""
    params = count_parameters(config, skeleton)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    return {
        "model": int(params * 4 * 1.1),
        "block checkpoints": params * 5,
        "activations": 2 * nsamples * seqlen * hidden * 4,
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

    if model_and_tokenizer is None:
        loaded = load_model(cfg.model, tokenizer=checked.tokenizer)
        model, tokenizer, resolved = loaded.model, loaded.tokenizer, loaded.resolved
    else:
        (model, tokenizer), resolved = model_and_tokenizer, cfg.model
    check_nm_divisible(find_blocks(model), cfg.prune.nm)
    tuner = make_finetuner(cfg.finetune, seed=cfg.calib.seed)
    if isinstance(tuner, ModelFinetuner):
        tuner.check(model)
    timings["load"] = time.perf_counter() - t0 - checked.seconds
    calib, eval_windows = windows if windows is not None else (checked.calib, checked.eval_windows)

    report = RunReport(
        ebft_version=ebft.__version__,
        config=cfg.to_dict(),
        model={
            "source": cfg.model,
            "resolved": resolved,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": len(find_blocks(model)),
        },
        device=str(device),
        precision=None,
        host={"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        timings=timings,
    )
    if cfg.eval_dense and eval_windows and (dist is None or dist.is_main):
        t = time.perf_counter()
        dense = evaluate_all(model, eval_windows, device, "dense")
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
        guard = ModelGuard(checkpoint.folder / "guard" if checkpoint is not None else None)
    walk_callbacks = [*([guard] if guard is not None else []),  # before the checkpoint's: it sees the dense model
                      *([CheckpointCallback(checkpoint)] if checkpoint is not None else []), *callbacks]
    try:
        finetune = cfg.finetune
        if tuner is not None:
            finetune = _resolve_precision(cfg, model, device, report, checkpoint, dist)
            tuner.config = finetune
        model = _prune_and_evaluate(cfg, finetune, model, tuner, calib, eval_windows, device, report,
                                    walk_callbacks, checkpoint, dist, guard)
        if dist is not None and not dist.is_main:
            return report  # rank 0 evaluates, saves and reports
        if checkpoint is not None:
            t = time.perf_counter()
            checkpoint.stage_model(model, tokenizer, save_model)
            staged = checkpoint.folder / "final" / "model"
            report.saved_bytes = sum(f.stat().st_size for f in staged.glob("*.safetensors"))
            timings["save"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0
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
    return report


def _resolve_precision(cfg: RunConfig, model: nn.Module, device: torch.device, report: RunReport,
                       checkpoint: Checkpoint | None, dist: DistContext | None) -> FinetuneConfig:
    """``cfg.finetune`` with ``--precision auto`` decided (by timing the blocks' GEMMs on the CPU), into
    the report; a resumed run keeps the choice it started with, and under torchrun every process takes
    rank 0's."""
    previous = checkpoint.state.get("precision") if checkpoint is not None else None
    if previous is not None:
        choice = PrecisionChoice(previous["precision"], f"{previous['reason']} (when the run started)",
                                 previous.get("gflops", {}))
        finetune = dataclasses.replace(cfg.finetune, precision=choice.precision)
    else:
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


def _prune_and_evaluate(cfg: RunConfig, finetune: FinetuneConfig, model: nn.Module, tuner: Any, calib: torch.Tensor,
                        eval_windows: dict[str, torch.Tensor], device: torch.device, report: RunReport,
                        callbacks: list[Callback], checkpoint: Checkpoint | None,
                        dist: DistContext | None = None, guard: ModelGuard | None = None) -> nn.Module:
    """The block walk (+ a whole-model stage), sparsity statistics and evaluation, into ``report``."""
    timings = report.timings
    t = time.perf_counter()
    torch.manual_seed(cfg.calib.seed)
    block_tuner = tuner if isinstance(tuner, BlockFinetuner) else None
    walk = BlockWalk(model, calib, make_compressor(model, cfg.prune), block_tuner, finetune, device,
                     seed=cfg.calib.seed, callbacks=callbacks, dist=dist, offload_dir=_offload_dir(cfg))
    result = walk.run()
    report.structured = result.summary if cfg.prune.structured is not None else None
    if dist is not None and not dist.is_main:
        return model
    timings["prune_finetune"] = time.perf_counter() - t
    report.blocks = result.blocks
    if checkpoint is not None and checkpoint.resumes:
        report.resumed = checkpoint.resumes  # finished blocks at each resume
    if isinstance(tuner, ModelFinetuner):
        t = time.perf_counter()
        if guard is not None:
            guard.before_model_stage(model)
        model, stage = tuner.tune_model(model, calib, result.masks, device)
        timings[tuner.name] = time.perf_counter() - t
        report.model_stage = stage.to_dict()
    if guard is not None:
        t = time.perf_counter()
        decided = guard.check(model, whole_model=isinstance(tuner, ModelFinetuner))
        report.model_guard = decided.to_dict() if decided is not None else None
        timings["model_guard"] = time.perf_counter() - t
    stats = mask_stats(result.masks)
    linears = find_blocks(model).all_linears()
    zeros = sum(weight_sparsity(linears[n].weight.data) * linears[n].weight.numel() for n in linears)
    stats["weights_zero"] = zeros / sum(l.weight.numel() for l in linears.values())
    report.sparsity = stats

    t = time.perf_counter()
    details = evaluate_all(model, eval_windows, device, "pruned") if eval_windows else {}
    report.eval = {s: r["perplexity"] for s, r in details.items()}
    report.eval_details = details
    timings["eval"] = time.perf_counter() - t
    return model


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
