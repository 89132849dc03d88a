"""Pruner registry, magnitude and Wanda scoring, checked against hand-computed answers."""

from __future__ import annotations

import pytest
import torch

from ebft.errors import EbftError, UsageError
from ebft.pruners import (
    PRUNERS,
    MagnitudePruner,
    Pruner,
    WandaPruner,
    magnitude_scores,
    make_pruner,
    register_pruner,
    wanda_scores,
)
from ebft.sparsity import check_nm, num_pruned

W = torch.tensor([[4.0, 1.0, -3.0, 2.0], [1.0, -2.0, 0.5, 3.0]])
# two tokens; mean of squares per feature = [0.01, 16, 1, 1], so ||X_j|| (RMS) = [0.1, 4, 1, 1]
X = torch.tensor([[0.1, 4.0, 1.0, 1.0], [0.1, -4.0, -1.0, 1.0]])


def test_registry() -> None:
    assert PRUNERS["magnitude"] is MagnitudePruner
    assert PRUNERS["wanda"] is WandaPruner
    assert MagnitudePruner.name == "magnitude" and not MagnitudePruner.needs_activations
    assert WandaPruner.name == "wanda" and WandaPruner.needs_activations
    assert isinstance(make_pruner("wanda", 0.5), WandaPruner)
    with pytest.raises(UsageError, match="unknown"):
        make_pruner("nope", 0.5)


def test_register_new_pruner() -> None:
    @register_pruner("_test_random")
    class RandomPruner(Pruner):
        def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
            return torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)

    try:
        assert PRUNERS["_test_random"] is RandomPruner and RandomPruner.name == "_test_random"
        mask = make_pruner("_test_random", 0.5).mask("x", torch.ones(2, 4))
        assert mask.tolist() == [[False] * 4, [True] * 4]  # base Pruner is layer-wise
        with pytest.raises(ValueError, match="already registered"):
            register_pruner("_test_random")(type("Other", (Pruner,), {}))
        with pytest.raises(TypeError):
            register_pruner("_test_bad")(int)  # type: ignore[arg-type]
    finally:
        PRUNERS.pop("_test_random", None)


# --- magnitude -----------------------------------------------------------------------------------


def test_magnitude_scores() -> None:
    assert torch.equal(magnitude_scores(W), W.abs())
    assert magnitude_scores(W.to(torch.bfloat16)).dtype == torch.float32


