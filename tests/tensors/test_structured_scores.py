"""Structured pruning's importance scores and selections, checked against hand-computed answers."""

from __future__ import annotations

import torch

from ebft.structured import ChannelStats, channel_scores, head_scores, select_channels, select_heads


def test_channel_stats_is_the_sample_variance() -> None:
    x = torch.tensor([[[1.0, 10.0, -2.0], [3.0, 10.0, 2.0]], [[5.0, 10.0, 0.0], [7.0, 10.0, 4.0]]])  # [2, 2, 3]
    stats = ChannelStats(3)
    stats.add(x[:1])
    stats.add(x[1:])
    assert stats.count == 4
    # channel 0: 1,3,5,7 -> mean 4, squared deviations 9+1+1+9 = 20, /3; channel 1 constant; channel 2: -2,2,0,4
    torch.testing.assert_close(stats.variance(), torch.tensor([20 / 3, 0.0, 20 / 3], dtype=torch.float64))


def test_fluctuation_and_magnitude_scores_by_hand() -> None:
    weight = torch.tensor([[1.0, 0.0, 2.0, -1.0], [3.0, 1.0, 0.0, 1.0]])  # [out 2, in 4]
    # squared column norms: 1+9=10, 0+1=1, 4+0=4, 1+1=2
    assert channel_scores(weight, None).tolist() == [10.0, 1.0, 4.0, 2.0]
    variance = torch.tensor([0.5, 8.0, 0.0, 3.0])
    assert channel_scores(weight, variance).tolist() == [5.0, 8.0, 0.0, 6.0]
    # two heads of head_dim 2: (5 + 8), (0 + 6)
    assert head_scores(channel_scores(weight, variance), 2).tolist() == [13.0, 6.0]
    assert select_channels(channel_scores(weight, variance), 2) == [1, 3]


def test_select_heads_keeps_whole_groups_then_the_best_heads_in_each() -> None:
    scores = torch.tensor([1.0, 9.0, 2.0, 0.5, 0.1, 0.2, 3.0, 3.0, 4.0])  # 9 heads, 3 groups of 3
    # group sums: 12, 0.8, 10; in the last group heads 6 and 7 tie, and the lower index stays
    assert select_heads(scores, 3, 3, 2) == ([1, 2, 3, 5, 6, 8], [0, 1, 2])
    assert select_heads(scores, 3, 2, 3) == ([0, 1, 2, 6, 7, 8], [0, 2])
    assert select_heads(scores, 3, 2, 1) == ([1, 8], [0, 2])
    assert select_heads(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1, 1, 2) == ([0, 1], [0])  # ties: the lower index
