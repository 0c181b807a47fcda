"""Tests for self_reward.py: the pure steps of an iteration (pairs, the prompt filter, the
few-shot prompt, pair statistics) and the whole loop end to end at micro size, with resume."""

import json
import os

import pytest
import torch

import report
import self_reward
import tasks
import self_reward_world
from self_reward import build_pairs
from self_reward_world import prompt_verdict

# -----------------------------------------------------------------------------
# build_pairs


@pytest.mark.parametrize("responses, scores, finished, expected", [
    (["a", "b", "c", "d"], [3.0, 5.0, 1.0, 4.0], None, (1, 2)),             # best vs worst
    (["a", "b", "c", "d"], [None, 4.5, None, 2.0], None, (1, 3)),           # Nones ignored
    (["a", "b", "c", "d"], [None, 4.0, None, None], None, "too few scores"),
    (["a", "b", "c", "d"], [None] * 4, None, "too few scores"),
    (["a", "b", "c", "d"], [3.0, 3.0, 3.0, 3.0], None, "tie"),               # no preference
    (["a", "b", "c", "d"], [3.0, None, 3.0, None], None, "tie"),
    (["same", "x", "same ", "y"], [5.0, 3.0, 1.0, 3.0], None, "identical"),  # judge noise, not a preference
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [True, False, True, True], (3, 2)),  # cut-off one never chosen
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [True, True, False, True], (1, 2)),  # ... but may be rejected
    (["a", "b", "c", "d"], [2.0, 5.0, 1.0, 4.0], [False] * 4, "none finished"),
    (["a", "b"], [0.0, 1 / 3], None, (1, 0)),                                 # means of 3 samples, a 0 is a score
])
def test_build_pairs(responses, scores, finished, expected):
    assert build_pairs(responses, scores, finished) == expected


# -----------------------------------------------------------------------------
# The prompt filter and the few-shot prompt


def test_prompt_verdict_on_hand_made_generations():
    """Kept only when the world reads a task that is new, not held out, of sane length."""
    train = tasks.sample_task(__import__("random").Random(0), "add", split="train")
    held = next(t for t in tasks.eval_prompts(3, 50) if t.family == "add")
    a, b = held.args
    seen = {tasks.task_key(train)}
    assert prompt_verdict("Sing me a song about the sea.", seen) == "not a task"
    assert prompt_verdict("Add 1", seen) == "length"
    assert prompt_verdict("Sort " + "1 " * 150, seen) == "length"
    assert prompt_verdict(f"Add {b} and {a}.", seen) == "held out"  # the swapped twin is held out too
    assert prompt_verdict(train.prompt, seen) == "seen"
    # another phrasing of a seen task is the same task
    a2, b2 = train.args
    assert prompt_verdict(f"Compute {b2} + {a2}.", seen) == "seen"
    fresh = next(t for t in (tasks.sample_task(__import__("random").Random(i), "reverse", split="train")
                             for i in range(100)) if tasks.task_key(t) not in seen)
    assert prompt_verdict(fresh.prompt, seen) == "kept"


def test_fewshot_text_is_a_numbered_list_ending_at_the_next_number():
    text = self_reward_world.fewshot_text(["Add 1 and 2.", "Reverse this list: 3 4 5"], "Tasks:")
    assert text == "Tasks:\n1. Add 1 and 2.\n2. Reverse this list: 3 4 5\n3."


