"""``--calib generated``: windows sampled from a tiny dense model, seeded, equal to a plain loop without the KV cache,
cached in the run folder so that a stopped run resumes on the very same windows."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ebft.runner
import ebft.sweep.runner
from ebft.checkpoint import fingerprint, work_dir
from ebft.cli import main
from ebft.data import GeneratedOptions, generate_windows
from ebft.data.generate import CACHE_NAME, next_tokens, sampling_draws
from ebft.models import load_model

GENERATED = ("--calib", "generated", "--gen-batch-size", "4")  # 6 windows: batches of 4 and 2


def _weights(out: Path) -> bytes:
    return (out / "model" / "model.safetensors").read_bytes()


def test_the_seed_decides_the_windows(tiny_factory, tokenizer) -> None:
    model = tiny_factory("llama")

    def sample(seed: int, batch_size: int = 4) -> torch.Tensor:
        return generate_windows(model, tokenizer, 6, 24, seed, GeneratedOptions(batch_size=batch_size), "cpu")

    first = sample(0)
    assert first.shape == (6, 24) and first.dtype == torch.long
    assert torch.equal(first[:, 0], torch.full((6,), tokenizer.bos_token_id))  # every window starts at BOS
    assert int(first.max()) < len(tokenizer)
    assert torch.equal(sample(0), first)
    assert torch.equal(sample(0, batch_size=1), first)  # the draws belong to the windows, not to the batches
    other = sample(1)
    assert not torch.equal(other, first) and all(not torch.equal(a, b) for a, b in zip(other, first))


def test_without_bos_the_first_token_is_drawn_under_the_seed(tiny_factory, tokenizer) -> None:
    model, plain = tiny_factory("llama"), copy.deepcopy(tokenizer)
    plain.bos_token = None
    windows = [generate_windows(model, plain, 8, 4, seed, GeneratedOptions(), "cpu") for seed in (0, 0, 1)]
    assert torch.equal(windows[0], windows[1]) and not torch.equal(windows[0][:, 0], windows[2][:, 0])
    assert not set(windows[0][:, 0].tolist()) & set(plain.all_special_ids)
    assert len(set(windows[0][:, 0].tolist())) > 1


@pytest.mark.parametrize(("family", "temperature", "top_p"), [("llama", 1.0, 1.0), ("llama", 0.7, 0.9),
                                                              ("gemma3_text", 1.3, 0.95)])
def test_the_sampler_is_a_plain_loop_without_the_kv_cache(family: str, temperature: float, top_p: float,
                                                          tiny_factory, tokenizer) -> None:
    """The reference recomputes the whole window at every step (no cache); the same draws give the same tokens, and
    its logits are the cached ones (Gemma 3: sliding-window layers, a window of 6 over 20 tokens)."""
    model = tiny_factory(family)
    nsamples, seqlen = 5, 20
    options = GeneratedOptions(temperature=temperature, top_p=top_p, batch_size=3)
    sampled = generate_windows(model, tokenizer, nsamples, seqlen, 7, options, "cpu")
    draws = sampling_draws(nsamples, seqlen, 7)
    reference = torch.full((nsamples, 1), tokenizer.bos_token_id)
    with torch.no_grad():
        cached = model(input_ids=sampled[:, :1], use_cache=True)
        cache_name = "cache" if "cache" in cached else "past_key_values"  # its name in recent transformers
        for t in range(1, seqlen):
            logits = model(input_ids=reference, use_cache=False).logits[:, -1]
            if t > 1:
                cached = model(input_ids=sampled[:, t - 1:t], use_cache=True, **{cache_name: cached[cache_name]})
            torch.testing.assert_close(cached.logits[:, -1], logits, rtol=1e-4, atol=1e-5)
            token = next_tokens(logits, draws[:, t], temperature, top_p)
            reference = torch.cat([reference, token[:, None]], dim=1)
    assert torch.equal(sampled, reference)


def test_a_prefix_is_kept_and_continued_as_a_plain_loop_would(tiny_factory, tokenizer) -> None:
    """``continue_windows`` (the distillation stage's extra windows): a [n, 5] prefix is read in one forward, then
    continued; the reference recomputes the whole window at every step from the same draws."""
    from ebft.data.generate import continue_windows

    model = tiny_factory("llama")
    nsamples, seqlen, given = 4, 16, 5
    prefix = torch.randint(3, len(tokenizer), (nsamples, given), generator=torch.Generator().manual_seed(3))
    draws = sampling_draws(nsamples, seqlen, 11)
    options = GeneratedOptions(temperature=0.8, top_p=0.9, batch_size=3)
    sampled = continue_windows(model, prefix, draws, len(tokenizer), options, "cpu", "test")
    reference = prefix.clone()
    with torch.no_grad():
        for t in range(given, seqlen):
            logits = model(input_ids=reference, use_cache=False).logits[:, -1]
            reference = torch.cat([reference, next_tokens(logits, draws[:, t], 0.8, 0.9)[:, None]], dim=1)
    assert torch.equal(sampled[:, :given], prefix) and torch.equal(sampled, reference)


def test_prune_samples_caches_and_resumes_bitwise(resume_setup, tmp_path: Path, interrupt_after, assert_unfinished,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole run, and one stopped after block 1: the windows wait in the work folder, with the run's fingerprint;
    --resume reads them back (sampling again would fail here) and gives the same model, byte for byte."""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(resume_setup.argv(whole, *GENERATED)) == 0
    report = json.loads((whole / "report.json").read_text())
    assert report["config"]["calib"]["source"] == "generated" and report["timings"]["calib_generation"] > 0
    assert report["config"]["calib"]["options"] == {"temperature": 1.0, "top_p": 1.0, "batch_size": 4}
    assert "sampled from the dense model at temperature 1, top-p 1" in (whole / "model" / "README.md").read_text()
    with interrupt_after(1):
        assert main(resume_setup.argv(broken, *GENERATED)) == 130
    assert_unfinished(broken, 2)
    cache = work_dir(broken) / CACHE_NAME
    ids = load_file(str(cache))["ids"]
    dense = load_model(str(resume_setup.model_dir)).model
    assert torch.equal(ids, generate_windows(dense, load_model(str(resume_setup.model_dir)).tokenizer, 6, 32, 0,
                                             GeneratedOptions(), "cpu"))
    assert json.loads((work_dir(broken) / "run.json").read_text())["fingerprint"] == fingerprint(ids)
    monkeypatch.setattr(ebft.runner, "generate_windows", lambda *a, **k: pytest.fail("resume samples again"))
    assert main(resume_setup.argv(broken, *GENERATED, "--resume", "--gen-batch-size", "2")) == 0  # not compared
    assert _weights(broken) == _weights(whole)
    assert not work_dir(broken).exists()  # the cache went with the work folder


@pytest.fixture(scope="module")
def stopped_run(resume_setup, tmp_path_factory: pytest.TempPathFactory, interrupt_after) -> Path:
    """``resume_setup`` with ``--calib generated``, stopped after block 0: its work folder, to copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with interrupt_after(0):
        assert main(resume_setup.argv(out, *GENERATED)) == 130
    return out


def _copy_stopped(stopped: Path, out: Path) -> Path:
    shutil.copytree(work_dir(stopped), work_dir(out))
    return work_dir(out) / CACHE_NAME


def test_resume_refuses_windows_of_other_settings(resume_setup, stopped_run: Path, tmp_path: Path,
                                                  one_line_error, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    cache = _copy_stopped(stopped_run, out)
    capsys.readouterr()
    assert main(resume_setup.argv(out, *GENERATED, "--resume", "--gen-temperature", "0.5")) == 2  # the config first
    one_line_error(capsys.readouterr().err, "(--gen-temperature was 1.0, now 0.5); repeat its flags")
    stored = load_file(str(cache))
    with safe_open(str(cache), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
    save_file(stored, str(cache), metadata={"settings": json.dumps({**settings, "top_p": 0.5})})
    assert main(resume_setup.argv(out, *GENERATED, "--resume")) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line == (f"error: --resume: {cache} holds calibration windows sampled with other settings (--gen-top-p "
                    "was 0.5, now 1.0); pass --overwrite to start over")
    cache.write_bytes(b"not a safetensors file")
    assert main(resume_setup.argv(out, *GENERATED, "--resume")) == 1
    one_line_error(capsys.readouterr().err, f"error: --resume: the sampled calibration windows in {cache} are not "
                                            "readable (")
    save_file({"ids": stored["ids"].flip(0).contiguous()}, str(cache), metadata={"settings": json.dumps(settings)})
    assert main(resume_setup.argv(out, *GENERATED, "--resume")) == 1  # other windows: the fingerprint differs
    one_line_error(capsys.readouterr().err, "error: --resume: the calibration windows differ")
    assert main(resume_setup.argv(out, *GENERATED, "--overwrite")) == 0


def test_resume_without_the_cache_samples_again(resume_setup, stopped_run: Path, tmp_path: Path) -> None:
    """Stopped before the windows were written (they are, right after run.json): sampled again, the same on the CPU."""
    out = tmp_path / "run"
    _copy_stopped(stopped_run, out).unlink()
    assert main(resume_setup.argv(out, *GENERATED, "--resume")) == 0
    assert main(resume_setup.argv(tmp_path / "whole", *GENERATED)) == 0
    assert _weights(out) == _weights(tmp_path / "whole")


def test_repair_samples_from_the_dense_model(resume_setup, tmp_path: Path) -> None:
    """ebft repair --calib generated samples from DENSE: the result of ebft prune with the same masks."""
    sparse, reference, repaired = tmp_path / "sparse", tmp_path / "prune", tmp_path / "repair"
    assert main(resume_setup.argv(sparse, "--pruner", "magnitude", "--finetune", "none")) == 0
    assert main(resume_setup.argv(reference, "--pruner", "magnitude", *GENERATED)) == 0
    flags = resume_setup.argv(repaired, *GENERATED)[2:]  # no "prune MODEL"
    assert main(["repair", str(sparse / "model"), "--dense", str(resume_setup.model_dir), *flags]) == 0
    assert _weights(repaired) == _weights(reference)
    assert json.loads((repaired / "report.json").read_text())["config"]["prune"]["pruner"] == "given"


def test_a_sweep_samples_once_per_setting(tiny_model_dir: Path, text_file: Path, tmp_path: Path) -> None:
    """Two cells (none, ebft) on generated windows: sampled once from the resident dense model, a temperature axis."""
    from ebft.sweep import load_sweep, run_sweep

    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
grid:
  gen_temperature: [1.0, 0.8]
  finetune: [none, ebft]
fixed:
  model: {tiny_model_dir}
  calib: generated
  nsamples: 4
  seqlen: 16
  epochs: 1
  lr: 1e-3
  batch_size: 2
  device: cpu
  eval: [text:{text_file}]
  eval_seqlen: 32
  max_windows: 2
out: {tmp_path / "out"}
""", encoding="utf-8")
    calls = []
    original = ebft.sweep.runner.generate_windows

    def counted(*args, **kwargs):
        calls.append(args[5].temperature)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ebft.sweep.runner, "generate_windows", counted)
        result = run_sweep(load_sweep(config))
    assert len(result.computed) == 4 and sorted(calls) == [0.8, 1.0]
