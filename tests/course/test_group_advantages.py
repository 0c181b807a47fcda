"""Grader for the exercise `group_advantages`: ppo.rloo_advantages and ppo.grpo_advantages, the
critic-free baselines (RLOO: Ahmadian et al. 2024; GRPO: Shao et al. 2024; Dr. GRPO: Liu et al. 2025).

    python -m pytest -q tests/course/test_group_advantages.py

scores (B,) hold k = group_size responses per prompt, prompt p owning rows p·k .. p·k+k-1.
    RLOO:  A_i = R_i - 1/(k-1) Σ_{j≠i} R_j
    GRPO:  A_i = (r_i - mean(r)) / (std(r) + eps)   std with Bessel's correction (n - 1)
           normalize_std=False (Dr. GRPO): A_i = r_i - mean(r)
"""

import math

import torch

from ppo import grpo_advantages, rloo_advantages

SCORES = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, 1.0])  # two groups of 4


def test_rloo_by_hand():
    got = rloo_advantages(SCORES, 4)
    s = SCORES.tolist()
    want = [s[i] - sum(s[j] for j in range(g, g + 4) if j != i) / 3 for g in (0, 4) for i in range(g, g + 4)]
    torch.testing.assert_close(got, torch.tensor(want), msg=lambda m: (
        "A_i = R_i - mean of the OTHER k-1 rewards of its own group (e.g. 1 - (2+3+6)/3 = -8/3)\n" + m))
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 4.0]), 2), torch.tensor([-3.0, 3.0]),
                               msg=lambda m: "k = 2: each response's baseline is the other one's reward\n" + m)


def test_grpo_by_hand():
    got = grpo_advantages(SCORES, 4)
    want = []
    for g in (0, 4):
        r = SCORES[g:g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # Bessel: n - 1
        want += [(x - mean) / (std + 1e-4) for x in r]
    torch.testing.assert_close(got, torch.tensor(want), msg=lambda m: (
        "A_i = (r_i - group mean) / (group std + eps), the std with Bessel's correction (torch's default), "
        "each group of 4 on its own\n" + m))
    flat = grpo_advantages(torch.tensor([2.0, 2.0, 2.0]), 3)
    assert torch.equal(flat, torch.zeros(3)), f"a group of equal rewards gets advantage 0 (eps keeps it from 0/0), got {flat}"


def test_dr_grpo_keeps_the_mean_only():
    got = grpo_advantages(SCORES, 4, normalize_std=False)
    torch.testing.assert_close(got, torch.tensor([-2.0, -1.0, 0.0, 3.0, -0.5, -0.5, 0.5, 0.5]),
                               msg=lambda m: "normalize_std=False: A_i = r_i - group mean, no division\n" + m)
