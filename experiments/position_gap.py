"""Where in a long window a repair closes the pruning gap: mean next-token loss by position, per model.

Calibration windows are short (the study's are 256 tokens) while perplexity is read on windows of 1024. This
script tells whether a repair trained on short windows also repairs the later positions: for each evaluation
source it scores the first ``--max-windows`` windows of ``--seqlen`` tokens with every model and prints, per
span of positions, each model's mean negative log-likelihood and, for every model after the first two, the
share of the gap closed there, (nll_pruned - nll_model) / (nll_pruned - nll_dense), the first model being the
dense one and the second the pruned one::

    EBFT_DATA_DIR=../shared/data python experiments/position_gap.py smollm2-135m runs/none/model runs/kd/model \\
        --data wikitext2:validation --data c4 --spans 0,255,511,1023

Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from torch import nn


def position_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> torch.Tensor:
    """Mean negative log-likelihood of each predicted position (``[seqlen - 1]``, float64) over ``windows``."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            total += nll.double().sum(0)
    return total / windows.shape[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="the dense model, the pruned one, then the repaired ones")
    parser.add_argument("--data", action="append", default=None, help="evaluation source (repeatable; default "
                                                                      "wikitext2:validation and c4)")
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=16)
    parser.add_argument("--spans", default="0,255,511,1023", help="predicted-position boundaries, ascending")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give the dense model and the pruned one, then any repaired ones")
    bounds = [int(b) for b in args.spans.split(",")]
    if bounds != sorted(set(bounds)) or bounds[0] < 0 or bounds[-1] > args.seqlen - 1:
        parser.error(f"--spans must ascend within 0..{args.seqlen - 1}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ebft.data.tokens import evaluation_tokens
    from ebft.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.models[0])
    data_dir = os.environ.get("EBFT_DATA_DIR")
    sources = {s: evaluation_tokens(tokenizer, s, args.seqlen, args.max_windows, data_dir)
               for s in (args.data or ["wikitext2:validation", "c4"])}
    spans = list(zip(bounds[:-1], bounds[1:]))
    nll: dict[str, dict[str, list[float]]] = {}
    for spec in args.models:
        model = load_model(spec, dtype=torch.float32, tokenizer=tokenizer).model
        nll[spec] = {}
        for source, windows in sources.items():
            curve = position_nll(model, windows)
            nll[spec][source] = [float(curve[a:b].mean()) for a, b in spans] + [float(curve.mean())]
        del model
    names = [f"{a}-{b}" for a, b in spans] + ["all"]
    dense, pruned = args.models[:2]
    out = {"spans": names, "seqlen": args.seqlen, "windows": args.max_windows, "nll": nll, "gap_closed": {}}
    for spec in args.models[2:]:
        out["gap_closed"][spec] = {
            source: [round((p - m) / (p - d), 4) for d, p, m in zip(nll[dense][source], nll[pruned][source],
                                                                    nll[spec][source])]
            for source in sources}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