def _smallest_pruned(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The layer-wise mask written out: the floor(numel * sparsity) lowest scores go, lower index first on ties."""
    flat = scores.flatten()
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[: num_pruned(flat.numel(), sparsity)]] = False
    return keep.reshape(scores.shape)


def test_magnitude_is_layer_wise() -> None:
    weight = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, -2.0, 3.0, 5.0]])
    mask = MagnitudePruner(0.5).mask("x", weight)
    assert mask.tolist() == [[True] * 4, [False] * 4]  # the whole small row goes
    # magnitude needs no activations: feeding it some and resetting it change nothing
    magnitude = MagnitudePruner(0.5)
    magnitude.add_batch("x", X)
    assert torch.equal(magnitude.mask("x", weight), mask)
    assert torch.equal(magnitude.mask("x", W), _smallest_pruned(W.abs(), 0.5))  # |W|'s 4 lowest, not Wanda's
    magnitude.reset()
    assert torch.equal(magnitude.mask("x", weight), mask)
    # on random weights: exactly floor(numel * s) pruned over the whole layer, and they are the smallest |w|
    dense = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    for sparsity in (0.1, 0.35, 0.5, 0.8):
        got = MagnitudePruner(sparsity).mask("x", dense)
        assert int((~got).sum()) == num_pruned(60, sparsity)
        assert float(dense.abs()[~got].max()) < float(dense.abs()[got].min())
        assert torch.equal(got, _smallest_pruned(dense.abs(), sparsity))
    assert (~MagnitudePruner(0.5).mask("x", dense)).sum(dim=1).tolist() != [5] * 6  # not row by row


def test_magnitude_nm() -> None:
    weight = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, -2.0, 3.0, 5.0]])
    mask = MagnitudePruner(0.5, nm=(2, 4)).mask("x", weight)
    assert mask.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_nm_error_names_layer() -> None:
    with pytest.raises(UsageError, match="layer 'mlp.up' has 6 inputs"):
        MagnitudePruner(0.5, nm=(2, 4)).mask("mlp.up", torch.ones(2, 6))


# --- wanda ---------------------------------------------------------------------------------------


def test_wanda_scores_hand_computed() -> None:
    sq_norm = torch.tensor([0.01, 16.0, 1.0, 1.0])
    expected = torch.tensor([[0.4, 4.0, 3.0, 2.0], [0.1, 8.0, 0.5, 3.0]])
    assert torch.allclose(wanda_scores(W, sq_norm), expected)


def test_wanda_flips_magnitude_ranking() -> None:
    wanda = WandaPruner(0.5)
    wanda.add_batch("q", X)
    assert torch.allclose(wanda.sq_norm("q"), torch.tensor([0.01, 16.0, 1.0, 1.0], dtype=torch.float64))
    mask = wanda.mask("q", W)
    # row 0 by |W| alone would keep cols 0, 2; the tiny activation on col 0 and the big one on col 1 flip it
    assert mask.tolist() == [[False, True, True, False], [False, True, False, True]]
    assert MagnitudePruner(0.5).mask("q", W)[0].tolist() == [True, False, True, False]


def test_wanda_is_row_wise() -> None:
    weight = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, -2.0, 3.0, 5.0]])
    wanda = WandaPruner(0.5)
    wanda.add_batch("x", torch.ones(3, 4))
    assert (~wanda.mask("x", weight)).sum(dim=1).tolist() == [2, 2]


def test_wanda_nm() -> None:
    wanda = WandaPruner(0.5, nm=(1, 2))
    wanda.add_batch("q", X)
    mask = wanda.mask("q", W)  # scores [[0.4, 4 | 3, 2], [0.1, 8 | 0.5, 3]]
    assert mask.tolist() == [[False, True, True, False], [False, True, False, True]]
    assert check_nm(mask, 1, 2)


def test_wanda_two_batches_equal_concatenation() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    weight = torch.randn(6, 8, generator=g)
    split, joined = WandaPruner(0.5), WandaPruner(0.5)
    split.add_batch("x", a)
    split.add_batch("x", b)
    joined.add_batch("x", torch.cat([a, b]))
    assert torch.allclose(split.sq_norm("x"), joined.sq_norm("x"), rtol=1e-6)
    expected = (torch.cat([a, b]).reshape(-1, 8).double() ** 2).mean(dim=0)
    assert torch.allclose(joined.sq_norm("x"), expected, rtol=1e-6)
    assert torch.equal(split.mask("x", weight), joined.mask("x", weight))


def test_wanda_missing_stats_raise() -> None:
    wanda = WandaPruner(0.5)
    with pytest.raises(EbftError, match="no calibration inputs"):
        wanda.score("q", W)
    wanda.add_batch("q", X)
    assert torch.allclose(wanda.score("q", W), torch.tensor([[0.4, 4.0, 3.0, 2.0], [0.1, 8.0, 0.5, 3.0]]))
    wanda.reset()
    with pytest.raises(EbftError, match="no calibration inputs"):
        wanda.mask("q", W)


def test_wanda_width_mismatch_raises() -> None:
    wanda = WandaPruner(0.5)
    wanda.add_batch("q", X)
    with pytest.raises(EbftError):
        wanda.add_batch("q", torch.ones(2, 5))
    with pytest.raises(EbftError):
        wanda.score("q", torch.ones(2, 5))


def test_wanda_bf16() -> None:
    wanda = WandaPruner(0.5)
    wanda.add_batch("q", X.to(torch.bfloat16).reshape(1, 2, 4))
    scores = wanda.score("q", W.to(torch.bfloat16))
    assert scores.dtype == torch.float32
    assert wanda.mask("q", W.to(torch.bfloat16)).tolist() == [[False, True, True, False], [False, True, False, True]]


def test_wanda_from_forward_hook() -> None:
    layer = torch.nn.Linear(8, 4, bias=False)
    wanda = WandaPruner(0.25)
    handle = layer.register_forward_hook(lambda mod, args, out: wanda.add_batch("lin", args[0]))
    x = torch.randn(2, 3, 8)
    layer(x)
    handle.remove()
    expected = wanda_scores(layer.weight, (x.reshape(-1, 8) ** 2).mean(dim=0))
    assert torch.allclose(wanda.score("lin", layer.weight), expected)
    assert not wanda.score("lin", layer.weight).requires_grad
    assert (~wanda.mask("lin", layer.weight)).sum(dim=1).tolist() == [2, 2, 2, 2]
