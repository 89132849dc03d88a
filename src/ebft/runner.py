"""``ebft prune`` as a library call: validate, load, calibrate, prune + repair, evaluate, save."""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ebft
from ebft.config import RunConfig
from ebft.data import calibration_windows, evaluation_tokens, load_documents, parse_source
from ebft.errors import EbftError, UsageError
from ebft.eval import perplexity
from ebft.export import atomic_dir, check_out_dir, save_model, write_json
from ebft.finetune.base import resolve_precision
from ebft.models import SUPPORTED_MODEL_TYPES, find_blocks, load_model
from ebft.models.loading import load_config
from ebft.pipeline import check_nm_divisible, prune_and_finetune
from ebft.sparsity import mask_stats, weight_sparsity

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


def validate_inputs(cfg: RunConfig, overwrite: bool = False) -> None:
    """Every check that needs no model weights: output folder, data sources, model architecture."""
    if cfg.out is not None:
        check_out_dir(Path(cfg.out), overwrite)
    parse_source(cfg.calib.source)
    for source in cfg.eval.sources:
        parse_source(source)
    resolve_device(cfg.device)
    if cfg.finetune.method == "lora":
        from ebft.finetune.lora import import_peft

        import_peft()
    config = load_config(cfg.model)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EbftError(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    check_context_length(config, cfg.calib.seqlen, "--seqlen")
    if cfg.eval.sources:
        check_context_length(config, cfg.eval.seqlen, "--eval-seqlen")
    load_documents(cfg.calib.source, "calibration", cfg.data_dir)
    for source in cfg.eval.sources:
        load_documents(source, "evaluation", cfg.data_dir)


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


def run_prune(cfg: RunConfig, overwrite: bool = False, model_and_tokenizer: tuple[nn.Module, Any] | None = None) -> dict:
    """Run the whole job described by ``cfg``; returns the report (also written to ``cfg.out``)."""
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    validate_inputs(cfg, overwrite)
    device = resolve_device(cfg.device)

    if model_and_tokenizer is None:
        loaded = load_model(cfg.model)
        model, tokenizer, resolved = loaded.model, loaded.tokenizer, loaded.resolved
    else:
        (model, tokenizer), resolved = model_and_tokenizer, cfg.model
    check_nm_divisible(find_blocks(model), cfg.prune.nm)
    lora = cfg.finetune.method == "lora"
    if lora:
        from ebft.finetune.lora import check_lora

        check_lora(model, cfg.finetune)
    timings["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    calib = calibration_windows(
        tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed, data_dir=cfg.data_dir
    )
    eval_windows = {
        source: evaluation_tokens(tokenizer, source, cfg.eval.seqlen, cfg.eval.max_windows, data_dir=cfg.data_dir)
        for source in cfg.eval.sources
    }
    timings["data"] = time.perf_counter() - t

    report: dict[str, Any] = {
        "ebft_version": ebft.__version__,
        "config": cfg.to_dict(),
        "model": {
            "source": cfg.model,
            "resolved": resolved,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "blocks": len(find_blocks(model)),
        },
        "device": str(device),
        "precision": resolve_precision(cfg.finetune.precision, device) if cfg.finetune.method != "none" else None,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if cfg.eval_dense and eval_windows:
        t = time.perf_counter()
        dense = evaluate_all(model, eval_windows, device, "dense")
        report["eval_dense"] = {s: r["perplexity"] for s, r in dense.items()}
        timings["eval_dense"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(cfg.calib.seed)
    block_finetune = dataclasses.replace(cfg.finetune, method="none") if lora else cfg.finetune
    result = prune_and_finetune(model, calib, cfg.prune, block_finetune, device, seed=cfg.calib.seed)
    timings["prune_finetune"] = time.perf_counter() - t
    report["blocks"] = result.block_dicts()
    if lora:
        from ebft.finetune.lora import lora_finetune

        t = time.perf_counter()
        model, lora_result = lora_finetune(model, calib, result.masks, cfg.finetune, device, seed=cfg.calib.seed)
        timings["lora"] = time.perf_counter() - t
        report["lora"] = lora_result.to_dict()
    stats = mask_stats(result.masks)
    linears = find_blocks(model).all_linears()
    zeros = sum(weight_sparsity(linears[n].weight.data) * linears[n].weight.numel() for n in linears)
    stats["weights_zero"] = zeros / sum(l.weight.numel() for l in linears.values())
    report["sparsity"] = stats

    t = time.perf_counter()
    details = evaluate_all(model, eval_windows, device, "pruned") if eval_windows else {}
    report["eval"] = {s: r["perplexity"] for s, r in details.items()}
    report["eval_details"] = details
    timings["eval"] = time.perf_counter() - t

    if cfg.out is not None:
        t = time.perf_counter()
        with atomic_dir(Path(cfg.out), overwrite) as tmp:
            save_model(model, tokenizer, tmp / "model")
            timings["save"] = time.perf_counter() - t
            timings["total"] = time.perf_counter() - t0
            report["timings"] = timings
            write_json(tmp / "report.json", report)
        logger.info("wrote %s", cfg.out)
    else:
        timings["total"] = time.perf_counter() - t0
        report["timings"] = timings
    return report
