"""Tests for evaluate.py: score parsing, the judge, sampling order and context limits,
instruction following, head-to-head and the reward-modeling metrics.

Metric tests compare against values worked out by hand in the test; sampling tests use a tiny
random model whose weights are redrawn with a large std, so greedy outputs differ clearly
between prompts and batching mistakes cannot hide behind near-tied logits.
"""

import inspect
import itertools
import math
import random

import pytest
import torch

import evaluate
import tasks
from data import decode_response, encode_prompt, train_tokenizer
import judge
import sampling
from evaluate import head_to_head, kendall_tau, reward_modeling, spearman
from judge import parse_failure_rate, parse_score
from model import ModelConfig, Transformer
from sampling import generate



# -----------------------------------------------------------------------------
# parse_score


@pytest.mark.parametrize("text, expected", [
    ("Score: 4", 4.0),
    ("score: 3.5", 3.5),
    ("**Score:** 4/5", 4.0),
    ("SCORE - 2", 2.0),
    ("Score: 4.0", 4.0),
    ("Score: 3 points", 3.0),
    ("Score: 0", 0.0),  # a valid zero must not be mistaken for a failure
    ("Score: 5", 5.0),
    ("+1 relevant: ok\n+0 correct: wrong\nScore: 1", 1.0),
    ("Score: 1 ... then I reconsidered. Score: 4", 4.0),  # the last match wins
    ("Score: 5\nOn reflection, final Score: 0", 0.0),
    ("Score (0-5): 4", 4.0),  # the stated range is not the score
    ("Score [1-5]: 3", 3.0),
    ("Score: 4. That explains the score.", 4.0),  # "score" in prose is no statement
    ("So the score is 3.", 3.0),
])
def test_parse_score_reads_the_last_score(text, expected):
    """parse_score reads the number after the last 'score' (case-insensitive, markdown, '/5' tolerated)."""
    got = parse_score(text)
    assert got == expected and isinstance(got, float)


@pytest.mark.parametrize("text", [
    None, "", "   ", "The response is fine.", "Points: 4", "4/5", "Score:", "Score: none",
    "Score: 7", "Score: 10/5", "Score: 5.5", "Score: 4\nScore: 9",  # last match out of range
    "asdf qwer 12345 !!",
    "Score: 3 ... on reflection, Score: 3-5",  # the final statement is unreadable: not the earlier 3
    "Score: 4\nScore: none", "Score: 2\n**Score:**", "Score: 4\nScore: 4/10",
])
def test_parse_score_failures_are_none(text):
    """No score, garbage or an out-of-range last score gives None, never a number."""
    assert parse_score(text) is None


def test_parse_score_negative_is_out_of_range():
    """'Score: -1' is outside the 0-5 scale -> None (the minus sign must not be dropped to read 1)."""
    assert parse_score("Score: -1") is None
    assert parse_score("Score: -5/5") is None


def test_parse_score_does_not_drop_a_leading_decimal_point():
    """'Score: .5' means 0.5 (or is unparsable), never 5: a '.' before the digits must not be skipped."""
    assert parse_score("Score: .5") in (None, 0.5)


# -----------------------------------------------------------------------------
# Spearman / Kendall


