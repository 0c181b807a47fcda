"""How much can a self-judge tell its own samples apart? Measured on a finished iteration of
`self_reward.py` in the task world, from its saved candidates and judgments (nothing is
sampled again):

  within-prompt agreement   over the pairs of one prompt's candidates that the oracle tells
                            apart, how often the judge's mean score orders them the same way
                            (agree), the other way (disagree), or not at all (tie)
  pair precision            the loop's pairs (best vs worst by the judge, ties dropped): the
                            share the oracle also prefers (right), prefers the other way
                            (reversed), or ties
  equivalent flip rate      reversed / (right + reversed): the noisy oracle's ε (Step 1 of
                            RESULTS.md's noisy-judge table) whose decidable pairs are as wrong
  by family                 the same agreement per task family, beside the share of exact
                            candidates (a judge cannot prefer a right answer nobody samples)
  orders                    (a pairwise run) the verdicts' A / B / same shares, and whether
                            a pair's two orders name the same winner
  --expected                the same with G-Eval's expected score (Liu et al. 2023): per judge
                            sample, Σ k·p(k) over the score digits at the "Score: " position
                            given the judge's own findings (one forward pass per judge sample)
  consistency               judge-free signals from the same candidates (self-consistency, as
                            in ScPO and TTRL): each candidate's vote share (how many of the N
                            give the same answer, text compared after normalize_answer), the
                            vote share with the judge's score breaking its ties, and with
                            --greedy the match with M(t)'s own greedy answer (one greedy
                            generation per prompt), alone and as one more voter

    python scripts/judge_diagnostics.py runs/default/iter_1 [--expected runs/default/M1/model]
                                                            [--greedy runs/default/M1/model]
"""

import argparse
import itertools
import json
import os
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tasks  # noqa: E402
from self_reward import normalize_answer, vote_shares  # noqa: E402


def agreement(oracle, scores) -> Counter:
    """Pairs of one prompt's candidates the oracle tells apart: judge agrees / disagrees / ties."""
    c = Counter()
    for a, b in itertools.combinations(range(len(oracle)), 2):
        if None in (oracle[a], oracle[b], scores[a], scores[b]) or oracle[a] == oracle[b]:
            continue
        d = (oracle[a] - oracle[b]) * (scores[a] - scores[b])
        c["agree" if d > 0 else "disagree" if d < 0 else "tie"] += 1
    return c


def best_vs_worst(candidate_row, oracle, scores) -> str:
    """The loop's pair for one prompt (self_reward.build_pairs) and the oracle's verdict on it:
    right, reversed, oracle tie, or why there is no pair."""
    from self_reward import build_pairs

    pair = build_pairs(candidate_row["candidates"], scores, candidate_row.get("finished"))
    if isinstance(pair, str):
        return pair
    best, worst = pair
    return "right" if oracle[best] > oracle[worst] else "reversed" if oracle[best] < oracle[worst] else "oracle tie"


def with_tiebreak(primary: list[float], secondary: list) -> list:
    """Order by primary, then by secondary (the judge's score, in [0, 5]); None stays None."""
    return [None if s is None else 10 * p + s / 10 for p, s in zip(primary, secondary)]


def expected_scores(model_dir, template_path, candidates, judgments) -> list[list]:
    """Per candidate, the mean over its judge samples of Σ k·p(k) at the "Score: " position."""
    import torch

    import judge
    from checkpoint import load_checkpoint
    from data import encode_prompt, pad_batch

    model, tok = load_checkpoint(model_dir, torch.device("cpu"))
    model.eval()
    template = judge.load_judge_template(template_path)
    digits = [tok.encode("Score: " + d)[-1] for d in "012345"]
    jobs = []
    for r, (c, j) in enumerate(zip(candidates, judgments)):
        for k, (response, texts) in enumerate(zip(c["candidates"], j["texts"])):
            for text in texts or []:
                if text and "Score:" in text:
                    findings = text[: text.rindex("Score:")] + "Score: "
                    filled = judge.fill(template, c["prompt"], response, *(
                        [j["reference"]] if judge.is_reference_guided(template) else []))
                    jobs.append((r, k, encode_prompt(tok, filled) + tok.encode(findings)))
    values = defaultdict(list)
    with torch.no_grad():
        for s in range(0, len(jobs), 64):
            chunk = jobs[s : s + 64]
            ids, attn = pad_batch([x[2] for x in chunk], tok.pad_id, "left")
            p = model(ids, attention_mask=attn)[:, -1, digits].float().softmax(-1)
            for (r, k, _), v in zip(chunk, (p * torch.arange(6.0)).sum(-1).tolist()):
                values[(r, k)].append(v)
    return [[sum(values[(r, k)]) / len(values[(r, k)]) if values.get((r, k)) else None
             for k in range(len(c["candidates"]))] for r, c in enumerate(candidates)]


