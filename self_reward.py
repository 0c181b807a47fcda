"""Self-Rewarding Language Models (Yuan et al., 2024): one model that follows instructions and
judges responses, improved iteration after iteration by DPO on pairs it made and judged itself.

    python self_reward.py                  # the cpu preset: M0 -> M1 -> M2 -> M3, evaluated
    python self_reward.py --seeds 3        # three whole runs, tables with mean ± spread
    python self_reward.py --pair_judge self,oracle,random   # ablations from the same M1
    python self_reward.py --pair_judge vote                 # no judge: the samples' majority (not the paper)
    python self_reward.py --preset gpu     # bigger model and data for one GPU

The algorithm is `self_rewarding` below, one line per step of the paper:

  M0   a base model (here: pretrained on the task world's noisy corpus)     sft.py --mode pretrain
  SFT  the baseline: SFT of M0 on instruction data (IFT) alone               sft.py
  M1   SFT of M0 on IFT + judge data (EFT): follows instructions AND judges
  for t = 1, 2 (M(t) -> M(t+1)), in run_dir/iter_t/:
    prompts      new instructions, written few-shot by a fixed generator (M0) from 8 seed
                 instructions and kept only if the world can read them as new tasks
    candidates   N = 4 responses per prompt from M(t) (T = 0.7, top-p 0.9)
    judgments    M(t) judges each candidate 3 times with judge_prompt.txt; the mean of the
                 parsable scores is the candidate's score (a parse failure is never a score)
    pairs        per prompt the best vs the worst candidate; ties dropped
    model        M(t+1) = DPO from M(t), reference M(t), on those pairs       dpo.py

Every step writes its file under run_dir and is reused when the run is started again, so a
killed run resumes at its last finished step. Evaluation and report.md are report.py's; a real
chat model and your own files (--init) are self_reward_real.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

import torch

import dpo
import judge
import sft
import tasks
from checkpoint import load_checkpoint
from data import UserError, write_jsonl
from sampling import sample_responses
from train_utils import Run, check_run_dir, cli, get_device, stage_seed


@dataclass
class Config:
    preset: str = "cpu"  # "cpu" or "gpu": sets the sizes below; explicit flags win
    run_dir: str = "runs/default"
    seed: int = 1337
    seeds: int = 1  # > 1: whole runs with seeds seed, seed+1, ... in run_dir/seed_<s>/, then mean ± spread
    world_seed: int = 0
    world_difficulty: str = "default"  # default | easy: shorter lists, numbers below 20 (tasks.DIFFICULTY)
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
    eft_group: int = 1  # responses per EFT question (1: the paper's); > 1: one question, several responses of different scores
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
    pair_judge: str = "self"  # self | oracle | random | noisy | vote; a comma list (self,oracle,random) runs a chain each from M1
    flip_rate: float = 0.2  # --pair_judge noisy: the oracle's verdict on a prompt is reversed with this probability
    flip_ties: bool = False  # --pair_judge noisy: also turn the oracle's ties into pairs of random direction
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
    candidate_temperature: float = 0.0  # T of the N candidates only; 0 = --temperature (the paper: 0.7 throughout)
    top_p: float = 0.9
    top_k: int = 0  # 0: off
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
        from train_utils import check_ranges

        check_ranges(c, {  # every flag a stage receives is checked here, under its name here
            "preset": (c.preset in PRESETS, " or ".join(PRESETS)),
            "seeds": (c.seeds >= 1, ">= 1"), "iterations": (c.iterations >= 0, ">= 0"),
            "world_difficulty": (c.world_difficulty in tasks.DIFFICULTY, " or ".join(tasks.DIFFICULTY)),
            "vocab_size": (c.vocab_size >= 260, ">= 260"), "dim": (c.dim >= 1 and c.dim % c.n_heads == 0,
                                                                   "a multiple of --n_heads"),
            "n_layers": (c.n_layers >= 1, ">= 1"), "n_heads": (c.n_heads >= 1 and c.n_heads % max(1, c.n_kv_heads) == 0,
                                                                "a multiple of --n_kv_heads"),
            "n_kv_heads": (c.n_kv_heads >= 1, ">= 1"),
            "max_seq_len": (c.max_seq_len > max(c.max_new_tokens, c.judge_max_new_tokens),
                            "larger than --max_new_tokens and --judge_max_new_tokens"),
            "corpus_docs": (c.corpus_docs >= 2, ">= 2"), "pretrain_steps": (c.pretrain_steps >= 1, ">= 1"),
            "pretrain_batch_size": (c.pretrain_batch_size >= 1, ">= 1"),
            "pretrain_seq_len": (2 <= c.pretrain_seq_len <= c.max_seq_len, "in 2..--max_seq_len"),
            "pretrain_lr": (c.pretrain_lr > 0, "> 0"), "n_ift": (c.n_ift >= 1, ">= 1"), "n_eft": (c.n_eft >= 0, ">= 0"),
            "eft_group": (1 <= c.eft_group <= 6, "in 1..6"),
            "sft_epochs": (c.sft_epochs > 0, "> 0"), "sft_batch_size": (c.sft_batch_size >= 1, ">= 1"),
            "sft_lr": (c.sft_lr > 0, "> 0"), "dropout": (0 <= c.dropout < 1, "in [0, 1)"),
            "n_prompts": (c.n_prompts >= 1, ">= 1"), "few_shot": (c.few_shot >= 1, ">= 1"),
            "n_candidates": (c.n_candidates >= 2, ">= 2"), "judge_samples": (c.judge_samples >= 1, ">= 1"),
            "prompt_generator": (c.prompt_generator in ("base", "model", "world"), "base, model or world"),
            "pair_judge": (set(pair_judges(c)) <= {"self", "oracle", "random", "noisy", "vote"} and len(pair_judges(c)) > 0,
                           "self, oracle, random, noisy, vote or a comma list of them"),
            "flip_rate": (0 <= c.flip_rate <= 1, "in [0, 1]"),
            "aift": (c.aift in ("pairs", "positive"), "pairs or positive"),
            "dpo_beta": (c.dpo_beta > 0, "> 0"), "dpo_nll_coef": (c.dpo_nll_coef >= 0, ">= 0"),
            "dpo_lr": (c.dpo_lr > 0, "> 0"), "dpo_epochs": (c.dpo_epochs > 0, "> 0"),
            "dpo_batch_size": (c.dpo_batch_size >= 1, ">= 1"),
            "k": (c.k >= 2, ">= 2"), "n_eval": (c.n_eval >= 1, ">= 1"), "n_eft_eval": (c.n_eft_eval >= 1, ">= 1"),
            "temperature": (c.temperature > 0, "> 0"), "candidate_temperature": (c.candidate_temperature >= 0, ">= 0"),
            "top_p": (0 < c.top_p <= 1, "in (0, 1]"),
            "top_k": (c.top_k >= 0, ">= 0"), "max_new_tokens": (c.max_new_tokens >= 1, ">= 1"),
            "judge_max_new_tokens": (c.judge_max_new_tokens >= 1, ">= 1"),
            "eval_batch_size": (c.eval_batch_size >= 1, ">= 1"),
        })
        if c.init and ({"oracle", "noisy", "vote"} & set(pair_judges(c)) or c.prompt_generator != "base"):
            raise UserError("with --init there is no oracle and no world: --pair_judge self or random "
                            "(vote needs short answers to compare), and prompts come from --prompts")
        if judge.is_pairwise_file(c.judge_prompt) and (c.init or c.eft_group < 2 or c.aift != "pairs"):
            raise UserError(f"--judge_prompt {c.judge_prompt} is pairwise: it learns from EFT groups of the task world "
                            "(--eft_group 2 or more, not with --init), and its win shares make pairs, not --aift positive")


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


# -----------------------------------------------------------------------------
# The algorithm


def self_rewarding(cfg: Config, source) -> dict[str, str]:
    """Self-Rewarding LMs (Yuan et al. 2024, section 2) for one seed; returns every model's
    checkpoint by name. `source` says where models, prompts and grades come from: the task
    world (self_reward_world.World, with its oracle) or a real chat model and your JSONL files
    (self_reward_real.Files, no oracle)."""
    run = Run(cfg.run_dir)
    m0 = source.base_model(run)                            # §2.4: M0, the base model
    baseline = source.sft(run, "SFT", eft=False)           # §3: the SFT baseline, IFT data only
    m1 = source.sft(run, "M1", eft=True)                   # §2.1, §2.4: M1 = SFT of M0 on IFT + EFT
    models = {"M0": m0, "SFT": baseline, "M1": m1}
    for chain in pair_judges(cfg):          # "self" is the paper's; "oracle" and "random" are ablations
        model, seen = m1, set()
        for t in range(1, cfg.iterations + 1):             # §2.4: M(t+1) = DPO of M(t) on AIFT(M(t))
            d, seed = iter_name(chain, t), (chain, t)
            prompts = run.rows(f"{d}/prompts.jsonl",             # §2.2 (1): new prompts
                               lambda: source.new_prompts(run, chain, t, model, seen))
            seen |= {source.task_key(p["prompt"]) for p in prompts}
            candidates = run.rows(f"{d}/candidates.jsonl",       # §2.2 (2): N candidate responses
                                  lambda: sample_candidates(cfg, model, prompts, seed))
            judgments = run.rows(f"{d}/judgments.jsonl",         # §2.2 (3): M(t) judges each one
                                 lambda: judge_candidates(cfg, chain, model, candidates, source, seed))
            pairs = run.rows(f"{d}/pairs.jsonl",                 # §2.3: best vs worst, ties dropped
                             lambda: preference_pairs(candidates, judgments), cache=False)
            model = run.model(d,                                 # §2.3: DPO from M(t), reference M(t)
                              lambda: train_next(cfg, model, pairs, candidates, judgments, d, seed))
            models[model_name(chain, t)] = model
    return models


# -----------------------------------------------------------------------------
# The steps of an iteration


def sample_candidates(cfg: Config, model_path: str, prompts: list[dict], seed: tuple) -> list[dict]:
    """N responses per prompt from M(t) at T = candidate_temperature (or temperature), top-p, one
    shared prefill per prompt.
    Rows {"prompt", "candidates": N texts, "finished": N bools (False: cut by the budget)}."""
    device = get_device(cfg.device)
    model, tok = load_policy(cfg, model_path, device)
    gen = torch.Generator(device).manual_seed(stage_seed(cfg, *seed, "candidates"))
    texts = [r["prompt"] for r in prompts]
    temperature = cfg.candidate_temperature or cfg.temperature
    out, finished = sample_responses(model, tok, texts, cfg.n_candidates, temperature, cfg.top_p,
                                     cfg.max_new_tokens, cfg.eval_batch_size, gen, "candidates", return_finished=True,
                                     top_k=cfg.top_k)
    return [{"prompt": p, "candidates": c, "finished": f} for p, c, f in zip(texts, out, finished)]


def judge_candidates(cfg: Config, chain: str, model_path: str, cands: list[dict], source, seed: tuple) -> list[dict]:
    """Scores of every candidate by the chain's pair judge, and the oracle's points (which
    only measure: pair precision; None without an oracle). self: M(t) judges each candidate
    judge_samples times, the mean of the parsable scores counts (None if none parsed);
    oracle: the exact grade (the ceiling a perfect judge gives); random: a random number
    (the control: no signal); with a pairwise --judge_prompt, self scores each candidate by
    the share of its comparisons with the others that it wins (judge.compare_pairs, both
    orders, then judge.win_shares; not the paper's); noisy: the oracle reversed at --flip_rate (noisy_oracle);
    vote: no judge at all, each candidate's share of the N samples giving its answer
    (vote_shares: self-consistency, not the paper)."""
    oracle = [[source.oracle(c["prompt"], x) for x in c["candidates"]] for c in cands]
    if chain == "self":
        device = get_device(cfg.device)
        model, tok = load_policy(cfg, model_path, device)
        gen = torch.Generator(device).manual_seed(stage_seed(cfg, *seed, "judge"))
        if judge.is_pairwise(source.template):  # not the paper's: two candidates at a time, both orders
            comparisons = judge.compare_pairs(model, tok, source.template,
                                              [(c["prompt"], c["candidates"]) for c in cands], cfg.judge_samples,
                                              cfg.temperature, cfg.top_p, cfg.judge_max_new_tokens,
                                              cfg.eval_batch_size, gen, top_k=cfg.top_k)
            rows = []
            for c, comps, o in zip(cands, comparisons, oracle):
                row = judge.win_shares(c["candidates"], comps)
                first = {x: k for k, x in reversed(list(enumerate(c["candidates"])))}  # text -> its first index
                rows.append({"prompt": c["prompt"], "scores": [j.score for j in row],
                             "samples": [j.samples for j in row], "oracle": o, "pairwise": True,
                             # one record per ordered comparison (candidate indices, A first), so
                             # that position bias and order agreement can be read back
                             "comparisons": [{"a": first[x.a], "b": first[x.b], "verdicts": x.verdicts,
                                              "texts": x.texts} for x in comps]})
            return rows
        items = [(c["prompt"], x) for c in cands for x in c["candidates"]]
        refs = None  # a reference-guided judge first answers each prompt itself, greedily
        if judge.is_reference_guided(source.template):
            refs = judge.reference_answers(model, tok, [q for q, _ in items], cfg.max_new_tokens, cfg.eval_batch_size)
        js = judge.score(model, tok, source.template, items, cfg.judge_samples, cfg.temperature,
                         cfg.top_p, cfg.judge_max_new_tokens, cfg.eval_batch_size, gen, "self-judging", top_k=cfg.top_k,
                         references=refs)
        n = cfg.n_candidates
        return [{"prompt": c["prompt"], "scores": [j.score for j in js[i * n:(i + 1) * n]],
                 "samples": [j.samples for j in js[i * n:(i + 1) * n]],
                 "texts": [j.texts for j in js[i * n:(i + 1) * n]], "oracle": o,
                 **({"reference": refs[i * n]} if refs else {})}
                for i, (c, o) in enumerate(zip(cands, oracle))]
    rng = random.Random(stage_seed(cfg, *seed, "judge"))
    if chain == "vote":
        scores = [vote_shares(c["candidates"]) for c in cands]
    elif chain == "noisy":
        scores = [noisy_oracle(o, cfg.flip_rate, cfg.flip_ties, rng) for o in oracle]
    else:
        scores = [[float(p) for p in o] if chain == "oracle" else [rng.random() for _ in o] for o in oracle]
    return [{"prompt": c["prompt"], "oracle": o, "scores": s} for c, o, s in zip(cands, oracle, scores)]


def noisy_oracle(points: list[int], flip_rate: float, flip_ties: bool, rng) -> list[float]:
    """A judge of known quality, to measure how good a judge the loop needs: the oracle's
    points, all negated with probability flip_rate (the best-vs-worst pair is then reversed);
    with flip_ties, a prompt whose candidates the oracle scores alike gets random scores (a
    pair of random direction, as a noisy judge makes them). Its precision and reversal rate
    are known in advance: (1 - flip_rate, flip_rate) of the pairs the oracle tells apart."""
    if len(set(points)) == 1:
        return [rng.random() for _ in points] if flip_ties else [float(p) for p in points]
    sign = -1.0 if rng.random() < flip_rate else 1.0
    return [sign * p for p in points]


def normalize_answer(text: str) -> str:
    """The answer a vote compares: lower case, runs of white space as one space, no final
    full stop or exclamation mark ("Sorted: 1, 2." and "sorted:  1, 2" are one answer)."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!")


