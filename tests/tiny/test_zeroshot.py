"""Zero-shot evaluation: lm-eval's prompts on local files, log-likelihood scoring, acc/acc_norm, the CLI."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from ebft.cli import main
from ebft.eval import zeroshot as zs
from ebft.eval.tasks_local import SUPPORTED_TASKS, TASKS, Example, load_examples
from ebft.eval.zeroshot import evaluate_harness, evaluate_local, loglikelihoods

# --- a handful of examples per task, in each file's original layout -------------------------------

SYNTHETIC: dict[str, list[dict[str, Any]]] = {
    "boolq": [
        {"question": "is the sky blue", "passage": "Sky -- The sky is blue on a clear day.", "idx": 0, "label": True},
        {"question": "can fish fly", "passage": "Fish -- Fish swim in water.", "idx": 1, "label": False},
        {"question": "is ice cold", "passage": "Ice -- Ice is frozen water.", "idx": 2, "label": True},
        {"question": "do cats bark", "passage": "Cat -- Cats meow and purr.", "idx": 3, "label": False},
        {"question": "is fire hot", "passage": "Fire -- Fire burns wood.", "idx": 4, "label": True},
    ],
    "rte": [
        {"premise": "A man is eating an apple.", "hypothesis": "A person eats fruit.", "label": "entailment", "idx": 0},
        {"premise": "The shop opens at nine.", "hypothesis": "The shop is closed all day.",
         "label": "not_entailment", "idx": 1},
        {"premise": "Rain fell all night.", "hypothesis": "It rained.", "label": "entailment", "idx": 2},
        {"premise": "She sold her car.", "hypothesis": "She bought a car.", "label": "not_entailment", "idx": 3},
        {"premise": "Tom is taller than Ann.", "hypothesis": "Ann is shorter than Tom.", "label": "entailment",
         "idx": 4},
    ],
    "winogrande": [
        {"qID": "a-1", "sentence": "Sarah was a better cook than Maria so _ made dinner.", "option1": "Sarah",
         "option2": "Maria", "answer": "1"},
        {"qID": "a-2", "sentence": "The cup fell off the table because _ was too close to the edge.",
         "option1": "cup", "option2": "table", "answer": "1"},
        {"qID": "a-3", "sentence": "Ben lent Sam money because _ was broke.", "option1": "Ben", "option2": "Sam",
         "answer": "2"},
        {"qID": "a-4", "sentence": "The box did not fit in the bag since _ was too small.", "option1": "box",
         "option2": "bag", "answer": "2"},
    ],
    "arc_easy": [
        {"id": "e1", "question": {"stem": "What do plants need to make food?", "choices": [
            {"text": "sunlight", "label": "A"}, {"text": "sand", "label": "B"}, {"text": "noise", "label": "C"},
            {"text": "plastic bags", "label": "D"}]}, "answerKey": "A"},
        {"id": "e2", "question": {"stem": "Which is a liquid at room temperature?", "choices": [
            {"text": "iron", "label": "1"}, {"text": "water", "label": "2"}, {"text": "a wooden chair", "label": "3"}]},
         "answerKey": "2"},
        {"id": "e3", "question": {"stem": "What melts ice fastest?", "choices": [
            {"text": "a warm room", "label": "A"}, {"text": "a freezer", "label": "B"}, {"text": "snow", "label": "C"},
            {"text": "wind", "label": "D"}, {"text": "a dark and very cold night", "label": "E"}]}, "answerKey": "A"},
        {"id": "e4", "question": {"stem": "Where does the Sun rise?", "choices": [
            {"text": "east", "label": "A"}, {"text": "west", "label": "B"}, {"text": "north", "label": "C"},
            {"text": "south", "label": "D"}]}, "answerKey": "A"},
    ],
    "arc_challenge": [
        {"id": "c1", "question": {"stem": "Which gas do animals breathe out?", "choices": [
            {"text": "oxygen", "label": "A"}, {"text": "carbon dioxide", "label": "B"},
            {"text": "helium", "label": "C"},
            {"text": "neon", "label": "D"}]}, "answerKey": "B"},
        {"id": "c2", "question": {"stem": "What causes the seasons?", "choices": [
            {"text": "the tilt of Earth's axis", "label": "A"}, {"text": "the Moon", "label": "B"},
            {"text": "clouds", "label": "C"}, {"text": "ocean tides", "label": "D"}]}, "answerKey": "A"},
        {"id": "c3", "question": {"stem": "Which is a mammal?", "choices": [
            {"text": "shark", "label": "A"}, {"text": "whale", "label": "B"}, {"text": "trout", "label": "C"},
            {"text": "frog", "label": "D"}]}, "answerKey": "B"},
    ],
    "openbookqa": [
        {"id": "o1", "question": {"stem": "The sun is responsible for", "choices": [
            {"text": "puppies learning new tricks", "label": "A"}, {"text": "plants sprouting", "label": "B"},
            {"text": "dogs barking", "label": "C"}, {"text": "cars moving", "label": "D"}]}, "answerKey": "B"},
        {"id": "o2", "question": {"stem": "A magnet will stick to", "choices": [
            {"text": "a wooden table", "label": "A"}, {"text": "a glass", "label": "B"},
            {"text": "an iron nail", "label": "C"}, {"text": "paper", "label": "D"}]}, "answerKey": "C"},
        {"id": "o3", "question": {"stem": "Water freezes at", "choices": [
            {"text": "zero degrees Celsius", "label": "A"}, {"text": "fifty degrees", "label": "B"},
            {"text": "noon", "label": "C"}, {"text": "sea level only", "label": "D"}]}, "answerKey": "A"},
    ],
    "piqa": [
        {"goal": "How do I cool a drink?", "sol1": "Put it in the fridge.", "sol2": "Put it in the oven."},
        {"goal": "dry wet shoes", "sol1": "fill them with newspaper", "sol2": "fill them with water"},
        {"goal": "How to open a jar?", "sol1": "Twist the lid left.", "sol2": "Twist the lid right and hold it tight."},
        {"goal": "keep bread fresh", "sol1": "leave it open in the sun", "sol2": "seal it in a bag"},
    ],
    "hellaswag": [
        {"ind": 0, "activity_label": "Baking", "ctx_a": "A woman stirs batter in a bowl.",
         "ctx_b": "she [header] pours it",
         "ctx": "", "endings": ["into a pan [title] and bakes it.", "on the floor.", "over her head  and laughs.",
                                "into the oven [step] slowly."], "split": "val", "split_type": "indomain", "label": 0},
        {"ind": 1, "activity_label": "Running", "ctx_a": "A man ties his shoes.", "ctx_b": "he",
         "ctx": "", "endings": ["runs down the road.", "eats the shoes.", "sleeps on a cloud.", "sings to a tree."],
         "split": "val", "split_type": "indomain", "label": 0},
    ],
}
PIQA_LABELS = [0, 0, 0, 1]

FILES = {name: spec.files[0] for name, spec in TASKS.items()}
REAL_TASKS = [t for t in SUPPORTED_TASKS if t != "hellaswag"]


def _write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")


def write_synthetic(root: Path, tasks: list[str] | None = None) -> Path:
    """The synthetic examples under ``root/zeroshot/`` in each task's layout; returns ``root``."""
    for task in tasks or list(SYNTHETIC):
        _write_jsonl(root / "zeroshot" / FILES[task], SYNTHETIC[task])
        if task == "piqa":
            (root / "zeroshot" / "piqa" / "valid-labels.lst").write_text("".join(f"{x}\n" for x in PIQA_LABELS))
    return root