def load_script(name):
    """A module from scripts/ (not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_diagnostics_count_only_pairs_the_oracle_tells_apart():
    """Within-prompt agreement: oracle ties are skipped, judge ties counted apart, unscored
    (None) candidates left out; the pair verdict follows build_pairs (first best, first worst)."""
    diag = load_script("judge_diagnostics")
    oracle = [5, 2, 2, 0, 3]
    scores = [4.0, 4.0, 1.0, 2.0, None]
    # pairs the oracle tells apart among the scored 0..3: (0,1) tie, (0,2) agree, (0,3) agree,
    # (1,3) agree, (2,3) disagree; (1,2) is an oracle tie
    assert diag.agreement(oracle, scores) == {"agree": 3, "disagree": 1, "tie": 1}
    row = {"candidates": ["a", "b", "c", "d", "e"], "finished": [True] * 5}
    assert diag.best_vs_worst(row, oracle, scores) == "right"  # best = 0 (first of the 4.0s), worst = 2
    assert diag.best_vs_worst(row, [0, 2, 5, 0, 3], scores) == "reversed"
    assert diag.best_vs_worst(row, [2, 2, 2, 0, 3], scores) == "oracle tie"
    assert diag.best_vs_worst(row, oracle, [3.0, None, None, None, 3.0]) == "tie"


def test_judge_diagnostics_read_a_pairwise_runs_two_orders():
    """From the per-comparison records: verdict counts by position, and per candidate pair
    whether its two orders name one winner (0 beats 1 as A and as B), contradict each other
    (0 wins as A, 2 wins as A: a first-position judge), or leave it undecided (a "same" mean
    or no readable verdict)."""
    diag = load_script("judge_diagnostics")
    comparisons = [
        {"a": 0, "b": 1, "verdicts": [1.0, 1.0, 0.0]}, {"a": 1, "b": 0, "verdicts": [0.0, 0.0, 0.0]},  # agree
        {"a": 0, "b": 2, "verdicts": [1.0, 1.0, 1.0]}, {"a": 2, "b": 0, "verdicts": [1.0, None, 1.0]},  # contradict
        {"a": 1, "b": 2, "verdicts": [0.5, 1.0, 0.0]}, {"a": 2, "b": 1, "verdicts": [None, None, None]},  # undecided
    ]
    out = diag.order_report([{"comparisons": comparisons}, {"scores": [1.0]}])
    assert out["orders"] == {"agree": 1, "contradict": 1, "undecided": 1}
    assert out["verdicts"] == {"A": 8, "B": 5, "same": 1, "unreadable": 4}


def test_judge_diagnostics_vote_shares():
    """Self-consistency: a candidate's share of the voters giving its answer (after
    normalisation), an extra voter (the greedy answer) counted but not scored, and the judge
    only breaking the vote's ties."""
    diag = load_script("judge_diagnostics")
    responses = ["Sorted: 1, 2.", "sorted:  1, 2", "Sorted: 2, 1.", "SORTED: 1, 2!"]
    assert self_reward.vote_shares(responses) == [0.75, 0.75, 0.25, 0.75]
    assert self_reward.vote_shares(responses, ["Sorted: 2, 1"]) == [0.6, 0.6, 0.4, 0.6]
    ranked = diag.with_tiebreak([0.75, 0.75, 0.25, 0.75], [1.0, 3.0, 5.0, None])
    assert ranked[3] is None
    assert ranked[1] > ranked[0] > ranked[2]  # the vote first (5.0 from the judge does not save 2, 1)


def test_vote_pair_judge_prefers_the_majority_and_drops_ties():
    """--pair_judge vote: the chosen response is the most common answer, the rejected the
    rarest; all-different and all-alike prompts give no pair; the oracle's points are kept
    for measuring only (a wrong majority is still chosen)."""
    class Source:
        def oracle(self, prompt, response):
            return 5 if "1, 2" in response else 0

    cfg = self_reward.Config(n_candidates=4)
    cands = [
        {"prompt": "p0", "candidates": ["Sorted: 1, 2.", "sorted: 1, 2", "Sorted: 2, 1.", "Sorted: 1, 2"]},
        {"prompt": "p1", "candidates": ["Sorted: 2, 1.", "Sorted: 2, 1.", "Sorted: 2, 1.", "Sorted: 1, 2."]},
        {"prompt": "p2", "candidates": ["a", "b", "c", "d"]},
        {"prompt": "p3", "candidates": ["a.", "A", "a", "a!"]},
    ]
    for c in cands:
        c["finished"] = [True] * 4
    judgments = self_reward.judge_candidates(cfg, "vote", "", cands, Source(), ("vote", 1))
    assert judgments[0]["scores"] == [0.75, 0.75, 0.25, 0.75] and judgments[0]["oracle"] == [5, 5, 0, 5]
    assert [self_reward.build_pairs(c["candidates"], j["scores"], c["finished"])
            for c, j in zip(cands, judgments)] == [(0, 2), (0, 3), "tie", "tie"]
    pairs = self_reward.preference_pairs(cands, judgments)
    assert [(p["chosen_oracle"], p["rejected_oracle"]) for p in pairs] == [(5, 0), (0, 5)]


