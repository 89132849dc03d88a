"""Text data sources (``c4``, ``wikitext2``, ``pydoc``, ``text:PATH``, ``jsonl:PATH``) and token windows."""

from __future__ import annotations

from ebft.data.sources import (
    DATA_DIR_ENV,
    ROLES,
    SOURCES,
    Source,
    SourceSpec,
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
    "Source",
    "SourceSpec",
    "calibration_stream",
    "calibration_windows",
    "evaluation_stream",
    "evaluation_tokens",
    "load_documents",
    "parse_source",
    "read_jsonl",
    "register_source",
    "resolve_data_dir",
    "resolve_split",
    "source_choices",
    "wikitext_rows",
]