def _real_root() -> Path | None:
    root = os.environ.get("EBFT_DATA_DIR")
    if root and (Path(root) / "zeroshot" / FILES["rte"]).is_file():
        return Path(root)
    return None


def write_real_prefix(root: Path, n: int = 4) -> Path:
    """The first ``n`` examples of each real file (PIQA's labels too) under ``root/zeroshot/``."""
    real = _real_root()
    assert real is not None
    for task in REAL_TASKS:
        for rel in TASKS[task].files:
            lines = (real / "zeroshot" / rel).read_text(encoding="utf-8").splitlines(keepends=True)[:n]
            (root / "zeroshot" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "zeroshot" / rel).write_text("".join(lines), encoding="utf-8")
    return root


needs_real = pytest.mark.skipif(_real_root() is None, reason="needs EBFT_DATA_DIR with zeroshot/")


@pytest.fixture(params=["synthetic", "real"])
def data_root(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, list[str]]:
    if request.param == "real":
        if _real_root() is None:
            pytest.skip("needs EBFT_DATA_DIR with zeroshot/")
        return write_real_prefix(tmp_path), REAL_TASKS
    return write_synthetic(tmp_path), list(SYNTHETIC)


@pytest.fixture(scope="module")
def long_tiny(tiny_factory):
    """The tiny Llama with room for BoolQ's long passages, so that nothing is cut."""
    return tiny_factory("llama", max_position_embeddings=4096)


