"""The self-rewarding run's evaluation and report.md: every model evaluated the same way, the
paper's two tables beside the paper's numbers, what each iteration's judge produced, and the
uncertainty of every comparison.

  - `world_report`       evaluate every model of a task-world run, write report.md, return the
                         run's headline numbers (flat, for mean ± spread over seeds)
  - `iteration_metrics`  what an iteration's judge produced, read back from its files
  - `write_seeds_report` report.md over several seeds
"""

from __future__ import annotations

import os
import statistics
import time
from collections import Counter

import torch

import evaluate
from evaluate import fmt
import judge
import tasks
from checkpoint import load_checkpoint
from data import read_json, write_json, write_jsonl
from self_reward import Config, build_pairs, iter_name, model_name, pair_judges
from train_utils import get_device, read_rows


def world_report(cfg: Config, models: dict[str, str]) -> dict:
    """Evaluate every model of the run (instruction following by the oracle; reward modeling
    for every model taught to judge), write run_dir/report.md and return the headline numbers."""
    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    eft_eval = tasks.eft_eval_set(cfg.world_seed + 4, cfg.n_eft_eval, cfg.k)
    template = judge.load_judge_template(cfg.judge_prompt or None)
    results = {}
    for name, path in models.items():
        print(f"[eval] {name}")
        results[name] = evaluate_model(cfg, os.path.dirname(path), path, eval_tasks, eft_eval, template,
                                       judge_too=name != "M0")
    iters = {model_name(chain, t): iteration_metrics(cfg, chain, t)
             for chain in pair_judges(cfg) for t in range(1, cfg.iterations + 1)}
    run_times = read_json(os.path.join(cfg.run_dir, "times.json"))
    times = {name: f"{run_times[name]:.0f}" for name in ("M0", "SFT", "M1") if name in run_times}
    for chain in pair_judges(cfg):
        for t in range(1, cfg.iterations + 1):
            d = iter_name(chain, t)
            steps = {"prompts": f"{d}/prompts.jsonl", "candidates": f"{d}/candidates.jsonl",
                     "judgments": f"{d}/judgments.jsonl", "train": d}
            times[model_name(chain, t)] = " + ".join(f"{k} {run_times[v]:.0f}" for k, v in steps.items() if v in run_times)
    write_report(cfg, report(cfg, results, iters, times))
    return summarize(cfg, results, iters)


def iteration_metrics(cfg: Config, chain: str, t: int) -> dict:
    """An iteration's numbers, from its files (run_dir/iter_t/): the prompt filter, the pair
    outcomes and pair_metrics; also written to its metrics.json."""
    d = os.path.join(cfg.run_dir, iter_name(chain, t))
    cands, judgments = read_rows(f"{d}/candidates.jsonl"), read_rows(f"{d}/judgments.jsonl")
    pairs = read_rows(f"{d}/pairs.jsonl")
    outcomes = Counter()
    for c, j in zip(cands, judgments):
        got = build_pairs(c["candidates"], j["scores"], c["finished"])
        outcomes[got if isinstance(got, str) else "pair"] += 1
    m = {"iteration": t, "pair_judge": chain, "generator": cfg.prompt_generator,
         "prompt_filter": read_json(f"{d}/prompt_filter.json"), **pair_metrics(cands, judgments, pairs, outcomes)}
    write_json(f"{d}/metrics.json", m)
    return m