@pytest.mark.parametrize("candidate_temperature, expected", [(0.0, 0.7), (1.3, 1.3)])
def test_candidates_sample_at_the_candidate_temperature(monkeypatch, candidate_temperature, expected):
    """--candidate_temperature sets the T of the N candidates only (0 falls back to
    --temperature, which the judge and the evaluation keep using)."""
    seen = {}

    def fake_sample(model, tok, texts, n, temperature, *args, **kw):
        seen["T"] = temperature
        return [["x"] * n for _ in texts], [[True] * n for _ in texts]

    monkeypatch.setattr(self_reward, "load_policy", lambda cfg, path, device: (None, None))
    monkeypatch.setattr(self_reward, "sample_responses", fake_sample)
    cfg = self_reward.Config(temperature=0.7, candidate_temperature=candidate_temperature, device="cpu")
    rows = self_reward.sample_candidates(cfg, "", [{"prompt": "p"}], ("vote", 1))
    assert seen["T"] == expected and rows[0]["candidates"] == ["x"] * cfg.n_candidates


def test_pair_metrics_precision_and_saturation():
    """Pair precision counts pairs whose chosen response the oracle also ranks higher; 5-vs-4
    counts pairs of a top score against a near-top one (judge saturation)."""
    pairs = [dict(chosen="aa", rejected="b", chosen_score=5.0, rejected_score=4.0, chosen_oracle=5, rejected_oracle=4),
             dict(chosen="a", rejected="bbb", chosen_score=4.0, rejected_score=1.0, chosen_oracle=2, rejected_oracle=2),
             dict(chosen="a", rejected="b", chosen_score=3.0, rejected_score=0.0, chosen_oracle=0, rejected_oracle=3),
             dict(chosen="a", rejected="b", chosen_score=5.0, rejected_score=2.0, chosen_oracle=4, rejected_oracle=1)]
    judgments = [{"oracle": [p["chosen_oracle"], p["rejected_oracle"]], "samples": [[5.0, None], [4.0, 4.0]]}
                 for p in pairs]
    m = report.pair_metrics([{}] * 5, judgments, pairs, {"pair": 4, "tie": 1})
    assert m["pair_precision"] == 50 and m["pair_oracle_tie"] == 25 and m["pair_reversed"] == 25
    assert m["five_vs_four"] == 25
    assert m["pair_yield"] == 80 and m["tie_rate"] == 20
    assert m["parse_failure_rate"] == 25 and m["judge_score_hist"] == [0, 0, 0, 0, 8, 4]
    assert m["chosen_length"] == 1.25 and m["rejected_length"] == 1.5


# -----------------------------------------------------------------------------
# The whole loop, micro-sized: M0 -> SFT -> M1 -> M2


def micro_cfg(run_dir, **kw):
    return self_reward.Config(**{**self_reward.PRESETS["micro"], "preset": "micro", "run_dir": str(run_dir),
                                 "device": "cpu", **kw})


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """One micro run (about a minute on one core), shared by the tests below."""
    cfg = micro_cfg(tmp_path_factory.mktemp("micro") / "run")
    self_reward.main(cfg)
    return cfg


ITER_FILES = ["prompts.jsonl", "prompt_filter.json", "candidates.jsonl", "judgments.jsonl", "pairs.jsonl",
              "metrics.json", "metrics.jsonl", "eval.json", "eval_responses.jsonl", "time.json"]


