"""What ``--calib generated`` costs and what its windows look like, beside C4 windows of the same shape.

Samples ``--nsamples`` x ``--seqlen`` tokens from the dense model (``ebft.data.generate_windows``, the
run's own sampler, at the given temperature and top-p) and cuts as many C4 train windows, then reports
the sampling time and throughput, and for both sets: the share of EOS tokens, the distinct tokens per
window, and the dense model's own mean next-token cross-entropy on them (how "typical" the text is for
the model: sampled text scores near the model's entropy, real text higher). Prints one JSON object on
stdout; logs go to stderr.

    EBFT_DATA_DIR=../shared/data python bench/generated_calibration.py --nsamples 64 --seqlen 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402


def _stats(model: torch.nn.Module, ids: torch.Tensor, eos: int | None) -> dict[str, float]:
    with torch.no_grad():
        losses = [float(model(ids[i:i + 8], labels=ids[i:i + 8]).loss) for i in range(0, ids.shape[0], 8)]
    distinct = [len(set(row.tolist())) for row in ids]
    return {"eos_share": C.r(float((ids == eos).float().mean()) if eos is not None else 0.0, 4),
            "distinct_tokens_per_window": C.r(sum(distinct) / len(distinct), 1),
            "dense_cross_entropy": C.r(sum(losses) / len(losses), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    machine = C.start(threads=args.threads)
    from ebft.data import calibration_windows, generate_windows
    from ebft.data.generate import GeneratedOptions
    from ebft.models.loading import load_model

    loaded = load_model(args.model)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    options = GeneratedOptions(temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size)
    start = time.perf_counter()
    generated = generate_windows(model, tokenizer, args.nsamples, args.seqlen, 0, options, torch.device("cpu"))
    seconds = time.perf_counter() - start
    c4 = calibration_windows(tokenizer, "c4", args.nsamples, args.seqlen, 0)
    eos = tokenizer.eos_token_id
    C.emit({"bench": "generated_calibration", "machine": machine, "model": args.model, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "temperature": args.temperature, "top_p": args.top_p,
            "batch_size": args.batch_size, "sampling_s": C.r(seconds, 1),
            "tokens_per_s": C.r(args.nsamples * args.seqlen / seconds, 1),
            "generated": _stats(model, generated, eos), "c4": _stats(model, c4, eos),
            "first_window_start": tokenizer.decode(generated[0, :40])})


if __name__ == "__main__":
    main()
