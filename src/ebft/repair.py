"""Repairing a model that another tool pruned: what is checked before the weights of either load.

``ebft repair SPARSE --dense DENSE`` is an ``ebft prune DENSE`` run whose pruner is ``given``
(:mod:`ebft.pruners.given`): the masks are SPARSE's exact zeros and the targets DENSE's blocks. So
SPARSE must be DENSE pruned: the same architecture and widths, the same tokenizer, and zeros to take.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ebft.errors import EbftError, UsageError

logger = logging.getLogger(__name__)

#: Fewer zeros than this share of the block weights: the model was not pruned.
MIN_ZEROS = 0.05
_SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "vocab_size")
_WIDTH_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
_SAMPLE = "The quick brown fox jumps over the lazy dog. Ünïcödé, 123 + 456 = 579; naïve café — ok?"


def _value(config: Any, key: str) -> Any:
    value = getattr(config, key, None)
    if key == "head_dim" and value is None and getattr(config, "num_attention_heads", None):
        value = config.hidden_size // config.num_attention_heads
    return value


def check_repair(sparse: str, dense: str, dense_config: Any, skeleton: Any) -> dict[str, Any]:
    """Refuse, in one line, a SPARSE that is not DENSE pruned; returns what SPARSE holds (its zeros)."""
    from ebft.models import find_blocks
    from ebft.models.loading import load_config, load_tokenizer
    from ebft.models.streaming import CheckpointFiles

    folder = Path(sparse).expanduser()
    if not folder.is_dir():
        raise UsageError(f"the pruned model {sparse} is not a folder; give the folder another tool saved it in "
                         "(config.json and safetensors weights)")
    files = CheckpointFiles(folder)
    config = load_config(str(folder))
    if config.model_type != dense_config.model_type:
        raise EbftError(f"the pruned model {sparse} is a {config.model_type}, the dense model {dense} a "
                        f"{dense_config.model_type}; give the dense model it was pruned from")
    for key in _SHAPE_KEYS:
        if _value(config, key) != _value(dense_config, key):
            raise EbftError(f"the pruned model {sparse} and the dense model {dense} differ in {key} "
                            f"({_value(config, key)} vs {_value(dense_config, key)}); give the dense model it was "
                            "pruned from")
    for key in _WIDTH_KEYS:
        if _value(config, key) != _value(dense_config, key):
            raise EbftError(f"the pruned model {sparse} has other block widths than {dense} ({key} "
                            f"{_value(config, key)} vs {_value(dense_config, key)}): it was pruned structurally, so "
                            "there are no zeros to take as masks; shrink and repair in one run with ebft prune "
                            f"{dense} --structured RATIO")
    names = [name + ".weight" for name in find_blocks(skeleton).all_linears()] if skeleton is not None else []
    missing = [name for name in names if name not in files]
    if missing:
        raise EbftError(f"the pruned model {sparse} has no {missing[0]}; it is not {dense} pruned")
    zeros = total = 0
    for start in range(0, len(names), 16):  # a few tensors at a time
        for tensor in files.get_many(names[start:start + 16]).values():
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
    share = zeros / total if total else 0.0
    if share < MIN_ZEROS:
        raise EbftError(f"only {share:.2%} of the pruned model's decoder-block linear weights are exactly 0.0; "
                        f"{sparse} does not look pruned (its zeros are the masks repair keeps)")
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        theirs, ours = load_tokenizer(str(folder)), load_tokenizer(dense)
        if theirs(_SAMPLE)["input_ids"] != ours(_SAMPLE)["input_ids"] or len(theirs) != len(ours):
            raise EbftError(f"the pruned model's tokenizer differs from {dense}'s ({len(theirs)} vs {len(ours)} "
                            "tokens, or another split of the same text); give the dense model it was pruned from")
    else:
        logger.info("%s holds no tokenizer; the dense model's is used", sparse)
    logger.info("repairing %s: %.2f%% of its block weights are 0.0", sparse, 100 * share)
    return {"zeros": share}
