"""judge.py's scoring paths and the noisy-oracle pair judge: reference-guided templates, the
judging of identical items once, a parse failure never becoming a score, and a judge of known
quality whose flip rate is what it claims."""

import random

import pytest

import judge
import self_reward
import tasks


class FakeJudge:
    """Stands in for sample_responses: answers every judge prompt with a fixed list of texts
    chosen by a function of the prompt, and records the prompts it was asked."""

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def __call__(self, model, tok, prompts, n, *args, **kwargs):
        self.prompts += prompts
        return [[self.answer(p, i) for i in range(n)] for p in prompts]


def test_fill_puts_the_reference_in_its_slot_and_needs_one_exactly_when_there_is_a_slot():
    t = judge.load_judge_template(judge.REFERENCE_PROMPT)
    assert judge.is_reference_guided(t) and not judge.is_reference_guided(judge.load_judge_template())
    filled = judge.fill(t, "Add 2 and 3.", "The sum is 6.", "The sum is 5.")
    assert "Reference answer: The sum is 5.\nResponse: The sum is 6." in filled
    with pytest.raises(ValueError, match="reference"):
        judge.fill(t, "Add 2 and 3.", "The sum is 6.")
    with pytest.raises(ValueError, match="reference"):
        judge.fill(judge.load_judge_template(), "Add 2 and 3.", "The sum is 6.", "The sum is 5.")


def test_identical_items_are_judged_once_and_every_item_gets_its_judgment(monkeypatch):
    """Four candidates, two of them the same text: three judge prompts are sampled, and the
    judgments come back in item order, the duplicate sharing its twin's."""
    fake = FakeJudge(lambda p, i: f"Score: {len(p) % 5 + 1}" if "B" not in p.split("Response:")[-1] else "no score")
    monkeypatch.setattr(judge, "sample_responses", fake)
    items = [("q", "A"), ("q", "B"), ("q", "A"), ("q", "C")]
    js = judge.score(None, None, "Q: {instruction}\nResponse: {response}", items, n_samples=3)
    assert len(fake.prompts) == 3
    assert [j.score for j in js][0] == js[2].score and js[0] is js[2]
    assert js[1].score is None and js[1].samples == [None] * 3  # a parse failure is no score
    assert js[3].score is not None


def test_reference_guided_score_answers_each_distinct_question_once_greedily(monkeypatch):
    """Without given references the model answers each distinct question first (T = 0), and
    that answer is what the judge prompt shows as the reference."""
    calls = []

    def fake_sample(model, tok, prompts, n, temperature, *args, **kwargs):
        calls.append((list(prompts), temperature))
        if "Reference answer" in prompts[0]:
            return [["Score: 4"] * n for _ in prompts]
        return [[f"answer to {p}"] for p in prompts]

    monkeypatch.setattr(judge, "sample_responses", fake_sample)
    template = judge.load_judge_template(judge.REFERENCE_PROMPT)
    items = [("q1", "r1"), ("q1", "r2"), ("q2", "r1")]
    js = judge.score(None, None, template, items, n_samples=2)
    (answered, t_answer), (judged, _) = calls
    assert answered == ["q1", "q2"] and t_answer == 0.0
    assert "Reference answer: answer to q1\nResponse: r2" in judged[1]
    assert "Reference answer: answer to q2\nResponse: r1" in judged[2]
    assert [j.score for j in js] == [4.0, 4.0, 4.0]


def test_reference_eft_examples_are_graded_against_the_reference_they_show():
    """A reference-guided EFT example's target is the oracle's grade of the response against
    the reference in the example (gold or a well-formed wrong answer), not against the gold:
    both kinds occur, and the score line agrees with the grading against the reference."""
    examples = tasks.eft_seed(7, 140, reference=True)
    wrong_refs = 0
    for prompt, response, target, reference in examples:
        task = tasks.parse_task(prompt)
        ref_task = tasks.with_answer(task, tasks.answer_of(task, reference))
        assert ref_task.gold == reference
        assert judge.parse_score(target) == tasks.grade(ref_task, response).points
        wrong_refs += reference != task.gold
    assert 0.3 < wrong_refs / len(examples) < 0.7
    assert all(len(e) == 3 for e in tasks.eft_seed(7, 20))  # the paper's template: no reference


def test_noisy_oracle_flips_the_stated_fraction_and_leaves_ties_alone():
    """Over 4000 prompts whose candidates the oracle tells apart, the share reversed is within
    4 binomial standard deviations of flip_rate; a reversed prompt's best is the oracle's
    worst. Ties stay ties unless flip_ties, which makes them random pairs."""
    rng = random.Random(0)
    n, eps = 4000, 0.3
    flipped = 0
    for _ in range(n):
        points = [rng.randint(0, 5) for _ in range(4)]
        while len(set(points)) == 1:
            points = [rng.randint(0, 5) for _ in range(4)]
        s = self_reward.noisy_oracle(points, eps, False, rng)
        assert s in ([float(p) for p in points], [-float(p) for p in points])
        flipped += s != [float(p) for p in points]  # not all equal, so not all 0: negation shows
    sd = (eps * (1 - eps) / n) ** 0.5
    assert abs(flipped / n - eps) < 4 * sd, flipped / n
    assert self_reward.noisy_oracle([3, 3, 3, 3], 1.0, False, rng) == [3.0] * 4
    tie_scores = self_reward.noisy_oracle([3, 3, 3, 3], 0.0, True, rng)
    assert len(set(tie_scores)) == 4


def test_the_noisy_judge_keeps_the_true_oracle_points_for_measuring(monkeypatch):
    """judge_candidates with the noisy judge scores by the flipped oracle but reports the true
    points under "oracle" (pair precision is measured against them), and at flip rate 1 every
    pair the oracle tells apart is reversed."""
    class Source:
        def oracle(self, prompt, response):
            return {"right": 5, "close": 3, "wrong": 0}[response]

    cfg = self_reward.Config(flip_rate=1.0, n_candidates=3)
    cands = [{"prompt": f"p{i}", "candidates": ["right", "close", "wrong"]} for i in range(5)]
    out = self_reward.judge_candidates(cfg, "noisy", "", cands, Source(), ("noisy", 1))
    for row in out:
        assert row["oracle"] == [5, 3, 0]
        best = max(range(3), key=lambda i: row["scores"][i])
        assert row["oracle"][best] == 0
