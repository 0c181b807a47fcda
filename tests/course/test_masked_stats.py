"""Grader for the exercise `masked_stats`: ppo.masked_mean and ppo.masked_whiten, statistics over
response tokens only (padding after EOS must not count).

    python -m pytest -q tests/course/test_masked_stats.py

    masked_mean(x, m)   = Σ x·m / max(Σ m, 1)                       (0 for an empty mask)
    masked_whiten(x, m) = (x - μ) / sqrt(σ² + eps) · m,   μ = masked_mean(x, m),
                          σ² = masked_mean((x - μ)², m)  (the biased variance)
"""

import math

import torch

from ppo import masked_mean, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # the masked-in values: 1, 2, 3, 4


def test_masked_mean_counts_only_the_masked_in_entries():
    got = masked_mean(X, M)
    assert got.dim() == 0, "masked_mean returns a scalar: the mean over every masked-in entry of the batch"
    assert abs(got.item() - 2.5) < 1e-6, f"masked_mean = {got.item()}, want (1 + 2 + 3 + 4) / 4 = 2.5"
    empty = masked_mean(X, torch.zeros_like(M))
    assert empty.item() == 0.0, f"an empty mask must give 0, not {empty.item()} (clamp the count to at least 1)"


def test_masked_whiten_by_hand():
    got = masked_whiten(X, M)
    std = math.sqrt(1.25 + 1e-8)  # values 1, 2, 3, 4: mean 2.5, biased variance 1.25
    want = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std, 0.0], [1.5 / std, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, want, msg=lambda m: (
        "(x - mean) / sqrt(var + eps) over the masked-in entries, with the BIASED variance (divide by n, not "
        "n - 1), and 0 where the mask is 0\n" + m))


def test_masked_out_values_change_nothing():
    junk = X.masked_fill(M == 0, 1e6)
    torch.testing.assert_close(masked_whiten(junk, M), masked_whiten(X, M),
                               msg=lambda m: "values under mask 0 must not enter the mean or the variance\n" + m)
    torch.testing.assert_close(masked_mean(junk, M), masked_mean(X, M))
