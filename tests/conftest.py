"""Shared fixtures: tiny random HF causal LMs, a byte-level tokenizer, a saved model folder, real text."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

#: model_type -> (config class, model class)
FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
}

#: 256 byte tokens + <eos> (256) + <bos> (257)
BYTE_VOCAB = 258
EOS_ID = 256

TINY = dict(
    vocab_size=BYTE_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # larger than HF's 0.02 so that blocks change their inputs noticeably
)

#: A width that 2:4 divides but 2:8 does not (36 % 8 == 4); head_dim 12 keeps rotary even.
ODD_WIDTH = dict(hidden_size=36, intermediate_size=72, num_attention_heads=3, num_key_value_heads=1, head_dim=12)


def make_tiny(family: str = "llama", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A seeded, randomly initialised tiny causal LM of ``family`` in fp32 eval mode, on the CPU."""
    config_cls, model_cls = FAMILIES[family]
    kwargs = {**TINY, **overrides}
    if family in ("qwen3", "gemma3_text"):
        kwargs.setdefault("head_dim", kwargs["hidden_size"] // kwargs["num_attention_heads"])
    if family == "gemma3_text":
        # sliding and full attention alternate, with a window shorter than the test sequences: every
        # block type gets its own mask and rotary table, so kwargs must be captured per block
        kwargs.setdefault("sliding_window", 6)
        kwargs.setdefault("layer_types", [("sliding_attention", "full_attention")[i % 2]
                                          for i in range(kwargs["num_hidden_layers"])])
    if family == "smollm3":
        kwargs.update(pad_token_id=None, bos_token_id=None, eos_token_id=EOS_ID)  # its defaults exceed the vocab
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    return model


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as the ByteLevel pre-tokenizer uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose ids are the UTF-8 bytes, plus <eos> (256) and <bos> (257); no BOS added."""
    vocab = {ch: b for b, ch in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


@pytest.fixture(scope="session")
def tiny_factory() -> Callable[..., PreTrainedModel]:
    return make_tiny


@pytest.fixture
def tiny_llama() -> PreTrainedModel:
    return make_tiny("llama")


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return byte_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 18K characters of real English prose (CPython's help topics)."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:5]), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def short_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text of 11 tokens: shorter than a 32-token window."""
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text("hello world", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 36, so 2:4 fits and 2:8 does not) saved with its tokenizer, loadable by the CLI."""
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    model = make_tiny("llama", **ODD_WIDTH)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@contextlib.contextmanager
def interrupted_after_block(stop_after: int) -> Iterator[None]:
    """Within the block, a run raises KeyboardInterrupt (Ctrl-C) right after block ``stop_after``'s checkpoint."""
    from ebft.checkpoint import Checkpoint

    save_block = Checkpoint.save_block

    def save_then_interrupt(self: Checkpoint, index: int, *args: object, **kwargs: object) -> None:
        save_block(self, index, *args, **kwargs)
        if index == stop_after:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "save_block", save_then_interrupt)
        yield


@pytest.fixture(scope="session")
def interrupt_after() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """``with interrupt_after(k):`` a run inside stops with Ctrl-C right after block ``k`` is committed."""
    return interrupted_after_block
