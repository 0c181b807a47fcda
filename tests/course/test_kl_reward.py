"""Grader for the exercise `kl_reward`: ppo.per_token_rewards, InstructGPT's reward (eq. 2)
written per token, as in Ziegler et al. 2019.

    python -m pytest -q tests/course/test_kl_reward.py

    kl_t = (log π(y_t) - log π_ref(y_t)) · mask_t                    (the k1 estimate)
    r_t  = -β kl_t,   plus the sequence's score on its LAST response token
The last response token of row b is column Σ_t mask[b, t] - 1 (responses start at column 0;
after EOS the mask is 0). Returns (rewards, kl), both (B, N). Expected values: a loop here.
"""

import torch

from ppo import per_token_rewards

SCORES = torch.tensor([2.0, -1.0])
LOGP = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.1, -0.2, -0.3, -0.4]])
REF = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.3, -0.2, -0.1, -1.4]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # row 0 ends (EOS) at column 2


def by_hand(beta):
    rewards, kl = torch.zeros(2, 4), torch.zeros(2, 4)
    for b in range(2):
        last = int(MASK[b].sum()) - 1
        for t in range(4):
            if MASK[b, t]:
                kl[b, t] = LOGP[b, t] - REF[b, t]
                rewards[b, t] = -beta * kl[b, t] + (SCORES[b] if t == last else 0.0)
    return rewards, kl


def test_rewards_by_hand():
    inputs = [x.clone() for x in (SCORES, LOGP, REF, MASK)]
    rewards, kl = per_token_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1)
    want_r, want_kl = by_hand(0.1)
    torch.testing.assert_close(kl, want_kl, msg=lambda m: "kl = (log π - log π_ref) · mask, 0 after EOS\n" + m)
    torch.testing.assert_close(rewards, want_r, msg=lambda m: (
        "r_t = -β (log π - log π_ref) on response tokens, + the score on the LAST response token (row 0: column 2, "
        "its EOS, not the last column); nothing after EOS\n" + m))
    for x, before in zip((SCORES, LOGP, REF, MASK), inputs):
        assert torch.equal(x, before), "per_token_rewards must not modify its inputs in place"


def test_policy_equal_to_reference_gets_the_score_alone():
    rewards, kl = per_token_rewards(SCORES, LOGP, LOGP.clone(), MASK, kl_coef=0.5)
    want = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(rewards, want, msg=lambda m: "with π = π_ref the KL is 0: only the score, at the last token\n" + m)
    assert torch.equal(kl, torch.zeros(2, 4))
