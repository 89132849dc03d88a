"""``--calib generated``'s sampler on hand-computed tensors: temperature, top-p, the inverse-CDF draw, the first
token; and its settings' refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ebft.config import CalibConfig, EvalConfig
from ebft.data.generate import (
    GeneratedOptions,
    inverse_cdf,
    next_tokens,
    sampling_draws,
    start_tokens,
    temperature_probs,
    top_p_filter,
)
from ebft.errors import UsageError
from ebft.settings import build_run_config


def _softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(x) for x in logits]
    return [e / sum(exps) for e in exps]


def test_temperature_is_the_softmax_of_the_scaled_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    # T = 2: exp(1), exp(0.5), exp(0) = 2.71828, 1.64872, 1 over 5.36700
    assert temperature_probs(logits, 2.0)[0].tolist() == pytest.approx([0.506480, 0.307196, 0.186324], abs=1e-6)
    # T = 0.5: exp(4), exp(2), exp(0) = 54.5982, 7.38906, 1 over 62.9872
    assert temperature_probs(logits, 0.5)[0].tolist() == pytest.approx([0.866813, 0.117310, 0.015876], abs=1e-6)
    assert temperature_probs(logits, 1.0)[0].tolist() == pytest.approx(_softmax([2.0, 1.0, 0.0]), abs=1e-7)


def test_top_p_keeps_the_nucleus_renormalised() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    assert top_p_filter(probs, 0.8)[0].tolist() == pytest.approx([0.625, 0.375, 0.0, 0.0])  # 0.5 + 0.3 reach 0.8
    assert top_p_filter(probs, 0.81)[0].tolist() == pytest.approx([0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0])
    assert top_p_filter(probs, 0.5)[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    assert top_p_filter(probs, 0.01)[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])  # the likeliest always stays
    assert top_p_filter(probs, 1.0) is probs
    shuffled = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.05, 0.15, 0.3, 0.5]])  # the nucleus is by rank, not by id
    assert top_p_filter(shuffled, 0.8).tolist() == [pytest.approx([0.0, 0.625, 0.0, 0.375]),
                                                    pytest.approx([0.0, 0.0, 0.375, 0.625])]


def test_inverse_cdf_draws_by_the_cumulative_distribution() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(7, 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 0.999999])
    assert inverse_cdf(probs, u).tolist() == [0, 0, 1, 1, 2, 3, 3]  # cdf 0.5, 0.8, 0.95, 1
    holes = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(3, 4)  # ids of probability 0 are never drawn
    assert inverse_cdf(holes, torch.tensor([0.0, 0.5, 1 - 2**-53])).tolist() == [1, 3, 3]
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # evenly spread draws give the probabilities
    counts = torch.bincount(inverse_cdf(torch.tensor([[0.5, 0.3, 0.15, 0.05]]).expand(1000, 4), grid), minlength=4)
    assert counts.tolist() == [500, 300, 150, 50]


def test_next_tokens_combine_temperature_top_p_and_the_draw() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(3, 4)
    # top-p 0.79 leaves 0.625 / 0.375: u below 0.625 draws id 0, above it id 1, never ids 2 or 3
    assert next_tokens(logits, torch.tensor([0.6, 0.63, 0.99]), 1.0, 0.79).tolist() == [0, 1, 1]
    # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 over 0.365
    assert next_tokens(logits, torch.tensor([0.68, 0.69, 0.99]), 0.5, 1.0).tolist() == [0, 1, 2]


def test_draws_are_seeded_and_nested() -> None:
    assert torch.equal(sampling_draws(4, 8, 0), sampling_draws(4, 8, 0))
    assert not torch.equal(sampling_draws(4, 8, 0), sampling_draws(4, 8, 1))
    assert torch.equal(sampling_draws(2, 8, 0), sampling_draws(4, 8, 0)[:2])  # fewer windows: the first ones
    draws = sampling_draws(64, 64, 3)
    assert draws.dtype == torch.float64 and 0.0 <= float(draws.min()) and float(draws.max()) < 1.0


def test_first_token_is_bos_or_a_uniform_ordinary_token() -> None:
    u = torch.tensor([0.0, 0.26, 0.5, 0.999])
    with_bos = SimpleNamespace(bos_token_id=5, all_special_ids=[0, 5])
    assert start_tokens(with_bos, 6, u).tolist() == [5, 5, 5, 5]
    without = SimpleNamespace(bos_token_id=None, all_special_ids=[0, 3])  # ordinary ids: 1, 2, 4, 5
    assert start_tokens(without, 6, u).tolist() == [1, 2, 4, 5]


@pytest.mark.parametrize(("options", "message"), [
    ({"temperature": 0.0}, "--gen-temperature must be a positive number (1 samples the model's own distribution); "
                           "got 0.0"),
    ({"temperature": -1.0}, "--gen-temperature must be a positive number"),
    ({"temperature": float("nan")}, "--gen-temperature must be a positive number"),
    ({"temperature": float("inf")}, "--gen-temperature must be a positive number"),
    ({"top_p": 0.0}, "--gen-top-p must be in (0, 1] (1 keeps every token); got 0.0"),
    ({"top_p": 1.01}, "--gen-top-p must be in (0, 1]"),
    ({"top_p": float("nan")}, "--gen-top-p must be in (0, 1]"),
    ({"batch_size": 0}, "--gen-batch-size must be a positive whole number; got 0"),
])
def test_bad_generation_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(UsageError) as info:
        CalibConfig(source="generated", options=options)
    assert str(info.value).startswith(message)


def test_generated_is_calibration_only() -> None:
    assert GeneratedOptions().top_p == 1.0 and GeneratedOptions().temperature == 1.0
    assert CalibConfig(source="generated", options={"top_p": 0.95}).options.top_p == 0.95
    assert CalibConfig().options is None  # a text source has no options
    with pytest.raises(UsageError, match=r"^--eval generated: its windows are sampled from the model being pruned"):
        EvalConfig(sources=["generated"])
    with pytest.raises(UsageError, match=r"^--calib-windows document cuts windows out of documents"):
        CalibConfig(source="generated", windows="document")
    with pytest.raises(UsageError, match=r"^--gen-top-p applies only to --calib generated, not c4; drop it$"):
        build_run_config({"gen_top_p": 0.9}, model="m")
    cfg = build_run_config({"calib": "generated", "gen_temperature": 0.7, "gen_batch_size": 4}, model="m")
    assert cfg.to_dict()["calib"]["options"] == {"temperature": 0.7, "top_p": 1.0, "batch_size": 4}
