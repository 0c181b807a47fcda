"""Grader for the exercise `entropy`: ppo.token_entropy, the policy's entropy at every position
(PPO logs it: a collapsing entropy means the policy stopped exploring).

    python -m pytest -q tests/course/test_entropy.py

    H_t = -Σ_v p_v log p_v,   p = softmax(logits_t / T),   in fp32;   (B, N, V) -> (B, N)
"""

import math

import torch

from ppo import token_entropy

LOGITS = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -3.0]],
                       [[0.0, 0.0, 0.0, 0.0], [-1.0, 3.0, 1.0, 0.0]]])  # (2, 2, 4)


def entropy_by_hand(row, temperature):
    z = [v / temperature for v in row]
    total = sum(math.exp(v) for v in z)
    return -sum(math.exp(v) / total * (v - math.log(total)) for v in z)


def test_entropy_by_hand():
    for temperature in (1.0, 0.5):
        got = token_entropy(LOGITS, temperature)
        assert got.shape == (2, 2), f"(B, N, V) -> (B, N); got {tuple(got.shape)}"
        want = torch.tensor([[entropy_by_hand(LOGITS[b, t].tolist(), temperature) for t in range(2)] for b in range(2)])
        torch.testing.assert_close(got, want, msg=lambda m: (
            f"temperature {temperature}: H = -Σ p log p with p = softmax(logits / T) (divide before the softmax)\n" + m))
    assert abs(token_entropy(LOGITS)[1, 0].item() - math.log(4)) < 1e-6, "a uniform distribution over 4 tokens has entropy ln 4"


def test_a_certain_token_has_entropy_zero_not_nan():
    sure = torch.tensor([[[200.0, 0.0, 0.0, 0.0]]])
    got = token_entropy(sure).item()
    assert math.isfinite(got) and abs(got) < 1e-6, (
        f"entropy = {got}: where p underflows to 0, p log p must be 0, not 0 · (-inf) = nan; take log p from "
        "log_softmax rather than log(softmax)")


def test_entropy_is_fp32():
    assert token_entropy(LOGITS.bfloat16()).dtype == torch.float32, "compute the entropy in fp32 (cast the logits)"
