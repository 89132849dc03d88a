"""Zero-shot multiple-choice accuracy, the way lm-evaluation-harness 0.4 measures it.

Two back-ends compute the same numbers:

- ``harness``: lm-evaluation-harness itself (``pip install 'ebft[eval]'``), with the in-memory model
  handed to its ``HFLM`` wrapper; it downloads the datasets from the Hugging Face hub.
- ``local``: an in-house re-implementation over local copies of the evaluation files
  (:mod:`ebft.eval.tasks_local`), needing neither lm-eval nor the hub.

For every choice the model scores the continuation given the context (summed log-probabilities of
its tokens). ``acc`` is 1 when the choice with the highest sum is the gold one; ``acc_norm`` divides
each sum by the length in characters of the choice string first (lm-eval's ``acc_norm``; for ASCII
text that is its byte length). Tokenization follows lm-eval's ``HFLM``: the context and
context + continuation are encoded with the tokenizer's default special tokens, the continuation's
tokens are those after the context's, trailing spaces of the context move into the continuation,
an empty context becomes the BOS (else EOS) token, and a sequence longer than the model's context
is cut from the left.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ebft.errors import EbftError, UsageError
from ebft.eval.tasks_local import (
    SUPPORTED_TASKS,
    TASKS,
    ZEROSHOT_SUBDIR,
    Example,
    load_examples,
    missing_files,
    parse_tasks,
    zeroshot_dir,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "harness", "local")
#: lm-eval's fallback context length when neither config nor tokenizer gives one
DEFAULT_MAX_LENGTH = 2048
_TOKENIZER_INFINITY = 1000000000000000019884624838656
_TRUE = ("1", "true", "yes", "on")

__all__ = [
    "BACKENDS", "SUPPORTED_TASKS", "LocalPlan", "TaskResult", "ZeroShotResult", "acc_stderr", "encode_pair",
    "evaluate_harness",
    "evaluate_local", "evaluate_zeroshot", "hub_reachable", "loglikelihoods", "mean_acc_stderr", "model_max_length",
    "parse_tasks", "plan_local", "select_backend",
]


@dataclass
class TaskResult:
    """One task's scores; the per-example details are filled by the local back-end only."""

    task: str
    acc: float
    acc_norm: float | None
    n: int
    predictions: list[int] = field(default_factory=list, repr=False)
    norm_predictions: list[int] = field(default_factory=list, repr=False)
    golds: list[int] = field(default_factory=list, repr=False)
    loglikelihoods: list[list[float]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"acc": self.acc}
        if self.acc_norm is not None:
            out["acc_norm"] = self.acc_norm
        out["n"] = self.n
        if self.n > 1:
            out["acc_stderr"] = acc_stderr(self.acc, self.n)
            if self.acc_norm is not None:
                out["acc_norm_stderr"] = acc_stderr(self.acc_norm, self.n)
        return out


def acc_stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy over ``n`` examples, as lm-eval reports it: the sample standard
    deviation of the 0/1 scores (``n - 1`` in the denominator) over ``sqrt(n)``."""
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 examples; got {n}")
    return math.sqrt(acc * (1.0 - acc) / (n - 1))


def mean_acc_stderr(tasks: dict[str, dict[str, Any]]) -> float | None:
    """Standard error of the unweighted mean ``acc`` over independent tasks (``{task: {"acc", "n"}}``):
    ``sqrt(sum of squared task errors) / tasks``; ``None`` if a task has fewer than 2 examples."""
    if not tasks or any(t["n"] < 2 for t in tasks.values()):
        return None
    return math.sqrt(sum(acc_stderr(t["acc"], t["n"]) ** 2 for t in tasks.values())) / len(tasks)


@dataclass
class ZeroShotResult:
    tasks: dict[str, TaskResult]
    backend: str  # "harness" or "local"
    limit: int | None
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # task -> why it was not run

    @property
    def mean_acc(self) -> float:
        """Unweighted mean of the tasks' ``acc``."""
        return sum(r.acc for r in self.tasks.values()) / len(self.tasks)

    def to_dict(self) -> dict[str, Any]:
        tasks = {name: r.to_dict() for name, r in self.tasks.items()}
        out: dict[str, Any] = {"tasks": tasks, "mean_acc": self.mean_acc}
        stderr = mean_acc_stderr(tasks)
        if stderr is not None:
            out["mean_acc_stderr"] = stderr
        out.update(backend=self.backend, limit=self.limit)
        if self.skipped:
            out["skipped"] = dict(self.skipped)
        return out


# --- log-likelihood of continuations, as lm-eval's HFLM computes it --------------------------------