def test_micro_run_writes_every_artifact(micro_run):
    d = micro_run.run_dir
    for stage in ("M0", "SFT", "M1", "iter_1"):
        assert os.path.exists(os.path.join(d, stage, "model", "model.safetensors")), stage
        ev = json.load(open(os.path.join(d, stage, "eval.json")))
        assert len(ev["sampled"]["points"]) == micro_run.n_eval
        assert ("judge" in ev) == (stage != "M0")  # M0 was never taught to judge
    for f in ITER_FILES:
        assert os.path.exists(os.path.join(d, "iter_1", f)), f
    cands = [json.loads(x) for x in open(os.path.join(d, "iter_1", "candidates.jsonl"))]
    judg = [json.loads(x) for x in open(os.path.join(d, "iter_1", "judgments.jsonl"))]
    pairs = [json.loads(x) for x in open(os.path.join(d, "iter_1", "pairs.jsonl"))]
    assert len(cands) == len(judg) > 0 and all(len(c["candidates"]) == micro_run.n_candidates for c in cands)
    for j in judg:  # a candidate's score is the mean of its parsable judge samples, never a parse failure
        for s, samples in zip(j["scores"], j["samples"]):
            valid = [x for x in samples if x is not None]
            assert s == (sum(valid) / len(valid) if valid else None)
    for p in pairs:  # the pairs are build_pairs' choice, and the oracle fields are the oracle's
        task = tasks.parse_task(p["prompt"])
        assert p["chosen_score"] > p["rejected_score"]
        assert p["chosen_oracle"] == tasks.grade(task, p["chosen"]).points
    for c in cands:  # new prompts: readable tasks, none held out
        assert not tasks.is_heldout(tasks.parse_task(c["prompt"]))
    report = open(os.path.join(d, "report.md")).read()
    for row in ("| M0 |", "| SFT |", "| M1 |", "| M2 |", "| M2 | M1 |", "pair precision"):
        assert row in report, row


def test_rerun_reuses_every_finished_stage(micro_run, capsys):
    stamp = os.path.getmtime(os.path.join(micro_run.run_dir, "iter_1", "model", "model.safetensors"))
    capsys.readouterr()
    self_reward.main(micro_run)
    out = capsys.readouterr().out
    assert out.count("reusing it") == 4  # M0, SFT, M1, iter_1
    assert os.path.getmtime(os.path.join(micro_run.run_dir, "iter_1", "model", "model.safetensors")) == stamp


def test_killed_mid_iteration_resumes_and_gives_the_same_result(micro_run, tmp_path, monkeypatch):
    """Kill the run in the DPO step of iteration 1, rerun: the finished steps (prompts,
    candidates, judgments) are not redone, and M2 equals the uninterrupted run's M2."""
    import shutil

    import dpo
    from safetensors.torch import load_file

    run = tmp_path / "run"
    run.mkdir()
    for stage in ("M0", "SFT", "M1"):  # the same M0..M1 as the uninterrupted run
        shutil.copytree(os.path.join(micro_run.run_dir, stage), run / stage)
    shutil.copy(os.path.join(micro_run.run_dir, "config.json"), run / "config.json")
    cfg = micro_cfg(run)
    real_dpo = dpo.main

    def killed(c):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(dpo, "main", killed)
        with pytest.raises(KeyboardInterrupt):
            self_reward.main(cfg)
    it = run / "iter_1"
    stamps = {f: os.path.getmtime(it / f) for f in ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl")}
    monkeypatch.setattr(dpo, "main", real_dpo)
    self_reward.main(cfg)
    assert {f: os.path.getmtime(it / f) for f in stamps} == stamps
    for f in ("prompts.jsonl", "candidates.jsonl", "judgments.jsonl", "pairs.jsonl"):
        assert (it / f).read_text() == open(os.path.join(micro_run.run_dir, "iter_1", f)).read(), f
    a = load_file(os.path.join(micro_run.run_dir, "iter_1", "model", "model.safetensors"))
    b = load_file(str(it / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