# --- prompts ---------------------------------------------------------------------------------------

#: task -> (requests of its first synthetic example, gold, acc_norm's choice strings)
EXPECTED_FIRST = {
    "boolq": ([("Sky -- The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " no"),
               ("Sky -- The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:", " yes")], 1,
              ("no", "yes")),
    "rte": ([("A man is eating an apple.\nQuestion: A person eats fruit. True or False?\nAnswer:", " True"),
             ("A man is eating an apple.\nQuestion: A person eats fruit. True or False?\nAnswer:", " False")], 0,
            ("True", "False")),
    "winogrande": ([("Sarah was a better cook than Maria so Sarah", " made dinner."),
                    ("Sarah was a better cook than Maria so Maria", " made dinner.")], 0,
                   ("Sarah was a better cook than Maria so Sarah", "Sarah was a better cook than Maria so Maria")),
    "arc_easy": ([("Question: What do plants need to make food?\nAnswer:", " sunlight"),
                  ("Question: What do plants need to make food?\nAnswer:", " sand"),
                  ("Question: What do plants need to make food?\nAnswer:", " noise"),
                  ("Question: What do plants need to make food?\nAnswer:", " plastic bags")], 0,
                 ("sunlight", "sand", "noise", "plastic bags")),
    "arc_challenge": ([("Question: Which gas do animals breathe out?\nAnswer:", " oxygen"),
                       ("Question: Which gas do animals breathe out?\nAnswer:", " carbon dioxide"),
                       ("Question: Which gas do animals breathe out?\nAnswer:", " helium"),
                       ("Question: Which gas do animals breathe out?\nAnswer:", " neon")], 1,
                      ("oxygen", "carbon dioxide", "helium", "neon")),
    "openbookqa": ([("The sun is responsible for", " puppies learning new tricks"),
                    ("The sun is responsible for", " plants sprouting"),
                    ("The sun is responsible for", " dogs barking"),
                    ("The sun is responsible for", " cars moving")], 1,
                   ("puppies learning new tricks", "plants sprouting", "dogs barking", "cars moving")),
    "piqa": ([("Question: How do I cool a drink?\nAnswer:", " Put it in the fridge."),
              ("Question: How do I cool a drink?\nAnswer:", " Put it in the oven.")], 0,
             ("Put it in the fridge.", "Put it in the oven.")),
    "hellaswag": ([("Baking: A woman stirs batter in a bowl. She pours it", " into a pan. and bakes it."),
                   ("Baking: A woman stirs batter in a bowl. She pours it", " on the floor."),
                   ("Baking: A woman stirs batter in a bowl. She pours it", " over her head and laughs."),
                   ("Baking: A woman stirs batter in a bowl. She pours it", " into the oven slowly.")], 0,
                  ("into a pan. and bakes it.", "on the floor.", "over her head and laughs.", "into the oven slowly.")),
}


@pytest.mark.parametrize("task", SUPPORTED_TASKS)
def test_prompt_of_first_example(task: str, tmp_path: Path) -> None:
    write_synthetic(tmp_path, [task])
    first = load_examples(task, tmp_path / "zeroshot")[0]
    requests, gold, choices = EXPECTED_FIRST[task]
    assert first == Example(tuple(requests), gold, choices)


def test_gold_label_mappings(tmp_path: Path) -> None:
    write_synthetic(tmp_path)
    golds = {t: [ex.gold for ex in load_examples(t, tmp_path / "zeroshot")] for t in SYNTHETIC}
    assert golds["boolq"] == [1, 0, 1, 0, 1]  # JSON booleans: False=0 ("no"), True=1 ("yes")
    assert golds["rte"] == [0, 1, 0, 1, 0]  # entailment=0 ("True"), not_entailment=1 ("False")
    assert golds["winogrande"] == [0, 0, 1, 1]  # answer "1"/"2"
    assert golds["arc_easy"] == [0, 1, 0, 0]  # labels A-E or 1-4, 3 to 5 choices
    assert [len(ex.requests) for ex in load_examples("arc_easy", tmp_path / "zeroshot")] == [4, 3, 5, 4]
    assert golds["piqa"] == PIQA_LABELS  # from the aligned .lst file


@needs_real
def test_prompts_of_the_real_files() -> None:
    folder = _real_root() / "zeroshot"  # type: ignore[operator]
    first = {t: load_examples(t, folder, limit=1)[0] for t in REAL_TASKS}
    assert first["rte"].requests[0] == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:", " True")
    assert first["rte"].gold == 1
    assert first["winogrande"].requests == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."))
    assert first["winogrande"].gold == 1
    assert first["arc_easy"].requests[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.")
    assert first["arc_easy"].gold == 0
    assert first["arc_challenge"].gold == 2
    assert first["openbookqa"].requests[1] == (
        "A person wants to start saving money so that they can afford a nice vacation at the end of the year. After "
        "looking over their budget and expenses, they decide the best way to save money is to",
        " quit eating lunch out")
    assert first["openbookqa"].gold == 1
    assert first["piqa"].requests[0][0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first["piqa"].gold == 0
    assert first["boolq"].requests[1][0].startswith("Ethanol fuel -- All biomass goes through")
    assert first["boolq"].requests[1][0].endswith(
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [r[1] for r in first["boolq"].requests] == [" no", " yes"] and first["boolq"].gold == 0
    # every example of every real file fits its layout
    sizes = {t: len(load_examples(t, folder)) for t in REAL_TASKS}
    assert sizes == {"boolq": 3270, "rte": 277, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
                     "openbookqa": 500, "piqa": 1838}


# --- scores ----------------------------------------------------------------------------------------

def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Plain forward pass over context + continuation; sum of the continuation tokens' log-probs."""
    ctx = tokenizer.encode(context)
    full = tokenizer.encode(context + continuation)
    assert full[: len(ctx)] == ctx  # the byte tokenizer never merges across the boundary
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[p - 1, full[p]]) for p in range(len(ctx), len(full)))


def test_accuracy_matches_a_direct_computation(long_tiny, tokenizer, data_root: tuple[Path, list[str]]) -> None:
    root, tasks = data_root
    result = evaluate_local(long_tiny, tokenizer, tasks, data_dir=root, batch_size=3)
    assert result.backend == "local" and list(result.tasks) == tasks
    for task in tasks:
        r = result.tasks[task]
        examples = load_examples(task, root / "zeroshot")
        assert r.n == len(examples) > 0
        assert 0.0 <= r.acc <= 1.0
        assert (r.acc_norm is not None) == TASKS[task].has_acc_norm
        correct = correct_norm = 0
        scores = []
        for ex, got in zip(examples, r.loglikelihoods):
            lls = [_direct_loglikelihood(long_tiny, tokenizer, c, x) for c, x in ex.requests]
            assert got == pytest.approx(lls, abs=1e-4)
            scores.append(float(max(range(len(lls)), key=lambda i: lls[i]) == ex.gold))
            correct += scores[-1]
            normed = [ll / len(choice) for ll, choice in zip(lls, ex.choices)]
            correct_norm += max(range(len(normed)), key=lambda i: normed[i]) == ex.gold
        assert r.acc == pytest.approx(correct / len(examples))
        # lm-eval's acc_stderr: the sample standard deviation of the 0/1 scores over sqrt(n)
        assert r.to_dict()["acc_stderr"] == pytest.approx(statistics.stdev(scores) / math.sqrt(len(scores)))
        if r.acc_norm is not None:
            assert 0.0 <= r.acc_norm <= 1.0
            assert r.acc_norm == pytest.approx(correct_norm / len(examples))
    assert result.mean_acc == pytest.approx(sum(r.acc for r in result.tasks.values()) / len(tasks))
    stderrs = [r.to_dict()["acc_stderr"] for r in result.tasks.values()]
    assert result.to_dict()["mean_acc_stderr"] == pytest.approx(math.sqrt(sum(e * e for e in stderrs)) / len(tasks))


def test_acc_norm_divides_by_the_choice_length(monkeypatch: pytest.MonkeyPatch, tiny_llama, tokenizer) -> None:
    # hand-checked: " a" scores -2.0 and " bbbbbbbbbb" -5.0. acc takes the higher sum (choice 0);
    # acc_norm compares -2.0/1 with -5.0/10 = -0.5 and takes choice 1, the gold one.
    example = Example((("Q:", " a"), ("Q:", " bbbbbbbbbb")), 1, ("a", "bbbbbbbbbb"))
    monkeypatch.setattr(zs, "loglikelihoods", lambda model, tok, requests, **kw: [-2.0, -5.0])
    r = evaluate_local(tiny_llama, tokenizer, ["piqa"], examples={"piqa": [example]}).tasks["piqa"]
    assert (r.predictions, r.norm_predictions) == ([0], [1])
    assert (r.acc, r.acc_norm) == (0.0, 1.0)
    # lm-eval divides by len(choice) in characters: for ASCII (all these tasks' choices) that is the byte length
    assert len("bbbbbbbbbb") == len("bbbbbbbbbb".encode("utf-8")) == 10


def test_acc_and_acc_norm_differ_on_the_tiny_model(long_tiny, tokenizer, tmp_path: Path) -> None:
    write_synthetic(tmp_path)
    tasks = ["arc_easy", "arc_challenge", "openbookqa", "piqa"]
    result = evaluate_local(long_tiny, tokenizer, tasks, data_dir=tmp_path)
    differing = 0
    for task, r in result.tasks.items():
        for ex, lls, pred, norm in zip(load_examples(task, tmp_path / "zeroshot"), r.loglikelihoods,
                                       r.predictions, r.norm_predictions):
            per_byte = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, ex.choices)]
            assert norm == max(range(len(per_byte)), key=lambda i: per_byte[i])
            assert pred == max(range(len(lls)), key=lambda i: lls[i])
            differing += pred != norm
    assert differing > 0  # the normalisation changes some predictions


