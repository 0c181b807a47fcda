"""Grader for the exercise `gae`: ppo.gae, generalised advantage estimation (Schulman et al. 2016,
eq. 16), backwards over the response tokens.

    python -m pytest -q tests/course/test_gae.py

    δ_t = r_t + γ V_{t+1} - V_t,     A_t = δ_t + γ λ A_{t+1}
The episode ends at the last response token (mask 1): V and A after it are 0, and whatever the
rewards and values hold there (junk) must not count. Returns (advantages, returns = (A + V) · mask).
"""

import torch

from ppo import gae


def gae_by_hand(rewards, values, mask, gamma, lam):
    B, N = rewards.shape
    adv = torch.zeros(B, N)
    for b in range(B):
        end = int(mask[b].sum())  # tokens 0 .. end-1 are the response
        v = values[b, :end].tolist() + [0.0]
        a_next = 0.0
        for t in reversed(range(end)):
            delta = rewards[b, t].item() + gamma * v[t + 1] - v[t]
            a_next = delta + gamma * lam * a_next
            adv[b, t] = a_next
    return adv, (adv + values) * mask


REWARDS = torch.tensor([[0.1, -0.2, 1.0, 7.0, 7.0], [0.0, 0.5, 0.0, 0.0, 2.0]])
VALUES = torch.tensor([[0.5, 0.4, 0.3, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4, 0.5]])  # 7.0 and 9.0: junk after EOS
MASK = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_hand_example_with_eos_in_the_middle():
    """Row 1 runs to the end: A_t = Σ_l (γλ)^l δ_(t+l), with V after the last token 0.
    Row 0, γ = 1, λ = 0.95:  δ2 = 1.0 + 0 - 0.3 = 0.7,  A2 = 0.7
                              δ1 = -0.2 + 0.3 - 0.4 = -0.3,  A1 = -0.3 + 0.95 · 0.7 = 0.365
                              δ0 = 0.1 + 0.4 - 0.5 = 0.0,   A0 = 0.95 · 0.365 = 0.34675"""
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=0.95)
    v = VALUES[1].tolist() + [0.0]
    deltas = [REWARDS[1, t].item() + v[t + 1] - v[t] for t in range(5)]
    want = torch.tensor([sum(0.95 ** l * deltas[t + l] for l in range(5 - t)) for t in range(5)])
    torch.testing.assert_close(adv[1], want, msg=lambda m: (
        "row 1 (no EOS, γ = 1, λ = 0.95): δ_t = r_t + γ V_(t+1) - V_t, A_t = δ_t + γ λ A_(t+1), computed backwards "
        "from the last token, where V_(t+1) = 0\n" + m))
    torch.testing.assert_close(adv[0], torch.tensor([0.34675, 0.365, 0.7, 0.0, 0.0]), msg=lambda m: (
        "row 0 ends at column 2: V after the last token is 0 (not the junk 9.0), A is 0 after it\n" + m))
    torch.testing.assert_close(ret[0], torch.tensor([0.84675, 0.765, 1.0, 0.0, 0.0]),
                               msg=lambda m: "returns = A + V on response tokens, 0 after the end\n" + m)


def test_equals_the_loop_for_several_gamma_and_lambda():
    for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (0.5, 0.0), (0.99, 0.8)]:
        adv, ret = gae(REWARDS, VALUES, MASK, gamma=gamma, lam=lam)
        want_adv, want_ret = gae_by_hand(REWARDS, VALUES, MASK, gamma, lam)
        torch.testing.assert_close(adv, want_adv, msg=lambda m: (
            f"γ = {gamma}, λ = {lam}: δ_t = r_t + γ V_(t+1) - V_t, A_t = δ_t + γ λ A_(t+1), backwards in t\n" + m))
        torch.testing.assert_close(ret, want_ret, msg=lambda m: f"γ = {gamma}, λ = {lam}: returns = (A + V) · mask\n" + m)


def test_lambda_one_gives_return_minus_value():
    """With γ = λ = 1 the advantage is the sum of the remaining rewards minus V_t (Monte Carlo)."""
    adv, ret = gae(REWARDS, VALUES, MASK, gamma=1.0, lam=1.0)
    r = REWARDS[1].tolist()
    want = torch.tensor([sum(r[t:]) - VALUES[1, t].item() for t in range(5)])
    torch.testing.assert_close(adv[1], want, msg=lambda m: "γ = λ = 1: A_t = Σ_(l>=t) r_l - V_t\n" + m)
    torch.testing.assert_close(ret[1], torch.tensor([sum(r[t:]) for t in range(5)]))
