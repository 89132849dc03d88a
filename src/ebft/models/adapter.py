"""Find a causal LM's decoder blocks and their linear layers without assuming attribute names."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ebft.errors import EbftError

# model_type -> family. Each family's decoder layer takes the hidden states first and returns the
# new hidden states (a tensor, or a tuple whose first item is the tensor).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (incl. SmolLM, SmolLM2)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3 (text)",
    "smollm3": "SmolLM3",
}


@dataclass
class DecoderBlocks:
    """The decoder stack of a model: where it lives and what can be pruned in it."""

    prefix: str  # module path of the ModuleList, e.g. "model.layers"
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def linears(self, index: int) -> dict[str, nn.Linear]:
        """The prunable linear layers of block ``index``, keyed by their full module name."""
        block = self.blocks[index]
        return {
            f"{self.block_name(index)}.{name}": module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear)
        }

    def all_linears(self) -> dict[str, nn.Linear]:
        out: dict[str, nn.Linear] = {}
        for index in range(len(self)):
            out.update(self.linears(index))
        return out


def find_blocks(model: nn.Module) -> DecoderBlocks:
    """Locate the decoder blocks of a supported causal LM.

    The block class is taken from ``model._no_split_modules`` (the classes transformers keeps
    whole when sharding), and the blocks are the ``nn.ModuleList`` of those classes.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        supported = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        raise EbftError(f"model type {model_type!r} is not supported; supported model types: {supported}")
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__ in block_classes for child in module):
                candidates.append((name, module))
    if not candidates:
        raise EbftError(f"could not find the decoder blocks of this {model_type} model ({type(model).__name__})")
    expected = getattr(model.config, "num_hidden_layers", None)
    matching = [c for c in candidates if expected is None or len(c[1]) == expected] or candidates
    prefix, blocks = max(matching, key=lambda c: len(c[1]))
    return DecoderBlocks(prefix=prefix, blocks=blocks)