def test_limit_takes_the_first_examples(tiny_llama, tokenizer, tmp_path: Path) -> None:
    write_synthetic(tmp_path, ["boolq", "arc_easy"])
    full = evaluate_local(tiny_llama, tokenizer, ["boolq", "arc_easy"], data_dir=tmp_path)
    part = evaluate_local(tiny_llama, tokenizer, ["boolq", "arc_easy"], data_dir=tmp_path, limit=2)
    assert part.limit == 2
    for task in ("boolq", "arc_easy"):
        assert part.tasks[task].n == 2 and full.tasks[task].n > 2
        for got, want in zip(part.tasks[task].loglikelihoods, full.tasks[task].loglikelihoods[:2]):
            assert got == pytest.approx(want, abs=1e-5)
    assert evaluate_local(tiny_llama, tokenizer, ["boolq"], data_dir=tmp_path, limit=100).tasks["boolq"].n == 5


def test_batching_and_truncation(tiny_llama, tokenizer) -> None:
    requests = [("The quick brown fox jumps over the lazy dog.", " yes"), ("The quick brown fox", " no"),
                ("The quick brown fox jumps over the lazy dog.", " no"), ("ab", " a long continuation here")]
    one = loglikelihoods(tiny_llama, tokenizer, requests, batch_size=1)
    many = loglikelihoods(tiny_llama, tokenizer, requests, batch_size=4)
    assert many == pytest.approx(one, abs=1e-4)
    assert one[1] == pytest.approx(_direct_loglikelihood(tiny_llama, tokenizer, *requests[1]), abs=1e-4)
    # a sequence longer than the context keeps its last max_length + 1 tokens, as lm-eval does
    cut = loglikelihoods(tiny_llama, tokenizer, requests[:1], max_length=16)[0]
    full = tokenizer.encode(requests[0][0] + requests[0][1])[-17:]
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny_llama(input_ids=torch.tensor([full[:-1]])).logits[0].float(), dim=-1)
    # " yes" is 4 byte tokens, predicted by the last 4 positions of the 16-token input
    expected = sum(float(logprobs[p - 1, full[p]]) for p in range(len(full) - 4, len(full)))
    assert cut == pytest.approx(expected, abs=1e-4)


