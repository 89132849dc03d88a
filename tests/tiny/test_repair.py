"""ebft repair: a model another tool pruned, repaired with its own zeros as the masks; the model card; several models
in one ebft eval."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ebft.cli import main
from ebft.export import write_model
from ebft.models import load_model

NBLOCKS = 3


@pytest.fixture(scope="module")
def dense(tiny_factory, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repair") / "dense"
    tiny_factory("llama", num_hidden_layers=NBLOCKS, tie_word_embeddings=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _common(text: Path) -> list[str]:
    return ["--calib", f"text:{text}", "--nsamples", "8", "--seqlen", "32", "--epochs", "2", "--batch-size", "2",
            "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--quiet",
            "--eval", f"text:{text}", "--eval-seqlen", "32", "--max-windows", "3"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def pruned_elsewhere(dense: Path, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Magnitude 50% alone (ebft's --finetune none), saved again as another tool might: fp16 and sharded, and fp32."""
    tmp = tmp_path_factory.mktemp("elsewhere")
    assert main(["prune", str(dense), "--pruner", "magnitude", "--finetune", "none", *_common(text_file),
                 "--out", str(tmp / "none")]) == 0
    loaded = load_model(str(tmp / "none" / "model"))
    out = {"fp32": tmp / "none" / "model"}
    out["fp16"] = tmp / "fp16"
    write_model(out["fp16"], loaded.model, loaded.tokenizer, dtype=torch.float16, max_shard_bytes=60_000)
    return out


def test_repair_takes_the_masks_and_gives_ebfts_result(dense: Path, text_file: Path, pruned_elsewhere: dict,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(pruned_elsewhere["fp16"].glob("*.safetensors"))) > 1  # sharded, with an index
    reference = tmp_path / "prune"
    assert main(["prune", str(dense), "--pruner", "magnitude", *_common(text_file), "--out", str(reference)]) == 0
    for layout in ("fp32", "fp16"):
        out = tmp_path / f"repair-{layout}"
        assert main(["repair", str(pruned_elsewhere[layout]), "--dense", str(dense), *_common(text_file),
                     "--out", str(out)]) == 0
        assert "repaired" in capsys.readouterr().out
        got, want = _weights(out / "model"), _weights(reference / "model")
        for name in (n for n in want if n.endswith("proj.weight")):
            assert torch.equal(got[name] == 0, want[name] == 0), name  # the same masks, whatever the layout
        report = json.loads((out / "report.json").read_text())
        assert report["config"]["prune"]["pruner"] == "given"
        assert report["sparsity"]["overall"] == 0.5 and report["sparsity"]["pattern"] == "per layer"
        if layout == "fp32":  # the same masks and the same dense values under them: ebft prune's very result
            assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
            assert report["eval"] == json.loads((reference / "report.json").read_text())["eval"]


def test_repair_with_the_distillation_stage_is_prunes_own(dense: Path, text_file: Path, pruned_elsewhere: dict,
                                                         tmp_path: Path) -> None:
    kd = ("--finetune", "kd", "--kd-lr", "1e-4")
    reference, out = tmp_path / "prune", tmp_path / "repair"
    assert main(["prune", str(dense), "--pruner", "magnitude", *kd, *_common(text_file), "--out", str(reference)]) == 0
    assert main(["repair", str(pruned_elsewhere["fp32"]), "--dense", str(dense), *kd, *_common(text_file),
                 "--out", str(out)]) == 0
    got, want = _weights(out / "model"), _weights(reference / "model")
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert json.loads((out / "report.json").read_text())["model_stage"]["method"] == "kd"


def test_repair_starts_from_the_pruned_models_own_block_parameters(dense: Path, text_file: Path,
                                                                   pruned_elsewhere: dict, tmp_path: Path) -> None:
    """A pruned model whose norms were tuned after pruning (an earlier ebft run does that) keeps them: the walk
    starts from every block parameter of the pruned model, not from the dense norms."""
    loaded = load_model(str(pruned_elsewhere["fp32"]))
    with torch.no_grad():
        for i, layer in enumerate(loaded.model.model.layers):
            layer.input_layernorm.weight.mul_(1.5 + i)
            layer.post_attention_layernorm.weight.add_(0.25)
    tuned = tmp_path / "tuned-norms"
    write_model(tuned, loaded.model, loaded.tokenizer)
    out = tmp_path / "repair-none"
    assert main(["repair", str(tuned), "--dense", str(dense), "--finetune", "none", *_common(text_file),
                 "--out", str(out)]) == 0
    got, given, dense_weights = _weights(out / "model"), _weights(tuned), _weights(dense)
    blocks = [n for n in given if n.startswith("model.layers.")]
    assert any(n.endswith("layernorm.weight") and not torch.equal(given[n], dense_weights[n]) for n in blocks)
    for name in blocks:  # nothing to tune: the blocks come back exactly as given
        assert torch.equal(got[name], given[name]), name
    norms = tmp_path / "repair-ebft"  # and the tuning starts there: its untuned loss is the given model's
    assert main(["repair", str(tuned), "--dense", str(dense), *_common(text_file), "--out", str(norms)]) == 0
    reference = tmp_path / "repair-plain"  # the same masks and linear weights, the dense norms
    assert main(["repair", str(pruned_elsewhere["fp32"]), "--dense", str(dense), *_common(text_file),
                 "--out", str(reference)]) == 0
    first = [json.loads((run / "report.json").read_text())["blocks"][0] for run in (norms, reference)]
    assert first[0]["init_loss"] != first[1]["init_loss"]


