"""judge.py's scoring paths and the noisy-oracle pair judge: reference-guided templates, the
judging of identical items once, a parse failure never becoming a score, and a judge of known
quality whose flip rate is what it claims."""

import json
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


# -----------------------------------------------------------------------------
# The pairwise judge (judge_prompt_pairwise.txt; not the paper's)


@pytest.mark.parametrize("text, share", [
    ("Asked for: one number.\nA misses nothing, 5 points\nB misses correct: off by one, 3 points\nBetter: A", 1.0),
    ("better: b", 0.0), ("Better: same", 0.5), ("Better: SAME.", 0.5),
    ("Better: A\nOn second thought... Better: B", 0.0),  # the last statement is the verdict
    ("Better: both", None), ("Better:", None), ("A is better", None), ("", None), (None, None),
    ("Better:\nA misses nothing, 5 points", None),  # a verdict is on its own line, not the next one's
])
def test_parse_verdict_reads_the_last_statement_and_never_guesses(text, share):
    assert judge.parse_verdict(text) == share


def pairwise_fake(prefer):
    """A fake pairwise judge: `prefer(a, b)` -> "A", "B", "same" or unreadable text, read from
    the filled prompt's two response lines."""
    def answer(prompt, i):
        a = prompt.split("Response A: ")[1].split("\n")[0]
        b = prompt.split("Response B: ")[1].split("\n")[0]
        return f"Better: {prefer(a, b)}"
    return FakeJudge(answer)


def oracle_verdict(prompt, i, flip=False):
    """A fake pairwise judge that answers as the oracle does (flip: the other way round), read
    from the filled judge prompt's question and two responses."""
    task = tasks.parse_task(prompt.split("Question: ")[1].split("\n")[0])
    a = prompt.split("Response A: ")[1].split("\nResponse B: ")[0]
    b = prompt.split("Response B: ")[1].split("\n")[0]
    pa, pb = tasks.grade(task, a).points, tasks.grade(task, b).points
    if flip:
        pa, pb = pb, pa
    return "Better: " + ("A" if pa > pb else "B" if pb > pa else "same")


def test_pairwise_judging_asks_both_orders_so_position_bias_cancels(monkeypatch):
    """Every two distinct responses are shown in both orders: a judge that always says "A" (or
    always "B") gives every response the same win share, so no pair can come of it."""
    template = judge.load_judge_template(judge.PAIRWISE_PROMPT)
    for always in ("A", "B"):
        fake = pairwise_fake(lambda a, b: always)
        monkeypatch.setattr(judge, "sample_responses", fake)
        [row] = judge.score_pairwise(None, None, template, [("q", ["x", "y", "z", "x"])], n_samples=2)
        assert len(fake.prompts) == 6  # 3 distinct responses: 3 pairs x 2 orders, the duplicate not again
        assert [j.score for j in row] == [0.5] * 4
        assert self_reward.build_pairs(["x", "y", "z", "x"], [j.score for j in row]) == "tie"


