"""--finetune kd: the block walk, then distillation from the dense model, masks exact, never worse held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ebft.cli import main
from ebft.report import render_report

WINDOWS = ("--nsamples", "32", "--precision", "fp32")  # 4 held out
KD = (*WINDOWS, "--finetune", "kd", "--kd-lr", "3e-4", "--kd-epochs", "3")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _assert_other_weights_same_masks(plain: Path, other: Path) -> None:
    """The run ``other`` saved other weights than ``plain``, with the same masks: every pruned weight 0.0 in both."""
    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (plain, other))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    for key, weight in b.items():
        if key.endswith("proj.weight"):
            assert torch.equal(weight == 0, a[key] == 0), key


def test_kd_after_ebft_lowers_the_kl_and_keeps_every_pruned_weight_zero(resume_setup, tmp_path: Path) -> None:
    ebft, kd = tmp_path / "ebft", tmp_path / "kd"
    assert main(resume_setup.argv(ebft, *WINDOWS)) == 0
    assert main(resume_setup.argv(kd, *KD)) == 0
    stage = _report(kd)["model_stage"]
    assert stage["method"] == "kd" and stage["loss"] == "KL to the dense model" and stage["restored"] is None
    assert stage["final_loss"] < stage["init_loss"]
    assert stage["details"]["holdout_kl_after"] < stage["details"]["holdout_kl_before"]
    assert stage["details"]["training_windows"] == 28
    # the walk before the stage is EBFT's own: its block reports are the plain ebft run's
    assert [b["final_loss"] for b in _report(kd)["blocks"]] == [b["final_loss"] for b in _report(ebft)["blocks"]]
    before, after = (load_file(str(p / "model" / "model.safetensors")) for p in (ebft, kd))
    changed = 0
    for key, weight in after.items():
        if key.startswith("model.layers.") and key.endswith("proj.weight"):
            assert torch.equal(weight == 0, before[key] == 0), key  # the same masks, every pruned weight 0.0
            changed += int(not torch.equal(weight, before[key]))
        elif not key.startswith("model.layers."):
            assert torch.equal(weight, before[key]), key  # embeddings, final norm and head stay
    assert changed == 28  # every linear of the 4 blocks moved
    render_report(kd)  # the report page and the model card name the stage's own settings by their flags
    row = next(line for line in (kd / "report.md").read_text().splitlines() if line.startswith("| fine-tuning |"))
    assert row.endswith("; --kd-lr 0.0003, --kd-epochs 3 |")
    assert "--kd-lr 0.0003, --kd-epochs 3)." in (kd / "model" / "README.md").read_text()


def test_kd_that_does_not_help_held_out_gives_the_walks_weights_back(resume_setup, tmp_path: Path) -> None:
    ebft, kd = tmp_path / "ebft", tmp_path / "kd"
    assert main(resume_setup.argv(ebft, *WINDOWS, "--no-model-guard")) == 0
    assert main(resume_setup.argv(kd, *WINDOWS, "--finetune", "kd", "--kd-lr", "5",
                                  "--no-model-guard")) == 0  # a learning rate that wrecks the model
    stage = _report(kd)["model_stage"]
    assert stage["restored"] and ("held-out KL" in stage["restored"] or "non-finite" in stage["restored"])
    assert (kd / "model" / "model.safetensors").read_bytes() == (ebft / "model" / "model.safetensors").read_bytes()


def test_kd_resumes_bitwise(resume_setup, tmp_path: Path, assert_resumes_bitwise) -> None:
    assert_resumes_bitwise(resume_setup, tmp_path, KD, stop_after=2)


def test_kd_options_are_refused_with_other_methods(resume_setup, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(resume_setup.argv(tmp_path / "x", "--kd-lr", "1e-4")) == 2
    assert "--kd-lr applies only to --finetune kd, not ebft; drop it" in capsys.readouterr().err


def test_kd_runs_on_a_structured_model(resume_setup, tmp_path: Path) -> None:
    out = tmp_path / "st"
    assert main(resume_setup.argv(out, *KD, "--structured", "0.25")) == 0
    report = _report(out)
    assert report["structured"] and report["model_stage"]["method"] == "kd"
    stage = report["model_stage"]
    assert stage["steps"] == 3 * 14 and stage["details"]["holdout_kl_before"] > 0  # 28 windows, batch 2


def test_the_hidden_state_loss_is_the_per_token_squared_error_over_the_dense_norm() -> None:
    from ebft.finetune.kd import hidden_loss

    student = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 0.0]]])
    # token 0: |(1, -2)|^2 / |(0, 2)|^2 = 5 / 4; token 1: |(0, 4)|^2 / |(3, 0)|^2 = 16 / 9
    assert float(hidden_loss(student, teacher)) == pytest.approx((5 / 4 + 16 / 9) / 2)
    assert float(hidden_loss(teacher, teacher)) == 0.0


def test_kd_hidden_weight_keeps_the_dense_block_outputs_and_trains_towards_them(resume_setup, tmp_path: Path) -> None:
    """The recorded teacher block outputs are the dense chain's on the calibration windows (a plain
    reference, to bf16); the stage with the hidden-state loss trains to another model, masks exact, and
    leaves no file behind under --offload disk."""
    from tests.tiny.test_block_window import _calibration_ids, _first_block_inputs
    from transformers import AutoModelForCausalLM

    from ebft.finetune.kd import KD as Stage
    from ebft.models.adapter import find_blocks
    from ebft.models.blocks import call_block

    kept: list[torch.Tensor] = []
    close = Stage.close

    def keep_then_close(self: Stage) -> None:
        if self.teacher_hidden is not None:
            kept.append(self.teacher_hidden.clone())
        close(self)

    plain, hidden = tmp_path / "plain", tmp_path / "hidden"
    assert main(resume_setup.argv(plain, *KD)) == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Stage, "close", keep_then_close)
        assert main(resume_setup.argv(hidden, *KD, "--kd-hidden-weight", "1", "--offload", "disk")) == 0
    assert len(kept) == 1 and kept[0].dtype == torch.bfloat16 and kept[0].shape[:2] == (4, 32)
    dense = AutoModelForCausalLM.from_pretrained(resume_setup.model_dir).float().eval()
    x, kwargs = _first_block_inputs(dense, _calibration_ids(hidden, resume_setup))
    with torch.no_grad():
        for index, block in enumerate(find_blocks(dense).blocks):
            x = call_block(block, x, kwargs)
            torch.testing.assert_close(kept[0][index].float(), x, rtol=1e-2, atol=1e-2)
    stage = _report(hidden)["model_stage"]
    assert stage["details"]["hidden_weight"] == 1.0 and stage["restored"] is None
    assert stage["details"]["holdout_kl_after"] < stage["details"]["holdout_kl_before"]
    _assert_other_weights_same_masks(plain, hidden)
    assert not list(tmp_path.rglob("kd-teacher-*"))


def test_a_negative_hidden_weight_is_refused(resume_setup, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             one_line_error) -> None:
    assert main(resume_setup.argv(tmp_path / "x", "--finetune", "kd", "--kd-hidden-weight", "-1")) == 2
    one_line_error(capsys.readouterr().err, "--kd-hidden-weight must be >= 0 (0: off); got -1.0")


GEN = (*KD, "--kd-gen-windows", "6", "--kd-gen-prefix", "4")  # 28 training windows, then 6 the dense model writes


def _teacher_ids(argv: list[str]) -> torch.Tensor:
    """The windows the distillation stage's teacher was recorded on, in the run ``argv``."""
    from ebft.finetune.kd import KD as Stage

    seen: list[torch.Tensor] = []
    tune = Stage.tune_model

    def keep_then_tune(self: Stage, *args, **kwargs):
        seen.append(self.teacher.ids.clone())
        return tune(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Stage, "tune_model", keep_then_tune)
        assert main(argv) == 0
    assert len(seen) == 1
    return seen[0]


