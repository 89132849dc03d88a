"""Zero-shot tasks read from local files, with lm-evaluation-harness 0.4's prompts.

Each task turns one example of its original file layout into the (context, continuation) pairs
that lm-eval's own task YAML would build (``lm_eval/tasks/<task>/*.yaml``, harness 0.4.x), the
index of the gold choice and the choice strings used for ``acc_norm``. Zero-shot, no description,
target delimiter ``" "``: each continuation is ``" " + choice``.

Local layout under ``DATA_DIR/zeroshot/`` (the original releases, as in the project's shared data):

====================  ==========================================  ====================================
task                  file                                        harness dataset it stands for
====================  ==========================================  ====================================
boolq                 boolq/val.jsonl                             super_glue/boolq validation
rte                   rte/val.jsonl (SuperGLUE form)              glue/rte validation (same 277 pairs)
winogrande            winogrande/dev.jsonl                        winogrande_xl validation
arc_easy              arc_easy/test.jsonl (AI2 layout)            ai2_arc ARC-Easy test
arc_challenge         arc_challenge/test.jsonl (AI2 layout)       ai2_arc ARC-Challenge test
openbookqa            openbookqa/test.jsonl (AI2 layout)          openbookqa main test
piqa                  piqa/valid.jsonl + piqa/valid-labels.lst    piqa validation
hellaswag             hellaswag/hellaswag_val.jsonl (rowanz)      hellaswag validation
====================  ==========================================  ====================================
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebft.errors import EbftError, UsageError

logger = logging.getLogger(__name__)

#: lm-eval's default ``target_delimiter`` for multiple-choice tasks
TARGET_DELIMITER = " "
#: the sub-folder of the data directory that holds the task files
ZEROSHOT_SUBDIR = "zeroshot"


@dataclass(frozen=True)
class Example:
    """One multiple-choice item: a (context, continuation) request per choice, and the gold index."""

    requests: tuple[tuple[str, str], ...]
    gold: int
    #: the strings whose character length divides the log-likelihood for acc_norm (lm-eval's ``doc_to_choice``)
    choices: tuple[str, ...]


@dataclass(frozen=True)
class LocalTask:
    """A harness task mapped onto local files."""

    name: str
    files: tuple[str, ...]  # relative to the zeroshot folder; the first is the examples' JSON Lines file
    has_acc_norm: bool
    build: Callable[[dict[str, Any]], Example]
    description: str
    #: reads extra per-line data (PIQA's label file) into the docs
    attach: Callable[[list[dict[str, Any]], Path], None] | None = None


def _choices_in_continuation(context: str, choices: list[str], gold: int) -> Example:
    """The usual layout: one context, each choice appended after the target delimiter."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} outside {len(choices)} choices")
    return Example(tuple((context, TARGET_DELIMITER + c) for c in choices), gold, tuple(choices))


# --- the tasks' doc_to_text / doc_to_choice / doc_to_target, as in lm-eval 0.4's YAML -------------

def _boolq(doc: dict[str, Any]) -> Example:
    # super_glue/boolq/default.yaml; HF's ClassLabel: False=0, True=1
    label = doc["label"]
    if isinstance(label, str):
        label = {"false": False, "true": True}[label.strip().lower()]
    context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    return _choices_in_continuation(context, ["no", "yes"], int(bool(label)))


def _rte(doc: dict[str, Any]) -> Example:
    # glue/rte/default.yaml: sentence1/sentence2 are SuperGLUE's premise/hypothesis; entailment=0
    premise = doc.get("premise", doc.get("sentence1"))
    hypothesis = doc.get("hypothesis", doc.get("sentence2"))
    label = doc["label"]
    gold = {"entailment": 0, "not_entailment": 1}[label] if isinstance(label, str) else int(label)
    context = f"{premise}\nQuestion: {hypothesis} True or False?\nAnswer:"
    return _choices_in_continuation(context, ["True", "False"], gold)