def report(name, candidates, judgments, scores, by_family=True):
    agree, pairs, families = Counter(), Counter(), defaultdict(Counter)
    for c, j, s in zip(candidates, judgments, scores):
        a = agreement(j["oracle"], s)
        agree += a
        pairs[best_vs_worst(c, j["oracle"], s)] += 1
        task = tasks.parse_task(c["prompt"])
        f = families[task.family if task else "?"]
        f += a
        f["exact"] += sum(p == 5 for p in j["oracle"] if p is not None)
        f["n"] += len(j["oracle"])
    n = pairs["right"] + pairs["reversed"] + pairs["oracle tie"]
    decidable = pairs["right"] + pairs["reversed"]
    print(f"{name}: within-prompt agree {agree['agree']}, disagree {agree['disagree']}, tie {agree['tie']}")
    share = lambda k: f"{100 * pairs[k] / n:.1f}%" if n else "–"  # no pair at all: all answers alike or all distinct
    print(f"  {n} pairs: right {share('right')}, reversed {share('reversed')}, "
          f"oracle tie {share('oracle tie')} (no pair: "
          f"{ {k: v for k, v in pairs.items() if k not in ('right', 'reversed', 'oracle tie')} }); "
          f"equivalent flip rate {pairs['reversed'] / max(1, decidable):.2f}")
    for fam, f in sorted(families.items(), key=lambda x: -x[1]["exact"] / max(1, x[1]["n"])) if by_family else []:
        print(f"  {fam:10s} exact {100 * f['exact'] / max(1, f['n']):5.1f}%   agree {f['agree']:5d}  "
              f"disagree {f['disagree']:5d}  tie {f['tie']:5d}")


def order_report(judgments) -> dict:
    """A pairwise run's verdicts, from its per-comparison records: how often the judge says A,
    B, same or nothing readable (a position bias shows as A ≠ B), and over the candidate pairs
    asked in both orders, whether the two orders name the same winner (each order's winner
    by its mean verdict; "undecided" where either order's mean is exactly even or unreadable)."""
    said, orders = Counter(), Counter()
    for j in judgments:
        share = {}  # (i, k) -> candidate i's mean share against k, with i shown as A
        for c in j.get("comparisons", []):
            valid = [v for v in c["verdicts"] if v is not None]
            said.update({1.0: "A", 0.0: "B", 0.5: "same", None: "unreadable"}[v] for v in c["verdicts"])
            share[(c["a"], c["b"])] = sum(valid) / len(valid) if valid else None
        for (i, k), s in share.items():
            if i > k or (k, i) not in share:
                continue
            r = share[(k, i)]
            if s is None or r is None or s == 0.5 or r == 0.5:
                orders["undecided"] += 1
            else:  # i's side: s as A, 1 - r as B
                orders["agree" if (s > 0.5) == (1 - r > 0.5) else "contradict"] += 1
    return {"verdicts": dict(said), "orders": dict(orders)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("iter_dir", help="a self-judged iteration: run_dir/iter_1 (candidates.jsonl, judgments.jsonl)")
    p.add_argument("--expected", default="", help="the judge's checkpoint (M(t)): also report the expected score")
    p.add_argument("--judge_prompt", default=None, help="the template the run judged with (default judge_prompt.txt)")
    p.add_argument("--greedy", default="", help="M(t)'s checkpoint: also measure agreement with its greedy answer")
    a = p.parse_args()
    if a.expected and a.judge_prompt:
        import judge

        if judge.is_pairwise_file(a.judge_prompt):
            p.error("--expected reads a score digit; a pairwise judge writes a verdict (A, B or same) instead")
    read = lambda name: [json.loads(line) for line in open(os.path.join(a.iter_dir, name))]
    candidates, judgments = read("candidates.jsonl"), read("judgments.jsonl")
    distinct = [len({normalize_answer(x) for x in c["candidates"]}) for c in candidates]
    points = [p for j in judgments for p in j["oracle"] if p is not None]
    print(f"{len(candidates)} prompts x {len(candidates[0]['candidates'])} candidates: exact "
          f"{100 * points.count(5) / len(points):.1f}%, distinct answers per prompt "
          f"{sum(distinct) / len(distinct):.2f}, all alike on {100 * distinct.count(1) / len(distinct):.1f}% of the prompts")
    report("sampled scores (the loop's)", candidates, judgments, [j["scores"] for j in judgments])
    if any(j.get("comparisons") for j in judgments):
        o = order_report(judgments)
        print(f"pairwise verdicts {o['verdicts']}; the two orders of a pair: {o['orders']}")
    votes = [vote_shares(c["candidates"]) for c in candidates]
    report("consistency: vote share", candidates, judgments, votes, by_family=False)
    report("consistency: vote share, the judge breaking ties", candidates, judgments,
           [with_tiebreak(v, j["scores"]) for v, j in zip(votes, judgments)], by_family=False)
    if a.greedy:
        import torch

        import judge
        from checkpoint import load_checkpoint

        model, tok = load_checkpoint(a.greedy, torch.device("cpu"))
        greedy = judge.reference_answers(model.eval(), tok, [c["prompt"] for c in candidates])
        exact = [tasks.grade(tasks.parse_task(c["prompt"]), g).points == 5 for c, g in zip(candidates, greedy)]
        print(f"greedy answers: exact on {100 * sum(exact) / len(exact):.1f}% of the prompts")
        report("consistency: equals the greedy answer", candidates, judgments,
               [[float(normalize_answer(x) == normalize_answer(g)) for x in c["candidates"]]
                for c, g in zip(candidates, greedy)], by_family=False)
        report("consistency: vote share, the greedy answer voting too", candidates, judgments,
               [vote_shares(c["candidates"], [g]) for c, g in zip(candidates, greedy)], by_family=False)
    if a.expected:
        report("expected scores (G-Eval)", candidates, judgments,
               expected_scores(a.expected, a.judge_prompt, candidates, judgments))


if __name__ == "__main__":
    main()
