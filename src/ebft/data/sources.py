"""Registry of text data sources and the ``name[:split]`` / ``text:PATH`` spec syntax.

A source turns a split (and, for file sources, a path) into a list of documents. How those
documents become tokens (joined text or an EOS-separated stream) is described by the
:class:`Source` entry and carried out in :mod:`ebft.data.tokens`. One source has no documents:
``generated`` (:mod:`ebft.data.generate`) samples its calibration windows from the dense model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ebft.errors import EbftError, UsageError

logger = logging.getLogger(__name__)

ROLES = ("calibration", "evaluation")
DATA_DIR_ENV = "EBFT_DATA_DIR"
SPLIT_ALIASES = {"valid": "validation", "val": "validation"}
_HUB_HINT = "pass --data-dir / set EBFT_DATA_DIR"

#: ``loader(split, path, data_dir) -> documents``; ``split`` is already resolved for the role.
Loader = Callable[[str | None, Path | None, Path | None], list[str]]


@dataclass(frozen=True)
class SourceSpec:
    """A parsed data spec: ``name``, optional ``split``, and ``path`` for file sources."""

    name: str
    split: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.name}:{self.path}"
        return self.name if self.split is None else f"{self.name}:{self.split}"


@dataclass(frozen=True)
class Source:
    """One registered source and the tokenization protocol that goes with it."""

    name: str
    load: Loader
    splits: tuple[str, ...] = ()
    calibration_split: str | None = None
    evaluation_split: str | None = None
    takes_path: bool = False
    #: False: the source needs neither a data dir nor the hub (pydoc, file sources).
    uses_data_dir: bool = True
    #: True: calibration tokenizes each document alone and puts EOS between them;
    #: False: calibration tokenizes the documents joined with ``joiner``.
    calibration_stream: bool = False
    #: Separator used when documents are joined into one text.
    joiner: str = "\n\n"
    #: Evaluation uses only the first N documents (C4 protocol: 1100).
    evaluation_max_documents: int | None = None
    #: Evaluation keeps at most N x seqlen tokens (C4 protocol: 256).
    evaluation_max_windows: int | None = None
    #: True: no documents; the calibration windows are sampled from the dense model (``generated``, see
    #: :mod:`ebft.data.generate`), so the source cannot be evaluated on.
    from_model: bool = False
    #: The dataclass of the options only this source reads (``--gen-temperature`` for ``generated``), or None.
    options: type | None = None

    @property
    def Options(self) -> type | None:  # noqa: N802 - the attribute the registries of methods have (ebft.registry)
        return self.options


SOURCES: dict[str, Source] = {}


def register_source(
    name: str,
    *,
    splits: tuple[str, ...] = (),
    calibration_split: str | None = None,
    evaluation_split: str | None = None,
    takes_path: bool = False,
    uses_data_dir: bool = True,
    calibration_stream: bool = False,
    joiner: str = "\n\n",
    evaluation_max_documents: int | None = None,
    evaluation_max_windows: int | None = None,
    from_model: bool = False,
    options: type | None = None,
) -> Callable[[Loader], Loader]:
    """Decorator that registers ``loader`` under ``name`` in :data:`SOURCES`."""

    def decorate(loader: Loader) -> Loader:
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is already registered")
        for split in (calibration_split, evaluation_split):
            if split is not None and split not in splits:
                raise ValueError(f"default split {split!r} of {name!r} is not among {splits}")
        SOURCES[name] = Source(
            name=name,
            load=loader,
            splits=splits,
            calibration_split=calibration_split,
            evaluation_split=evaluation_split,
            takes_path=takes_path,
            uses_data_dir=uses_data_dir and not takes_path,
            calibration_stream=calibration_stream,
            joiner=joiner,
            evaluation_max_documents=evaluation_max_documents,
            evaluation_max_windows=evaluation_max_windows,
            from_model=from_model,
            options=options,
        )
        return loader

    return decorate


def source_choices(role: str | None = None) -> str:
    """The accepted source names, as shown in error messages: all of them, or those that ``role`` can use."""
    usable = {n: s for n, s in SOURCES.items() if role != "evaluation" or not s.from_model}
    plain = sorted(n for n, s in usable.items() if not s.takes_path)
    with_path = [f"{n}:PATH" for n, s in usable.items() if s.takes_path]
    return ", ".join(plain + with_path)


def check_evaluation_source(spec: str, flag: str) -> SourceSpec:
    """:func:`parse_source`, refusing a source that has no text to evaluate on (``generated``)."""
    parsed = parse_source(spec)
    if SOURCES[parsed.name].from_model:
        raise UsageError(f"{flag} {spec}: its windows are sampled from the model being pruned, as calibration data "
                         f"only (--calib {parsed.name}); evaluate on a text source: {source_choices('evaluation')}")
    return parsed


def parse_source(spec: str) -> SourceSpec:
    """Parse ``c4``, ``wikitext2:test``, ``text:PATH`` and friends into a :class:`SourceSpec`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty data source; use one of: {source_choices()}")
    head, sep, rest = spec.strip().partition(":")
    name = head.strip().lower()
    source = SOURCES.get(name)
    if source is None:
        raise UsageError(f"unknown data source {head!r}; use one of: {source_choices()}")
    if source.takes_path:
        if not rest.strip():
            raise UsageError(f"data source {name!r} needs a file path, such as {name}:corpus.{_example_ext(name)}")
        return SourceSpec(name=name, split=None, path=Path(rest.strip()).expanduser())
    if not sep:
        return SourceSpec(name=name)
    split = SPLIT_ALIASES.get(rest.strip().lower(), rest.strip().lower())
    if split not in source.splits:
        raise UsageError(f"unknown split {rest!r} for data source {name!r}; use one of: {', '.join(source.splits)}")
    return SourceSpec(name=name, split=split)