def test_spearman_kendall_hand_cases():
    """Hand-computed Spearman and tau-b with ties, and None for a constant side."""
    # ranks x [3,1.5,1.5], y [2.5,2.5,1] -> rho = 0.75 / 1.5
    assert spearman([5.0, 3.0, 3.0], [4, 4, 2]) == pytest.approx(0.5)
    # pairs: (0,1) tied in y only, (0,2) concordant, (1,2) tied in x only -> 1 / sqrt(2 * 2)
    assert kendall_tau([5.0, 3.0, 3.0], [4, 4, 2]) == pytest.approx(0.5)
    # no ties: d^2 = 2 -> rho = 1 - 6*2 / (4*15); 5 concordant, 1 discordant -> 4/6
    assert spearman([4.5, 4.0, 1.0, 2.0], [5, 3, 1, 0]) == pytest.approx(0.8)
    assert kendall_tau([4.5, 4.0, 1.0, 2.0], [5, 3, 1, 0]) == pytest.approx(2 / 3)
    # a tie inside the range: ranks x [1, 2.5, 2.5, 4] vs [1, 2, 3, 4] -> 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10);
    # tau-b: 5 concordant, 1 pair tied in x -> 5 / sqrt(5 * 6)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1) and kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert spearman([2, 2, 2], [1, 2, 3]) is None and kendall_tau([2, 2, 2], [1, 2, 3]) is None
    assert spearman([1, 2, 3], [4, 4, 4]) is None and kendall_tau([1, 2, 3], [4, 4, 4]) is None


def test_spearman_kendall_match_scipy_with_ties():
    """spearman and kendall_tau (tau-b) agree with scipy on random data with many ties."""
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    checked = 0
    for _ in range(60):
        n = rng.randint(2, 9)
        x = [rng.choice([0, 1, 2, 3, 4, 4.5, 5]) for _ in range(n)]
        y = [rng.randint(0, 3) for _ in range(n)]
        rho, tau = spearman(x, y), kendall_tau(x, y)
        if len(set(x)) < 2 or len(set(y)) < 2:
            assert rho is None and tau is None
            continue
        assert rho == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)
        assert tau == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-9)
        checked += 1
    assert checked > 30


# -----------------------------------------------------------------------------
# reward_modeling

# Four prompts. judge None = no parsable judgment.
JUDGE = [
    [4.5, 13 / 3, 1.0, 2.0],
    [5.0, 3.0, 3.0],
    [4.0, None, 5.0],
    [4.0, 2.0, 2.0],
]
ORACLE = [
    [5, 3, 1, 0],
    [4, 4, 2],
    [5, 2, 0],
    [3, 1, 1],
]


def test_reward_modeling_hand_computed():
    """reward_modeling matches hand-computed pairwise / 5-best / exact / Spearman / Kendall on a small example."""
    # pairwise (oracle-distinct pairs; judge tie or None = wrong):
    #   p1: 6 pairs, all ordered right except (2,3) [judge 1<2, oracle 1>0]      -> 5/6
    #   p2: (0,1) oracle tie skipped; (0,2) right; (1,2) judge tie 3==3 wrong     -> 1/2
    #   p3: (0,1) None, (0,2) judge 4<5 vs oracle 5>0, (1,2) None                 -> 0/3
    #   p4: (0,1), (0,2) right; (1,2) oracle tie skipped                          -> 2/2
    #   total 8 / 13
    # 5-best (judge == 5, every sample a 5): p1 has none (4.5 is not 5); p2 r0 oracle 4 = best (4);
    #   p3 r2 oracle 0 != 5  -> 1 / 2
    # exact match: p1 ranks [4,3,1,2] vs [4,3,2,1] no; p2 [3,1.5,1.5] vs [2.5,2.5,1] no;
    #   p3 has a None; p4 [3,1.5,1.5] vs [3,1.5,1.5] yes -> 1 / 4
    # Spearman: p1 1 - 6*2/(4*15) = 0.8; p2 0.75/1.5 = 0.5; p3 (None dropped) [4,5] vs [5,0] = -1;
    #   p4 1 -> mean 1.3 / 4
    # Kendall tau-b: p1 (5-1)/6 = 2/3; p2 1/sqrt(2*2) = 0.5; p3 -1; p4 2/sqrt(2*2) = 1 -> (7/6) / 4
    r = reward_modeling(JUDGE, ORACLE)
    assert r["n_pairs"] == 13
    assert r["pairwise_accuracy"] == pytest.approx(100 * 8 / 13)
    assert r["n_judged_five"] == 2
    assert r["five_best"] == pytest.approx(50.0)
    assert r["exact_match"] == pytest.approx(25.0)
    assert r["spearman"] == pytest.approx(1.3 / 4)
    assert r["kendall_tau"] == pytest.approx(7 / 24)