def test_kd_gen_windows_continue_pieces_of_the_training_windows(resume_setup, tmp_path: Path) -> None:
    """The extra windows follow the calibration's (whose 28 training and 4 held-out windows stay as they are), each
    starts with 4 consecutive tokens of training window j; the stage takes one more step per epoch for every 2 of
    them, the held-out KL still falls, every pruned weight stays 0.0, and the same seed gives the same windows."""
    from tests.tiny.test_block_window import _calibration_ids

    first, again, plain = tmp_path / "gen", tmp_path / "again", tmp_path / "plain"
    ids = _teacher_ids(resume_setup.argv(first, *GEN))
    calib = _calibration_ids(first, resume_setup)
    seqlen = calib.shape[1]
    assert ids.shape == (32 + 6, seqlen) and torch.equal(ids[:32], calib)
    for j, window in enumerate(ids[32:]):
        pieces = {tuple(calib[j, o:o + 4].tolist()) for o in range(seqlen - 3)}
        assert tuple(window[:4].tolist()) in pieces, j
    assert len({tuple(w.tolist()) for w in ids[32:]}) == 6
    assert torch.equal(_teacher_ids(resume_setup.argv(again, *GEN)), ids)
    assert main(resume_setup.argv(plain, *KD)) == 0
    stage, without = _report(first)["model_stage"], _report(plain)["model_stage"]
    assert stage["details"]["generated_windows"] == 6 and without["details"]["generated_windows"] == 0
    assert stage["details"]["training_windows"] == 28
    assert stage["steps"] == 3 * 17 and without["steps"] == 3 * 14  # batch 2: 34 windows against 28
    assert stage["details"]["holdout_kl_after"] < stage["details"]["holdout_kl_before"]
    _assert_other_weights_same_masks(plain, first)


def test_kd_gen_windows_never_draw_a_padded_embedding_row(resume_setup, tmp_path: Path) -> None:
    """A model whose embedding has rows past its tokenizer's ids (as Qwen2.5's has) writes windows of known ids
    only: the padded rows' tokens would mean nothing to the tokenizer, and a random model draws them often."""
    from tests.conftest import BYTE_VOCAB, PruneSetup, _save_tiny

    padded = PruneSetup(_save_tiny(tmp_path / "padded", num_hidden_layers=2, vocab_size=BYTE_VOCAB + 62),
                        resume_setup.text_file, resume_setup.flags)
    ids = _teacher_ids(padded.argv(tmp_path / "gen", *GEN, "--no-model-guard"))
    assert ids.shape[0] == 32 + 6 and int(ids.max()) < BYTE_VOCAB