def _winogrande(doc: dict[str, Any]) -> Example:
    # winogrande/preprocess_winogrande.py: the option fills the blank in the context ("multiple
    # inputs"), and the continuation is the rest of the sentence after the blank
    sentence = doc["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]]
    continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    gold = {"1": 0, "2": 1}[str(doc["answer"])]
    return Example(tuple((c, continuation) for c in contexts), gold, tuple(contexts))


def _ai2_choices(doc: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """AI2's layout ``question.stem`` + ``question.choices[{text,label}]``, or HF's flattened one."""
    question = doc["question"]
    if isinstance(question, dict):
        return question["stem"], [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
    stem = question if isinstance(question, str) else doc["question_stem"]
    return stem, list(doc["choices"]["text"]), list(doc["choices"]["label"])


def _arc(doc: dict[str, Any]) -> Example:
    # arc/arc_easy.yaml (arc_challenge includes it)
    stem, texts, labels = _ai2_choices(doc)
    return _choices_in_continuation(f"Question: {stem}\nAnswer:", texts, labels.index(doc["answerKey"]))


def _openbookqa(doc: dict[str, Any]) -> Example:
    # openbookqa/openbookqa.yaml: the bare question stem is the context
    if "question_stem" in doc:
        stem, texts, labels = doc["question_stem"], list(doc["choices"]["text"]), list(doc["choices"]["label"])
    else:
        stem, texts, labels = _ai2_choices(doc)
    return _choices_in_continuation(stem, texts, labels.index(doc["answerKey"].lstrip()))


def _piqa(doc: dict[str, Any]) -> Example:
    # piqa/piqa.yaml
    return _choices_in_continuation(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _attach_piqa_labels(docs: list[dict[str, Any]], folder: Path) -> None:
    """Line i of ``valid-labels.lst`` is the label of line i of ``valid.jsonl``."""
    path = folder / "piqa" / "valid-labels.lst"
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) < len(docs):
        raise EbftError(f"{path} has {len(labels)} labels for {len(docs)} examples")
    for doc, label in zip(docs, labels):
        doc["label"] = int(label)


def _hellaswag_preprocess(text: str) -> str:
    """hellaswag/utils.py ``preprocess``: strip WikiHow's bracket artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> Example:
    # hellaswag/hellaswag.yaml + utils.process_docs, on rowanz's original hellaswag_val.jsonl
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = _hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    endings = [_hellaswag_preprocess(e) for e in doc["endings"]]
    return _choices_in_continuation(query, endings, int(doc["label"]))


TASKS: dict[str, LocalTask] = {
    t.name: t
    for t in (
        LocalTask("boolq", ("boolq/val.jsonl",), False, _boolq, "BoolQ validation (3270)"),
        LocalTask("rte", ("rte/val.jsonl",), False, _rte, "RTE validation (277)"),
        LocalTask("winogrande", ("winogrande/dev.jsonl",), False, _winogrande, "WinoGrande xl validation (1267)"),
        LocalTask("arc_easy", ("arc_easy/test.jsonl",), True, _arc, "ARC-Easy test (2376)"),
        LocalTask("arc_challenge", ("arc_challenge/test.jsonl",), True, _arc, "ARC-Challenge test (1172)"),
        LocalTask("openbookqa", ("openbookqa/test.jsonl",), True, _openbookqa, "OpenBookQA main test (500)"),
        LocalTask("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), True, _piqa, "PIQA validation (1838)",
                  attach=_attach_piqa_labels),
        LocalTask("hellaswag", ("hellaswag/hellaswag_val.jsonl",), True, _hellaswag, "HellaSwag validation (10042)"),
    )
}

SUPPORTED_TASKS: tuple[str, ...] = tuple(TASKS)


def parse_tasks(spec: str | list[str]) -> list[str]:
    """``"boolq, rte"`` -> ``["boolq", "rte"]``: known names, in order, without repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in TASKS:
            raise UsageError(f"unknown zero-shot task {item.strip()!r}; supported: {', '.join(SUPPORTED_TASKS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError(f"--tasks is empty; supported: {', '.join(SUPPORTED_TASKS)}")
    return names


def zeroshot_dir(data_dir: str | Path | None) -> Path | None:
    """``DATA_DIR/zeroshot`` (``--data-dir``, else ``$EBFT_DATA_DIR``), or ``DATA_DIR`` itself if it holds the tasks."""
    from ebft.data.sources import resolve_data_dir

    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    if (root / ZEROSHOT_SUBDIR).is_dir():
        return root / ZEROSHOT_SUBDIR
    if any((root / t.files[0]).is_file() for t in TASKS.values()):
        return root
    return root / ZEROSHOT_SUBDIR


def missing_files(task: str, folder: Path | None) -> list[str]:
    """The task's files absent from ``folder`` (all of them when there is no folder)."""
    spec = TASKS[task]
    if folder is None:
        return list(spec.files)
    return [f for f in spec.files if not (folder / f).is_file()]


def load_examples(task: str, folder: Path, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples of ``task`` (all when ``None``), in file order."""
    spec = TASKS[task]
    missing = missing_files(task, folder)
    if missing:
        raise EbftError(f"zero-shot task {task} needs {folder / missing[0]}; pass --data-dir DIR with DIR/"
                        f"{ZEROSHOT_SUBDIR}/{spec.files[0]} or set EBFT_DATA_DIR")
    path = folder / spec.files[0]
    docs: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EbftError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
    if spec.attach is not None:
        spec.attach(docs, folder)
    examples = []
    for number, doc in enumerate(docs, start=1):
        try:
            examples.append(spec.build(doc))
        except (KeyError, ValueError, TypeError) as exc:
            raise EbftError(f"{path}: example {number} does not fit the {task} layout ({type(exc).__name__}: "
                            f"{exc})") from None
    if not examples:
        raise EbftError(f"{path} holds no examples")
    logger.info("loaded %d %s examples from %s", len(examples), task, path)
    return examples