def test_reward_modeling_perfect_and_reversed_judges():
    """A judge monotone in the oracle scores 100/100/1/1; a reversed judge scores pairwise 0, Spearman -1, tau -1."""
    perfect = [[0.5 + 0.9 * o for o in os_] for os_ in ORACLE]
    r = reward_modeling(perfect, ORACLE)
    assert r["pairwise_accuracy"] == 100 and r["exact_match"] == 100
    assert r["spearman"] == pytest.approx(1) and r["kendall_tau"] == pytest.approx(1)
    assert r["five_best"] == 100  # every response judged 5 is its prompt's best
    reverse = [[5.0 - o for o in os_] for os_ in ORACLE]
    r = reward_modeling(reverse, ORACLE)
    assert r["pairwise_accuracy"] == 0 and r["exact_match"] == 0
    assert r["spearman"] == pytest.approx(-1) and r["kendall_tau"] == pytest.approx(-1)
    # a judge that scores every response alike ranks nothing: correlation 0, not left out
    r = reward_modeling([[5.0] * len(os_) for os_ in ORACLE], ORACLE)
    assert r["spearman"] == 0 and r["kendall_tau"] == 0 and r["pairwise_accuracy"] == 0
    # a judge that never parses gets no credit anywhere
    r = reward_modeling([[None] * len(os_) for os_ in ORACLE], ORACLE)
    assert r["pairwise_accuracy"] == 0 and r["exact_match"] == 0 and r["n_judged_five"] == 0
    assert r["spearman"] is None and r["kendall_tau"] is None and r["five_best"] is None  # nothing to measure


# -----------------------------------------------------------------------------
# head_to_head


def test_head_to_head_hand_example():
    """head_to_head counts per-prompt win/tie/loss of A vs B as percentages summing to 100."""
    a = [5, 3, 2, 0, 4]
    b = [4, 3, 5, 0, 1]
    # wins: 5>4, 4>1 (2); losses: 2<5 (1); ties: 3=3, 0=0 (2)
    h = head_to_head(a, b)
    assert h == pytest.approx({"win": 40.0, "tie": 40.0, "loss": 20.0})
    assert h["win"] + h["tie"] + h["loss"] == pytest.approx(100)
    back = head_to_head(b, a)
    assert back == pytest.approx({"win": 20.0, "tie": 40.0, "loss": 40.0})


# -----------------------------------------------------------------------------
# judge() with a stubbed sampler


SAMPLE_RESPONSES_SIGNATURE = inspect.signature(sampling.sample_responses)