def test_kd_gen_windows_are_kept_for_resume_which_reads_them_back_bitwise(
        resume_setup, tmp_path: Path, interrupt_after, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped after block 1 keeps its written windows in the work folder; --resume reads them back (sampling
    again would fail here) and gives the uninterrupted run's model, byte for byte; the file goes with the folder."""
    import ebft.data.generate
    from ebft.checkpoint import work_dir
    from ebft.finetune.kd import WRITTEN_NAME

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    written = _teacher_ids(resume_setup.argv(whole, *GEN))[32:]
    with interrupt_after(1):
        assert main(resume_setup.argv(broken, *GEN)) == 130
    assert torch.equal(load_file(str(work_dir(broken) / WRITTEN_NAME))["ids"], written)
    monkeypatch.setattr(ebft.data.generate, "continue_windows", lambda *a, **k: pytest.fail("resume samples again"))
    assert main(resume_setup.argv(broken, *GEN, "--resume")) == 0
    assert (broken / "model" / "model.safetensors").read_bytes() == (whole / "model" / "model.safetensors").read_bytes()
    assert not work_dir(broken).exists()


def test_kd_gen_windows_of_other_settings_are_refused_on_resume(resume_setup, tmp_path: Path, interrupt_after,
                                                                capsys: pytest.CaptureFixture[str],
                                                                one_line_error) -> None:
    """A work folder whose kept windows do not match the run (a file left from elsewhere) is one line, not a
    silent mix of windows."""
    from ebft.checkpoint import work_dir
    from ebft.data.generate import write_cache
    from ebft.finetune.kd import WRITTEN_NAME

    broken = tmp_path / "broken"
    with interrupt_after(1):
        assert main(resume_setup.argv(broken, *GEN)) == 130
    path = work_dir(broken) / WRITTEN_NAME
    write_cache(path, torch.zeros(6, 32, dtype=torch.long), {"format": 1, "nsamples": 6, "seqlen": 32, "prefix": 8,
                                                             "seed": 0})
    capsys.readouterr()
    assert main(resume_setup.argv(broken, *GEN, "--resume")) == 2
    one_line_error(capsys.readouterr().err, f"--resume: {path} holds windows the dense model wrote for the "
                                            "distillation stage sampled with other settings (--kd-gen-prefix was 8, "
                                            "now 4); pass --overwrite to start over")


@pytest.mark.parametrize(("flags", "message"), [
    (("--kd-gen-windows", "-1"), "--kd-gen-windows must be a whole number >= 0 (0: none); got -1"),
    (("--kd-gen-windows", "4", "--kd-gen-prefix", "0"), "--kd-gen-prefix must be a positive whole number; got 0"),
    (("--kd-gen-windows", "4", "--kd-gen-prefix", "32"),
     "--kd-gen-prefix 32 leaves nothing to sample in windows of 32 tokens; give at most 31"),
])
def test_bad_kd_gen_settings_are_refused(flags: tuple[str, ...], message: str, resume_setup, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], one_line_error) -> None:
    assert main(resume_setup.argv(tmp_path / "x", "--finetune", "kd", *flags)) == 2
    one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "x").exists()


def test_the_extra_windows_are_sampled_in_batches_whose_kv_cache_fits_a_gib() -> None:
    from types import SimpleNamespace

    from ebft.finetune.kd import _gen_batch

    smollm2 = SimpleNamespace(num_attention_heads=9, hidden_size=576, num_key_value_heads=3, num_hidden_layers=30,
                              head_dim=64)
    llama7b = SimpleNamespace(num_attention_heads=32, hidden_size=4096, num_key_value_heads=None,
                              num_hidden_layers=32)  # head_dim from the width, keys and values for every head
    # a window's cache: 2 (keys, values) x layers x kv heads x head dim x tokens x 2 bytes
    assert _gen_batch(smollm2, 256) == 128  # 2**30 // (2*30*3*64*256*2) = 182, capped at 128
    assert _gen_batch(llama7b, 1024) == 2  # 2**30 // (2*32*32*128*1024*2) = 2
    assert _gen_batch(llama7b, 4096) == 1  # at least one


def test_activation_checkpointing_changes_no_weight(resume_setup, tmp_path: Path) -> None:
    """Recomputing each block's activations in the backward pass gives the same gradients, so the same bytes."""
    on, off = tmp_path / "on", tmp_path / "off"
    assert main(resume_setup.argv(on, *KD, "--kd-checkpointing")) == 0
    assert main(resume_setup.argv(off, *KD, "--no-kd-checkpointing")) == 0
    assert _report(on)["model_stage"]["final_loss"] < _report(on)["model_stage"]["init_loss"]
    assert (on / "model" / "model.safetensors").read_bytes() == (off / "model" / "model.safetensors").read_bytes()