def pair_metrics(cands, judgments, pairs, outcomes) -> dict:
    """What the paper's follow-ups watch in iterated self-rewarding (judge saturation, length
    growth, chosen and rejected converging), and the one number the world adds: pair
    precision, the share of pairs whose chosen response the oracle also prefers."""
    samples = [s for j in judgments for per in j.get("samples", []) for s in per]
    hist = Counter(round(s) for s in samples if s is not None)
    pairwise = bool(judgments) and judgments[0].get("pairwise", False)  # samples are verdicts, scores win shares
    n = len(pairs)
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    share = lambda k: 100 * k / n if n else None  # of the pairs; None without any
    has_oracle = bool(pairs) and pairs[0]["chosen_oracle"] is not None
    return {
        "prompts": len(cands),
        "pairs": len(pairs),
        "pair_yield": 100 * len(pairs) / max(1, len(cands)),
        "outcomes": dict(outcomes),
        "tie_rate": 100 * outcomes.get("tie", 0) / max(1, len(cands)),
        "parse_failure_rate": 100 * sum(s is None for s in samples) / len(samples) if samples else None,
        "judge_score_hist": None if pairwise else [hist.get(k, 0) for k in range(6)],
        "five_vs_four": None if pairwise else share(sum(p["chosen_score"] >= 4.5 and p["rejected_score"] >= 3.5
                                                        for p in pairs)),
        "chosen_length": mean([len(p["chosen"]) for p in pairs]),
        "rejected_length": mean([len(p["rejected"]) for p in pairs]),
        **({
            "candidate_oracle_mean": mean([o for j in judgments for o in j["oracle"]]),
            "pair_precision": share(sum(p["chosen_oracle"] > p["rejected_oracle"] for p in pairs)),
            "pair_oracle_tie": share(sum(p["chosen_oracle"] == p["rejected_oracle"] for p in pairs)),
            "pair_reversed": share(sum(p["chosen_oracle"] < p["rejected_oracle"] for p in pairs)),
        } if has_oracle else {}),
    }


def evaluate_model(cfg: Config, out_dir: str, path: str, eval_tasks, eft_eval, template, judge_too: bool):
    """Instruction following (T = temperature and greedy) and, for a judge, reward modeling.
    Every model is evaluated the same way, on the same prompts, with the same seed."""
    out_path = os.path.join(out_dir, "eval.json")
    if os.path.exists(out_path):
        return read_json(out_path)
    device = get_device(cfg.device)
    model, tok = load_checkpoint(path, device)
    model.eval()
    gen = torch.Generator(device).manual_seed(cfg.seed)
    t0 = time.time()
    sampled = evaluate.instruction_following(model, tok, eval_tasks, cfg.temperature, gen,
                                             cfg.max_new_tokens, cfg.eval_batch_size, cfg.top_p, cfg.top_k)
    greedy = evaluate.instruction_following(model, tok, eval_tasks, 0.0, None, cfg.max_new_tokens,
                                            cfg.eval_batch_size)
    result = {"sampled": sampled, "greedy": greedy}
    if judge_too:
        result["judge"] = evaluate.judge_eval(model, tok, template, eft_eval, cfg.judge_samples, gen,
                                              cfg.judge_max_new_tokens, cfg.eval_batch_size,
                                              cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens)
    result["seconds"] = time.time() - t0
    write_jsonl(os.path.join(out_dir, "eval_responses.jsonl"), [
        {"prompt": t.prompt, "response": r, "points": p, "greedy": gr, "greedy_points": gp}
        for t, r, p, gr, gp in zip(eval_tasks, sampled["responses"], sampled["points"],
                                   greedy["responses"], greedy["points"])])
    write_json(out_path, result)
    return result


# -----------------------------------------------------------------------------
# The report


PAPER_RM = {"SFT": (65.1, 39.6, 10.1, .253, .233), "M1": (78.7, 41.5, 13.1, .279, .253),
            "M2": (80.4, 44.3, 14.3, .331, .315), "M3": (81.7, 43.2, 14.3, .349, .324)}
PAPER_H2H = {"M1": (30.5, 38.7, 30.9), "M2": (49.2, 36.3, 14.5), "M3": (62.5, 27.7, 9.8)}


