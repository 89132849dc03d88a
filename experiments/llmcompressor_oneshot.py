"""Prune SmolLM2-135M with llm-compressor's ``oneshot`` (Wanda or SparseGPT, 50%), for ``ebft repair`` to repair.

llm-compressor is not a dependency of ebft: run this in a virtual environment of its own, with ebft's
source on the path for the calibration windows (the same 64 x 256 tokens of the shared C4 sample that
ebft's runs use, so that both tools prune on the same data)::

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 && /tmp/llmc/bin/pip install llmcompressor==0.14.0.1 gguf
    python -c "from pathlib import Path; from ebft.models import load_model; from ebft.export import save_model; \\
        m = load_model('smollm2-135m'); save_model(m.model, m.tokenizer, Path('runs/smollm2-135m-hf'))"
    PYTHONPATH=src /tmp/llmc/bin/python experiments/llmcompressor_oneshot.py runs/smollm2-135m-hf wanda runs/llmc-wanda50
    PYTHONPATH=src /tmp/llmc/bin/python experiments/llmcompressor_oneshot.py runs/smollm2-135m-hf sparsegpt runs/llmc-sparsegpt50

Then ``ebft eval`` the outputs and ``ebft repair OUT --dense runs/smollm2-135m-hf ...`` them (BENCHMARKS.md
gives the commands). The output is what ``oneshot`` saves: a plain Hugging Face folder whose pruned
weights are zeros.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the dense model, a Hugging Face folder")
    parser.add_argument("method", choices=("wanda", "sparsegpt"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EBFT_DATA_DIR", "../shared/data")))
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.data import calibration_windows

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    windows = calibration_windows(tokenizer, "c4", args.nsamples, args.seqlen, 0, data_dir=args.data_dir)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    recipe = cls(sparsity=args.sparsity, targets=["Linear"], ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=args.seqlen,
            num_calibration_samples=args.nsamples)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