def vote_shares(responses: list[str], extra_voters: list[str] = ()) -> list[float]:
    """Self-consistency as the pair judge (Wang et al. 2023; majority voting as the reward in
    TTRL, Zuo et al. 2025): per response, the share of all voters (the responses, then
    extra_voters) whose answer equals its own, the response counting as its own voter.
        score(y_i) = |{j : a(y_j) = a(y_i)}| / N,   a = normalize_answer
    best vs worst is then the most common answer against the rarest; a prompt whose answers
    are all different (or all the same) is a tie and gives no pair. It certifies a shared
    answer, not a right one: it helps where the model's majority is more often right."""
    answers = [normalize_answer(r) for r in list(responses) + list(extra_voters)]
    counts = Counter(answers)
    return [counts[a] / len(answers) for a in answers[: len(responses)]]


def build_pairs(responses: list[str], scores: list[float | None], finished: list[bool] | None = None):
    """The paper's preference pair for one prompt: (index of the best, index of the worst)
    candidate by score, or the reason there is none:
      "too few scores"  fewer than two candidates with a valid score (None = no parsable judgment)
      "none finished"   no validly scored candidate ended with EOS
      "tie"             best and worst scores are equal: no preference
      "identical"       the best and worst are the same text (a judge's noise, not a preference)
    A candidate cut off without EOS (finished False) may be the worst, never the best: DPO
    would teach its text followed by an EOS the model never wrote."""
    # --- exercise: build_pairs ---
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
    # --- end exercise ---


