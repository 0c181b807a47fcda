"""Grader for the exercise `dpo_loss`: dpo.preference_loss, DPO (Rafailov et al. 2023, eq. 7) and
its variants: conservative DPO (label smoothing), IPO (Azar et al. 2023) and the NLL term (RPO).

    python -m pytest -q tests/course/test_dpo_loss.py

    h    = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))      (summed log-probs, (B,))
    dpo  = -(1 - ε) log σ(β h) - ε log σ(-β h)
    ipo  = (h - 1/(2β))²
    nll  = -log π(y_w) / |y_w|          (returned when chosen_lengths is given; None otherwise)
    loss = dpo or ipo, + α · nll when nll_coef α > 0
    implicit rewards: β (log π(y) - log π_ref(y)) of chosen and rejected, detached
Returns (losses (B,), chosen_rewards, rejected_rewards, nll). Expected values: math.log here.
"""

import math

import pytest
import torch

from dpo import preference_loss

# two pairs of summed response log-probs
PC = torch.tensor([-10.0, -20.0])  # policy, chosen
PR = torch.tensor([-12.0, -15.0])  # policy, rejected
RC = torch.tensor([-11.0, -19.0])  # reference, chosen
RR = torch.tensor([-11.0, -17.0])  # reference, rejected
H = [(-10 + 11) - (-12 + 11), (-20 + 19) - (-15 + 17)]  # [2, -3]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_loss_is_ln2_when_policy_equals_reference():
    torch.manual_seed(0)
    c, r = -torch.rand(4) * 30, -torch.rand(4) * 30
    losses, cr, rr, nll = preference_loss(c, r, c.clone(), r.clone(), beta=0.1)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)),
                               msg=lambda m: "DPO loss must be ln 2 for every pair when policy = reference (h = 0)\n" + m)
    assert torch.equal(cr, torch.zeros(4)) and torch.equal(rr, torch.zeros(4)), \
        "implicit rewards must be 0 when policy = reference"
    assert nll is None, "without chosen_lengths the NLL is None"


def test_dpo_by_hand():
    for beta in (0.1, 0.5):
        losses, cr, rr, _ = preference_loss(PC, PR, RC, RR, beta=beta)
        want = torch.tensor([-log_sigmoid(beta * h) for h in H])
        torch.testing.assert_close(losses, want, msg=lambda m: (
            f"β={beta}: loss = -log σ(β h), h = (π_w - ref_w) - (π_l - ref_l) = {H}; pair 0 prefers the chosen "
            "more than the reference does, so its loss is below ln 2\n" + m))
        torch.testing.assert_close(cr, beta * (PC - RC), msg=lambda m: "chosen reward = β (π_w - ref_w)\n" + m)
        torch.testing.assert_close(rr, beta * (PR - RR), msg=lambda m: "rejected reward = β (π_l - ref_l)\n" + m)


def test_label_smoothing_by_hand():
    eps, beta = 0.1, 0.5
    losses, _, _, _ = preference_loss(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    want = torch.tensor([-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h) for h in H])
    torch.testing.assert_close(losses, want, msg=lambda m: (
        "label smoothing ε: -(1 - ε) log σ(β h) - ε log σ(-β h) (the label is wrong with probability ε)\n" + m))


def test_ipo_by_hand():
    beta = 0.1
    losses, _, _, _ = preference_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
    want = torch.tensor([(h - 1 / (2 * beta)) ** 2 for h in H])  # target margin 5
    torch.testing.assert_close(losses, want, msg=lambda m: "IPO: (h - 1/(2β))², with 1/(2β) = 5 at β = 0.1\n" + m)
    with pytest.raises(ValueError):
        preference_loss(PC, PR, RC, RR, beta=beta, loss_type="nope")


def test_nll_term_is_the_chosen_per_token_nll():
    lengths = torch.tensor([5.0, 4.0])
    plain, _, _, nll = preference_loss(PC, PR, RC, RR, beta=0.1, chosen_lengths=lengths)
    torch.testing.assert_close(nll, torch.tensor([10 / 5, 20 / 4]),
                               msg=lambda m: "nll = -log π(y_w) / |y_w|: per token, from the SUMMED log-prob\n" + m)
    with_nll, _, _, _ = preference_loss(PC, PR, RC, RR, beta=0.1, nll_coef=0.5, chosen_lengths=lengths)
    torch.testing.assert_close(with_nll, plain + 0.5 * torch.tensor([2.0, 5.0]),
                               msg=lambda m: "nll_coef α adds α · nll to each pair's loss\n" + m)


def test_large_margins_stay_finite():
    """β h = -200: log σ(-200) underflows to log(0) = -inf in fp32 unless taken with F.logsigmoid."""
    zero = torch.zeros(1)
    losses, _, _, _ = preference_loss(zero, zero, zero, torch.tensor([-2000.0]), beta=0.1)
    assert math.isfinite(losses.item()) and abs(losses.item() - 200.0) < 1e-3, \
        f"loss = {losses.item()}, want 200: use F.logsigmoid(β h), never torch.log(torch.sigmoid(β h))"


def test_gradient_raises_chosen_and_lowers_rejected_and_rewards_are_detached():
    pc, pr = PC.clone().requires_grad_(True), PR.clone().requires_grad_(True)
    losses, cr, rr, _ = preference_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all(), \
        "gradient descent on the DPO loss must raise log π(y_w) and lower log π(y_l) (check the sign of h)"
    assert not cr.requires_grad and not rr.requires_grad, "the implicit rewards are for logging: detach them"