def _example_ext(name: str) -> str:
    return "jsonl" if name == "jsonl" else "txt"


def resolve_split(spec: SourceSpec, role: str) -> str | None:
    """The split that ``spec`` uses in ``role``: the explicit one, else the role's default."""
    _check_role(role)
    if spec.split is not None:
        return spec.split
    source = SOURCES[spec.name]
    return source.calibration_split if role == "calibration" else source.evaluation_split


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """``data_dir`` if given, else ``$EBFT_DATA_DIR`` if set, else ``None`` (use the hub)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or None
        if data_dir is None:
            return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise EbftError(f"data directory not found: {path}; pass an existing --data-dir or fix {DATA_DIR_ENV}")
    return path


def load_documents(spec: str, role: str, data_dir: str | Path | None = None) -> list[str]:
    """Documents of ``spec`` for ``role`` ("calibration" or "evaluation"), in source order."""
    _check_role(role)
    parsed = parse_source(spec)
    source = SOURCES[parsed.name]
    split = resolve_split(parsed, role)
    directory = resolve_data_dir(data_dir) if source.uses_data_dir else None
    documents = source.load(split, parsed.path, directory)
    where = f" from {directory or 'the Hugging Face hub'}" if source.uses_data_dir else ""
    label = SourceSpec(parsed.name, split, parsed.path)
    logger.info("loaded %s for %s%s: %d documents", label, role, where, len(documents))
    return documents


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise UsageError(f"unknown data role {role!r}; use one of: {', '.join(ROLES)}")


# ---------------------------------------------------------------------------- readers


def _missing(path: Path, instead: str) -> EbftError:
    return EbftError(f"data file not found: {path}; {instead}")


def _read_text(path: Path) -> str:
    """A UTF-8 file's text (a leading BOM is dropped; line endings are kept as they are)."""
    if not path.is_file():
        raise _missing(path, "check the path")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise EbftError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