def _stub_sampler(monkeypatch, reply):
    """Replace sample_responses (in judge.py and evaluate.py); `reply(prompts, n, kwargs)` gives the texts.
    Returns the call log."""
    sig = SAMPLE_RESPONSES_SIGNATURE
    calls = []

    def stub(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        calls.append(a)
        return reply(a["prompts"], a["n"], a)

    monkeypatch.setattr(judge, "sample_responses", stub)
    monkeypatch.setattr(evaluate, "sample_responses", stub)
    return calls


def test_judge_averages_parsable_samples_only(monkeypatch):
    """judge(): score = mean of the parsable samples, None if none parse; parse_failure_rate counts unparsable samples."""
    template = judge.load_judge_template()
    items = [("Compute 1 + 2.", "The sum is 3."), ("Sort: 3 1", "Sorted: 1 3."), ("Compute 2 + 2.", "Five.")]
    texts = [
        ["+1 ...\nScore: 4", "Score: 5", "I cannot decide."],
        ["nothing here", None, ""],
        ["Score: 2", "Score: 3", "Score: 7"],
    ]
    prompts = [judge.fill(template, i, r) for i, r in items]
    by_prompt = dict(zip(prompts, texts))
    calls = _stub_sampler(monkeypatch, lambda ps, n, a: [list(by_prompt[p]) for p in ps])
    out = judge.score(None, None, template, items, n_samples=3, max_new_tokens=77)
    assert calls[0]["prompts"] == prompts and calls[0]["n"] == 3 and calls[0]["max_new_tokens"] == 77
    assert [j.score for j in out] == [pytest.approx(4.5), None, pytest.approx(2.5)]
    assert [j.samples for j in out] == [[4.0, 5.0, None], [None, None, None], [2.0, 3.0, None]]
    assert [j.texts for j in out] == texts
    assert parse_failure_rate(out) == pytest.approx(5 / 9)
    assert parse_failure_rate([]) == 0


def test_judge_eval_with_oracle_judge(monkeypatch):
    """judge_eval regroups per-response judgments by prompt: a judge that writes the oracle's points ranks perfectly."""
    template = judge.load_judge_template()
    eft_eval = tasks.eft_eval_set(11, 4, 3)
    points_of = {judge.fill(template, t.prompt, r): p for t, rs, ps in eft_eval for r, p in zip(rs, ps)}
    _stub_sampler(monkeypatch, lambda ps, n, a: [[f"Score: {points_of[p]}"] * n for p in ps])
    r = evaluate.judge_eval(None, None, template, eft_eval, n_samples=2)
    assert r["pairwise_accuracy"] == 100 and r["exact_match"] == 100 and r["parse_failure_rate"] == 0
    assert r["n_pairs"] == sum(1 for _, _, ps in eft_eval for a, b in itertools.combinations(ps, 2) if a != b)


# -----------------------------------------------------------------------------
# instruction_following with a stubbed sampler


def test_instruction_following_gold_scores_five_and_wrong_scores_lower(monkeypatch):
    """Gold responses give oracle_mean 5 / exact_correct 1; wrong or missing (None) responses score lower, in order."""
    eval_tasks = tasks.eval_prompts(3, 12)
    gold = {t.prompt: t.gold for t in eval_tasks}
    calls = _stub_sampler(monkeypatch, lambda ps, n, a: [[gold[p]] * n for p in ps])
    r = evaluate.instruction_following(None, None, eval_tasks, temperature=0.0)
    assert calls[0]["n"] == 1 and calls[0]["prompts"] == [t.prompt for t in eval_tasks]
    assert r["oracle_mean"] == 5 and r["exact_correct"] == 1
    assert r["score_hist"] == [0, 0, 0, 0, 0, 12] and r["responses"] == [t.gold for t in eval_tasks]

    _stub_sampler(monkeypatch, lambda ps, n, a: [["I do not know."] * n for p in ps])
    r = evaluate.instruction_following(None, None, eval_tasks)
    assert r["oracle_mean"] == 0 and r["exact_correct"] == 0 and r["score_hist"][0] == 12

    # every other task answered with gold, the rest unanswered (too long for the context: None,
    # left out of every statistic: an unanswered prompt is never scored)
    half = {t.prompt: (t.gold if i % 2 == 0 else None) for i, t in enumerate(eval_tasks)}
    _stub_sampler(monkeypatch, lambda ps, n, a: [[half[p]] * n for p in ps])
    r = evaluate.instruction_following(None, None, eval_tasks)
    assert r["points"] == [5 if i % 2 == 0 else None for i in range(12)] and r["unanswered"] == 6
    assert r["oracle_mean"] == 5 and r["exact_correct"] == 1
    assert r["mean_length_chars"] == pytest.approx(sum(len(t.gold) for t in eval_tasks[0::2]) / 6)


# -----------------------------------------------------------------------------
# sample_responses with a real (tiny, random) model


@pytest.fixture(scope="module")
def tiny():
    texts = [p + "\n" + r for p, r in tasks.ift_seed(1, 150)]
    tok = train_tokenizer(texts, 300)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(
        vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, max_seq_len=128,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.5 * noise)
    return model.eval(), tok


def _greedy_one(model, tok, prompt, max_new_tokens):
    """The greedy reply to one prompt, alone in its batch (no padding), as sample_responses reports it."""
    g = generate(model, [encode_prompt(tok, prompt)], max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                 temperature=0)
    text = decode_response(tok, g.tokens[0])
    return text if bool(g.finished[0]) else text + " …"


def test_sample_responses_keeps_input_order(tiny):
    """Length-sorted batching must not scramble outputs: out[i] is prompts[i]'s reply (greedy, checked one by one)."""
    model, tok = tiny
    prompts = [
        "Reverse this list: cat dog egg hat pen cow milk star",
        "Compute 3 + 4.",
        "Sort these numbers from smallest to largest: 9 2 7",
        "Count the items: bed cup",
        "What are the last 2 words in apple, egg, cup, hat, ball, bus?",
    ]
    lengths = [len(encode_prompt(tok, p)) for p in prompts]
    assert lengths != sorted(lengths) and len(set(lengths)) == len(lengths)
    expected = [_greedy_one(model, tok, p, 10) for p in prompts]
    assert len(set(expected)) == len(expected)  # distinct, so a mix-up would show
    out = sampling.sample_responses(model, tok, prompts, n=2, temperature=0, top_p=1.0, max_new_tokens=10,
                                    batch_size=3)
    assert len(out) == len(prompts) and all(len(o) == 2 for o in out)
    assert out == [[e, e] for e in expected]


def test_sample_responses_skips_prompts_that_do_not_fit(tiny, capsys):
    """A prompt longer than max_seq_len - max_new_tokens gets n Nones (not cut); one exactly at the limit is answered."""
    model, tok = tiny
    max_new = 8
    limit = model.config.max_seq_len - max_new
    base = len(encode_prompt(tok, "Sort: "))
    at_limit = "Sort: " + "7" * (limit - base)  # digits are one token each
    over = "Sort: " + "7" * (limit - base + 1)
    assert len(encode_prompt(tok, at_limit)) == limit and len(encode_prompt(tok, over)) == limit + 1
    prompts = ["Compute 3 + 4.", over, at_limit, "Count the items: bed cup"]
    out = sampling.sample_responses(model, tok, prompts, n=3, temperature=0.7, max_new_tokens=max_new,
                                    generator=torch.Generator().manual_seed(0))
    assert out[1] == [None, None, None]
    for i in (0, 2, 3):
        assert all(isinstance(s, str) for s in out[i]), i
    assert "1 of 4 prompts" in capsys.readouterr().out
    # sampled (temperature > 0) with a seeded generator: repeatable
    again = sampling.sample_responses(model, tok, prompts, n=3, temperature=0.7, max_new_tokens=max_new,
                                      generator=torch.Generator().manual_seed(0))
    assert again == out


def test_judged_head_to_head_needs_both_judgings_to_agree(monkeypatch):
    """A frozen judge's head-to-head: a win needs both independent judging passes to prefer A;
    a disagreement, equal means or an unparsable judgment is a tie, never a win."""
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    a = ["a0", "a1", "a2", "a3", "a4"]
    b = ["b0", "b1", "b2", "b3", "b4"]
    # score each response gets in the first and in the second pass
    first = {"a0": 5, "b0": 1, "a1": 1, "b1": 4, "a2": 4, "b2": 2, "a3": 3, "b3": 3, "a4": 5, "b4": None}
    second = {"a0": 4, "b0": 2, "a1": 2, "b1": 5, "a2": 1, "b2": 3, "a3": 3, "b3": 3, "a4": 5, "b4": 0}
    calls = []

    def fake_judge(model, tok, template, items, n_samples=3, **kw):
        table = first if not calls else second
        calls.append([r for _, r in items])
        return [judge.Judgment(table[r], [table[r]], ["..."]) for _, r in items]

    monkeypatch.setattr(judge, "score", fake_judge)
    h = evaluate.judged_head_to_head(None, None, "t", prompts, a, b)
    # p0: A wins twice -> win; p1: B twice -> loss; p2: A then B -> tie; p3: equal -> tie;
    # p4: B unparsable in the first pass -> tie
    assert (h["win"], h["tie"], h["loss"]) == (20.0, 60.0, 20.0)
    assert len(calls) == 2 and all(sorted(c) == sorted(a + b) for c in calls)  # every response, both passes
    assert h["parse_failure_rate"] == pytest.approx(100 / 20)


def test_judged_head_to_head_missing_response_is_a_tie_not_judged(monkeypatch):
    """A response that does not exist (its prompt did not fit) is never judged and never wins."""
    def fake_judge(model, tok, template, items, n_samples=3, **kw):
        return [judge.Judgment(5.0 if r == "a" else 0.0, [5.0], ["..."]) for _, r in items]

    monkeypatch.setattr(judge, "score", fake_judge)
    h = evaluate.judged_head_to_head(None, None, "t", ["p0", "p1"], ["a", None], ["b", "b"])
    assert (h["win"], h["tie"], h["loss"]) == (50.0, 50.0, 0.0)


# -----------------------------------------------------------------------------
# Uncertainty: paired bootstrap, sign test


def test_sign_test_hand_values():
    """Exact two-sided binomial: 9 wins 1 loss -> 2 * (1 + 10) / 1024; ties are not counted."""
    assert evaluate.sign_test(9, 1) == pytest.approx(22 / 1024)
    assert evaluate.sign_test(5, 5) == 1.0 and evaluate.sign_test(0, 0) == 1.0
    assert evaluate.sign_test(0, 6) == pytest.approx(2 / 64)


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_prompts():
    """The interval holds the sample mean; 4x the prompts gives about half the width (1/sqrt n);
    a constant sample has a zero-width interval."""
    rng = random.Random(0)
    small = [rng.choice([0, 1, 2, 5]) for _ in range(100)]
    m, lo, hi = evaluate.bootstrap_mean(small)
    assert lo < m < hi and m == pytest.approx(sum(small) / 100)
    m4, lo4, hi4 = evaluate.bootstrap_mean(small * 4)
    assert 0.4 < (hi4 - lo4) / (hi - lo) < 0.6
    assert evaluate.bootstrap_mean([3.0] * 50) == (3.0, 3.0, 3.0)


def test_compare_is_paired():
    """B = A + 1 on every prompt: unpaired intervals of two noisy score lists would overlap, the
    paired difference is exactly 1 with a zero-width interval; every prompt is a loss for A."""
    rng = random.Random(1)
    a = [rng.randint(0, 4) for _ in range(60)]
    c = evaluate.compare(a, [x + 1 for x in a])
    assert c["mean_diff"] == -1 and c["mean_diff_ci"] == [-1, -1]
    assert c["loss"] == 100 and c["margin"] == -100 and c["sign_test_p"] < 1e-15


def test_judged_head_to_head_passes_temperature_and_top_p(monkeypatch):
    """--temperature and --top_p reach the judge's sampling (they were ignored)."""
    seen = []

    def fake_judge(*a, **kw):
        seen.append((kw["temperature"], kw["top_p"]))
        return [judge.Judgment(3.0, [3.0], ["Score: 3"])] * len(a[3])

    monkeypatch.setattr(judge, "score", fake_judge)
    evaluate.judged_head_to_head(None, None, "{instruction}{response}", ["p"], ["a"], ["b"],
                                 temperature=1.3, top_p=0.5)
    assert seen == [(1.3, 0.5), (1.3, 0.5)]
