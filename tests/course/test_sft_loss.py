"""Grader for the exercise `sft_loss`: sft.lm_loss, the next-token loss on the reply only.

    python -m pytest -q tests/course/test_sft_loss.py

    loss = - 1/|S| Σ_{(b, t) in S} log softmax(logits[b, t])[input_ids[b, t+1]],
    S = {(b, t): loss_mask[b, t+1] = 1}
The logits at column t predict the token at column t+1; a target counts where the loss mask is
1 (the reply and its EOS), and the mean is over ALL counted targets of the batch (not per row).
The model is a stand-in that returns fixed logits, so this grader needs no other exercise.
"""

import math

import torch

from sft import lm_loss

LOGITS = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -3.0], [2.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0]],
                       [[0.0, 0.0, 0.0, 0.0], [-1.0, 3.0, 1.0, 0.0], [1.0, -2.0, 0.5, 0.25], [3.0, 0.0, 0.0, 1.0]]])
IDS = torch.tensor([[0, 3, 1, 2], [2, 1, 3, 0]])
ATTN = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
# row 0: prompt = column 0, reply = columns 1-3 (3 targets); row 1: reply = column 3 only (1 target)
LOSS_MASK = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        self.seen_mask = attention_mask
        return self.logits


def nll(row, target):
    return -(row[target] - math.log(sum(math.exp(v) for v in row)))


def by_hand():
    terms = [nll(LOGITS[b, t].tolist(), IDS[b, t + 1].item())
             for b in range(2) for t in range(3) if LOSS_MASK[b, t + 1]]
    return sum(terms) / len(terms)


def test_loss_by_hand():
    m = FixedLogits(LOGITS)
    got = lm_loss(m, IDS, ATTN, LOSS_MASK)
    assert got.dim() == 0, f"lm_loss returns a scalar, got shape {tuple(got.shape)}"
    per_row = (sum(nll(LOGITS[0, t].tolist(), IDS[0, t + 1].item()) for t in range(3)) / 3
               + nll(LOGITS[1, 2].tolist(), IDS[1, 3].item())) / 2
    assert abs(got.item() - per_row) > 1e-5, \
        "the mean is over all supervised targets of the batch, not a mean of per-row means"
    assert abs(got.item() - by_hand()) < 1e-5, (
        f"lm_loss = {got.item():.6f}, want {by_hand():.6f}: mean cross-entropy of logits[:, t] against "
        "input_ids[:, t+1] over the targets where loss_mask[:, t+1] is 1")
    assert m.seen_mask is ATTN, "pass the attention_mask to the model"


def test_prompt_targets_get_no_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    lm_loss(FixedLogits(logits), IDS, ATTN, LOSS_MASK).backward()
    g = logits.grad.abs().sum(-1)  # (B, T): which columns' logits the loss reaches
    want = torch.tensor([[True, True, True, False], [False, False, True, False]])
    assert torch.equal(g > 0, want), (
        f"gradient reaches the logits of columns {(g > 0).tolist()}, want {want.tolist()}: only columns t "
        "with loss_mask[t+1] = 1 predict a supervised token; the last column predicts nothing")


def test_loss_is_fp32_and_a_perfect_prediction_costs_nothing():
    got = lm_loss(FixedLogits(LOGITS.bfloat16()), IDS, ATTN, LOSS_MASK)
    assert got.dtype == torch.float32, "take the loss in fp32 (cast the logits) even when the model runs in bf16"
    sure = torch.full((2, 4, 4), -30.0)
    for b in range(2):
        for t in range(3):
            sure[b, t, IDS[b, t + 1]] = 30.0
    assert lm_loss(FixedLogits(sure), IDS, ATTN, LOSS_MASK).item() < 1e-6, \
        "logits that put all mass on the next token must give loss 0 (check the shift: column t predicts t+1)"