def test_pairwise_scores_are_win_shares_and_a_parse_failure_counts_for_nothing(monkeypatch):
    """A judge that prefers the longer response in either position ranks the responses by
    length (win shares 1, 1/2, 0); "same" is half a win; a response whose every verdict is
    unreadable gets no score, and a group with one distinct response gets none either."""
    template = judge.load_judge_template(judge.PAIRWISE_PROMPT)
    monkeypatch.setattr(judge, "sample_responses", pairwise_fake(
        lambda a, b: "A" if len(a) > len(b) else "B" if len(b) > len(a) else "same"))
    [row] = judge.score_pairwise(None, None, template, [("q", ["bb", "ccc", "a"])])
    assert [j.score for j in row] == [0.5, 1.0, 0.0]
    assert self_reward.build_pairs(["bb", "ccc", "a"], [j.score for j in row]) == (1, 2)
    monkeypatch.setattr(judge, "sample_responses", pairwise_fake(lambda a, b: "same"))
    [row] = judge.score_pairwise(None, None, template, [("q", ["bb", "cc"])])
    assert [j.score for j in row] == [0.5, 0.5]
    fake = pairwise_fake(lambda a, b: "unsure" if "zz" in (a, b) else ("A" if a < b else "B"))
    monkeypatch.setattr(judge, "sample_responses", fake)
    [row, alone, spaced] = judge.score_pairwise(None, None, template, [
        ("q", ["aa", "bb", "zz"]), ("q2", ["aa", "aa"]), ("q3", ["x", " x", "y"])])
    assert [j.score for j in row] == [1.0, 0.0, None] and row[2].samples == [None] * 12  # 2 opponents x 2 orders x 3
    assert judge.parse_failure_rate(row) == pytest.approx(24 / 36)
    # one distinct response: nothing to compare, nothing sampled, a tie (not "too few scores")
    assert [j.score for j in alone] == [0.5, 0.5] and all("Question: q2\n" not in p for p in fake.prompts)
    assert self_reward.build_pairs(["aa", "aa"], [j.score for j in alone]) == "tie"
    # texts are compared exactly, as judge.score compares them: " x" is its own response
    assert len([p for p in fake.prompts if "Question: q3\n" in p]) == 6  # 3 distinct: 3 pairs x 2 orders


def test_pairwise_template_takes_two_responses_and_refuses_one():
    t = judge.load_judge_template(judge.PAIRWISE_PROMPT)
    assert judge.is_pairwise(t) and not judge.is_pairwise(judge.load_judge_template())
    filled = judge.fill(t, "Add 2 and 3.", ("The sum is {response}.", "The sum is 5."))
    assert "Response A: The sum is {response}.\nResponse B: The sum is 5." in filled
    with pytest.raises(ValueError, match="pair"):
        judge.fill(t, "Add 2 and 3.", "The sum is 5.")
    with pytest.raises(ValueError, match="pair"):
        judge.fill(judge.load_judge_template(), "Add 2 and 3.", ("a", "b"))


def test_pairwise_eft_verdicts_follow_the_oracle_and_both_positions_win():
    """Each pairwise EFT example shows two responses to one training question; its verdict is
    the one the oracle's points give, each response's line names its points, and A wins about
    as often as B (within 4 binomial standard deviations of a half)."""
    examples = tasks.eft_pairs(11, 600, 4)
    a_wins = b_wins = 0
    for prompt, (a, b), target in examples:
        task = tasks.parse_task(prompt)
        ga, gb = tasks.grade(task, a), tasks.grade(task, b)
        assert a != b and not tasks.is_heldout(task)
        assert judge.parse_verdict(target) == (1.0 if ga.points > gb.points else 0.0 if gb.points > ga.points else 0.5)
        assert f"A {tasks.missed_point(ga)}" in target and f"{gb.points} points" in target.split("\n")[2]
        a_wins += ga.points > gb.points
        b_wins += gb.points > ga.points
    n = a_wins + b_wins
    assert abs(a_wins - n / 2) < 4 * (n / 4) ** 0.5
    assert len(examples) == 600 and len({p for p, _, _ in examples}) < 200  # questions come in groups


@pytest.mark.parametrize("flags", [dict(eft_group=1), dict(eft_group=4, init="some/model"),
                                   dict(eft_group=4, aift="positive")])
def test_a_pairwise_judge_is_refused_where_it_cannot_work(flags):
    """It learns from EFT groups of the task world, and its win shares (0..1) make pairs, never
    the 5s that --aift positive keeps: each is refused before anything trains."""
    with pytest.raises(self_reward.UserError, match="pairwise"):
        self_reward.Config(judge_prompt=judge.PAIRWISE_PROMPT, **flags)
    self_reward.Config(judge_prompt=judge.PAIRWISE_PROMPT, eft_group=4)
    import sft

    with pytest.raises(self_reward.UserError, match="pairwise"):
        sft.SFTConfig(mode="sft", n_eft=10, eft_group=1, judge_prompt=judge.PAIRWISE_PROMPT)
    sft.SFTConfig(mode="pretrain", judge_prompt=judge.PAIRWISE_PROMPT)  # M0's tokenizer corpus: fine


