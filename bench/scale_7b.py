"""A Llama-2-7B-shaped run on this machine: ``ebft prune`` streams a 13.5 GB bf16 checkpoint block by block.

Writes a checkpoint with Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, 32 layers,
vocabulary 32000, untied head) and random bf16 weights, as sharded safetensors with the standard index,
into a temporary folder (``--workdir``; removed at the end unless ``--keep``), with a byte-level
tokenizer whose 258 ids the vocabulary covers. Then runs the real CLI on it in a child process:

    python -m ebft prune CHECKPOINT --out OUT --pruner wanda --sparsity 0.5 --finetune ebft \\
        --calib pydoc --nsamples 8 --seqlen 128 --epochs 1 --offload disk --stream on \\
        --eval pydoc:test --eval-seqlen 128 --max-windows 2

The child records its own peak resident memory (``VmHWM``: anonymous and file-backed pages) as it
exits; a sampler also records the largest ``VmRSS``, ``RssAnon`` and ``RssFile`` it sees every 0.5 s. Afterwards the output is
loaded with ``AutoModelForCausalLM.from_pretrained`` (bf16) and every decoder-block linear weight is
checked to have exactly half of each row at 0.0 (Wanda's per-row 50%). Printed as one JSON object:
``peak_rss_gib``, ``seconds_per_block``, ``input_bytes``, ``output_bytes``, the checks, the disk the run
folder took at its largest, and the host-memory arithmetic for 13B and 70B from the measured per-block
cost. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402

log = logging.getLogger("bench.scale_7b")
GiB = 2**30

SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, layers, vocab)
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 40, 32000),
    "70b": (8192, 28672, 64, 8, 80, 32000),
}

#: ``python -c CHILD OUT_JSON ARGS...``: ``ebft ARGS...``, then its own VmHWM into OUT_JSON
CHILD = r"""
import json, sys
from ebft.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
json.dump({"exit": code, "vmhwm_kb": peak}, open(sys.argv[1], "w"))
sys.exit(code)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (default 32, Llama-2-7B's)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows (default 8)")
    p.add_argument("--seqlen", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--epochs", type=int, default=1, help="EBFT epochs per block (default 1)")
    p.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and the run go (default: a "
                                                              "temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the run folder")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the run (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    return p.parse_args(argv)


def block_params(hidden: int, inter: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return attn + 3 * hidden * inter + 2 * hidden  # + the two RMSNorm weights


def write_checkpoint(folder: Path, layers: int, shard_bytes: int = 2 * GiB) -> dict[str, int]:
    """The random bf16 Llama-2-7B-shaped checkpoint, tensor by tensor (never the whole model in memory)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ebft.export import _shards
    from ebft.fsio import write_text

    hidden, inter, heads, kv_heads, _, vocab = SHAPES["7b"]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=257, eos_token_id=256,
                         pad_token_id=None, tie_word_embeddings=False, dtype="bfloat16")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    names = [(n, tuple(p.shape)) for n, p in skeleton.named_parameters()]
    plan = _shards([(n, 2 * torch.Size(s).numel()) for n, s in names], shard_bytes)
    files = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
    shapes = dict(names)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    folder.mkdir(parents=True, exist_ok=True)
    for file, shard in zip(files, plan):
        tensors = {}
        for name in shard:
            shape = shapes[name]
            if len(shape) == 1:  # norm weights
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = file
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        log.info("wrote %s", folder / file)
    write_text(folder / "model.safetensors.index.json",
               json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(folder)
    C.byte_tokenizer().save_pretrained(folder)
    return {"tensor_bytes": total, "files": len(files), "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def check_output(folder: Path, layers: int) -> dict[str, object]:
    """Load the output with from_pretrained and check every block weight's per-row sparsity."""
    from transformers import AutoModelForCausalLM

    from ebft.models import find_blocks

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    load_s = time.perf_counter() - start
    blocks = find_blocks(model)
    bad = []
    for name, linear in blocks.all_linears().items():
        w = linear.weight.data
        if not bool(((w == 0).sum(1) == w.shape[1] // 2).all()):
            bad.append(name)
    return {"loaded_with_from_pretrained": True, "load_seconds": round(load_s, 1), "dtype": str(model.dtype),
            "blocks": len(blocks), "linear_layers_checked": len(blocks.all_linears()),
            "layers_not_exactly_half_per_row": bad, "masks_exact": not bad and len(blocks) == layers}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.setup_logging(args.quiet)
    state_before = C.machine_state()
    work = Path(tempfile.mkdtemp(prefix="ebft-scale-", dir=args.workdir))
    checkpoint, out = work / "llama2-7b-shaped", work / "run"
    try:
        t = time.perf_counter()
        written = write_checkpoint(checkpoint, args.layers)
        write_s = time.perf_counter() - t
        log.info("checkpoint: %.2f GB in %d files in %.0f s", written["file_bytes"] / 1e9, written["files"], write_s)
        run_args = ["prune", str(checkpoint), "--out", str(out), "--pruner", "wanda", "--sparsity", "0.5",
                    "--finetune", "ebft", "--calib", "pydoc", "--nsamples", str(args.nsamples), "--seqlen",
                    str(args.seqlen), "--epochs", str(args.epochs), "--offload", "disk", "--stream", "on",
                    "--eval", "pydoc:test", "--eval-seqlen", str(args.seqlen), "--max-windows", "2", "--device", "cpu"]
        if args.threads:
            run_args += ["--threads", str(args.threads)]
        peak_disk = {"bytes": 0}
        stop = threading.Event()

        def watch_disk() -> None:  # the run folder and its work folder at their largest
            while not stop.wait(2.0):
                peak_disk["bytes"] = max(peak_disk["bytes"], folder_bytes(out) + folder_bytes(work / ".run.partial"))

        watcher = threading.Thread(target=watch_disk, daemon=True)
        watcher.start()
        marks = work / "child.json"
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marks), *run_args],
                                env={**os.environ, "TQDM_DISABLE": "1"}, stderr=subprocess.PIPE, text=True)
        sampled = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}

        def watch_memory() -> None:  # the child's resident memory, anonymous and file-backed, every 0.5 s
            while proc.poll() is None:
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        for line in f:
                            key = line.split(":")[0]
                            if key in sampled:
                                sampled[key] = max(sampled[key], int(line.split()[1]) * 1024)
                except OSError:
                    return
                time.sleep(0.5)

        sampler = threading.Thread(target=watch_memory, daemon=True)
        sampler.start()
        _, stderr = proc.communicate()
        run_s = time.perf_counter() - t
        stop.set()
        watcher.join()
        sampler.join()
        sys.stderr.write(stderr[-4000:])
        if proc.returncode != 0:
            raise SystemExit(f"ebft prune failed with exit {proc.returncode}")
        child = json.loads(marks.read_text())
        report = json.loads((out / "report.json").read_text())
        output_bytes = folder_bytes(out / "model")
        output_tensor_files = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
        checks = check_output(out / "model", args.layers)
        blocks = report["blocks"]
        per_block = sum(b["seconds"] for b in blocks) / len(blocks)
        peak = child["vmhwm_kb"] * 1024
        hidden, inter, heads, kv, layers, vocab = SHAPES["7b"]
        p_block = block_params(hidden, inter, heads, kv)
        non_block = 2 * vocab * hidden * 2 + hidden * 2  # embeddings + untied head + final norm, bf16
        per_param = (peak - non_block) / p_block  # bytes of host memory at the peak per parameter of the block in hand
        arithmetic = {}
        for name in ("13b", "70b"):
            h, i, nh, nkv, nl, v = SHAPES[name]
            pb, nb = block_params(h, i, nh, nkv), 2 * v * h * 2 + h * 2
            arithmetic[name] = {
                "block_params": pb, "non_block_bytes": nb, "checkpoint_bytes_bf16": 2 * (nl * pb + nb),
                "peak_host_gib_estimate": C.r((nb + per_param * pb) / GiB),
                "formula": f"non-block bf16 {nb / GiB:.2f} GiB + {per_param:.1f} B x {pb / 1e6:.0f}M block parameters "
                           "(the 7B run's peak per block parameter; activations at 8 x 128 tokens are negligible)",
            }
        C.emit({
            "bench": "scale_7b",
            "command": "python -m ebft " + " ".join(a if a not in (str(checkpoint), str(out)) else
                                                   ("CHECKPOINT" if a == str(checkpoint) else "OUT") for a in run_args),
            "layers": args.layers,
            "input_bytes": written["file_bytes"],
            "input_tensor_bytes": written["tensor_bytes"],
            "output_bytes": output_bytes,
            "output_tensor_file_bytes": output_tensor_files,
            "output_equals_input_size": output_tensor_files == written["file_bytes"],
            "peak_rss_gib": C.r(peak / GiB),
            "peak_rss_under_8gb": peak < 8e9,
            "sampled_peak_gib": {k: C.r(v / GiB) for k, v in sampled.items()},
            "seconds_per_block": C.r(per_block),
            "block_seconds_min_max": [C.r(min(b["seconds"] for b in blocks)), C.r(max(b["seconds"] for b in blocks))],
            "run_seconds": C.r(run_s),
            "checkpoint_write_seconds": C.r(write_s),
            "timings": {k: C.r(v) for k, v in report["timings"].items()},
            "run_folder_peak_disk_bytes": peak_disk["bytes"],
            "precision": report.get("precision"),
            "precision_choice": report.get("precision_choice"),
            "eval": report.get("eval"),
            "model_guard": {k: report.get("model_guard", {}).get(k) for k in ("decision", "seconds")},
            "streamed": report["model"].get("streamed"),
            "saved_dtype": report["model"].get("saved_dtype"),
            "sparsity_overall": report["sparsity"]["overall"],
            "checks": checks,
            "bytes_per_block_parameter_at_peak": C.r(per_param),
            "arithmetic": arithmetic,
            "machine_before": state_before,
            "machine_after": C.machine_state(),
        })
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
