"""Load causal LMs (hub id, local folder, GGUF file, built-in alias) and find their decoder blocks."""

from ebft.models.adapter import SUPPORTED_MODEL_TYPES, DecoderBlocks, find_blocks
from ebft.models.loading import ALIASES, LoadedModel, load_model, load_tokenizer, prepare_for_saving

__all__ = [
    "ALIASES",
    "SUPPORTED_MODEL_TYPES",
    "DecoderBlocks",
    "LoadedModel",
    "find_blocks",
    "load_model",
    "load_tokenizer",
    "prepare_for_saving",
]
