"""Grader for the exercise `parse_score`: judge.parse_score, reading the judge's verdict
(Self-Rewarding LMs: the judge ends with "Score: <points>" on an additive 0-5 scale).

    python -m pytest -q tests/course/test_parse_score.py

Rules: a score statement is the word "score" (case-insensitive; a stated range such as "(0-5)"
may follow), then a few separator characters (":", "-", "*", "=", spaces, "is"), then the
number. The LAST statement is the verdict. Return it as a float in [0, 5]; return None when
there is no statement, when the last one is unreadable ("Score: none", "Score:"), a range
("3-5"), out of another scale ("4/10"; "/5" is fine) or out of range ("7", "-1"). A failure
must never become a score. (judge.py's SCORE_*_RE regular expressions may be used.)
"""

import pytest

from judge import parse_score

READ = [
    ("Score: 4", 4.0, "the plain format"),
    ("score: 3.5", 3.5, "case-insensitive, decimals"),
    ("**Score:** 4/5", 4.0, "markdown and '/5'"),
    ("SCORE - 2", 2.0, "a dash as separator"),
    ("Score: 3 points", 3.0, "words after the number"),
    ("Score: 0", 0.0, "a valid 0 is a score, not a failure"),
    ("+1 relevant: ok\n+0 correct: wrong\nScore: 1", 1.0, "findings first, then the score"),
    ("Score: 1 ... then I reconsidered. Score: 4", 4.0, "the LAST statement wins"),
    ("Score (0-5): 4", 4.0, "a stated range is not the score"),
    ("Score: 4. That explains the score.", 4.0, "'score' in prose is no statement"),
    ("So the score is 3.", 3.0, "'the score is 3'"),
]

FAIL = [
    (None, "no text"),
    ("", "no text"),
    ("The response is fine.", "no statement"),
    ("Points: 4", "no 'score'"),
    ("Score: none", "unreadable"),
    ("Score:", "unreadable"),
    ("Score: 7", "out of range"),
    ("Score: 5.5", "out of range"),
    ("Score: -1", "negative: out of range (do not drop the minus sign)"),
    ("Score: 10/5", "out of range"),
    ("Score: 4/10", "another scale"),
    ("Score: 3-5", "a range is no single score"),
    ("Score: 4\nScore: 9", "the last statement is out of range: not the earlier 4"),
    ("Score: 3 ... on reflection, Score: none", "the last statement is unreadable: not the earlier 3"),
]


@pytest.mark.parametrize("text, expected, why", READ)
def test_reads_the_last_score(text, expected, why):
    got = parse_score(text)
    assert got == expected and isinstance(got, float), f"parse_score({text!r}) = {got!r}, want {expected!r} ({why})"


@pytest.mark.parametrize("text, why", FAIL)
def test_failures_are_none(text, why):
    got = parse_score(text)
    assert got is None, f"parse_score({text!r}) = {got!r}, want None ({why}): a failure must never become a score"
