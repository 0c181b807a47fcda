"""Grader for the exercise `bradley_terry`: reward.comparison_loss, InstructGPT's K-choose-2
reward-model loss (Ouyang et al. 2022, eq. 1).

    python -m pytest -q tests/course/test_bradley_terry.py

    loss = mean over prompts p of [ -1/|pairs(p)| Σ_{(w, l) in pairs(p)} log σ(r_w - r_l) ]
    accuracy = the share of all pairs with r_w > r_l
rewards (R,) holds every response of the batch; pair i compares rewards[win[i]] (better) with
rewards[lose[i]] and belongs to prompt group[i]. Each prompt counts once, whatever its number
of pairs. Expected values: a loop over pairs written here.
"""

import math

import torch

from reward import comparison_loss

# prompt 0: three responses ranked 0 > 1 > 2 (3 pairs); prompt 1: two responses, 3 > 4 (1 pair)
REWARDS = torch.tensor([1.0, 0.5, -0.2, 0.3, 0.9])
WIN = torch.tensor([0, 0, 1, 3])
LOSE = torch.tensor([1, 2, 2, 4])
GROUP = torch.tensor([0, 0, 0, 1])


def neg_log_sigmoid(x):
    return math.log1p(math.exp(-x))


def by_hand(rewards):
    r = rewards.tolist()
    per_prompt = {}
    for w, l, g in zip(WIN.tolist(), LOSE.tolist(), GROUP.tolist()):
        per_prompt.setdefault(g, []).append(neg_log_sigmoid(r[w] - r[l]))
    return sum(sum(v) / len(v) for v in per_prompt.values()) / len(per_prompt)


def test_loss_is_the_mean_over_prompts_of_each_prompts_mean_over_pairs():
    loss, acc = comparison_loss(REWARDS, WIN, LOSE, GROUP, 2)
    pairs_mean = sum(neg_log_sigmoid(REWARDS[w] - REWARDS[l]) for w, l in zip(WIN, LOSE)) / 4
    assert abs(loss.item() - pairs_mean) > 1e-4, \
        "each PROMPT counts once: average the pairs within a prompt, then the prompts (not all pairs at once)"
    assert abs(loss.item() - by_hand(REWARDS)) < 1e-5, (
        f"loss = {loss.item():.6f}, want {by_hand(REWARDS):.6f}: per prompt -mean log σ(r_w - r_l), then the mean "
        "over prompts (check the sign: a larger r_w - r_l must LOWER the loss)")
    assert abs(acc.item() - 0.75) < 1e-6, f"accuracy = {acc.item()}, want 0.75: 3 of the 4 pairs have r_w > r_l"


def test_equal_rewards_cost_ln2_and_the_gradient_pushes_the_winner_up():
    r = torch.zeros(5, requires_grad=True)
    loss, _ = comparison_loss(r, WIN, LOSE, GROUP, 2)
    assert abs(loss.item() - math.log(2)) < 1e-6, f"with equal rewards every pair costs -log σ(0) = ln 2, got {loss.item()}"
    loss.backward()
    assert r.grad[0] < 0 and r.grad[4] > 0, \
        "gradient descent must raise the better response's reward (dL/dr_w < 0) and lower the worse one's"


def test_large_margins_stay_finite():
    """A pair ordered wrongly by 200: log(sigmoid(-200)) is log(0) = -inf in fp32; F.logsigmoid is exact."""
    r = torch.tensor([-200.0, 0.0, 0.0, 0.0, 0.0])
    loss, _ = comparison_loss(r, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), 1)
    assert math.isfinite(loss.item()) and abs(loss.item() - 200.0) < 1e-3, \
        f"loss = {loss.item()}, want 200: use F.logsigmoid(r_w - r_l), never torch.log(torch.sigmoid(...))"