def _encode(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer.encode`` with its default special tokens, unless ``text`` already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def _prefix_token_id(tokenizer: Any) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise EbftError("the tokenizer has neither a BOS nor an EOS token to stand for an empty context")
    return int(token)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it (lm-eval's ``_encode_pair``)."""
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = _prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model: nn.Module, tokenizer: Any = None) -> int:
    """The model's context length: config (``text_config`` first), then tokenizer, then 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != _TOKENIZER_INFINITY and limit < _TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def loglikelihoods(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``.

    Sequences are batched longest first and right-padded (padding after a causal sequence cannot
    change it); requests with the same input and continuation length (such as one-token answers to
    one context) share one forward pass; only the continuation's positions go through the LM head
    when the model supports ``logits_to_keep``. ``on_done(i)`` is called once request ``i`` is scored.
    """
    from ebft.capture import calibration_context

    if batch_size < 1:
        raise UsageError(f"batch size must be a positive whole number; got {batch_size}")
    max_len = max_length or model_max_length(model, tokenizer)
    # one entry per distinct (input ids, continuation length): the forward pass it needs
    groups: dict[tuple[tuple[int, ...], int], list[tuple[int, list[int]]]] = {}
    truncated = 0
    for index, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise EbftError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
        if len(cont) > max_len:
            raise EbftError(f"a continuation of {len(cont)} tokens exceeds the model's context of {max_len}")
        truncated += len(ctx) + len(cont) > max_len + 1
        inp = tuple((ctx + cont)[-(max_len + 1):][:-1])
        groups.setdefault((inp, len(cont)), []).append((index, cont))
    if truncated:
        logger.warning("%d of %d sequences exceed the model's context of %d tokens; their contexts were cut from "
                       "the left (as lm-eval does)", truncated, len(requests), max_len)
    keys = sorted(groups, key=lambda k: (-len(k[0]), k[0]))
    device = model.get_input_embeddings().weight.device
    use_keep = _accepts_logits_to_keep(model)
    out: list[float] = [math.nan] * len(requests)
    with calibration_context(model):
        for start in range(0, len(keys), batch_size):
            chunk = keys[start : start + batch_size]
            width = len(chunk[0][0])
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            needed: set[int] = set()
            for row, (inp, contlen) in enumerate(chunk):
                ids[row, : len(inp)] = torch.tensor(inp, dtype=torch.long)
                needed.update(range(len(inp) - contlen, len(inp)))
            keep = sorted(needed)
            column = {pos: col for col, pos in enumerate(keep)}
            ids = ids.to(device)
            if use_keep:
                logits = model(input_ids=ids, use_cache=False,
                               logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device)).logits
            else:
                logits = model(input_ids=ids, use_cache=False).logits[:, keep]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, key in enumerate(chunk):
                inp, contlen = key
                cols = torch.tensor([column[p] for p in range(len(inp) - contlen, len(inp))], device=device)
                rows = logprobs[row, cols]  # [contlen, vocab]
                for index, cont in groups[key]:
                    target = torch.tensor(cont, dtype=torch.long, device=device)
                    out[index] = float(rows.gather(1, target[:, None]).sum())
                    if on_done is not None:
                        on_done(index)
    if not all(math.isfinite(v) for v in out):
        raise EbftError("the model produced non-finite log-likelihoods; its weights are broken (NaN/inf)")
    return out


# --- local back-end ---------------------------------------------------------------------------

def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties, like ``numpy.argmax``."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


@dataclass
class LocalPlan:
    folder: Path | None
    run: list[str]
    skipped: dict[str, str]


def plan_local(tasks: Sequence[str], data_dir: str | Path | None = None) -> LocalPlan:
    """Which tasks the local back-end can run from ``data_dir``; fails (one line) on anything else.

    HellaSwag has no copy in the project's shared data: without its file it is skipped with a
    warning when other tasks were asked for, and is an error when it is the only task.
    """
    names = parse_tasks(list(tasks))
    folder = zeroshot_dir(data_dir)
    run: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        missing = missing_files(name, folder)
        if not missing:
            run.append(name)
            continue
        where = f"{folder / missing[0]}" if folder is not None else f"DATA_DIR/{ZEROSHOT_SUBDIR}/{missing[0]}"
        if name == "hellaswag":
            reason = (f"hellaswag is not available offline: no local copy ({where}); it needs the "
                      f"lm-eval back-end with the Hugging Face hub")
            if len(names) == 1:
                raise EbftError(reason)
            skipped[name] = reason
            logger.warning("%s; skipping it", reason)
            continue
        if folder is None:
            raise EbftError(f"zero-shot task {name} runs offline from local files: pass --data-dir DIR (with "
                            f"DIR/{ZEROSHOT_SUBDIR}/{missing[0]}) or set EBFT_DATA_DIR")
        raise EbftError(f"zero-shot task {name} needs {where}, which does not exist")
    return LocalPlan(folder, run, skipped)