def test_a_pairwise_template_with_a_single_response_slot_is_refused(tmp_path):
    bad = tmp_path / "mixed.txt"
    bad.write_text("Q: {instruction}\nA: {response_a}\nB: {response_b}\nAlso: {response}\n")
    with pytest.raises(ValueError, match="pairwise"):
        judge.load_judge_template(str(bad))


def test_the_loop_judges_candidates_pairwise_and_reports_no_score_histogram(monkeypatch):
    """judge_candidates with a pairwise template: every candidate gets its win share (a judge
    that prefers the oracle's better answer ranks the right one first), the rows are marked
    pairwise, and the iteration's metrics carry no 0..5 histogram or 5-vs-4 share (a win share
    is no score)."""
    import report

    class Source:
        template = judge.load_judge_template(judge.PAIRWISE_PROMPT)
        oracle = staticmethod(lambda prompt, response: tasks.grade(tasks.parse_task(prompt), response).points)

    monkeypatch.setattr(self_reward, "load_policy", lambda cfg, path, device: (None, None))
    monkeypatch.setattr(judge, "sample_responses", FakeJudge(oracle_verdict))
    cfg = self_reward.Config(judge_prompt=judge.PAIRWISE_PROMPT, eft_group=4, n_candidates=3)
    cands = [{"prompt": "Add 2 and 3.", "candidates": ["The sum is 6.", "The sum is 5.", "The sum is 5."],
              "finished": [True] * 3}]
    [row] = self_reward.judge_candidates(cfg, "self", "M1", cands, Source(), ("self", 1))
    assert row["pairwise"] and row["scores"] == [0.0, 1.0, 1.0] and row["oracle"] == [3, 5, 5]
    # one record per ordered comparison, by the first candidate index of each text (A first):
    # the duplicate "5" is not compared again, and the record survives a round trip to JSONL
    assert [(c["a"], c["b"], c["verdicts"]) for c in row["comparisons"]] == [(0, 1, [0.0] * 3), (1, 0, [1.0] * 3)]
    assert all(t == "Better: B" for t in row["comparisons"][0]["texts"]) and json.loads(json.dumps(row)) == row
    pairs = self_reward.preference_pairs(cands * 2, [row, row])
    assert pairs[0]["chosen"] == "The sum is 5." and pairs[0]["rejected"] == "The sum is 6."
    m = report.pair_metrics(cands * 2, [row, row], pairs, {"pair": 2})
    assert m["judge_score_hist"] is None and m["five_vs_four"] is None and m["pair_precision"] == 100.0


def test_judge_eval_with_a_pairwise_template_ranks_by_win_share(monkeypatch):
    """evaluate.judge_eval on the held-out judge set with a pairwise template: a fake judge
    that answers as the oracle does ranks every prompt's responses as the oracle does (τ 1,
    pairwise accuracy 100%); the same judge with its verdicts swapped ranks them backwards."""
    import evaluate

    eft_eval = tasks.eft_eval_set(3, 6, 4)
    template = judge.load_judge_template(judge.PAIRWISE_PROMPT)
    monkeypatch.setattr(judge, "sample_responses", FakeJudge(oracle_verdict))
    out = evaluate.judge_eval(None, None, template, eft_eval, n_samples=1)
    assert out["kendall_tau"] == pytest.approx(1.0) and out["pairwise_accuracy"] == 100.0
    monkeypatch.setattr(judge, "sample_responses", FakeJudge(lambda p, i: oracle_verdict(p, i, flip=True)))
    assert evaluate.judge_eval(None, None, template, eft_eval, n_samples=1)["kendall_tau"] == pytest.approx(-1.0)