def preference_pairs(cands: list[dict], judgments: list[dict]) -> list[dict]:
    """The best-vs-worst pair of every prompt that has one (build_pairs), with the judge's and
    the oracle's scores of both sides (the oracle's only measure pair precision)."""
    pairs = []
    for c, j in zip(cands, judgments):
        got = build_pairs(c["candidates"], j["scores"], c["finished"])
        if isinstance(got, str):
            continue
        b, w = got
        pairs.append({"prompt": c["prompt"], "chosen": c["candidates"][b], "rejected": c["candidates"][w],
                      "chosen_score": j["scores"][b], "rejected_score": j["scores"][w],
                      "chosen_oracle": j["oracle"][b], "rejected_oracle": j["oracle"][w]})
    print(f"pairs: {len(pairs)} from {len(cands)} prompts")
    if len(pairs) < 2:
        raise UserError(f"only {len(pairs)} preference pairs; more --n_prompts or a better judge needed")
    return pairs


def train_next(cfg: Config, model_path: str, pairs: list[dict], cands, judgments, d: str, seed: tuple) -> str:
    """M(t+1): DPO from M(t) with reference M(t) on the pairs (dpo.py; + the NLL term of the
    chosen response), or with --aift positive SFT on the responses every judge sample scored 5
    (the paper's ablation)."""
    out_dir = os.path.join(cfg.run_dir, d)
    if cfg.aift == "pairs":
        return dpo.main(dpo.DPOConfig(
            init=model_path, data=os.path.join(out_dir, "pairs.jsonl"), out_dir=out_dir,
            seed=stage_seed(cfg, *seed, "dpo"), world_seed=cfg.world_seed, beta=cfg.dpo_beta,
            nll_coef=cfg.dpo_nll_coef, lr=cfg.dpo_lr, min_lr_ratio=0.1, epochs=cfg.dpo_epochs,
            batch_size=min(cfg.dpo_batch_size, len(pairs)), warmup_steps=5, eval_every=0, eval_frac=0.0,
            device=cfg.device, compile=cfg.compile, overwrite=True, system=cfg.system))
    positives = [{"prompt": c["prompt"], "response": c["candidates"][k]} for c, j in zip(cands, judgments)
                 for k in [next((k for k, s in enumerate(j["scores"]) if s == 5.0 and c["finished"][k]), None)]
                 if k is not None]
    pos_path = os.path.join(out_dir, "positive.jsonl")
    write_jsonl(pos_path, positives)
    if len(positives) < 2:
        raise UserError(f"{pos_path}: only {len(positives)} responses judged 5; --aift positive has nothing to train on")
    return sft.main(sft.SFTConfig(
        mode="sft", init=model_path, data=pos_path, out_dir=out_dir, eval_frac=0.0,
        seed=stage_seed(cfg, *seed, "sft"), batch_size=min(cfg.dpo_batch_size, len(positives)),
        epochs=cfg.dpo_epochs, lr=cfg.dpo_lr, min_lr_ratio=0.1, warmup_steps=5, eval_every=0,
        dropout=cfg.dropout, device=cfg.device, overwrite=True, show_example=False, system=cfg.system))


