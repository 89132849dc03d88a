"""The README's worked examples: a new pruner, a block fine-tuner and a whole-model stage are each one file.

Each file is taken from the README as it is, imported as a module of its package (what putting it in
``src/ebft/pruners/`` or ``src/ebft/finetune/`` does), and run through ``ebft prune`` with the flags its
options dataclass gives it; nothing else in the tree is changed.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import build_parser, main
from ebft.errors import UsageError
from ebft.finetune import FINETUNERS
from ebft.pruners import PRUNERS
from ebft.settings import all_settings, settings_doc

README = Path(__file__).resolve().parents[2] / "README.md"


def _example(path: str) -> str:
    """The Python block that follows the README's mention of ``path``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"`{path}`")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match is not None, path
    return match[1]


@pytest.fixture
def examples() -> Iterator[dict[str, types.ModuleType]]:
    """The three example files, imported; the registries are as before once the test ends."""
    pruners, tuners = dict(PRUNERS), dict(FINETUNERS)
    modules = {}
    for name, path in (("random_scores", "src/ebft/pruners/random_scores.py"),
                       ("norms", "src/ebft/finetune/norms.py"), ("norms_lm", "src/ebft/finetune/norms_lm.py")):
        package = "ebft.pruners" if "pruners" in path else "ebft.finetune"
        module = types.ModuleType(f"{package}.{name}")
        sys.modules[module.__name__] = module
        exec(compile(_example(path), path, "exec"), module.__dict__)  # noqa: S102 - the README's own code
        modules[name] = module
    yield modules
    for name in modules:
        sys.modules.pop(f"ebft.pruners.{name}", None)
        sys.modules.pop(f"ebft.finetune.{name}", None)
    PRUNERS.clear()
    PRUNERS.update(pruners)
    FINETUNERS.clear()
    FINETUNERS.update(tuners)


def _prune(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", str(model), "--calib", f"text:{text}", "--nsamples", "4", "--seqlen", "32", "--epochs", "2",
            "--lr", "1e-2", "--batch-size", "2", "--device", "cpu", "--threads", "1", "--quiet", "--out", str(out),
            *extra]


def test_each_example_gets_flags_sweep_keys_and_docs(examples) -> None:
    settings = all_settings()
    assert settings["random_seed"].owner == ("pruner", "random") and settings["random_seed"].default == 0
    assert settings["norms_biases"].owner == ("finetune", "norms")
    assert settings["norms_lm_final_norm"].default is True
    help_text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for flag in ("--random-seed", "--norms-biases", "--no-norms-lm-final-norm"):
        assert flag in help_text
    doc = settings_doc()
    assert "## `--pruner random` options" in doc and "`--norms-biases`" in doc


def test_the_new_pruner_prunes_by_its_option(examples, tiny_model_dir: Path, text_file: Path,
                                             tmp_path: Path) -> None:
    weights = {}
    for seed in (1, 1, 2):
        out = tmp_path / f"seed{seed}-{len(weights)}"
        assert main(_prune(tiny_model_dir, text_file, out, "--pruner", "random", "--random-seed", str(seed),
                           "--finetune", "none")) == 0
        weights[out.name] = load_file(str(out / "model" / "model.safetensors"))
        report = json.loads((out / "report.json").read_text())
        assert report["config"]["prune"]["options"] == {"seed": seed}
        assert report["sparsity"]["overall"] == 0.5
    a, b, c = weights.values()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[q] == 0, b[q] == 0) and not torch.equal(a[q] == 0, c[q] == 0)
    assert ((a[q] == 0).sum(1) == a[q].shape[1] // 2).all()  # per row, as the file asks


def test_the_block_finetuner_changes_only_norms(examples, tiny_model_dir: Path, text_file: Path,
                                                tmp_path: Path) -> None:
    none, norms = tmp_path / "none", tmp_path / "norms"
    assert main(_prune(tiny_model_dir, text_file, none, "--finetune", "none")) == 0
    assert main(_prune(tiny_model_dir, text_file, norms, "--finetune", "norms", "--holdout-fraction", "0")) == 0
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    before, after = (load_file(str(p / "model" / "model.safetensors")) for p in (none, norms))
    changed = {k for k in before if k.startswith("model.layers.0.") and not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed)  # block 0: its norms, nothing else
    for key, weight in after.items():  # every block: the linear weights kept are the dense ones
        if key.endswith("proj.weight"):
            assert torch.equal(weight[weight != 0], dense[key][weight != 0]), key
    report = json.loads((norms / "report.json").read_text())
    assert all(b["steps"] == 4 and b["final_loss"] < b["init_loss"] for b in report["blocks"])
    with pytest.raises(UsageError, match="unrecognized arguments: yes"):  # --norms-biases is a switch
        build_parser().parse_args(["prune", "m", "--out", "o", "--norms-biases", "yes"])


def test_the_model_stage_runs_after_the_walk(examples, tiny_model_dir: Path, text_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_prune(tiny_model_dir, text_file, out, "--finetune", "norms-lm", "--no-norms-lm-final-norm")) == 0
    assert "norms-lm: 4 steps, causal-LM loss" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    stage = report["model_stage"]
    assert stage["method"] == "norms-lm" and stage["final_loss"] < stage["init_loss"]
    assert report["config"]["finetune"]["options"] == {"final_norm": False}
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert report["sparsity"]["weights_zero"] == 0.5  # the stage left the masks alone
    assert torch.equal(weights["model.norm.weight"], torch.ones_like(weights["model.norm.weight"]))
    assert main(_prune(tiny_model_dir, text_file, tmp_path / "x", "--finetune", "norms-lm", "--norms-biases")) == 2
    assert "--norms-biases applies only to --finetune norms, not norms-lm; drop it" in capsys.readouterr().err