def test_harness_backend_hands_over_the_model(monkeypatch: pytest.MonkeyPatch, tiny_llama, tokenizer) -> None:
    calls: dict[str, Any] = {}

    class FakeHFLM:
        def __init__(self, pretrained, tokenizer, batch_size):
            calls["hflm"] = (pretrained, tokenizer, batch_size)

    def simple_evaluate(model, tasks, limit, **kwargs):
        calls["evaluate"] = (model, tasks, limit)
        return {"results": {"rte": {"alias": "rte", "acc,none": 0.5, "acc_stderr,none": "N/A"},
                            "piqa": {"acc,none": 0.75, "acc_norm,none": 0.625}},
                "n-samples": {"rte": {"original": 277, "effective": 4}, "piqa": {"original": 1838, "effective": 4}}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate  # type: ignore[attr-defined]
    models = types.ModuleType("lm_eval.models")
    hf = types.ModuleType("lm_eval.models.huggingface")
    hf.HFLM = FakeHFLM  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lm_eval", lm_eval)
    monkeypatch.setitem(sys.modules, "lm_eval.models", models)
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", hf)
    result = evaluate_harness(tiny_llama, tokenizer, ["rte", "piqa"], limit=4, batch_size=2)
    assert calls["hflm"][0] is tiny_llama and calls["hflm"][1] is tokenizer and calls["hflm"][2] == 2
    assert calls["evaluate"][1:] == (["rte", "piqa"], 4)
    # standard errors sqrt(acc (1 - acc) / (n - 1)): rte sqrt(.25/3), piqa sqrt(.1875/3), acc_norm sqrt(.234375/3)
    got = result.to_dict()
    assert got["tasks"]["rte"] == pytest.approx({"acc": 0.5, "n": 4, "acc_stderr": 0.2886751}, abs=1e-6)
    assert got["tasks"]["piqa"] == pytest.approx(
        {"acc": 0.75, "acc_norm": 0.625, "n": 4, "acc_stderr": 0.25, "acc_norm_stderr": 0.2795085}, abs=1e-6)
    assert list(got["tasks"]) == ["rte", "piqa"]
    got.pop("tasks")
    assert got == pytest.approx({"mean_acc": 0.625, "mean_acc_stderr": 0.1909407, "backend": "harness", "limit": 4},
                                abs=1e-6)


# --- command line ----------------------------------------------------------------------------------

def test_cli_writes_the_documented_json(tiny_model_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    write_synthetic(tmp_path / "data", ["rte"])
    out = tmp_path / "f.json"
    argv = ["eval", str(tiny_model_dir), "--tasks", "rte", "--limit", "4", "--json", str(out), "--data-dir",
            str(tmp_path / "data"), "--zeroshot-backend", "local", "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"tasks", "mean_acc", "mean_acc_stderr", "backend", "limit"}
    assert set(data["tasks"]) == {"rte"} and set(data["tasks"]["rte"]) == {"acc", "n", "acc_stderr"}
    assert data["tasks"]["rte"]["n"] == 4 and data["tasks"]["rte"]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert data["mean_acc"] == data["tasks"]["rte"]["acc"]
    assert (data["backend"], data["limit"]) == ("local", 4)
    printed = capsys.readouterr().out
    assert "rte" in printed and f"mean acc over 1 tasks: {data['mean_acc']:.4f}" in printed


def test_cli_tasks_with_perplexity_and_auto_offline(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EBFT_DATA_DIR", str(write_synthetic(tmp_path / "data", ["piqa", "winogrande"])))
    out = tmp_path / "both.json"
    argv = ["eval", str(tiny_model_dir), "--data", "pydoc", "--seqlen", "16", "--max-windows", "1",
            "--tasks", "piqa,winogrande,hellaswag", "--json", str(out), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert {"perplexity", "tokens", "windows", "tasks", "mean_acc", "mean_acc_stderr", "backend", "limit",
            "skipped"} == set(data)
    assert data["backend"] == "local" and data["limit"] is None
    assert set(data["tasks"]["piqa"]) == {"acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr"}
    assert data["tasks"]["piqa"]["n"] == 4
    assert set(data["tasks"]) == {"piqa", "winogrande"} and "hellaswag" in data["skipped"]
    assert data["mean_acc"] == pytest.approx((data["tasks"]["piqa"]["acc"] + data["tasks"]["winogrande"]["acc"]) / 2)


BAD_CLI = [
    ("unknown task", ["--tasks", "rte,mmlu"], 2,
     "unknown zero-shot task 'mmlu'; supported: boolq, rte, winogrande, arc_easy, arc_challenge, openbookqa, piqa, "
     "hellaswag"),
    ("neither data nor tasks", [], 2, "give --data SOURCE (perplexity), --tasks LIST (zero-shot accuracy), or both"),
    ("limit 0", ["--tasks", "rte", "--limit", "0"], 2, "--limit must be a positive"),
    ("hellaswag alone", ["--tasks", "hellaswag"], 1, "hellaswag is not available offline"),
    ("missing task file", ["--tasks", "boolq"], 1, "zero-shot task boolq needs"),
    ("bad backend", ["--tasks", "rte", "--zeroshot-backend", "cloud"], 2, "--zeroshot-backend 'cloud' is unknown"),
]


@pytest.mark.parametrize("name,extra,code,fragment", BAD_CLI, ids=[b[0] for b in BAD_CLI])
def test_cli_errors(name: str, extra: list[str], code: int, fragment: str, tiny_model_dir: Path, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_synthetic(tmp_path / "data", ["rte"])
    argv = ["eval", str(tiny_model_dir), "--data-dir", str(data), "--json", str(tmp_path / "x.json"), *extra]
    assert main(argv) == code
    captured = capsys.readouterr()
    one_line_error(captured.err, fragment)
    assert captured.out == "" and not (tmp_path / "x.json").exists()


def test_cli_without_a_data_dir(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    monkeypatch.delenv("EBFT_DATA_DIR", raising=False)
    assert main(["eval", str(tiny_model_dir), "--tasks", "rte", "--zeroshot-backend", "local"]) == 1
    one_line_error(capsys.readouterr().err,
                    "pass --data-dir DIR (with DIR/zeroshot/rte/val.jsonl) or set EBFT_DATA_DIR")
