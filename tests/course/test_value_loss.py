"""Grader for the exercise `value_loss`: ppo.value_loss, the clipped value loss of OpenAI
baselines' PPO2.

    python -m pytest -q tests/course/test_value_loss.py

    V_clip = V_old + clip(V - V_old, -c, c)
    L      = ½ · mean over response tokens of max((V - R)², (V_clip - R)²)
Returns (L, the share of response tokens with |V - V_old| > c, a float). masked_mean is given
(the grader swaps in its own, so this grader does not need the `masked_stats` exercise).
"""

import pytest
import torch

import ppo
from ppo import value_loss


@pytest.fixture(autouse=True)
def _given_masked_mean(monkeypatch):
    monkeypatch.setattr(ppo, "masked_mean", lambda x, mask: (x * mask).sum() / mask.sum().clamp(min=1))


def test_value_loss_by_hand():
    """token 0: V = 1 moved 1 > 0.2 from V_old = 0, V_clip = 0.2: max((1-2)², (0.2-2)²) = 3.24
    token 1: V = V_old = 0: (0 - 1)² = 1
    token 2: V = 0.5, V_clip = 0.2: max((0.5+1)², (0.2+1)²) = 2.25
    token 3: padding (junk)"""
    values = torch.tensor([[1.0, 0.0, 0.5, 50.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0, -1.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, frac = value_loss(values, old, ret, mask, clip=0.2)
    want = 0.5 * (3.24 + 1 + 2.25) / 3
    assert abs(loss.item() - want) < 1e-5, (
        f"loss = {loss.item():.5f}, want {want:.5f}: ½ mean over response tokens of the LARGER of the squared errors "
        "of V and of V_clip = V_old + clip(V - V_old, -c, c)")
    assert isinstance(frac, float) and abs(frac - 2 / 3) < 1e-6, f"clip fraction = {frac}, want 2/3 (tokens 0 and 2 moved more than 0.2)"
    loss.backward()
    assert values.grad[0, 0] == 0, "token 0: the clipped error is the larger, so V gets no gradient there"
    assert abs(values.grad[0, 2].item() - (0.5 - (-1.0)) / 3) < 1e-6, \
        "token 2: the unclipped error is the larger: gradient (V - R) / n (the ½ cancels the square's 2)"
    assert values.grad[0, 3] == 0, "padding gets no gradient"


def test_no_move_no_clip():
    values = torch.tensor([[0.3, -0.2]])
    loss, frac = value_loss(values, values.clone(), torch.tensor([[1.3, 0.8]]), torch.ones(1, 2), clip=0.2)
    assert abs(loss.item() - 0.5) < 1e-6 and frac == 0.0, "V = V_old: ½ mean (V - R)² = ½ · (1 + 1) / 2 = 0.5, nothing clipped"