def read_jsonl(path: Path) -> list[str]:
    """The ``"text"`` field of every non-blank line of a JSON Lines file."""
    texts: list[str] = []
    # split on "\n" only: JSON strings may hold raw U+2028 and friends, which splitlines() breaks on
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EbftError(
                f"{path} line {number}: not valid JSON ({exc.msg}); write one JSON object per line"
            ) from exc
        if not isinstance(record, dict) or "text" not in record:
            raise EbftError(f'{path} line {number}: no "text" field; each line must be an object like {{"text": "..."}}')
        if not isinstance(record["text"], str):
            raise EbftError(f'{path} line {number}: "text" is not a string; each line needs {{"text": "..."}}')
        texts.append(record["text"])
    if not texts:
        raise EbftError(f"{path} holds no documents; add lines like {{\"text\": \"...\"}}")
    return texts


def wikitext_rows(text: str) -> list[str]:
    """Split raw WikiText into HF rows: one line each, newline kept, blank lines as ``""``."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        rows.append(lines[-1])
    return [row if row.strip() else "" for row in rows]


def _hub_rows(what: str, column: str, *args: Any, **kwargs: Any) -> list[str]:
    """``column`` of ``datasets.load_dataset(*args, **kwargs)``, with one-line errors."""
    try:
        import datasets
    except ImportError as exc:
        raise EbftError(f"install datasets (pip install 'ebft[hub]') or {_HUB_HINT}") from exc
    try:
        dataset = datasets.load_dataset(*args, **kwargs)
        rows = list(dataset[column])
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line for the user
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise EbftError(f"could not load {what} from the Hugging Face hub ({detail}); {_HUB_HINT}") from exc
    logger.debug("hub %s: %d rows", what, len(rows))
    return [str(row) for row in rows]


# ---------------------------------------------------------------------------- sources

_WIKITEXT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
_C4_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}
_C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


@register_source(
    "wikitext2",
    splits=("train", "validation", "test"),
    calibration_split="train",
    evaluation_split="test",
)
def _load_wikitext2(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """WikiText-2 raw rows (HF ``wikitext-2-raw-v1``)."""
    assert split is not None
    if data_dir is None:
        return _hub_rows(f"wikitext2:{split}", "text", "wikitext", "wikitext-2-raw-v1", split=split)
    file = data_dir / "wikitext2" / _WIKITEXT_FILES[split]
    if not file.is_file():
        raise _missing(file, "add it to the data dir, or use another split or source (c4, pydoc)")
    return wikitext_rows(_read_text(file))


@register_source(
    "c4",
    splits=("train", "validation"),
    calibration_split="train",
    evaluation_split="validation",
    calibration_stream=True,
    joiner=" ",
    evaluation_max_documents=1100,
    evaluation_max_windows=256,
)
def _load_c4(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """C4 ``en`` documents from the first shard of the split."""
    assert split is not None
    if data_dir is None:
        return _hub_rows(
            f"c4:{split}", "text", "allenai/c4", data_files={split: _C4_HUB_FILES[split]}, split=split
        )
    file = data_dir / "c4" / _C4_FILES[split]
    if not file.is_file():
        raise _missing(file, "add it to the data dir, or use another source (wikitext2, pydoc)")
    return read_jsonl(file)


@register_source(
    "pydoc", splits=("train", "test"), calibration_split="train", evaluation_split="test", uses_data_dir=False
)
def _load_pydoc(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """CPython's topic help texts; sorted topics, every 5th (index % 5 == 0) is ``test``."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise EbftError("this Python lacks pydoc_data; use another data source (c4, wikitext2, text:PATH)") from exc
    names = sorted(topics)
    chosen = [n for i, n in enumerate(names) if (i % 5 == 0) == (split == "test")]
    return [topics[n] for n in chosen]


@register_source("text", takes_path=True)
def _load_text(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """A plain UTF-8 text file as a single document."""
    assert path is not None
    return [_read_text(path)]


@register_source("jsonl", takes_path=True, calibration_stream=True)
def _load_jsonl(split: str | None, path: Path | None, data_dir: Path | None) -> list[str]:
    """One document per JSON Lines record (its ``"text"`` field)."""
    assert path is not None
    return read_jsonl(path)
