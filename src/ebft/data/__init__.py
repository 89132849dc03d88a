"""Data sources (``c4``, ``wikitext2``, ``pydoc``, ``text:PATH``, ``jsonl:PATH``, and ``generated``: sampled from
the model) and token windows."""

from __future__ import annotations

from ebft.data.generate import GeneratedOptions, generate_windows  # registers the source "generated"
from ebft.data.sources import (
    DATA_DIR_ENV,
    ROLES,
    SOURCES,
    Source,
    SourceSpec,
    check_evaluation_source,
    load_documents,
    parse_source,
    read_jsonl,
    register_source,
    resolve_data_dir,
    resolve_split,
    source_choices,
    wikitext_rows,
)
from ebft.data.tokens import calibration_stream, calibration_windows, evaluation_stream, evaluation_tokens

__all__ = [
    "DATA_DIR_ENV",
    "ROLES",
    "SOURCES",
    "GeneratedOptions",
    "Source",
    "SourceSpec",
    "calibration_stream",
    "calibration_windows",
    "check_evaluation_source",
    "evaluation_stream",
    "evaluation_tokens",
    "generate_windows",
    "load_documents",
    "parse_source",
    "read_jsonl",
    "register_source",
    "resolve_data_dir",
    "resolve_split",
    "source_choices",
    "wikitext_rows",
]
