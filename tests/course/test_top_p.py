"""Grader for the exercise `top_p`: sampling.filter_logits, top-k and top-p (nucleus) filtering
(Holtzman et al. 2020).

    python -m pytest -q tests/course/test_top_p.py

top_k: keep the k largest logits of a row (and any tied with the k-th); 0 = off.
top_p: sort the (kept) tokens by probability, descending; drop a token when the mass of the
tokens before it already reaches top_p. The token that crosses top_p is kept, and so is the
most likely token always. Dropped logits become -inf; kept ones are returned unchanged.
"""

import torch

from sampling import filter_logits

# probabilities in a shuffled order: from most to least likely the columns are 1, 3, 0, 2, 4
PROBS = torch.tensor([[0.1, 0.5, 0.08, 0.3, 0.02]])
LOGITS = PROBS.log()


def kept(out):
    return [[bool(v) for v in row] for row in torch.isfinite(out)]


def cols(*c):
    return [[i in c for i in range(5)]]


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    for top_p, want, why in [
        (0.7, cols(1, 3), "mass before 0.3 is 0.5 < 0.7: kept; before 0.1 it is 0.8 >= 0.7: dropped"),
        (0.85, cols(1, 3, 0), "mass before 0.1 is 0.8 < 0.85: kept; before 0.08 it is 0.9: dropped"),
        (0.3, cols(1), "the most likely token is always kept (nothing comes before it)"),
        (0.95, cols(1, 3, 0, 2), "mass before 0.08 is 0.9 < 0.95: kept; before 0.02 it is 0.98: dropped"),
    ]:
        out = filter_logits(LOGITS, top_p=top_p)
        assert kept(out) == want, f"top_p={top_p}: kept {kept(out)[0]}, want {want[0]} ({why})"
        assert torch.equal(out[torch.isfinite(out)], LOGITS[torch.isfinite(out)]), \
            "kept logits must be returned unchanged (no renormalisation of the logits themselves)"
        assert (out[~torch.isfinite(out)] == float("-inf")).all(), "dropped logits must be -inf"


def test_top_p_one_and_top_k_zero_change_nothing():
    out = filter_logits(LOGITS, top_k=0, top_p=1.0)
    assert torch.equal(out, LOGITS), "top_k=0 and top_p=1.0 mean no filtering: the logits come back as they were"


def test_top_k_keeps_the_k_largest_and_their_ties():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3], [3.0, -2.0, 0.0, 1.0, 2.5]])
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, False, True, False],
                                                     [True, False, False, False, True]], \
        "top_k=2 keeps the two largest logits of EACH row, wherever they are"
    assert kept(filter_logits(logits, top_k=5)) == [[True] * 5] * 2, "top_k >= vocabulary size keeps everything"
    ties = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept(filter_logits(ties, top_k=2)) == [[False, True, True, True, False]], \
        "a logit tied with the k-th largest is kept too (compare with the k-th value, as HF does)"


def test_rows_get_their_own_nucleus():
    logits = torch.cat([LOGITS, torch.tensor([[0.05, 0.03, 0.02, 0.0, 0.9]]).clamp(min=1e-9).log()])
    out = filter_logits(logits, top_p=0.7)
    assert kept(out) == [cols(1, 3)[0], cols(4)[0]], "each row is sorted and cut on its own probabilities"


def test_top_p_measures_mass_among_the_tokens_top_k_kept():
    """top_k=3 keeps 0.5, 0.3, 0.1, renormalised to 0.556, 0.333, 0.111: the mass before the
    third is 0.889, so top_p=0.85 drops it (on the original probabilities it would be 0.8: kept)."""
    out = filter_logits(LOGITS, top_k=3, top_p=0.85)
    assert kept(out) == cols(1, 3), \
        "top-k first, then top-p on the softmax of what top-k kept (filtered logits are -inf, probability 0)"
