"""Inference speed, size and parameter count of a structured-pruned model against the dense one.

    python bench/structured_inference.py runs/issue4/structured25-ebft/model [--dense smollm2-135m]

Both models run in the same process, on the same tokens (the first ``--windows`` windows of
``--seqlen`` tokens of WikiText-2 test, tokenized by the dense model's tokenizer), in fp32 on the
CPU, alternating dense / pruned ``--repeats`` times after one warm-up each, so that load drift on a
shared machine hits both alike. Two measurements:

- ``prefill``: one forward over all windows (batch ``--batch``), no cache: tokens/s;
- ``decode``: greedy generation of ``--new-tokens`` tokens after a 128-token prompt, with the KV
  cache, batch 1: new tokens/s.

The file size of the dense model is that of its fp32 safetensors, saved to a temporary folder by
``ebft.export.save_model`` (as ``ebft prune`` saves; its report's ``saved_bytes`` counts the same files).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine_state, r, setup_logging  # noqa: E402
from ebft.data import evaluation_tokens  # noqa: E402
from ebft.export import save_model  # noqa: E402
from ebft.models import load_model  # noqa: E402


def _file_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


@torch.no_grad()
def _prefill(model: torch.nn.Module, tokens: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, tokens.shape[0], batch):
        model(input_ids=tokens[i:i + batch], use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def _decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned", help="the structured-pruned model folder (RUN/model)")
    parser.add_argument("--dense", default="smollm2-135m", help="the dense model it came from")
    parser.add_argument("--data-dir", type=Path, default=None, help="local data mirror (default $EBFT_DATA_DIR)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    setup_logging(quiet=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    dense = load_model(args.dense)
    pruned = load_model(args.pruned)
    tokens = evaluation_tokens(dense.tokenizer, "wikitext2:test", args.seqlen, args.windows, data_dir=args.data_dir)
    prompt = tokens[:1, :128]
    models = {"dense": dense.model.eval(), "structured": pruned.model.eval()}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(dense.model, dense.tokenizer, Path(tmp))  # as ebft prune saves its models
        dense_bytes = _file_bytes(Path(tmp))

    times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
    for name, model in models.items():  # warm-up
        _prefill(model, tokens[: args.batch], args.batch)
        _decode(model, prompt, 4)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name]["prefill"].append(_prefill(model, tokens, args.batch))
            times[name]["decode"].append(_decode(model, prompt, args.new_tokens))

    result: dict = {"how": " ".join(__doc__.split("\n\n")[2].split()), "tokens": {
        "source": "wikitext2:test", "windows": int(tokens.shape[0]), "seqlen": args.seqlen,
        "prefill_tokens": int(tokens.numel()), "decode_prompt": int(prompt.shape[1]), "decode_new": args.new_tokens}}
    for name, model in models.items():
        prefill = statistics.median(times[name]["prefill"])
        decode = statistics.median(times[name]["decode"])
        result[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "file_bytes": dense_bytes if name == "dense" else _file_bytes(Path(args.pruned)),
            "heads": [model.config.num_attention_heads, model.config.num_key_value_heads],
            "intermediate": model.config.intermediate_size,
            "prefill_s": [r(t) for t in times[name]["prefill"]],
            "prefill_tokens_per_s": r(tokens.numel() / prefill),
            "decode_s": [r(t) for t in times[name]["decode"]],
            "decode_tokens_per_s": r(args.new_tokens / decode),
        }
    d, s = result["dense"], result["structured"]
    result["ratio_structured_over_dense"] = {
        "parameters": r(s["parameters"] / d["parameters"], 4),
        "file_bytes": r(s["file_bytes"] / d["file_bytes"], 4),
        "prefill_speedup": r(s["prefill_tokens_per_s"] / d["prefill_tokens_per_s"]),
        "decode_speedup": r(s["decode_tokens_per_s"] / d["decode_tokens_per_s"]),
    }
    result["machine"] = machine_state()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
