"""Grader for the exercise `policy_loss`: ppo.policy_loss, PPO's clipped surrogate (Schulman et
al. 2017, eq. 7), negated to be minimised.

    python -m pytest -q tests/course/test_policy_loss.py

    ρ_t = exp(log π(y_t) - log π_old(y_t))
    L   = mean over response tokens of max(-A_t ρ_t, -A_t clip(ρ_t, 1 - ε, 1 + ε))
    stats: clip_frac = share of response tokens with |ρ - 1| > ε,
           approx_kl = mean of (ρ - 1) - log ρ,   ratio_dev = max |ρ - 1|   (floats)
masked_mean is given (the grader swaps in its own, so this grader does not need the
`masked_stats` exercise).
"""

import math

import pytest
import torch

import ppo
from ppo import policy_loss


@pytest.fixture(autouse=True)
def _given_masked_mean(monkeypatch):
    monkeypatch.setattr(ppo, "masked_mean", lambda x, mask: (x * mask).sum() / mask.sum().clamp(min=1))


EPS = 0.2
RATIOS = [1.5, 1.1, 0.5, 0.7, 1.5, 0.9, 3.0]
ADV = [1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 5.0]
MASK = [1.0, 1, 1, 1, 1, 1, 0]  # the last token is padding: its huge ρ and A must not count


def test_loss_by_hand():
    logp = torch.tensor(RATIOS).log()[None]
    loss, stats = policy_loss(logp, torch.zeros(1, 7), torch.tensor(ADV)[None], torch.tensor(MASK)[None], EPS)
    per_token = [max(-a * r, -a * min(max(r, 1 - EPS), 1 + EPS)) for r, a in zip(RATIOS[:6], ADV[:6])]
    want = sum(per_token) / 6
    assert abs(loss.item() - want) < 1e-5, (
        f"loss = {loss.item():.5f}, want {want:.5f}: the mean over response tokens of max(-A ρ, -A clip(ρ, 1-ε, 1+ε)) "
        "(the pessimistic of the two, negated: PPO maximises the min of the un-negated terms)")
    assert abs(stats["clip_frac"] - 4 / 6) < 1e-6, f"clip_frac = {stats['clip_frac']}, want 4/6: 1.5, 0.5, 0.7, 1.5 are outside [0.8, 1.2]"
    want_kl = sum(r - 1 - math.log(r) for r in RATIOS[:6]) / 6
    assert abs(stats["approx_kl"] - want_kl) < 1e-5, \
        f"approx_kl = {stats['approx_kl']}, want the mean of (ρ - 1) - log ρ = {want_kl:.5f} (k3, not -log ρ)"
    assert abs(stats["ratio_dev"] - 0.5) < 1e-6, f"ratio_dev = {stats['ratio_dev']}, want max |ρ - 1| over response tokens = 0.5"
    assert all(isinstance(stats[k], float) for k in ("clip_frac", "approx_kl", "ratio_dev")), "stats are plain floats (.item())"


def test_gradient_vanishes_once_the_ratio_left_the_range_in_the_favoured_direction():
    """ρ = 1.5 with A > 0 or ρ = 0.5 with A < 0: the clipped term is the larger loss and has no
    gradient. Elsewhere (ρ = 0.7 with A > 0 too: outside the range, but on the side A does not
    favour) d loss / d log π = -A ρ / n."""
    logp = torch.tensor(RATIOS).log().requires_grad_(True)
    loss, _ = policy_loss(logp[None], torch.zeros(1, 7), torch.tensor(ADV)[None], torch.tensor(MASK)[None], EPS)
    loss.backward()
    zero = [True, False, True, False, False, False, True]
    for i, (r, a, z) in enumerate(zip(RATIOS, ADV, zero)):
        g = logp.grad[i].item()
        if z:
            assert g == 0, f"token {i} (ρ={r}, A={a}{', masked' if i == 6 else ''}): gradient must be 0, got {g}"
        else:
            assert abs(g - (-a * r / 6)) < 1e-6, f"token {i} (ρ={r}, A={a}): gradient must be -A ρ / 6 = {-a * r / 6}, got {g}"


def test_at_ratio_one_the_loss_is_minus_the_mean_advantage():
    loss, stats = policy_loss(torch.zeros(1, 7), torch.zeros(1, 7), torch.tensor(ADV)[None], torch.tensor(MASK)[None], EPS)
    assert abs(loss.item() + sum(ADV[:6]) / 6) < 1e-6, "at ρ = 1 the loss is -mean(A) over response tokens"
    assert stats["approx_kl"] == 0 and stats["clip_frac"] == 0 and stats["ratio_dev"] == 0, \
        "at ρ = 1 nothing is clipped and the KL estimate is 0"