def summarize(cfg: Config, results: dict, iters: dict) -> dict:
    """The headline numbers of one run (one seed), flat, for the report and for mean ± spread."""
    s = {}
    for name, r in results.items():
        s[f"{name}/oracle_mean"] = r["sampled"]["oracle_mean"]
        s[f"{name}/exact"] = 100 * r["sampled"]["exact_correct"]
        s[f"{name}/greedy_mean"] = r["greedy"]["oracle_mean"]
        s[f"{name}/greedy_exact"] = 100 * r["greedy"]["exact_correct"]
        s[f"{name}/length"] = r["sampled"]["mean_length_chars"]
        for k in ("pairwise_accuracy", "five_best", "exact_match", "spearman", "kendall_tau", "parse_failure_rate"):
            if "judge" in r:
                s[f"{name}/{k}"] = r["judge"][k]
        if name != "SFT" and name != "M0":
            h = evaluate.compare(r["sampled"]["points"], results["SFT"]["sampled"]["points"])
            for k in ("win", "tie", "loss", "margin"):
                s[f"{name}/vs_SFT_{k}"] = h[k]
    for name, m in iters.items():
        for k in ("pairs", "pair_yield", "pair_precision", "tie_rate", "parse_failure_rate", "five_vs_four",
                  "chosen_length", "rejected_length"):
            s[f"{name}/iter_{k}"] = m[k]
    return s


