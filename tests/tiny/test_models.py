"""Block discovery (find_blocks) and model resolution, on tiny random models and folders built offline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from ebft.errors import EbftError
from ebft.models import SUPPORTED_MODEL_TYPES, find_blocks
from ebft.models.loading import load_config, resolve_model

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [2, 3])
def test_find_blocks(family: str, layers: int, tiny_factory: Callable[..., nn.Module]) -> None:
    model = tiny_factory(family, num_hidden_layers=layers)
    blocks = find_blocks(model)
    assert blocks.prefix == "model.layers"
    assert len(blocks) == layers
    assert blocks.blocks is model.model.layers
    assert blocks.block_name(1) == "model.layers.1"
    modules = dict(model.named_modules())
    for index in range(layers):
        linears = blocks.linears(index)
        assert sorted(linears) == sorted(f"model.layers.{index}.{p}" for p in PROJ)
        for name, linear in linears.items():
            assert modules[name] is linear  # full module names, resolvable on the model
            assert isinstance(linear, nn.Linear)
    everything = blocks.all_linears()
    assert len(everything) == 7 * layers
    assert "lm_head" not in everything


def test_unsupported_model_type_names_the_supported_ones() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(EbftError) as info:
        find_blocks(model)
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in message


def test_resolve_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(EbftError, match="model file not found"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_resolve_gguf_file(tmp_path: Path) -> None:
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF")
    where = resolve_model(str(file))
    assert (where.path_or_id, where.gguf_file) == (str(tmp_path), "m.gguf")


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(EbftError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_resolve_folder_and_hub_id(tiny_model_dir: Path) -> None:
    where = resolve_model(str(tiny_model_dir))
    assert (where.path_or_id, where.gguf_file) == (str(tiny_model_dir), None)
    assert resolve_model("org/name").path_or_id == "org/name"


def test_load_config_of_saved_folder(tiny_model_dir: Path) -> None:
    assert load_config(str(tiny_model_dir)).model_type == "llama"
