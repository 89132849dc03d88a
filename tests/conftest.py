"""Shared fixtures: tiny random HF causal LMs, a byte-level tokenizer, saved model folders, real text, and the
runs and checks that tests in more than one folder use.

Each folder of tests/ holds the tests of one need (tests/README.md); its tests get the folder's marker.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
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

TESTS = Path(__file__).resolve().parent

#: folder of tests/ -> the marker its tests get: ``pytest -m tensors``, ``pytest -m "not process"``
FOLDER_MARKERS = {"tensors": "tensors", "tiny": "tiny", "process": "process", "smollm2": "integration", "gpu": "gpu"}

#: the folders whose tests run tiny models: one torch thread is faster there, and far faster on a busy machine
ONE_THREAD = {"tensors", "tiny", "process"}


def _folder(path: Path) -> str | None:
    """The folder of tests/ that ``path`` lies in, if any."""
    parts = path.resolve().relative_to(TESTS).parts if path.resolve().is_relative_to(TESTS) else ()
    return parts[0] if len(parts) > 1 else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        marker = FOLDER_MARKERS.get(_folder(item.path) or "")
        if marker is not None:
            item.add_marker(marker)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    if _folder(request.path) not in ONE_THREAD:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ tiny models and a tokenizer

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
BOS_ID = 257

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


def byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose ids are the UTF-8 bytes, plus <eos> (256) and <bos> (257).

    With ``bos`` it puts <bos> before every text it encodes with special tokens; without, it adds nothing.
    """
    vocab = {ch: b for b, ch in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>", "<bos>"])
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def _save_tiny(folder: Path, **overrides: object) -> Path:
    """A tiny Llama saved with the byte tokenizer into ``folder``, loadable by the CLI."""
    make_tiny("llama", **overrides).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


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
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer that starts every text it encodes with special tokens with <bos>."""
    return byte_tokenizer(bos=True)


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
    return _save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama", **ODD_WIDTH)


# ------------------------------------------------------------------------------ a decoder block to tune


def _first_block_problem(model: torch.nn.Module, ids: torch.Tensor,
                         score: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Block 0 of ``model``, pruned, with what tuning it needs: its inputs and kwargs captured from ``ids``, its
    dense outputs as targets, and per linear weight a row-wise 50% mask by ``score(weight)`` (default: magnitude)
    and the dense weight. Keys: block, inputs, targets, masks, kwargs, dense."""
    from ebft.capture import capture_block_kwargs, capture_first_block_inputs
    from ebft.models import find_blocks
    from ebft.models.blocks import run_block
    from ebft.sparsity import apply_mask_, unstructured_mask

    blocks = find_blocks(model)
    kwargs = capture_block_kwargs(model, blocks, ids[:1])[0]
    inputs = capture_first_block_inputs(model, blocks, ids)
    block = blocks.blocks[0]
    targets = torch.empty_like(inputs)
    run_block(block, inputs, kwargs, len(ids), out=targets)
    masks, dense = {}, {}
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = f"{name}.weight"
            dense[key] = module.weight.detach().clone()
            masks[key] = unstructured_mask(module.weight.abs() if score is None else score(module.weight), 0.5,
                                           per_row=True)
            apply_mask_(module.weight.data, masks[key])
    return dict(block=block, inputs=inputs, targets=targets, masks=masks, kwargs=kwargs, dense=dense)


@pytest.fixture(scope="session")
def first_block_problem() -> Callable[..., dict[str, Any]]:
    """``first_block_problem(model, ids, score=None)``: block 0 of ``model`` pruned, with its inputs and targets."""
    return _first_block_problem


def _assert_refined_masks(block: torch.nn.Module, masks: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                          dense: dict[str, torch.Tensor], kind: str = "row") -> None:
    """What a mask-refining tuner must leave: pruned weights exactly 0.0, kept ones exactly the dense values, and
    each mask with its starting count per row (``row``), per layer (``layer``) or per 2:4 group (``nm``)."""
    from ebft.sparsity import check_nm

    params = dict(block.named_parameters())
    for name, mask in masks.items():
        weight = params[name].data
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask])), name  # exactly 0.0
        assert torch.equal(weight[mask], dense[name][mask]), name  # exactly the dense values
        if kind == "row":
            assert torch.equal(mask.sum(1), start[name].sum(1)), name
        elif kind == "layer":
            assert int(mask.sum()) == int(start[name].sum()), name
        else:
            assert check_nm(mask, 2, 4) and int(mask.sum()) == int(start[name].sum()), name


@pytest.fixture(scope="session")
def assert_refined_masks() -> Callable[..., None]:
    """``assert_refined_masks(block, masks, start, dense, kind="row")``: see :func:`_assert_refined_masks`."""
    return _assert_refined_masks


# ------------------------------------------------------------------------------ the command line's errors