def evaluate_local(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    examples: dict[str, list[Example]] | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy from local files (or from ``examples`` given per task)."""
    _check_limit(limit)
    if examples is None:
        plan = plan_local(tasks, data_dir)
        names, skipped = plan.run, plan.skipped
        examples = {name: load_examples(name, plan.folder, limit) for name in names}  # type: ignore[arg-type]
    else:
        names, skipped = parse_tasks(list(tasks)), {}
        examples = {name: examples[name][:limit] if limit else examples[name] for name in names}
    if device is not None:
        model.to(device)
    start = time.perf_counter()
    results: dict[str, TaskResult] = {}
    for name in names:
        results[name] = _score_task(model, tokenizer, name, examples[name], batch_size)
    seconds = time.perf_counter() - start
    return ZeroShotResult(results, "local", limit, seconds, skipped)


def _score_task(model: nn.Module, tokenizer: Any, name: str, items: list[Example], batch_size: int) -> TaskResult:
    requests: list[tuple[str, str]] = []
    owner: list[int] = []
    for i, ex in enumerate(items):
        requests.extend(ex.requests)
        owner.extend([i] * len(ex.requests))
    remaining = [len(ex.requests) for ex in items]
    start = time.perf_counter()
    with tqdm(total=len(items), desc=f"zero-shot {name}", unit="ex", leave=False, disable=None) as bar:
        def done(index: int) -> None:
            remaining[owner[index]] -= 1
            if remaining[owner[index]] == 0:
                bar.update(1)

        lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, on_done=done)
    per_example: list[list[float]] = []
    pos = 0
    for ex in items:
        per_example.append(lls[pos : pos + len(ex.requests)])
        pos += len(ex.requests)
    preds = [_argmax(ll) for ll in per_example]
    norm_preds = [_argmax([v / len(c) for v, c in zip(ll, ex.choices)]) for ll, ex in zip(per_example, items)]
    golds = [ex.gold for ex in items]
    n = len(items)
    acc = sum(p == g for p, g in zip(preds, golds)) / n
    acc_norm = sum(p == g for p, g in zip(norm_preds, golds)) / n if TASKS[name].has_acc_norm else None
    logger.info("%s: acc %.4f%s over %d examples in %.1f s", name, acc,
                f", acc_norm {acc_norm:.4f}" if acc_norm is not None else "", n, time.perf_counter() - start)
    return TaskResult(name, acc, acc_norm, n, preds, norm_preds, golds, per_example)


# --- harness back-end -------------------------------------------------------------------------

def evaluate_harness(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy through lm-evaluation-harness 0.4, with the in-memory model."""
    _check_limit(limit)
    names = parse_tasks(list(tasks))
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise EbftError(f"the harness back-end needs lm-evaluation-harness ({exc}); install it with: "
                        f"pip install 'ebft[eval]', or use --zeroshot-backend local") from None
    if device is not None:
        model.to(device)
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, log_samples=False, bootstrap_iters=0)
    except (ConnectionError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EbftError(f"lm-eval could not load its datasets ({first}); use --zeroshot-backend local") from None
    if not out or "results" not in out:
        raise EbftError("lm-eval returned no results")
    counts = out.get("n-samples", {})
    results: dict[str, TaskResult] = {}
    for name in names:
        metrics = out["results"].get(name)
        if metrics is None:
            raise EbftError(f"lm-eval returned no result for task {name}")
        acc = _metric(metrics, "acc")
        if acc is None:
            raise EbftError(f"lm-eval's result for {name} has no acc")
        acc_norm = _metric(metrics, "acc_norm") if TASKS[name].has_acc_norm else None
        n = counts.get(name, {}).get("effective")
        if n is None:
            n = limit if limit is not None else 0
            logger.warning("lm-eval did not report how many %s examples it scored; n is recorded as %d", name, n)
        results[name] = TaskResult(name, acc, acc_norm, int(n))
    return ZeroShotResult(results, "harness", limit, time.perf_counter() - start)


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    for key in (f"{name},none", name):
        if key in metrics and metrics[key] is not None:
            return float(metrics[key])
    return None


# --- choosing a back-end ------------------------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (any HTTP status counts); false when HF_HUB_OFFLINE is set."""
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets/nyu-mll/glue", method="HEAD"),
                               timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def harness_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def select_backend(choice: str = "auto") -> tuple[str, str]:
    """``(backend, why)``: ``auto`` picks the harness only when lm-eval is installed and the hub answers."""
    if choice not in BACKENDS:
        raise UsageError(f"--zeroshot-backend {choice!r} is unknown; choose one of: {', '.join(BACKENDS)}")
    if choice == "local":
        return "local", "asked for"
    if choice == "harness":
        if not harness_installed():
            raise EbftError("--zeroshot-backend harness needs lm-evaluation-harness; install it with: "
                            "pip install 'ebft[eval]'")
        return "harness", "asked for"
    if not harness_installed():
        return "local", "lm-eval is not installed"
    if any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return "local", "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "local", "the Hugging Face hub is unreachable"
    return "harness", "lm-eval is installed and the hub answers"


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"--limit must be a positive whole number; got {limit}")


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | str,
    backend: str = "auto",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on ``tasks`` with the chosen (or automatically selected) back-end.

    ``limit`` scores the first N examples of each task, in the order of the split's file (the
    dataset's published order, which is also the order lm-eval's ``--limit`` takes).
    """
    names = parse_tasks(tasks if isinstance(tasks, str) else list(tasks))
    _check_limit(limit)
    chosen, why = select_backend(backend)
    logger.info("zero-shot back-end: %s (%s)", chosen, why)
    if chosen == "harness":
        return evaluate_harness(model, tokenizer, names, limit=limit, batch_size=batch_size, device=device)
    return evaluate_local(model, tokenizer, names, data_dir=data_dir, limit=limit, batch_size=batch_size,
                          device=device)
