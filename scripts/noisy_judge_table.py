"""How good must the judge be? The table (CSV on stdout) of one-iteration runs of
`self_reward.py --pair_judge noisy --flip_rate ε --iterations 1 [--flip_ties]`, one run_dir per ε,
all from the same M1: pairs, pair precision / reversal / oracle ties, and M2 - M1 in oracle
points with a paired-bootstrap 95% interval over the held-out prompts.

    python scripts/noisy_judge_table.py runs/step1/eps_* > step1.csv

Each run_dir must hold its M1 (a copy or a link: the runs share one) and its evaluated
iter_1_noisy (the run's report writes both eval.json files)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import evaluate  # noqa: E402


def row(run_dir: str) -> dict:
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    m1 = json.load(open(os.path.join(run_dir, "M1", "eval.json")))["sampled"]
    m2 = json.load(open(os.path.join(run_dir, "iter_1_noisy", "eval.json")))["sampled"]
    pairs = [json.loads(line) for line in open(os.path.join(run_dir, "iter_1_noisy", "pairs.jsonl"))]
    share = lambda n: 100 * n / len(pairs)
    c = evaluate.compare(m2["points"], m1["points"], seed=0)  # unanswered prompts (None) are left out
    return {"flip_rate": cfg["flip_rate"], "flip_ties": int(cfg["flip_ties"]), "seed": cfg["seed"], "pairs": len(pairs),
            "pair_precision": share(sum(p["chosen_oracle"] > p["rejected_oracle"] for p in pairs)),
            "pair_reversed": share(sum(p["chosen_oracle"] < p["rejected_oracle"] for p in pairs)),
            "pair_oracle_tie": share(sum(p["chosen_oracle"] == p["rejected_oracle"] for p in pairs)),
            "M1": m1["oracle_mean"], "M2": m2["oracle_mean"],
            "M2_minus_M1": c["mean_diff"], "ci_lo": c["mean_diff_ci"][0], "ci_hi": c["mean_diff_ci"][1]}


if __name__ == "__main__":
    rows = sorted((row(d) for d in sys.argv[1:]), key=lambda r: (r["flip_ties"], r["flip_rate"], r["seed"]))
    keys = list(rows[0]) if rows else []
    print(",".join(keys))
    for r in rows:
        print(",".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