def _one_line_error(err: str, fragment: str = "") -> str:
    """The one line of ``err``, which must be all of it: ``error: ...`` holding ``fragment``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def one_line_error() -> Callable[..., str]:
    """``one_line_error(stderr, fragment="")``: asserts that stderr is one ``error:`` line holding ``fragment``."""
    return _one_line_error


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


# ------------------------------------------------------------------------------ runs that tiny/ and process/ share


@dataclasses.dataclass(frozen=True)
class PruneSetup:
    """A saved tiny model and the ``ebft prune`` flags a group of tests runs it with."""

    model_dir: Path
    text_file: Path
    flags: tuple[str, ...]

    def argv(self, out: Path, *extra: str, text: Path | None = None) -> list[str]:
        """``prune MODEL --out OUT --calib text:TEXT FLAGS... EXTRA...``, on ``text`` instead when given."""
        return ["prune", str(self.model_dir), "--out", str(out), "--calib", f"text:{text or self.text_file}",
                *self.flags, *extra]


@pytest.fixture(scope="session")
def resume_setup(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> PruneSetup:
    """A tiny Llama with 4 blocks, so that a run can stop after the first, middle and last ones."""
    folder = _save_tiny(tmp_path_factory.mktemp("resume") / "tiny4", num_hidden_layers=4, hidden_size=32,
                        intermediate_size=64)
    return PruneSetup(folder, text_file, ("--nsamples", "6", "--seqlen", "32", "--epochs", "2", "--batch-size", "2",
                                          "--lr", "1e-3", "--device", "cpu", "--threads", "1", "--quiet"))


@pytest.fixture(scope="session")
def resume_reference(resume_setup: PruneSetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of ``resume_setup``."""
    from ebft.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(resume_setup.argv(out)) == 0
    return out


def _assert_unfinished_run(out: Path, done: int) -> None:
    """``out`` is a run stopped after ``done`` blocks: no run folder yet, the blocks committed in its work folder."""
    import json

    from ebft.checkpoint import work_dir

    assert not out.exists()  # the run folder appears only complete
    state = json.loads((work_dir(out) / "run.json").read_text())
    assert state["done"] == done and len(state["blocks"]) == done
    assert sorted(p.name for p in (work_dir(out) / "blocks").iterdir()) == [f"{i:05d}.safetensors" for i in range(done)]


@pytest.fixture(scope="session")
def assert_unfinished() -> Callable[[Path, int], None]:
    """``assert_unfinished(out, done)``: the run to ``out`` stopped with exactly ``done`` blocks committed."""
    return _assert_unfinished_run


def _assert_resumes_bitwise(setup: PruneSetup, folder: Path, flags: tuple[str, ...], stop_after: int) -> tuple[Path, Path]:
    """``setup`` with ``flags`` run whole, and again stopped after block ``stop_after`` then resumed: the same
    ``model.safetensors``, byte for byte. Returns the two run folders (whole, resumed)."""
    from ebft.cli import main

    whole, broken = folder / "whole", folder / "broken"
    assert main(setup.argv(whole, *flags)) == 0
    with interrupted_after_block(stop_after):
        assert main(setup.argv(broken, *flags)) == 130
    _assert_unfinished_run(broken, stop_after + 1)
    assert main(setup.argv(broken, *flags, "--resume")) == 0
    assert (broken / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()
    return whole, broken


@pytest.fixture(scope="session")
def assert_resumes_bitwise() -> Callable[..., tuple[Path, Path]]:
    """``assert_resumes_bitwise(setup, tmp_path, flags, stop_after)``: a run stopped after a block and resumed
    gives the uninterrupted run's model, byte for byte."""
    return _assert_resumes_bitwise


@pytest.fixture(scope="session")
def parallel_setup(tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> PruneSetup:
    """A tiny Llama with 3 blocks; 8 windows, 1 held out: batches of 3, 3 and 1 windows, so that one of two
    processes gets an empty shard each epoch."""
    folder = _save_tiny(tmp_path_factory.mktemp("dist") / "tiny3", num_hidden_layers=3)
    return PruneSetup(folder, text_file, ("--nsamples", "8", "--seqlen", "32", "--epochs", "2", "--batch-size", "3",
                                          "--lr", "1e-3", "--precision", "fp32", "--device", "cpu", "--threads", "1",
                                          "--quiet"))


@pytest.fixture(scope="session")
def single_process_run(parallel_setup: PruneSetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``parallel_setup`` run in this process, without torchrun or offloading."""
    from ebft.cli import main

    out = tmp_path_factory.mktemp("single") / "run"
    assert main(parallel_setup.argv(out)) == 0
    return out


#: The grid most sweep tests run: 2 sparsities x none/ebft, 4 cells.
SWEEP_GRID = """  sparsity: [0.5, 0.7]
  finetune: [none, ebft]"""


@pytest.fixture(scope="session")
def sweep_config(tiny_model_dir: Path, text_file: Path) -> Callable[..., Path]:
    """``sweep_config(folder, grid=SWEEP_GRID, extra="")`` writes ``folder/sweep.yaml``: ``grid`` over small
    runs of the tiny model, ``extra`` added to the fixed settings, cells under ``folder/out``."""

    def write(tmp: Path, grid: str = SWEEP_GRID, extra: str = "") -> Path:
        path = tmp / "sweep.yaml"
        path.write_text(f"""
grid:
{grid}
fixed:
  model: {tiny_model_dir}
  calib: text:{text_file}
  nsamples: 4
  seqlen: 32
  epochs: 1
  lr: 1e-3
  batch_size: 2
  device: cpu
  eval: [text:{text_file}]
  eval_seqlen: 32
  max_windows: 2
{extra}
out: {tmp / "out"}
""", encoding="utf-8")
        return path

    return write
