"""Grader for the exercise `build_pairs`: self_reward.build_pairs, the preference pair of one
prompt from its judged candidates (Self-Rewarding LMs, section 2.2: best vs worst).

    python -m pytest -q tests/course/test_build_pairs.py

Return (index of the best, index of the worst) by score, or the reason there is no pair:
    "too few scores"  fewer than two candidates with a score (None = the judge was unreadable)
    "none finished"   no scored candidate ended with EOS (finished None means all did)
    "tie"             best and worst score the same
    "identical"       best and worst are the same text once stripped of surrounding whitespace
A candidate that never ended may be the worst, never the best. Checks in this order. Among
equal scores, the first index wins (Python's max/min).
"""

import pytest

from self_reward import build_pairs

CASES = [
    (["a", "b", "c", "d"], [3.0, 5.0, 1.0, 4.0], None, (1, 2), "best vs worst by score"),
    (["a", "b", "c", "d"], [None, 4.5, None, 2.0], None, (1, 3), "None scores are ignored"),
    (["a", "b", "c", "d"], [None, 4.0, None, None], None, "too few scores", "one valid score is no pair"),
    (["a", "b", "c", "d"], [None] * 4, None, "too few scores", "no valid score"),
    (["a", "b", "c", "d"], [3.0, 3.0, 3.0, 3.0], None, "tie", "equal scores: no preference"),
    (["a", "b", "c", "d"], [3.0, None, 3.0, None], None, "tie", "equal valid scores"),
    (["same", "x", "same ", "y"], [5.0, 3.0, 1.0, 3.0], None, "identical", "same text (stripped): judge noise"),
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [True, False, True, True], (3, 2), "a cut-off response is never chosen"),
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [True, True, False, True], (1, 2), "... but may be rejected"),
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [False] * 4, "none finished", "no finished candidate to choose"),
    (["a", "b"], [0.0, 1 / 3], None, (1, 0), "0 is a valid score (not a missing one)"),
    (["a", "b", "c"], [2.0, 2.0, 1.0], [False, True, True], (1, 2), "the best among the finished"),
]


@pytest.mark.parametrize("responses, scores, finished, expected, why", CASES)
def test_build_pairs(responses, scores, finished, expected, why):
    got = build_pairs(responses, scores, finished)
    assert got == expected, f"build_pairs({responses}, {scores}, {finished}) = {got!r}, want {expected!r}: {why}"