def test_repair_reads_nm_patterns(dense: Path, text_file: Path, tmp_path: Path) -> None:
    nm = tmp_path / "nm"
    assert main(["prune", str(dense), "--nm", "2:4", "--finetune", "none", *_common(text_file),
                 "--out", str(nm)]) == 0
    out = tmp_path / "repaired"
    assert main(["repair", str(nm / "model"), "--dense", str(dense), "--finetune", "dsnot", *_common(text_file),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["pattern"] == "N:M" and (report["sparsity"]["n"], report["sparsity"]["m"]) == (2, 4)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_refusals(dense: Path, text_file: Path, tiny_factory, tokenizer, tmp_path: Path,
                  capsys: pytest.CaptureFixture[str]) -> None:
    def repair(sparse: Path, *extra: str) -> int:
        return main(["repair", str(sparse), "--dense", str(dense), *_common(text_file), "--out", str(tmp_path / "o"),
                     *extra])

    other = tmp_path / "other"  # another width
    tiny_factory("llama", num_hidden_layers=NBLOCKS, hidden_size=32, tie_word_embeddings=False).save_pretrained(other)
    assert repair(other) == 1 and "differ in hidden_size (32 vs 64)" in _one_line(capsys)
    unpruned = tmp_path / "unpruned"  # the dense model itself
    tiny_factory("llama", num_hidden_layers=NBLOCKS, tie_word_embeddings=False).save_pretrained(unpruned)
    assert repair(unpruned) == 1 and "does not look pruned" in _one_line(capsys)
    shrunk = tmp_path / "shrunk"  # structurally pruned
    assert main(["prune", str(dense), "--structured", "0.25", "--finetune", "none", *_common(text_file),
                 "--out", str(shrunk)]) == 0
    capsys.readouterr()
    assert repair(shrunk / "model") == 1
    line = _one_line(capsys)
    assert "it was pruned structurally" in line and f"ebft prune {dense} --structured RATIO" in line
    pruned = tmp_path / "pruned"
    assert main(["prune", str(dense), "--finetune", "none", *_common(text_file), "--out", str(pruned)]) == 0
    capsys.readouterr()
    loaded = load_model(str(pruned / "model"))
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_special_tokens({"additional_special_tokens": ["<sep>"]})
    retokenized = tmp_path / "retokenized"  # pruned, but saved with another tokenizer
    write_model(retokenized, loaded.model, other_tokenizer)
    assert repair(retokenized) == 1 and "tokenizer differs" in _one_line(capsys)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))  # nothing was written, not even staged
    assert repair(pruned / "model", "--sparsity", "0.5") == 2  # repair has no pruning flags
    assert "unrecognized arguments: --sparsity" in _one_line(capsys)
    assert main(["prune", str(dense), "--pruner", "given", "--given-model", str(pruned / "model"), "--nm", "2:4",
                 "--out", str(tmp_path / "q")]) == 2
    assert "takes its masks from another model; drop --sparsity and --nm" in _one_line(capsys)


def test_the_model_card_is_a_valid_card_that_agrees_with_the_report(dense: Path, text_file: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["prune", str(dense), "--nm", "2:4", "--eval-dense", *_common(text_file), "--out", str(out)]) == 0
    card = (out / "model" / "README.md").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    match = re.match(r"---\n(.*?)\n---\n", card, re.S)
    assert match is not None
    front = yaml.safe_load(match[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "wanda", "ebft", "2:4-sparsity"} <= set(front["tags"])
    assert front["base_model"] == str(dense)
    source = f"text:{text_file}"
    assert f"{report['eval'][source]:.2f} |" in card and f"{report['eval_dense'][source]:.2f} |" in card
    assert f"{100 * report['sparsity']['overall']:.2f}% by mask" in card
    command = re.search(r"```bash\n(.*?)\n```", card, re.S)[1]
    assert command.startswith(f"ebft prune {dense} --out OUT") and "--nm 2:4" in command and "--sparsity" not in command
    assert main(["report", str(out)]) == 0
    page = (out / "report.md").read_text(encoding="utf-8")
    assert f"{report['eval'][source]:.2f}" in page  # ebft report shows the card's numbers
    rerun = tmp_path / "rerun"  # the card's command reproduces the run
    words = command.split()[1:]
    words[words.index("OUT")] = str(rerun)
    assert main([*words, "--quiet", "--threads", "1"]) == 0
    assert _weights(rerun / "model").keys() == _weights(out / "model").keys()
    assert all(torch.equal(a, b) for a, b in zip(_weights(rerun / "model").values(), _weights(out / "model").values()))


def test_eval_compares_several_models(dense: Path, text_file: Path, pruned_elsewhere: dict, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    json_file = tmp_path / "all.json"
    assert main(["eval", str(pruned_elsewhere["fp32"]), str(pruned_elsewhere["fp16"]), "--dense", str(dense),
                 "--data", f"text:{text_file}", "--data", "pydoc:test", "--seqlen", "32", "--max-windows", "2",
                 "--device", "cpu", "--json", str(json_file)]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| model | ppl text:") and "ppl pydoc:test" in table[0]
    assert table[2].startswith(f"| {dense} (dense) |") and len(table) == 5
    data = json.loads(json_file.read_text())
    assert [m["role"] for m in data["models"]] == ["dense", "model", "model"]
    assert all(set(m["perplexity"]) == {f"text:{text_file}", "pydoc:test"} for m in data["models"])
    dense_ppl = data["models"][0]["perplexity"][f"text:{text_file}"]["perplexity"]
    assert all(m["perplexity"][f"text:{text_file}"]["perplexity"] > dense_ppl for m in data["models"][1:])