def sft_stage(cfg: Config, name: str, **overrides) -> str:
    """One sft.py run into run_dir/name; prints the equivalent command line."""
    common = dict(out_dir=os.path.join(cfg.run_dir, name), seed=cfg.seed, world_seed=cfg.world_seed,
                  device=cfg.device, compile=cfg.compile, dropout=cfg.dropout, max_seq_len=cfg.max_seq_len,
                  overwrite=True)  # overrides win
    scfg = sft.SFTConfig(**{**common, **overrides})
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v}"
             for k, v in dataclasses.asdict(scfg).items() if v != getattr(sft.SFTConfig(), k)]
    print(f"[{name}] python sft.py " + " ".join(flags))  # the same stage, run by hand
    return sft.main(scfg)


def load_policy(cfg: Config, path: str, device):
    model, tok = load_checkpoint(path, device)
    tok.system = cfg.system or None
    return model.eval(), tok


def iter_name(chain: str, t: int) -> str:
    """run_dir/iter_1 for the self-judged chain; iter_1_oracle, iter_1_random for ablations."""
    return f"iter_{t}" if chain == "self" else f"iter_{t}_{chain}"


def model_name(chain: str, t: int) -> str:
    return f"M{t + 1}" if chain == "self" else f"M{t + 1}-{chain}"