def report(cfg: Config, results: dict, iters: dict, times: dict) -> str:
    """report.md of one run: the paper's two tables beside the paper's numbers, the
    per-iteration table, uncertainty of every comparison, and wall time per stage."""
    T = cfg.temperature
    names = list(results)
    lines = [
        f"# Self-rewarding run: {cfg.run_dir}", "",
        f"Preset `{cfg.preset}`, seed {cfg.seed}, world seed {cfg.world_seed}; pair judge(s) {cfg.pair_judge}, "
        f"prompt generator {cfg.prompt_generator}, AIFT {cfg.aift}. Held-out: {cfg.n_eval} instruction prompts, "
        f"{cfg.n_eft_eval} judge prompts × {cfg.k} responses. Numbers depend on the CPU and library versions "
        "(float rounding, amplified by training): compare models by the intervals, not the last digit.", "",
        "## Instruction following (oracle grader, 0-5 points)", "",
        f"| model | mean points (T={T}) [95% CI] | exact-correct % (T={T}) | mean points (greedy) | "
        f"exact-correct % (greedy) | mean length (chars) | score histogram 0..5 (T={T}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        r = results[n]
        m, lo, hi = evaluate.bootstrap_mean([p for p in r["sampled"]["points"] if p is not None])
        lines.append(f"| {n} | {m:.2f} [{lo:.2f}, {hi:.2f}] | {100 * r['sampled']['exact_correct']:.1f} | "
                     f"{r['greedy']['oracle_mean']:.2f} | {100 * r['greedy']['exact_correct']:.1f} | "
                     f"{r['sampled']['mean_length_chars']:.1f} | {r['sampled']['score_hist']} |")
    lines += ["", f"Head-to-head (T={T}, per prompt, the higher oracle score wins; margin = win − loss, "
                  "95% paired-bootstrap interval; p = two-sided sign test):", "",
              "| model | vs | win | tie | loss | margin [95% CI] | mean points diff [95% CI] | p | paper (win/tie/loss) |",
              "|---|---|---|---|---|---|---|---|---|"]
    pts = {n: results[n]["sampled"]["points"] for n in names}
    comparisons = [(n, "SFT") for n in names if n not in ("M0", "SFT")]
    for chain in pair_judges(cfg):
        for t in range(1, cfg.iterations + 1):
            prev = "M1" if t == 1 else model_name(chain, t - 1)
            comparisons.append((model_name(chain, t), prev))
    if cfg.iterations >= 2:
        comparisons.append((model_name(pair_judges(cfg)[0], cfg.iterations), "M1"))
    for a, b in comparisons:
        if a not in pts or b not in pts:
            continue
        c = evaluate.compare(pts[a], pts[b])
        paper = "/".join(f"{x}" for x in PAPER_H2H[a]) if b == "SFT" and a in PAPER_H2H else ""
        lines.append(f"| {a} | {b} | {c['win']:.1f} | {c['tie']:.1f} | {c['loss']:.1f} | {c['margin']:+.1f} "
                     f"[{c['margin_ci'][0]:+.1f}, {c['margin_ci'][1]:+.1f}] | {c['mean_diff']:+.2f} "
                     f"[{c['mean_diff_ci'][0]:+.2f}, {c['mean_diff_ci'][1]:+.2f}] | {c['sign_test_p']:.3g} | {paper} |")
    lines += ["", "## Reward modeling (the model as judge vs the oracle's ranking)", "",
              "| model | pairwise acc % | 5-best % | exact match % | Spearman | Kendall τ | judge parse failures % | paper (70B): pairwise / 5-best / exact / Spearman / τ |",
              "|---|---|---|---|---|---|---|---|"]
    for n in names:
        j = results[n].get("judge")
        if j:
            paper = " / ".join(str(x) for x in PAPER_RM[n]) if n in PAPER_RM else ""
            lines.append(f"| {n} | {fmt(j['pairwise_accuracy'])} | {fmt(j['five_best'])} | {fmt(j['exact_match'])} | "
                         f"{fmt(j['spearman'], '.3f')} | {fmt(j['kendall_tau'], '.3f')} | {j['parse_failure_rate']:.1f} | "
                         f"{paper} |")
    if iters:
        lines += ["", "## The iterations: what the judge produced", "",
                  "| model | prompts kept (filter) | pairs (yield %) | ties % | parse failures % | judge scores 0..5 | "
                  "5-vs-4 pairs % | chosen / rejected length | pair precision % (oracle tie / reversed) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, m in iters.items():
            f = m["prompt_filter"]
            lines.append(f"| {n} | {m['prompts']} ({', '.join(f'{k} {v}' for k, v in f.items())}) | "
                         f"{m['pairs']} ({m['pair_yield']:.0f}) | {m['tie_rate']:.1f} | {fmt(m['parse_failure_rate'])} | "
                         f"{m['judge_score_hist'] or 'n/a (pairwise)'} | {fmt(m['five_vs_four'])} | {fmt(m['chosen_length'])} / "
                         f"{fmt(m['rejected_length'])} | {fmt(m['pair_precision'])} ({fmt(m['pair_oracle_tie'])} / "
                         f"{fmt(m['pair_reversed'])}) |")
    lines += ["", "## Time (seconds)", "", "| stage | train / steps | eval |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {times.get(n, '')} | {results[n]['seconds']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def seeds_report(cfg: Config, summaries: list[dict], seeds: list[int]) -> str:
    """report.md over several seeds: every headline number as mean ± standard deviation over
    the seeds (one seed is noise), and each seed's value."""
    lines = [f"# Self-rewarding runs: {cfg.run_dir}, seeds {seeds}", "",
             "Each number: mean ± standard deviation over the seeds' whole runs (M0 pretraining included), then "
             "the per-seed values. Per-seed reports, with bootstrap intervals, are in seed_<s>/report.md.", "",
             "| quantity | mean ± sd | per seed |", "|---|---|---|"]
    for key in summaries[0]:
        vals = [s[key] for s in summaries if s.get(key) is not None]  # a metric with nothing to measure is None
        if not vals:
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {key} | {statistics.mean(vals):.2f} ± {sd:.2f} | {', '.join(f'{v:.2f}' for v in vals)} |")
    return "\n".join(lines) + "\n"


def write_report(cfg: Config, text: str):
    tmp = os.path.join(cfg.run_dir, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(cfg.run_dir, "report.md"))
    print("\n" + text)


def write_seeds_report(cfg: Config, summaries: list[dict], seeds: list[int]):
    text = seeds_report(cfg, summaries, seeds)
    write_json(os.path.join(cfg.run_dir, "summary.json"), {"seeds": seeds, "runs": summaries})
    with open(os.path.join(cfg.run_dir, "report.md"), "w") as f:
        f.write(text)
    print("\n" + text)
