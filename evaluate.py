"""Evaluation: the oracle's grade, head-to-heads with their uncertainty, and the papers'
reward-modeling metrics. One implementation of each measurement, used by self_reward.py's loop
and its tables and by this file's command line:

  instruction_following   oracle mean score, exact-correct rate (task world)
  head_to_head, compare   win / tie / loss of model A vs model B per prompt, with a paired
                          bootstrap interval and a sign test
  judged_head_to_head     the same without an oracle: a frozen judge model decides (user data)
  reward_modeling         how well a judge's scores rank responses against the oracle's
  judge_eval              a model as judge on the held-out judge set (judge.py samples it)

    python evaluate.py --model runs/default/M1/model                       # task world
    python evaluate.py --model runs/default/M1/model --baseline runs/default/SFT/model
    python evaluate.py --model A --baseline B --judge C --data prompts.jsonl  # user data
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import judge
import tasks
from checkpoint import load_checkpoint
from data import UserError
from sampling import sample_responses
from train_utils import SamplingFlags, check_ranges, cli, get_device, sampling_ranges


# -----------------------------------------------------------------------------
# Instruction following (the oracle plays the human / GPT-4 evaluator)


def instruction_following(model, tok, eval_tasks: list, temperature: float = 0.7, generator=None,
                          max_new_tokens: int = 48, batch_size: int = 64, top_p: float = 0.9, top_k: int = 0) -> dict:
    """Oracle grades of one response per held-out task. temperature 0 = greedy.
    exact-correct = the answer is right (criterion 4 met), whatever the wording. A prompt that
    does not fit the context with the token budget is not answered: its points are None and it
    is left out of every statistic (counted as "unanswered"), never scored 0."""
    responses = [r[0] for r in sample_responses(model, tok, [t.prompt for t in eval_tasks], 1,
                                                temperature, top_p if temperature > 0 else 1.0,
                                                max_new_tokens, batch_size, generator, "instruction following",
                                                top_k=top_k if temperature > 0 else 0)]
    points = [tasks.grade(t, r).points if r is not None else None for t, r in zip(eval_tasks, responses)]
    answered = [p for p in points if p is not None]
    if not answered:
        raise UserError(f"no held-out prompt fits the context with a budget of {max_new_tokens} new tokens")
    return {
        "oracle_mean": sum(answered) / len(answered),
        "exact_correct": sum(p >= 4 for p in answered) / len(answered),
        "score_hist": [answered.count(k) for k in range(6)],
        "mean_length_chars": sum(len(r) for r in responses if r is not None) / len(answered),
        "unanswered": len(points) - len(answered),
        "points": points,
        "responses": responses,
    }


def fmt(value, spec: str = ".1f") -> str:
    """A number for a report, or "n/a" for a metric with nothing to measure (None)."""
    return "n/a" if value is None else format(value, spec)


def paired(points_a: list, points_b: list) -> tuple[list, list]:
    """The prompts both models answered (an unanswered prompt's points are None)."""
    both = [(a, b) for a, b in zip(points_a, points_b) if a is not None and b is not None]
    return [a for a, _ in both], [b for _, b in both]


def head_to_head(points_a: list[float], points_b: list[float]) -> dict:
    """Per prompt, the higher score wins. Returns win/tie/loss of A against B in percent, over
    the prompts both answered."""
    points_a, points_b = paired(points_a, points_b)
    n = len(points_a)
    win = sum(a > b for a, b in zip(points_a, points_b))
    loss = sum(a < b for a, b in zip(points_a, points_b))
    return {"win": 100 * win / n, "tie": 100 * (n - win - loss) / n, "loss": 100 * loss / n}


def bootstrap_mean(values, n_resamples: int = 10000, seed: int = 0, level: float = 0.95):
    """(mean, low, high): the mean of per-prompt values and its percentile bootstrap interval,
    prompts resampled with replacement. Fed per-prompt DIFFERENCES of two models on the same
    prompts, it is the paired bootstrap: a prompt's two scores move together."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(x.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability of a split at least this uneven between wins
    and losses if each were a coin flip (ties carry no information and are left out)."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def compare(points_a: list[float], points_b: list[float], seed: int = 0) -> dict:
    """Model A against model B on the same prompts, with uncertainty (one seed is noise here):
    the mean score difference and the win - loss margin, each with a paired-bootstrap 95%
    interval, and the sign test's p-value for wins vs losses."""
    points_a, points_b = paired(points_a, points_b)
    diffs = [a - b for a, b in zip(points_a, points_b)]
    signs = [(d > 0) - (d < 0) for d in diffs]
    h = head_to_head(points_a, points_b)
    d, d_lo, d_hi = bootstrap_mean(diffs, seed=seed)
    m, m_lo, m_hi = bootstrap_mean(signs, seed=seed)
    return {**h, "mean_diff": d, "mean_diff_ci": [d_lo, d_hi], "margin": 100 * m,
            "margin_ci": [100 * m_lo, 100 * m_hi],
            "sign_test_p": sign_test(signs.count(1), signs.count(-1))}


def judged_head_to_head(judge_model, judge_tok, template: str, prompts: list[str],
                        responses_a: list, responses_b: list, n_samples: int = 3,
                        generator=None, max_new_tokens: int = 64, batch_size: int = 64,
                        temperature: float = 0.7, top_p: float = 0.9, top_k: int = 0) -> dict:
    """Head-to-head without an oracle, for user data: a third, frozen checkpoint judges both
    responses to each prompt with judge_prompt.txt (n_samples each, averaged) and the higher
    mean wins. The judge prompt is pointwise (one response per prompt), so there is no
    position to swap; the "both orders" rule becomes: every response is judged in two
    independent passes, and a prompt is a win only when both passes' verdicts agree. A disagreement, equal means, a
    response with no parsable judgment, or a missing response (its prompt did not fit) is a
    tie: a judge failure is never a win. A judge that scored no prompt's two responses gives no
    verdict at all ("verdict": False, win/tie/loss None), never 100% ties."""
    n = len(prompts)
    a_items = [(p, r if r is not None else "") for p, r in zip(prompts, responses_a)]
    b_items = [(p, r if r is not None else "") for p, r in zip(prompts, responses_b)]
    kw = dict(n_samples=n_samples, generator=generator, max_new_tokens=max_new_tokens, batch_size=batch_size,
              temperature=temperature, top_p=top_p, top_k=top_k)
    passes = [judge.score(judge_model, judge_tok, template, a_items + b_items, desc=f"judging, pass {k + 1}/2", **kw)
              for k in range(2)]
    outcome = [0] * n  # per prompt: +1 A wins, -1 B wins, 0 tie
    judged = 0  # prompts where both passes scored both responses
    for i in range(n):
        if responses_a[i] is None or responses_b[i] is None:
            continue  # nothing to compare: a tie
        verdicts = []
        for js in passes:
            a, b = js[i].score, js[n + i].score
            verdicts.append(None if a is None or b is None else (a > b) - (a < b))
        judged += None not in verdicts
        if verdicts in ([1, 1], [-1, -1]):
            outcome[i] = verdicts[0]
    failures = 100 * judge.parse_failure_rate(passes[0] + passes[1])
    if not judged:  # the judge never scored both responses of a prompt: it said nothing, not "tie"
        return {"verdict": False, "win": None, "tie": None, "loss": None, "margin": None, "margin_ci": None,
                "sign_test_p": None, "judged_prompts": 0, "parse_failure_rate": failures}
    win, loss = outcome.count(1), outcome.count(-1)
    m, lo, hi = bootstrap_mean(outcome)
    return {"verdict": True, "win": 100 * win / n, "tie": 100 * (n - win - loss) / n, "loss": 100 * loss / n,
            "margin": 100 * m, "margin_ci": [100 * lo, 100 * hi], "sign_test_p": sign_test(win, loss),
            "judged_prompts": judged, "parse_failure_rate": failures}


# -----------------------------------------------------------------------------
# Reward modeling (the model as judge, against the oracle's ranking)


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n with ties given their average rank (for Spearman)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def spearman(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation of the ranks; None when either side is constant (undefined)."""
    return _pearson(_ranks(x), _ranks(y))


def kendall_tau(x: list[float], y: list[float]) -> float | None:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y))."""
    conc = disc = tx = ty = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else None


def reward_modeling(judge_scores: list[list[float | None]], oracle_scores: list[list[int]]) -> dict:
    """How well the judge ranks each prompt's K responses, against the oracle (the paper's
    Table: human rankings). Per prompt i, judge_scores[i][k] is the judge's mean score of
    response k (None: no parsable judgment), oracle_scores[i][k] the oracle's points.

    pairwise accuracy: over response pairs with different oracle scores, the share the judge
        orders the same way (a judge tie or a None counts as wrong).
    5-best: over responses the judge scores 5 (every parsable sample said 5), the share that
        are their prompt's best by the oracle.
    exact match: prompts whose judge ranking (with ties) equals the oracle's exactly.
    Spearman, Kendall tau: per prompt, averaged over prompts whose oracle scores differ. A
        judge that scores them all alike gets 0 there (it ranks nothing), not a pass. None
        scores are left out of these."""
    pairs = correct = five = five_best = exact = 0
    rhos, taus = [], []
    for js, os_ in zip(judge_scores, oracle_scores):
        for a in range(len(js)):
            for b in range(a + 1, len(js)):
                if os_[a] == os_[b]:
                    continue
                pairs += 1
                if js[a] is not None and js[b] is not None and (js[a] - js[b]) * (os_[a] - os_[b]) > 0:
                    correct += 1
        best = max(os_)
        for j, o in zip(js, os_):
            if j is not None and j == 5.0:
                five += 1
                five_best += o == best
        valid = [(j, o) for j, o in zip(js, os_) if j is not None]
        if len(valid) == len(js) and _ranks(js) == _ranks([float(o) for o in os_]):
            exact += 1
        if len(valid) >= 2:
            jx, ox = [v[0] for v in valid], [float(v[1]) for v in valid]
            if len(set(ox)) > 1:  # with equal oracle scores there is no ranking to match
                rhos.append(spearman(jx, ox) or 0.0)  # None here means a constant judge
                taus.append(kendall_tau(jx, ox) or 0.0)
    return {  # a metric with nothing to measure is None ("n/a"), never 0 and never NaN
        "pairwise_accuracy": 100 * correct / pairs if pairs else None,
        "five_best": 100 * five_best / five if five else None,
        "exact_match": 100 * exact / len(judge_scores) if judge_scores else None,
        "spearman": sum(rhos) / len(rhos) if rhos else None,
        "kendall_tau": sum(taus) / len(taus) if taus else None,
        "n_pairs": pairs,
        "n_judged_five": five,
    }


def judge_eval(model, tok, template: str, eft_eval, n_samples: int = 3, generator=None,
               max_new_tokens: int = 64, batch_size: int = 64, temperature: float = 0.7,
               top_p: float = 0.9, top_k: int = 0, answer_max_new_tokens: int = 48) -> dict:
    """Reward-modeling metrics of `model` as a judge on the EFT evaluation set
    [(task, K responses, K oracle points)], each response judged n_samples times (with a
    reference-guided template, against the model's own greedy answer to each prompt; with a
    pairwise one, every two responses compared in both orders, n_samples times each)."""
    if judge.is_pairwise(template):  # each response scored by the share of its comparisons it wins
        rows = judge.score_pairwise(model, tok, template, [(t.prompt, rs) for t, rs, _ in eft_eval], n_samples,
                                    temperature, top_p, max_new_tokens, batch_size, generator, desc="judge eval",
                                    top_k=top_k)
        js = [j for row in rows for j in row]
    else:
        items = [(t.prompt, r) for t, rs, _ in eft_eval for r in rs]
        js = judge.score(model, tok, template, items, n_samples, temperature, top_p, max_new_tokens, batch_size,
                         generator, desc="judge eval", top_k=top_k, answer_max_new_tokens=answer_max_new_tokens)
    k = len(eft_eval[0][1])
    scores = [[j.score for j in js[i * k : (i + 1) * k]] for i in range(len(eft_eval))]
    out = reward_modeling(scores, [pts for _, _, pts in eft_eval])
    out["parse_failure_rate"] = 100 * judge.parse_failure_rate(js)
    return out


# -----------------------------------------------------------------------------
# Command line: evaluate checkpoints on the task world


@dataclass
class EvalConfig(SamplingFlags):
    # what to evaluate
    model: str = "runs/default/M1/model"  # the checkpoint to evaluate
    baseline: str = ""  # a second checkpoint for the head-to-head
    judge: str = ""  # with --data: a third, frozen checkpoint that judges model vs baseline
    data: str = ""  # a JSONL of prompts (any data.py SFT format; responses ignored); empty: the task world
    world_seed: int = 0  # the task world's data are generated from this seed
    n_eval: int = 200  # held-out instruction prompts (or the first n of --data)
    n_eft_eval: int = 40  # held-out judge prompts (K responses each)
    k: int = 4  # responses per judge prompt
    judge_samples: int = 3  # judge samples per response, averaged
    judge_max_new_tokens: int = 64  # the judge's token budget (its own, separate from the prompt)
    seed: int = 1337  # sampling seed
    device: str = "auto"  # auto: cuda > mps > cpu
    # sampling
    max_new_tokens: int = 48

    def __post_init__(self):
        c = self
        check_ranges(c, {**sampling_ranges(c), "temperature": (c.temperature > 0, "> 0"),
                         "n_eval": (c.n_eval >= 1, ">= 1"), "n_eft_eval": (c.n_eft_eval >= 1, ">= 1"),
                         "k": (c.k >= 2, ">= 2: a ranking needs two responses"),
                         "judge_samples": (c.judge_samples >= 1, ">= 1"),
                         "judge_max_new_tokens": (c.judge_max_new_tokens >= 1, ">= 1")})


def main(cfg: EvalConfig):
    from data import load_sft_data

    device = get_device(cfg.device)

    def load(path):
        model, tok = load_checkpoint(path, device)
        return model.eval(), tok

    # the world's compact judge prompt for world tasks, the real-text one for a user's data
    template = judge.load_judge_template(None if not cfg.data else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "judge_prompt_real.txt"))
    gen = torch.Generator(device).manual_seed(cfg.seed)
    if cfg.data:  # user data: no oracle, a frozen judge decides
        if not (cfg.baseline and cfg.judge):
            raise UserError("--data needs --baseline and --judge (a frozen checkpoint that judges)")
        prompts = [e.prompt for e in load_sft_data(cfg.data)][: cfg.n_eval]
        responses = []
        for path in (cfg.model, cfg.baseline):
            model, tok = load(path)
            responses.append([r[0] for r in sample_responses(model, tok, prompts, 1, cfg.temperature, cfg.top_p,
                                                             cfg.max_new_tokens, generator=gen, top_k=cfg.top_k)])
        judge_model, judge_tok = load(cfg.judge)
        h = judged_head_to_head(judge_model, judge_tok, template, prompts, *responses, cfg.judge_samples,
                                gen, cfg.judge_max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                top_k=cfg.top_k)
        verdict = (f"win {h['win']:.1f} / tie {h['tie']:.1f} / loss {h['loss']:.1f}" if h["verdict"] else
                   "no verdict: the judge scored no prompt's two responses")
        print(f"{cfg.model} vs {cfg.baseline}, judged by {cfg.judge} on {len(prompts)} prompts: {verdict} "
              f"(judge parse failures {h['parse_failure_rate']:.1f}%)")
        return
    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    eft_eval = tasks.eft_eval_set(cfg.world_seed + 4, cfg.n_eft_eval, cfg.k)
    results = {}
    for name in filter(None, [cfg.model, cfg.baseline]):
        model, tok = load(name)
        r = instruction_following(model, tok, eval_tasks, cfg.temperature, gen, cfg.max_new_tokens, top_p=cfg.top_p,
                                  top_k=cfg.top_k)
        g = instruction_following(model, tok, eval_tasks, 0.0, None, cfg.max_new_tokens)
        rm = judge_eval(model, tok, template, eft_eval, cfg.judge_samples, gen, cfg.judge_max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        results[name] = r
        print(f"{name}: oracle mean {r['oracle_mean']:.2f} exact {100 * r['exact_correct']:.1f}% (T={cfg.temperature}); "
              f"greedy {g['oracle_mean']:.2f} / {100 * g['exact_correct']:.1f}%")
        print("  judge: " + ", ".join(f"{k} {fmt(v, '.3f')}" for k, v in rm.items()))
    if cfg.baseline:
        h = head_to_head(results[cfg.model]["points"], results[cfg.baseline]["points"])
        print(f"{cfg.model} vs {cfg.baseline}: win {h['win']:.1f} / tie {h['tie']:.1f} / loss {h['loss']:.1f}")


if __name__ == "__main__":
    cli(main, EvalConfig, __doc__)
