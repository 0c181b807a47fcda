"""Grader for the exercise `logprobs`: model.token_logprobs and model.sequence_logprobs, the
log-probabilities every loss is built from (SFT, reward, PPO, DPO), with the one-token shift.

    python -m pytest -q tests/course/test_logprobs.py

    token_logprobs(logits, targets, T)[b, t] = log softmax(logits[b, t] / T)[targets[b, t]]   (fp32)
    sequence_logprobs(...)[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]) · response_mask[b, t+1]
                                   for t = 0 .. T-2: the logits at column t predict the token at t+1.
The model here is a stand-in that returns fixed logits, so this grader needs no other exercise.
"""

import math

import torch

from model import sequence_logprobs, token_logprobs

LOGITS = torch.tensor([[[1.0, 0.0, -1.0, 2.0], [0.5, 0.5, 0.0, -3.0], [2.0, 1.0, 0.0, 0.0]],
                       [[0.0, 0.0, 0.0, 0.0], [-1.0, 3.0, 1.0, 0.0], [1.0, -2.0, 0.5, 0.25]]])  # (2, 3, 4)


def log_softmax_at(row, target, temperature=1.0):
    z = [v / temperature for v in row]
    return z[target] - math.log(sum(math.exp(v) for v in z))


def test_token_logprobs_by_hand():
    targets = torch.tensor([[3, 0, 2], [1, 1, 3]])
    for temperature in (1.0, 0.7):
        got = token_logprobs(LOGITS, targets, temperature)
        assert got.shape == (2, 3), f"token_logprobs: (B, T, V), (B, T) -> (B, T); got {tuple(got.shape)}"
        want = torch.tensor([[log_softmax_at(LOGITS[b, t].tolist(), targets[b, t].item(), temperature)
                              for t in range(3)] for b in range(2)])
        torch.testing.assert_close(got, want, msg=lambda m: f"temperature {temperature}: log-prob of the target "
                                   "under softmax(logits / T), a log_softmax then a gather\n" + m)


def test_token_logprobs_are_fp32():
    got = token_logprobs(LOGITS.bfloat16(), torch.zeros(2, 3, dtype=torch.long))
    assert got.dtype == torch.float32, "log-probs must be taken in fp32 (cast the logits first): bf16 loses ~0.1 nats"


class FixedLogits(torch.nn.Module):
    """A stand-in model: returns LOGITS, and remembers the attention mask it was given."""

    def forward(self, input_ids, attention_mask=None):
        self.seen_mask = attention_mask
        return LOGITS


def test_sequence_logprobs_shift_by_one_and_mask_the_prompt():
    ids = torch.tensor([[0, 3, 1], [2, 1, 3]])
    attn = torch.tensor([[1, 1, 1], [1, 1, 1]])
    resp = torch.tensor([[0, 1, 1], [0, 0, 1]])  # row 1: only its last token is response
    m = FixedLogits()
    got = sequence_logprobs(m, ids, attn, resp)
    assert got.shape == (2, 2), f"the output is (B, T-1) = (2, 2): one entry per predicted token; got {tuple(got.shape)}"
    want = torch.tensor([[log_softmax_at(LOGITS[0, 0].tolist(), 3), log_softmax_at(LOGITS[0, 1].tolist(), 1)],
                         [0.0, log_softmax_at(LOGITS[1, 1].tolist(), 3)]])
    torch.testing.assert_close(
        got, want, msg=lambda m: "entry t is log p(input_ids[:, t+1]) from the logits at column t, kept where "
                                 "response_mask[:, t+1] is 1 and 0 elsewhere (the one-token shift)\n" + m)
    assert m.seen_mask is attn, "pass the attention_mask to the model (padding must be masked in the forward)"
    sums = got.sum(-1)
    torch.testing.assert_close(sums[1], want[1, 1], msg=lambda m: "prompt tokens must contribute 0\n" + m)
