"""Capturing block inputs and kwargs, and replaying the blocks from them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ebft.capture import calibration_context, capture_block_kwargs, capture_first_block_inputs
from ebft.models import find_blocks
from ebft.models.blocks import run_block

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "smollm3"]


def _ids(batch: int, seqlen: int, vocab: int = 258, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def test_first_block_inputs_are_the_embeddings(tiny_llama: nn.Module) -> None:
    ids = _ids(5, 12)
    blocks = find_blocks(tiny_llama)
    captured = capture_first_block_inputs(tiny_llama, blocks, ids, batch_size=2)
    with torch.no_grad():
        expected = tiny_llama.get_input_embeddings()(ids)
    assert captured.shape == (5, 12, 64)
    assert captured.dtype == torch.float32
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


VARIANTS = [(family, {}) for family in FAMILIES] + [
    ("llama", {"attn_implementation": "eager"}),  # an explicit [1, 1, s, s] mask tensor
    ("mistral", {"sliding_window": 6}),  # a window shorter than the sequence
    # full attention in block 0, sliding in blocks 1-2: kwargs differ per block
    ("qwen2", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
]


@pytest.mark.parametrize("family,overrides", VARIANTS, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in VARIANTS])
def test_replaying_blocks_reproduces_hidden_states(
    family: str, overrides: dict, tiny_factory: Callable[..., nn.Module]
) -> None:
    model = tiny_factory(family, num_hidden_layers=3, **overrides)
    ids = _ids(3, 20)
    blocks = find_blocks(model)
    kwargs = capture_block_kwargs(model, blocks, ids[:1])  # batch 1 ...
    assert len(kwargs) == 3
    hidden = capture_first_block_inputs(model, blocks, ids, batch_size=8)  # ... replayed on batch 3
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states
    # hidden_states = (embeddings, block 0 out, ..., block L-2 out, norm(block L-1 out))
    assert len(reference) == len(blocks) + 1
    torch.testing.assert_close(hidden, reference[0], rtol=0, atol=0)
    for index, block in enumerate(blocks.blocks):
        out = torch.empty_like(hidden)
        run_block(block, hidden, kwargs[index], batch_size=2, out=out)
        hidden = out
        if index < len(blocks) - 1:
            torch.testing.assert_close(hidden, reference[index + 1], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(hidden), reference[-1], rtol=1e-5, atol=1e-5)


def test_kwargs_are_captured_per_block(tiny_factory: Callable[..., nn.Module]) -> None:
    model = tiny_factory("qwen2", num_hidden_layers=3, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    kwargs = capture_block_kwargs(model, find_blocks(model), _ids(1, 20))

    def allowed(kw: dict) -> torch.Tensor:
        """Which positions each query may attend to; None is SDPA's plain causal attention."""
        mask = kw["attention_mask"]
        if mask is None:
            return torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
        return mask if mask.dtype == torch.bool else mask == 0

    full, sliding = allowed(kwargs[0])[0, 0], allowed(kwargs[1])[0, 0]
    assert torch.equal(full, torch.ones(20, 20, dtype=torch.bool).tril())
    assert bool(full[19, 0]) and not bool(sliding[19, 0])  # position 19 no longer sees position 0
    assert torch.equal(allowed(kwargs[1]), allowed(kwargs[2]))


def test_kwargs_drop_cache_and_use_cache(tiny_llama: nn.Module) -> None:
    blocks = find_blocks(tiny_llama)
    kwargs = capture_block_kwargs(tiny_llama, blocks, _ids(1, 8))
    for kw in kwargs:
        assert "position_embeddings" in kw
        cos, sin = kw["position_embeddings"]
        assert cos.shape[:2] == (1, 8) and sin.shape[:2] == (1, 8)
        assert kw.get("use_cache", False) is False
        for key in ("past_key_value", "past_key_values"):
            assert kw.get(key) is None


def test_kwargs_need_a_single_window(tiny_llama: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\[1, seqlen\]"):
        capture_block_kwargs(tiny_llama, find_blocks(tiny_llama), _ids(2, 8))


def _no_instance_forward(blocks) -> bool:
    return all("forward" not in block.__dict__ for block in blocks.blocks)


def test_forwards_restored_after_capture(tiny_llama: nn.Module) -> None:
    blocks = find_blocks(tiny_llama)
    ids = _ids(2, 8)
    with torch.no_grad():
        before = tiny_llama(ids).logits
    capture_block_kwargs(tiny_llama, blocks, ids[:1])
    capture_first_block_inputs(tiny_llama, blocks, ids)
    assert _no_instance_forward(blocks)
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, before, rtol=0, atol=0)


def test_forwards_restored_after_an_exception(tiny_llama: nn.Module) -> None:
    blocks = find_blocks(tiny_llama)
    bad = torch.full((2, 8), 10_000)  # out of the vocabulary: the embedding raises inside the stubbed forward
    with pytest.raises(IndexError):
        capture_first_block_inputs(tiny_llama, blocks, bad)
    assert _no_instance_forward(blocks)
    with pytest.raises(IndexError):
        capture_block_kwargs(tiny_llama, blocks, bad[:1])
    assert _no_instance_forward(blocks)


def test_forwards_restored_when_the_model_raises(tiny_llama: nn.Module) -> None:
    blocks = find_blocks(tiny_llama)

    def explode(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("boom")

    # an exception from the model's own code (here the rotary table) while the stubs are in place
    handle = tiny_llama.model.rotary_emb.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture_block_kwargs(tiny_llama, blocks, _ids(1, 8))
    finally:
        handle.remove()
    assert _no_instance_forward(blocks)


def test_existing_instance_forward_is_kept(tiny_llama: nn.Module) -> None:
    blocks = find_blocks(tiny_llama)
    block = blocks.blocks[0]
    original = block.forward  # bound method of the class

    def wrapped(*args, **kwargs):
        return original(*args, **kwargs)

    block.forward = wrapped  # as accelerate's hooks do
    capture_block_kwargs(tiny_llama, blocks, _ids(1, 8))
    assert block.__dict__["forward"] is wrapped
    assert "forward" not in blocks.blocks[1].__dict__


def test_calibration_context_restores_state(tiny_llama: nn.Module) -> None:
    tiny_llama.train()
    tiny_llama.config.use_cache = True
    with calibration_context(tiny_llama):
        assert not tiny_llama.training
        assert tiny_llama.config.use_cache is False
        assert not torch.is_grad_enabled()
    assert tiny_llama.training
    assert tiny_llama.config.use_cache is True
    assert torch.is_grad_enabled()
    with pytest.raises(KeyError), calibration_context(tiny_llama):
        raise KeyError("x")
    assert tiny_llama.training and tiny_llama.config.use_cache is True
