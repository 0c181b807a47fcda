"""Self-Rewarding Language Models (Yuan et al., 2024) on the synthetic task world.

    python self_reward.py                  # the cpu preset: M0 -> M1 -> M2 -> M3, evaluated
    python self_reward.py --seeds 3        # three whole runs, tables with mean ± spread
    python self_reward.py --pair_judge self,oracle,random   # ablations from the same M1
    python self_reward.py --preset gpu     # bigger model and data for one GPU

One model both follows instructions and judges responses. The run, stage by stage (each
stage writes its files and is reused when the run is started again):

  M0   pretraining on the world's noisy corpus                         (sft.py --mode pretrain)
  SFT  the baseline: SFT of M0 on instruction data (IFT) alone          (sft.py --eft 0)
  M1   SFT of M0 on IFT + judge data (EFT): follows instructions AND judges
  for t = 1, 2 (M(t) -> M(t+1)), in run_dir/iter_t/:
    prompts      new instructions, written few-shot by a fixed generator (M0) from 8 seed
                 instructions and kept only if the world can read them as new tasks
    candidates   N = 4 responses per prompt from M(t) (T = 0.7, top-p 0.9)
    judgments    M(t) judges each candidate 3 times with judge_prompt.txt; the mean of the
                 parsable scores is the candidate's score (a parse failure is never a score)
    pairs        per prompt the best vs the worst candidate; ties dropped
    model        M(t+1) = DPO from M(t), reference M(t), on those pairs   (dpo.py)
  evaluation   every model: instruction following (the oracle grades held-out prompts),
               head-to-head against the SFT baseline and the previous model, and reward
               modeling (the model as judge against the oracle's ranking)
  report.md    the paper's tables for this run, with their uncertainty

Because the world has an exact oracle, the run also measures what the paper could not: how
often the self-judged pairs are right (pair precision).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch

import dpo
import evaluate
import sft
import tasks
from data import UserError, read_jsonl, write_json, write_jsonl
from model import cli, generate, get_device, load_checkpoint, read_json


@dataclass
class Config:
    preset: str = "cpu"  # "cpu" or "gpu": sets the sizes below; explicit flags win
    run_dir: str = "runs/default"
    seed: int = 1337
    seeds: int = 1  # > 1: whole runs with seeds seed, seed+1, ... in run_dir/seed_<s>/, then mean ± spread
    world_seed: int = 0
    device: str = "auto"
    compile: bool = False
    # model (M0 from scratch)
    vocab_size: int = 1024
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    max_seq_len: int = 256
    # M0: pretraining
    corpus_docs: int = 20000
    pretrain_steps: int = 900
    pretrain_batch_size: int = 16
    pretrain_seq_len: int = 256  # the judge's prompts and the few-shot prompts need the whole context
    pretrain_lr: float = 2e-3
    # M1 / SFT baseline
    n_ift: int = 400  # IFT seed size (the paper: 3,200 Open Assistant examples)
    n_eft: int = 1200  # EFT train size (the paper: 1,775)
    sft_epochs: float = 12.0  # passes over the SFT data, baseline and M1 alike; at 4, M1 learns the judge's format, not to judge
    sft_batch_size: int = 32
    sft_lr: float = 5e-4
    dropout: float = 0.1
    # the self-rewarding iterations M(t) -> M(t+1)
    iterations: int = 2  # M2, M3 (the paper's AIFT(M1), AIFT(M2))
    n_prompts: int = 500  # new prompts per iteration
    prompt_generator: str = "base"  # base: M0, fixed (the paper's choice); model: M(t) itself; world: the world's sampler
    few_shot: int = 8  # seed instructions shown to the prompt generator
    n_candidates: int = 4  # responses per prompt (the paper: N = 4)
    pair_judge: str = "self"  # self | oracle | random; a comma list (self,oracle,random) runs a chain each from M1
    aift: str = "pairs"  # pairs: DPO on best-vs-worst pairs; positive: SFT on responses judged 5 (the paper's ablation)
    dpo_beta: float = 0.1
    dpo_nll_coef: float = 1.0  # DPO + α·NLL of the chosen response (Pang et al. 2024); 0 = plain DPO, which hurt here
    dpo_lr: float = 1e-4
    dpo_epochs: float = 2.0
    dpo_batch_size: int = 16
    # evaluation
    n_eval: int = 300  # held-out instruction prompts
    n_eft_eval: int = 60  # held-out judge prompts, K responses each (the paper: 531 EFT eval)
    k: int = 4
    judge_samples: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 40  # response budget
    judge_max_new_tokens: int = 80  # judge's budget (its own, separate from the prompt)
    eval_batch_size: int = 64
    # a real model and your own files instead of the task world (there is no oracle then)
    init: str = ""  # an HF chat model directory; it is M0 (no pretraining). Needs --prompts
    ift: str = ""  # JSONL of demonstrations (any data.py SFT format): the SFT baseline, and M1 with --eft
    eft: str = ""  # JSONL of judge demonstrations (prompt = a filled judge prompt, response = justification + "Score: k")
    prompts: str = ""  # JSONL prompt pool (any SFT format, responses unused): held-out eval prompts + new prompts per iteration
    eval_judge: str = ""  # a frozen checkpoint that judges head-to-heads (no oracle for real text)
    judge_prompt: str = ""  # the judge template; default judge_prompt.txt (world), judge_prompt_real.txt (--init)
    system: str = ""  # a system message for every prompt (default none; SmolLM2's template then adds its own)

    def __post_init__(self):
        c = self
        from model import check_ranges

        check_ranges(c, {
            "preset": (c.preset in PRESETS, " or ".join(PRESETS)),
            "seeds": (c.seeds >= 1, ">= 1"), "iterations": (c.iterations >= 0, ">= 0"),
            "n_prompts": (c.n_prompts >= 1, ">= 1"), "few_shot": (c.few_shot >= 1, ">= 1"),
            "n_candidates": (c.n_candidates >= 2, ">= 2"), "judge_samples": (c.judge_samples >= 1, ">= 1"),
            "prompt_generator": (c.prompt_generator in ("base", "model", "world"), "base, model or world"),
            "pair_judge": (set(pair_judges(c)) <= {"self", "oracle", "random"} and len(pair_judges(c)) > 0,
                           "self, oracle, random or a comma list of them"),
            "aift": (c.aift in ("pairs", "positive"), "pairs or positive"),
            "k": (c.k >= 2, ">= 2"), "n_eval": (c.n_eval >= 1, ">= 1"), "n_eft_eval": (c.n_eft_eval >= 1, ">= 1"),
            "temperature": (c.temperature > 0, "> 0"), "top_p": (0 < c.top_p <= 1, "in (0, 1]"),
        })
        if c.init and ("oracle" in pair_judges(c) or c.prompt_generator != "base"):
            raise UserError("with --init there is no oracle and no world: --pair_judge self or random, "
                            "and prompts come from --prompts")


PRESETS = {
    "cpu": {},  # the dataclass defaults: the whole run in minutes on 2 cores
    "gpu": dict(vocab_size=1024, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=384,
                corpus_docs=200000, pretrain_steps=6000, pretrain_batch_size=64, pretrain_seq_len=256,
                pretrain_lr=1e-3, n_ift=2000, n_eft=1800, sft_epochs=5.0, sft_batch_size=32, sft_lr=2e-4,
                n_prompts=3000, n_eval=1000, n_eft_eval=300, eval_batch_size=256),
    # the whole loop M0 -> M2 in about a minute: for tests and for stepping through the code
    "micro": dict(vocab_size=1024, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, corpus_docs=3000,
                  pretrain_steps=300, pretrain_batch_size=16, pretrain_seq_len=256, n_ift=160, n_eft=240,
                  sft_epochs=4.0, sft_batch_size=16, sft_lr=2e-3, iterations=1, n_prompts=48, few_shot=4,
                  dpo_batch_size=8, n_eval=36, n_eft_eval=6, judge_samples=2),
    # a real ~100M chat model from --init (e.g. SmolLM2-135M-Instruct): small learning rates,
    # real-text budgets; sized for minutes on a GPU (a CPU smoke run wants fewer prompts)
    "real": dict(sft_epochs=1.0, sft_batch_size=8, sft_lr=1e-5, dropout=0.0, n_prompts=128, dpo_lr=5e-7,
                 dpo_epochs=1.0, dpo_batch_size=8, n_eval=64, max_new_tokens=160, judge_max_new_tokens=160,
                 eval_batch_size=32),
}


def pair_judges(cfg: Config) -> list[str]:
    return [j.strip() for j in cfg.pair_judge.split(",") if j.strip()]


def stage_seed(cfg: Config, *names) -> int:
    """A seed per stage, so that a stage run again (after a kill) draws what it drew before,
    whatever ran earlier in the process."""
    return random.Random("/".join(map(str, (cfg.seed, *names)))).randrange(2 ** 31)


def timed(path: str, seconds: float):
    write_json(path, {"seconds": seconds})


# -----------------------------------------------------------------------------
# M0, the SFT baseline and M1: sft.py stages


def stage(cfg: Config, name: str, **overrides) -> str:
    """Run one sft.py stage into run_dir/name unless it has finished before."""
    out_dir = os.path.join(cfg.run_dir, name)
    ckpt = os.path.join(out_dir, "model")
    done = os.path.join(out_dir, "time.json")  # written only once the stage has finished
    if os.path.exists(done):
        print(f"[{name}] found {ckpt}, reusing it")
        return ckpt
    # an unfinished stage (killed mid-way) is redone from its start
    common = dict(out_dir=out_dir, seed=cfg.seed, world_seed=cfg.world_seed, device=cfg.device,
                  compile=cfg.compile, dropout=cfg.dropout, max_seq_len=cfg.max_seq_len,
                  overwrite=True)  # overrides win
    scfg = sft.SFTConfig(**{**common, **overrides})
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v}"
             for k, v in dataclasses.asdict(scfg).items() if v != getattr(sft.SFTConfig(), k)]
    print(f"[{name}] python sft.py " + " ".join(flags))  # the same stage, run by hand
    t0 = time.time()
    path = sft.main(scfg)
    timed(done, time.time() - t0)
    return path


# -----------------------------------------------------------------------------
# One iteration M(t) -> M(t+1), step by step


def fewshot_text(examples: list[str], head: str) -> str:
    """The prompt-generation prompt, in the form of the corpus's numbered task lists:
    'Tasks:\\n1. ...\\n...\\n8. ...\\n9.' -- the generator writes item 9."""
    lines = [head] + [f"{i + 1}. {p}" for i, p in enumerate(examples)] + [f"{len(examples) + 1}."]
    return "\n".join(lines)


PROMPT_BUDGET = 40  # tokens for one generated instruction (the longest world prompts take ~30)


def fewshot_ids(tok, examples: list[str], head: str, limit: int) -> list[int]:
    """Token ids of the few-shot prompt (BOS first, as every pretraining document), with the
    oldest examples dropped while it is longer than `limit`."""
    while True:
        ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(fewshot_text(examples, head))
        if len(ids) <= limit or len(examples) == 1:
            return ids
        examples = examples[1:]


def generate_prompts(cfg: Config, generator_model, tok, seed_prompts: list[str], seen: set, rng) -> tuple[list, Counter]:
    """New instructions for one iteration (Self-Instruct style, as the paper did): show the
    generator `few_shot` random seed instructions as a numbered list and keep the line it
    writes next, if it passes the filter:
      not a task     the world cannot read it as a task (it plays the paper's filtering)
      held out       an evaluation task (its identity, task_key, is in the held-out split)
      seen           a seed instruction's task or one generated earlier in this run
      length         shorter than 10 or longer than 200 characters
    Returns the kept prompts and the count of each outcome. `generator_model` None: the
    world's own sampler writes the prompts (the fast control)."""
    kept, counts = [], Counter()
    seen |= {tasks.task_key(tasks.parse_task(p)) for p in seed_prompts}
    newline = tok.encode("\n")
    stop_id = newline[0] if len(newline) == 1 else tok.eos_id  # one line, then stop
    gen = torch.Generator(get_device(cfg.device)).manual_seed(rng.randrange(2 ** 31))
    heads = ["Tasks:", "Practice questions:", "Exercises:", "Some things to ask an assistant:"]
    attempts = 0
    while len(kept) < cfg.n_prompts and attempts < 20 * cfg.n_prompts:
        if generator_model is None:
            texts = [tasks.sample_task(rng, split="train").prompt for _ in range(256)]
        else:
            ids = [fewshot_ids(tok, rng.sample(seed_prompts, cfg.few_shot), rng.choice(heads),
                               generator_model.config.max_seq_len - PROMPT_BUDGET)
                   for _ in range(cfg.eval_batch_size)]
            g = generate(generator_model, ids, PROMPT_BUDGET, eos_id=stop_id, pad_id=tok.pad_id,
                         temperature=1.0, top_p=0.95, generator=gen)
            texts = [tok.decode(row).split("\n")[0].strip() for row in g.tokens.tolist()]
        attempts += len(texts)
        for text in texts:
            if len(kept) == cfg.n_prompts:
                break
            verdict = prompt_verdict(text, seen)
            counts[verdict] += 1
            if verdict == "kept":
                seen.add(tasks.task_key(tasks.parse_task(text)))
                kept.append(text)
    return kept, counts


def prompt_verdict(text: str, seen: set) -> str:
    """Whether a generated instruction joins the iteration's prompts: "kept", or why not
    ("length", "not a task", "held out", "seen"); see generate_prompts."""
    if not 10 <= len(text) <= 200:
        return "length"
    task = tasks.parse_task(text)
    if task is None:
        return "not a task"
    if tasks.is_heldout(task):
        return "held out"
    if tasks.task_key(task) in seen:
        return "seen"
    return "kept"


def build_pairs(responses: list[str], scores: list[float | None], finished: list[bool] | None = None):
    """The paper's preference pair for one prompt: (index of the best, index of the worst)
    candidate by score, or the reason there is none:
      "too few scores"  fewer than two candidates with a valid score (None = no parsable judgment)
      "none finished"   no validly scored candidate ended with EOS
      "tie"             best and worst scores are equal: no preference
      "identical"       the best and worst are the same text (a judge's noise, not a preference)
    A candidate cut off without EOS (finished False) may be the worst, never the best: DPO
    would teach its text followed by an EOS the model never wrote."""
    valid = [i for i, s in enumerate(scores) if s is not None]
    if len(valid) < 2:
        return "too few scores"
    finished = finished or [True] * len(scores)
    worst = min(valid, key=lambda i: scores[i])
    best_pool = [i for i in valid if finished[i]]
    if not best_pool:
        return "none finished"
    best = max(best_pool, key=lambda i: scores[i])
    if scores[best] <= scores[worst]:
        return "tie"
    if responses[best].strip() == responses[worst].strip():
        return "identical"
    return best, worst


def iteration(cfg: Config, chain: str, t: int, model_path: str, new_prompts, oracle, template: str) -> tuple[str, dict]:
    """M(t) -> M(t+1) in run_dir/<iter dir>/. Every step writes its file and is skipped when
    the file exists, so a killed run resumes where it stopped (each step's randomness is
    seeded by the step, so a redone step draws what it drew before). Returns the new model's
    path and the iteration's metrics.
    new_prompts(model, tok, rng) -> (prompts, filter counts): this iteration's instructions;
    oracle(prompt, response) -> points, or None when there is no oracle (real data)."""
    d = os.path.join(cfg.run_dir, iter_name(chain, t))
    os.makedirs(d, exist_ok=True)
    metrics_path = os.path.join(d, "metrics.json")
    if os.path.exists(os.path.join(d, "time.json")):
        print(f"[{iter_name(chain, t)}] found {d}/model, reusing it")
        return os.path.join(d, "model"), read_json(metrics_path)
    device = get_device(cfg.device)
    model, tok = load_checkpoint(model_path, device)
    model.eval()
    tok.system = cfg.system or None
    seconds = {}
    m = {"iteration": t, "pair_judge": chain, "generator": cfg.prompt_generator}

    # 1. prompts
    path = os.path.join(d, "prompts.jsonl")
    t0 = time.time()
    if not os.path.exists(path):
        prompts, counts = new_prompts(model, tok, random.Random(stage_seed(cfg, chain, t, "prompts")))
        write_json(os.path.join(d, "prompt_filter.json"), dict(counts))
        write_jsonl(path, [{"prompt": p} for p in prompts])
        seconds["prompts"] = time.time() - t0
    prompts = [r["prompt"] for r in read_rows(path)]
    m["prompt_filter"] = read_json(os.path.join(d, "prompt_filter.json"))
    print(f"[{iter_name(chain, t)}] prompts: {len(prompts)} kept; filter {m['prompt_filter']}")
    if not prompts:
        raise UserError(f"{path}: the prompt generator wrote no usable prompt; try --prompt_generator world")

    # 2. candidates: N per prompt from M(t), one shared prefill per prompt
    path = os.path.join(d, "candidates.jsonl")
    t0 = time.time()
    if not os.path.exists(path):
        gen = torch.Generator(device).manual_seed(stage_seed(cfg, chain, t, "candidates"))
        texts, finished = evaluate.sample_responses(
            model, tok, prompts, cfg.n_candidates, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
            cfg.eval_batch_size, gen, "candidates", return_finished=True)
        write_jsonl(path, [{"prompt": p, "candidates": c, "finished": f} for p, c, f in zip(prompts, texts, finished)])
        seconds["candidates"] = time.time() - t0
    cands = read_rows(path)

    # 3. judgments: the pair judge scores every candidate
    path = os.path.join(d, "judgments.jsonl")
    t0 = time.time()
    if not os.path.exists(path):
        rows = judge_candidates(cfg, chain, t, model, tok, cands, device, oracle, template)
        write_jsonl(path, rows)
        seconds["judgments"] = time.time() - t0
    judgments = read_rows(path)

    # 4. pairs: best vs worst per prompt
    path = os.path.join(d, "pairs.jsonl")
    pairs, outcomes = [], Counter()
    for c, j in zip(cands, judgments):
        got = build_pairs(c["candidates"], j["scores"], c["finished"])
        if isinstance(got, str):
            outcomes[got] += 1
            continue
        b, w = got
        outcomes["pair"] += 1
        pairs.append({"prompt": c["prompt"], "chosen": c["candidates"][b], "rejected": c["candidates"][w],
                      "chosen_score": j["scores"][b], "rejected_score": j["scores"][w],
                      "chosen_oracle": j["oracle"][b], "rejected_oracle": j["oracle"][w]})
    write_jsonl(path, pairs)
    m.update(pair_metrics(cands, judgments, pairs, outcomes))
    print(f"[{iter_name(chain, t)}] pairs: {len(pairs)} from {len(cands)} prompts; outcomes {dict(outcomes)}"
          + (f"; pair precision vs oracle {m['pair_precision']:.1f}%" if "pair_precision" in m else ""))
    if len(pairs) < 2:
        raise UserError(f"{path}: only {len(pairs)} preference pairs; more --n_prompts or a better judge needed")

    # 5. M(t+1): DPO from M(t), reference M(t) (or SFT on the positives: the paper's ablation)
    del model
    t0 = time.time()
    if cfg.aift == "pairs":
        dcfg = dpo.DPOConfig(init=model_path, data=path, out_dir=d, seed=stage_seed(cfg, chain, t, "dpo"),
                             world_seed=cfg.world_seed, beta=cfg.dpo_beta, nll_coef=cfg.dpo_nll_coef,
                             lr=cfg.dpo_lr, min_lr=cfg.dpo_lr / 10,
                             epochs=cfg.dpo_epochs, batch_size=min(cfg.dpo_batch_size, len(pairs)),
                             warmup_steps=5, eval_every=0, eval_frac=0.0, device=cfg.device,
                             compile=cfg.compile, overwrite=True, system=cfg.system)
        new_path = dpo.main(dcfg)
    else:
        positives = [{"prompt": c["prompt"], "response": c["candidates"][k]} for c, j in zip(cands, judgments)
                     for k in [next((k for k, s in enumerate(j["scores"]) if s == 5.0 and c["finished"][k]), None)]
                     if k is not None]
        m["n_positive"] = len(positives)
        pos_path = os.path.join(d, "positive.jsonl")
        write_jsonl(pos_path, positives)
        if len(positives) < 2:
            raise UserError(f"{pos_path}: only {len(positives)} responses judged 5; --aift positive has nothing to train on")
        steps = max(1, math.ceil(cfg.dpo_epochs * len(positives) / cfg.dpo_batch_size))
        new_path = sft.main(sft.SFTConfig(mode="sft", init=model_path, data=pos_path, out_dir=d, eval_frac=0.0,
                                          seed=stage_seed(cfg, chain, t, "sft"), batch_size=min(cfg.dpo_batch_size, len(positives)),
                                          max_steps=steps, lr=cfg.dpo_lr, min_lr=cfg.dpo_lr / 10, warmup_steps=5,
                                          eval_every=0, dropout=cfg.dropout, device=cfg.device, overwrite=True,
                                          show_example=False, system=cfg.system))
    seconds["train"] = time.time() - t0
    m["seconds"] = {**read_json(metrics_path).get("seconds", {}), **seconds} if os.path.exists(metrics_path) else seconds
    write_json(metrics_path, m)
    timed(os.path.join(d, "time.json"), sum(m["seconds"].values()))
    return new_path, m


def judge_candidates(cfg: Config, chain: str, t: int, model, tok, cands: list[dict], device, oracle,
                     template: str) -> list[dict]:
    """Scores of every candidate by the chain's pair judge, and the oracle's points (which
    only measure: pair precision; None without an oracle). self: M(t) judges each candidate
    judge_samples times, the mean of the parsable scores counts (None if none parsed);
    oracle: the exact grade (the ceiling a perfect judge gives); random: a random number
    (the control: no signal)."""
    oracle = [[oracle(c["prompt"], x) for x in c["candidates"]] for c in cands]
    if chain == "self":
        gen = torch.Generator(device).manual_seed(stage_seed(cfg, chain, t, "judge"))
        items = [(c["prompt"], x) for c in cands for x in c["candidates"]]
        js = evaluate.judge(model, tok, template, items, cfg.judge_samples, cfg.temperature,
                            cfg.top_p, cfg.judge_max_new_tokens, cfg.eval_batch_size, gen, "self-judging")
        n = cfg.n_candidates
        return [{"prompt": c["prompt"], "scores": [j.score for j in js[i * n:(i + 1) * n]],
                 "samples": [j.samples for j in js[i * n:(i + 1) * n]],
                 "texts": [j.texts for j in js[i * n:(i + 1) * n]], "oracle": o}
                for i, (c, o) in enumerate(zip(cands, oracle))]
    rng = random.Random(stage_seed(cfg, chain, t, "judge"))
    return [{"prompt": c["prompt"], "oracle": o,
             "scores": [float(p) for p in o] if chain == "oracle" else [rng.random() for _ in o]}
            for c, o in zip(cands, oracle)]


def pair_metrics(cands, judgments, pairs, outcomes) -> dict:
    """What the paper's follow-ups watch in iterated self-rewarding (judge saturation, length
    growth, chosen and rejected converging), and the one number the world adds: pair
    precision, the share of pairs whose chosen response the oracle also prefers."""
    samples = [s for j in judgments for per in j.get("samples", []) for s in per]
    hist = Counter(round(s) for s in samples if s is not None)
    n = max(1, len(pairs))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    has_oracle = bool(pairs) and pairs[0]["chosen_oracle"] is not None
    return {
        "prompts": len(cands),
        "pairs": len(pairs),
        "pair_yield": 100 * len(pairs) / max(1, len(cands)),
        "outcomes": dict(outcomes),
        "tie_rate": 100 * outcomes.get("tie", 0) / max(1, len(cands)),
        "parse_failure_rate": 100 * sum(s is None for s in samples) / len(samples) if samples else 0.0,
        "judge_score_hist": [hist.get(k, 0) for k in range(6)],
        "five_vs_four": 100 * sum(p["chosen_score"] >= 4.5 and p["rejected_score"] >= 3.5 for p in pairs) / n,
        "chosen_length": mean([len(p["chosen"]) for p in pairs]),
        "rejected_length": mean([len(p["rejected"]) for p in pairs]),
        **({
            "candidate_oracle_mean": mean([o for j in judgments for o in j["oracle"]]),
            "pair_precision": 100 * sum(p["chosen_oracle"] > p["rejected_oracle"] for p in pairs) / n,
            "pair_oracle_tie": 100 * sum(p["chosen_oracle"] == p["rejected_oracle"] for p in pairs) / n,
            "pair_reversed": 100 * sum(p["chosen_oracle"] < p["rejected_oracle"] for p in pairs) / n,
        } if has_oracle else {}),
    }


def read_rows(path: str) -> list[dict]:
    return [obj for _, obj in read_jsonl(path)] if os.path.getsize(path) else []


def iter_name(chain: str, t: int) -> str:
    """run_dir/iter_1 for the self-judged chain; iter_1_oracle, iter_1_random for ablations."""
    return f"iter_{t}" if chain == "self" else f"iter_{t}_{chain}"


def model_name(chain: str, t: int) -> str:
    return f"M{t + 1}" if chain == "self" else f"M{t + 1}-{chain}"


# -----------------------------------------------------------------------------
# Evaluation of one model


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
                                             cfg.max_new_tokens, cfg.eval_batch_size, cfg.top_p)
    greedy = evaluate.instruction_following(model, tok, eval_tasks, 0.0, None, cfg.max_new_tokens,
                                            cfg.eval_batch_size)
    result = {"sampled": sampled, "greedy": greedy}
    if judge_too:
        result["judge"] = evaluate.judge_eval(model, tok, template, eft_eval, cfg.judge_samples, gen,
                                              cfg.judge_max_new_tokens, cfg.eval_batch_size,
                                              cfg.temperature, cfg.top_p)
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
        m, lo, hi = evaluate.bootstrap_mean(r["sampled"]["points"])
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
            lines.append(f"| {n} | {j['pairwise_accuracy']:.1f} | {j['five_best']:.1f} | {j['exact_match']:.1f} | "
                         f"{j['spearman']:.3f} | {j['kendall_tau']:.3f} | {j['parse_failure_rate']:.1f} | {paper} |")
    if iters:
        lines += ["", "## The iterations: what the judge produced", "",
                  "| model | prompts kept (filter) | pairs (yield %) | ties % | parse failures % | judge scores 0..5 | "
                  "5-vs-4 pairs % | chosen / rejected length | pair precision % (oracle tie / reversed) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n, m in iters.items():
            f = m["prompt_filter"]
            lines.append(f"| {n} | {m['prompts']} ({', '.join(f'{k} {v}' for k, v in f.items())}) | "
                         f"{m['pairs']} ({m['pair_yield']:.0f}) | {m['tie_rate']:.1f} | {m['parse_failure_rate']:.1f} | "
                         f"{m['judge_score_hist']} | {m['five_vs_four']:.1f} | {m['chosen_length']:.1f} / "
                         f"{m['rejected_length']:.1f} | {m['pair_precision']:.1f} ({m['pair_oracle_tie']:.1f} / "
                         f"{m['pair_reversed']:.1f}) |")
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
        vals = [s[key] for s in summaries if key in s and s[key] == s[key]]  # skip NaN
        if not vals:
            continue
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(f"| {key} | {statistics.mean(vals):.2f} ± {sd:.2f} | {', '.join(f'{v:.2f}' for v in vals)} |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Main


def check_run_dir(cfg: Config):
    """Finished stages are reused, so a run_dir holds one configuration only; the run_dir
    itself may be spelled differently (a trailing slash, a relative path)."""
    os.makedirs(cfg.run_dir, exist_ok=True)
    cfg_path = os.path.join(cfg.run_dir, "config.json")
    if os.path.exists(cfg_path):
        old = read_json(cfg_path)
        changed = {k: (old.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("device", "compile", "run_dir") and old.get(k) != v}
        if changed:
            raise UserError(f"{cfg.run_dir} holds a run with other settings {changed} (old, new); "
                            "resume it with the same flags or choose another --run_dir")
    write_json(cfg_path, dataclasses.asdict(cfg))


def run(cfg: Config) -> dict:
    """One whole run (one seed) in the task world, in cfg.run_dir; returns its summary."""
    check_run_dir(cfg)
    model_shape = dict(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads)

    m0 = stage(cfg, "M0", mode="pretrain", corpus_docs=cfg.corpus_docs, max_steps=cfg.pretrain_steps,
               batch_size=cfg.pretrain_batch_size, seq_len=cfg.pretrain_seq_len, lr=cfg.pretrain_lr,
               min_lr=cfg.pretrain_lr / 10, warmup_steps=min(100, cfg.pretrain_steps // 10),
               eval_every=max(1, cfg.pretrain_steps // 4), **{**model_shape, "dropout": 0.0})

    def sft_stage(name, eft, **kw):
        steps = max(1, math.ceil(cfg.sft_epochs * (cfg.n_ift + eft) / cfg.sft_batch_size))
        return stage(cfg, name, mode="sft", init=m0, ift=cfg.n_ift, eft=eft, max_steps=steps,
                     batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, min_lr=cfg.sft_lr / 5,
                     warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 3), **kw)

    baseline = sft_stage("SFT", 0, show_example=False)  # IFT alone
    # IFT + EFT; half of the EFT responses are the SFT baseline's own (oracle-graded)
    m1 = sft_stage("M1", cfg.n_eft, eft_policy=baseline)

    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    eft_eval = tasks.eft_eval_set(cfg.world_seed + 4, cfg.n_eft_eval, cfg.k)
    template = tasks.load_judge_template(cfg.judge_prompt or None)
    seed_prompts = [p for p, _ in tasks.ift_seed(cfg.world_seed + 1, cfg.n_ift)]
    results, times, iters = {}, {}, {}

    def evaluate_stage(name, out_dir, path, judge_too=True):
        print(f"[eval] {name}")
        results[name] = evaluate_model(cfg, out_dir, path, eval_tasks, eft_eval, template, judge_too)
        tf = os.path.join(out_dir, "time.json")
        if os.path.exists(tf):
            times[name] = f"{read_json(tf)['seconds']:.0f}"

    def oracle(prompt, response):
        return tasks.grade(tasks.parse_task(prompt), response).points

    for name, path, judge_too in [("M0", m0, False), ("SFT", baseline, True), ("M1", m1, True)]:
        evaluate_stage(name, os.path.dirname(path), path, judge_too)
    for chain in pair_judges(cfg):
        prev, seen = m1, set()

        def new_prompts(model, tok, rng):
            generator = {"base": lambda: load_checkpoint(m0, get_device(cfg.device))[0].eval(),
                         "model": lambda: model, "world": lambda: None}[cfg.prompt_generator]()
            return generate_prompts(cfg, generator, tok, seed_prompts, seen, rng)

        for t in range(1, cfg.iterations + 1):
            # tasks of earlier iterations are not new: generate_prompts skips what `seen` holds
            done = os.path.join(cfg.run_dir, iter_name(chain, t), "prompts.jsonl")
            if os.path.exists(done):
                seen |= {tasks.task_key(tasks.parse_task(r["prompt"])) for r in read_rows(done)}
            prev, iters[model_name(chain, t)] = iteration(cfg, chain, t, prev, new_prompts, oracle, template)
            evaluate_stage(model_name(chain, t), os.path.dirname(prev), prev)
            sec = iters[model_name(chain, t)]["seconds"]
            times[model_name(chain, t)] = " + ".join(f"{k} {v:.0f}" for k, v in sec.items())
    write_report(cfg, report(cfg, results, iters, times))
    return summarize(cfg, results, iters)


def write_report(cfg: Config, text: str):
    tmp = os.path.join(cfg.run_dir, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(cfg.run_dir, "report.md"))
    print("\n" + text)


# -----------------------------------------------------------------------------
# A real model and your own files (--init): no oracle, a frozen judge evaluates


def run_files(cfg: Config) -> dict:
    """The same loop from a real chat model (--init) on your files: M0 = --init; the SFT
    baseline = SFT on --ift; M1 = SFT on --ift + --eft (without --eft, M1 is the baseline and
    judges with whatever it can already do). Prompts come from the --prompts pool: a
    held-out part for evaluation, then n_prompts new ones per iteration. Every model answers
    the held-out prompts; the --eval_judge checkpoint (frozen) judges head-to-heads."""
    from data import load_sft_data

    check_run_dir(cfg)
    if not cfg.prompts:
        raise UserError("--init needs --prompts (a JSONL prompt pool)")
    pool = list(dict.fromkeys(e.prompt for e in load_sft_data(cfg.prompts)))  # distinct, in file order
    random.Random(cfg.world_seed).shuffle(pool)
    eval_prompts, pool = pool[: cfg.n_eval], pool[cfg.n_eval :]
    if len(pool) < cfg.n_prompts * cfg.iterations:
        raise UserError(f"{cfg.prompts}: {len(pool) + len(eval_prompts)} distinct prompts; need {cfg.n_eval} for "
                        f"evaluation + {cfg.n_prompts} x {cfg.iterations} iterations (lower --n_eval or --n_prompts)")
    template = tasks.load_judge_template(cfg.judge_prompt or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "judge_prompt_real.txt"))

    def sft_stage(name, files):
        rows = [{"prompt": e.prompt, "response": e.response} for f in files for e in load_sft_data(f)]
        data = os.path.join(cfg.run_dir, f"{name}_data.jsonl")
        write_jsonl(data, rows)
        steps = max(1, math.ceil(cfg.sft_epochs * len(rows) / cfg.sft_batch_size))
        return stage(cfg, name, mode="sft", init=cfg.init, data=data, max_steps=steps, max_seq_len=0,
                     batch_size=min(cfg.sft_batch_size, len(rows)), lr=cfg.sft_lr, min_lr=cfg.sft_lr / 5,
                     warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 3), system=cfg.system)

    m0 = cfg.init
    baseline = sft_stage("SFT", [cfg.ift]) if cfg.ift else m0
    m1 = sft_stage("M1", [f for f in (cfg.ift, cfg.eft) if f]) if cfg.eft else baseline
    models = {"M0": m0, "SFT": baseline, "M1": m1}
    iters, times, comparisons = {}, {}, [("M1", "SFT")] if m1 != baseline else []
    for chain in pair_judges(cfg):
        prev = m1
        for t in range(1, cfg.iterations + 1):
            comparisons += [(model_name(chain, t), "SFT"), (model_name(chain, t), "M1" if t == 1 else model_name(chain, t - 1))]
            chunk = pool[(t - 1) * cfg.n_prompts : t * cfg.n_prompts]  # new prompts each iteration
            prev, iters[model_name(chain, t)] = iteration(
                cfg, chain, t, prev, lambda model, tok, rng, chunk=chunk: (chunk, {"from the pool": len(chunk)}),
                lambda prompt, response: None, template)
            models[model_name(chain, t)] = prev
            times[model_name(chain, t)] = " + ".join(f"{k} {v:.0f}" for k, v in iters[model_name(chain, t)]["seconds"].items())
    answers = {name: answer_prompts(cfg, name, path, eval_prompts) for name, path in models.items()}
    verdicts = judged_comparisons(cfg, comparisons, answers, eval_prompts, template)
    write_report(cfg, report_files(cfg, answers, verdicts, iters, times))
    return {}


def answer_prompts(cfg: Config, name: str, path: str, prompts: list[str]) -> list[str]:
    """One response (T = temperature) per held-out prompt, kept in run_dir/answers_<name>.jsonl."""
    out = os.path.join(cfg.run_dir, f"answers_{name}.jsonl")
    if not os.path.exists(out):
        device = get_device(cfg.device)
        model, tok = load_checkpoint(path, device)
        tok.system = cfg.system or None
        gen = torch.Generator(device).manual_seed(cfg.seed)
        texts = evaluate.sample_responses(model.eval(), tok, prompts, 1, cfg.temperature, cfg.top_p,
                                          cfg.max_new_tokens, cfg.eval_batch_size, gen, f"answers {name}")
        write_jsonl(out, [{"prompt": p, "response": r[0]} for p, r in zip(prompts, texts)])
    return [r["response"] for r in read_rows(out)]


def judged_comparisons(cfg: Config, comparisons: list, answers: dict, prompts: list[str], template: str) -> dict:
    """Head-to-heads (model a, model b) judged by the frozen --eval_judge, kept in
    run_dir/judged.json: every model after M1 against the SFT baseline and against the model
    it came from."""
    if not cfg.eval_judge:
        print("no --eval_judge: the report has no head-to-head (there is no oracle for real text)")
        return {}
    out_path = os.path.join(cfg.run_dir, "judged.json")
    done = read_json(out_path) if os.path.exists(out_path) else {}
    device = get_device(cfg.device)
    judge_model, judge_tok = load_checkpoint(cfg.eval_judge, device)
    judge_model.eval()
    for a, b in comparisons:
        key = f"{a} vs {b}"
        if key in done:
            continue
        gen = torch.Generator(device).manual_seed(cfg.seed)
        done[key] = evaluate.judged_head_to_head(judge_model, judge_tok, template, prompts, answers[a], answers[b],
                                                 cfg.judge_samples, gen, cfg.judge_max_new_tokens,
                                                 cfg.eval_batch_size, cfg.temperature, cfg.top_p)
        write_json(out_path, done)
    return done


def report_files(cfg: Config, answers: dict, verdicts: dict, iters: dict, times: dict) -> str:
    lines = [f"# Self-rewarding run from {cfg.init}: {cfg.run_dir}", "",
             f"Prompts from {cfg.prompts} ({cfg.n_eval} held out for evaluation, {cfg.n_prompts} new per iteration); "
             f"judge prompt {cfg.judge_prompt or 'judge_prompt_real.txt'}; evaluation judge {cfg.eval_judge or 'none'}.", "",
             "| model | mean response length (chars) | responses cut by the budget % |", "|---|---|---|"]
    for n, rs in answers.items():
        lines.append(f"| {n} | {sum(len(r or '') for r in rs) / len(rs):.0f} | "
                     f"{100 * sum((r or '').endswith(' …') for r in rs) / len(rs):.0f} |")
    if verdicts:
        lines += ["", f"Head-to-head judged by {cfg.eval_judge} (each response judged in two passes; a win needs "
                      "both to agree; margin = win − loss with its 95% paired-bootstrap interval):", "",
                  "| comparison | win | tie | loss | margin [95% CI] | judge parse failures % |", "|---|---|---|---|---|---|"]
        for key, h in verdicts.items():
            lines.append(f"| {key} | {h['win']:.1f} | {h['tie']:.1f} | {h['loss']:.1f} | {h['margin']:+.1f} "
                         f"[{h['margin_ci'][0]:+.1f}, {h['margin_ci'][1]:+.1f}] | {h['parse_failure_rate']:.1f} |")
    lines += ["", "## The iterations: the model as its own judge", "",
              "| model | prompts | pairs (yield %) | ties % | parse failures % | judge scores 0..5 | 5-vs-4 pairs % | "
              "chosen / rejected length | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for n, m in iters.items():
        lines.append(f"| {n} | {m['prompts']} | {m['pairs']} ({m['pair_yield']:.0f}) | {m['tie_rate']:.1f} | "
                     f"{m['parse_failure_rate']:.1f} | {m['judge_score_hist']} | {m['five_vs_four']:.1f} | "
                     f"{m['chosen_length']:.0f} / {m['rejected_length']:.0f} | {times.get(n, '')} |")
    return "\n".join(lines) + "\n"


def main(cfg: Config):
    t_start = time.time()
    get_device(cfg.device)  # a missing device is reported before anything is written
    go = run_files if cfg.init else run
    if cfg.seeds == 1:
        go(cfg)
    else:
        seeds = [cfg.seed + s for s in range(cfg.seeds)]
        summaries = [go(dataclasses.replace(cfg, seed=s, seeds=1, run_dir=os.path.join(cfg.run_dir, f"seed_{s}")))
                     for s in seeds]
        text = seeds_report(cfg, summaries, seeds)
        write_json(os.path.join(cfg.run_dir, "summary.json"), {"seeds": seeds, "runs": summaries})
        with open(os.path.join(cfg.run_dir, "report.md"), "w") as f:
            f.write(text)
        print("\n" + text)
    print(f"total {time.time() - t_start:.0f} s; report in {os.path.join(cfg.run_dir, 'report.md')}")


if __name__ == "__main__":
    # the preset chooses the defaults; flags given on the command line override them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    preset = pre.parse_known_args()[0].preset
    defaults = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    cli(main, Config, __doc__, defaults)
