"""What ebft does on one CUDA GPU: a whole run at the paper's budget, and a 7B-shaped block at the paper's batch.

1. ``ebft prune`` (``run_prune``) on a SmolLM2-135M-shaped Llama with random weights (30 blocks, hidden
   576, 9 heads / 3 KV heads, vocabulary 49152) and a byte-level tokenizer, at the paper's budget:
   256 calibration windows of 1024 tokens of C4 (``--data-dir``; CPython's documentation if absent),
   10 epochs, batch 8, lr 2e-4, Wanda 50%, on CUDA; its per-phase times, peak GPU memory, the
   precision chosen, the held-out guard's decisions and the WikiText-2 perplexity (random weights, so
   only a sanity figure).
2. One Llama-2-7B-shaped decoder block (hidden 4096, intermediate 11008, 32 heads) through the walk
   on CUDA: magnitude 50% and EBFT steps at the paper's batch (8 x 1024 tokens), timed with CUDA
   synchronisation; the peak GPU memory; and what a full 7B run at the paper's budget (32 blocks,
   280 steps each, the no-grad passes over 256 windows) takes at that rate, against the paper's 30 min.

``--smoke`` runs both with tiny sizes (for a machine without a GPU: the script itself is checked).
Prints one JSON object on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

log = logging.getLogger("bench.gpu_check")
GiB = 2**30
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke)")
    p.add_argument("--data-dir", type=Path, default=None, help="a copy of the shared data (c4/, wikitext2/)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script without a GPU")
    p.add_argument("--block-steps", type=int, default=20, help="timed EBFT steps on the 7B block (default 20)")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float | None:
    return C.r(torch.cuda.max_memory_allocated(device) / GiB) if device.type == "cuda" else None


def whole_run(args: argparse.Namespace, device: torch.device, work: Path) -> dict:
    """The SmolLM2-shaped model through ``run_prune`` at the paper's budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.config import CalibConfig, EvalConfig, FinetuneConfig, PruneConfig, RunConfig
    from ebft.runner import run_prune

    shape = dict(SMOLLM2, num_hidden_layers=2, vocab_size=258) if args.smoke else SMOLLM2
    config = LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=257, eos_token_id=256, pad_token_id=None)
    torch.manual_seed(0)
    folder = work / "smollm2-shaped"
    LlamaForCausalLM(config).save_pretrained(folder)
    C.byte_tokenizer().save_pretrained(folder)
    have_data = args.data_dir is not None and (args.data_dir / "c4" / "train.jsonl").is_file()
    nsamples, seqlen = (8, 64) if args.smoke else (256, 1024)
    evals = ["wikitext2"] if have_data and (args.data_dir / "wikitext2" / "test.txt").is_file() else ["pydoc:test"]
    cfg = RunConfig(model=str(folder), out=work / "run", prune=PruneConfig("wanda", 0.5),
                    calib=CalibConfig(source="c4" if have_data else "pydoc", nsamples=nsamples, seqlen=seqlen),
                    finetune=FinetuneConfig(method="ebft", epochs=1 if args.smoke else 10, lr=2e-4, batch_size=8),
                    eval=EvalConfig(sources=evals, seqlen=seqlen, max_windows=4 if args.smoke else 16),
                    device=device.type, data_dir=args.data_dir if have_data else None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    report = run_prune(cfg)
    seconds = time.perf_counter() - start
    blocks = report.blocks
    return {
        "model": "SmolLM2-135M-shaped, random weights" + (" (2 blocks, smoke)" if args.smoke else ""),
        "budget": f"{nsamples} x {seqlen} tokens of {cfg.calib.source}, {cfg.finetune.epochs} epochs, batch 8, "
                  "lr 2e-4, Wanda 50%",
        "seconds": C.r(seconds),
        "timings": {k: C.r(v) for k, v in report.timings.items()},
        "seconds_per_block": C.r(sum(b.seconds for b in blocks) / len(blocks)),
        "train_seconds_per_block": C.r(sum(b.train_seconds for b in blocks) / len(blocks)),
        "steps_per_block": blocks[0].steps,
        "blocks_improved": report.improved_blocks,
        "blocks_restored": report.restored_blocks,
        "precision": report.precision,
        "peak_gpu_memory_gib": _peak_gib(device),
        "eval": report.eval,
        "model_guard": {k: (report.model_guard or {}).get(k) for k in ("decision", "seconds")},
        "sparsity": report.sparsity.get("overall"),
    }


class _BlockClock:
    """The 7B block's training steps, timed from the first autograd forward to the end of tuning, synchronised."""

    def __init__(self, device: torch.device) -> None:
        from ebft.walk import Callback

        clock = self

        class Hooks(Callback):
            def on_block_start(self, walk, index):
                _sync(device)
                clock.start = time.perf_counter()

            def on_targets(self, walk, index):
                _sync(device)
                clock.targets_s = time.perf_counter() - clock.start
                clock.timer = C.StepTimer(walk.block)

            def on_tuned(self, walk, index, report):
                _sync(device)
                clock.tuned = time.perf_counter()
                clock.report = report

        self.callback = Hooks()
        self.start = self.tuned = self.targets_s = 0.0
        self.timer = self.report = None


def block_7b(args: argparse.Namespace, device: torch.device) -> dict:
    """One 7B-shaped block: targets, magnitude 50%, EBFT steps at the paper's batch, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.config import FinetuneConfig, PruneConfig
    from ebft.precision import block_shapes, describe_precision
    from ebft.walk import prune_and_finetune

    shape = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4) \
        if args.smoke else LLAMA2_7B
    bs, seqlen = (2, 64) if args.smoke else (8, 1024)
    steps = 3 if args.smoke else args.block_steps
    config = LlamaConfig(**shape, num_hidden_layers=1, vocab_size=256, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    p_block = sum(p.numel() for p in model.model.layers[0].parameters())
    ids = torch.randint(0, 256, (bs * steps, seqlen), generator=torch.Generator().manual_seed(0))
    clock = _BlockClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    finetune = FinetuneConfig(method="ebft", epochs=1, batch_size=bs, lr=2e-4, holdout_fraction=0.0)
    prune_and_finetune(model, ids, PruneConfig("magnitude", 0.5), finetune, device, callbacks=[clock.callback],
                       forward_batch_size=bs, progress=False)
    clock.timer.stop()
    timing = clock.timer.summary(warmup=1)
    step_s = timing["median_step_s"]
    # a full 7B run at the paper's budget: 32 blocks x (280 steps + the no-grad passes over all 256 windows)
    forward_s_per_window = clock.targets_s / ids.shape[0]  # the dense pass, the cheapest per window
    no_grad_passes = 4  # dense targets, initial loss, final loss + propagation (one pass), and the guard's share
    per_block = 280 * step_s + no_grad_passes * 256 * forward_s_per_window
    full_min = 32 * per_block / 60
    return {
        "block": "Llama-2-7B-shaped" + (" (smoke: small)" if args.smoke else ""),
        "block_parameters": p_block,
        "batch": f"{bs} x {seqlen} tokens",
        "precision": describe_precision(finetune.precision, device, block_shapes(model.model.layers[0]),
                                        bs * seqlen).precision,
        "steps_timed": timing["steps_timed"],
        "median_step_s": C.r(step_s),
        "median_fwd_bwd_s": C.r(timing["median_fwd_bwd_s"]),
        "dense_pass_s_per_window": C.r(forward_s_per_window),
        "peak_gpu_memory_gib": _peak_gib(device),
        "full_7b_minutes": C.r(full_min),
        "full_7b_arith": (f"32 blocks x (280 steps x {step_s:.4g} s + {no_grad_passes} no-grad passes x 256 windows x "
                          f"{forward_s_per_window:.4g} s) = {full_min:.3g} min"),
        "paper_minutes": 30,
        "vs_paper": C.r(full_min / 30),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = C.start(args.quiet)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --smoke to check the script")
    gpu = {"name": torch.cuda.get_device_name(device), "memory_gib": C.r(
        torch.cuda.get_device_properties(device).total_memory / GiB)} if device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="ebft-gpu-check-") as tmp:
        run = whole_run(args, device, Path(tmp))
        block = block_7b(args, device)
    C.emit({"bench": "gpu_check", "device": str(device), "gpu": gpu, "torch": torch.__version__,
            "whole_run": run, "block_7b": block, "machine": state})
    return 0


if __name__ == "__main__":
    sys.exit(main())