# -----------------------------------------------------------------------------
# Main


def run_world(cfg: Config) -> dict:
    """One whole run (one seed) in the task world: the loop, then every model evaluated and
    report.md written. Returns the run's headline numbers."""
    import report

    from self_reward_world import World

    check_run_dir(cfg)
    tasks.set_difficulty(cfg.world_difficulty)  # every stage runs in this process: all draw from it
    models = self_rewarding(cfg, World(cfg))
    return report.world_report(cfg, models)


def main(cfg: Config):
    import report

    t_start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("self_reward.py runs its stages in one process (its sampling and judging are not sharded); "
                        "run the training stages it prints ([M1] python sft.py ..., dpo.py ...) under torchrun instead")
    get_device(cfg.device)  # a missing device is reported before anything is written
    if cfg.init:
        import self_reward_real

        go = self_reward_real.run_files
    else:
        go = run_world
    if cfg.seeds == 1:
        go(cfg)
    else:
        seeds = [cfg.seed + s for s in range(cfg.seeds)]
        summaries = [go(dataclasses.replace(cfg, seed=s, seeds=1, run_dir=os.path.join(cfg.run_dir, f"seed_{s}")))
                     for s in seeds]
        report.write_seeds_report(cfg, summaries, seeds)
    print(f"total {time.time() - t_start:.0f} s; report in {os.path.join(cfg.run_dir, 'report.md')}")


if __name__ == "__main__":
    # the preset chooses the defaults; flags given on the command line override them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    preset = pre.parse_known_args()[0].preset
    defaults = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    cli(main, Config, __doc__, defaults)
