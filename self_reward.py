"""Self-Rewarding Language Models (Yuan et al., 2024) on the synthetic task world.

    python self_reward.py                  # the cpu preset: M0 -> SFT baseline -> M1, evaluated
    python self_reward.py --preset gpu     # bigger model and data for one GPU

What runs today (each stage resumes: a finished stage's checkpoint is found and reused):

  M0   pretraining on the world's noisy corpus                         (sft.py --mode pretrain)
  SFT  the baseline: SFT of M0 on instruction data (IFT) alone           (sft.py --eft 0)
  M1   SFT of M0 on IFT + judge data (EFT): follows instructions AND judges (sft.py)
  eval instruction following (oracle, held-out prompts) and reward modeling (M as judge)
  report.md   the paper's two tables for this run

Not yet: M2 and M3. In the paper each M(t+1) is trained with DPO on pairs that M(t) generated
(N = 4 candidates) and scored itself (3 judge samples averaged, best vs worst, ties dropped).
That iteration needs dpo.py, which has not landed; this script stops after M1 and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch

import evaluate
import sft
import tasks
from data import load_tokenizer, write_json, write_jsonl
from model import Transformer, get_device, parse_config


@dataclass
class Config:
    preset: str = "cpu"  # "cpu" or "gpu": sets the sizes below; explicit flags win
    run_dir: str = "runs/default"
    seed: int = 1337
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
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 32
    pretrain_seq_len: int = 128
    pretrain_lr: float = 2e-3
    # M1 / SFT baseline
    ift: int = 400  # IFT seed size (the paper: 3,200 Open Assistant examples)
    eft: int = 800  # EFT train size (the paper: 1,775)
    sft_epochs: float = 8.0  # passes over the SFT data: the baseline and M1 see each IFT example equally often
    sft_batch_size: int = 32
    sft_lr: float = 5e-4
    dropout: float = 0.1
    # evaluation
    n_eval: int = 300  # held-out instruction prompts
    n_eft_eval: int = 60  # held-out judge prompts, K responses each (the paper: 531 EFT eval)
    k: int = 4
    judge_samples: int = 3
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 40  # response budget
    judge_max_new_tokens: int = 64  # judge's budget (its own, separate from the prompt)
    eval_batch_size: int = 64


PRESETS = {
    "cpu": {},  # the dataclass defaults: the whole run in minutes on 2 cores
    "gpu": dict(vocab_size=1024, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, max_seq_len=384,
                corpus_docs=200000, pretrain_steps=6000, pretrain_batch_size=64, pretrain_seq_len=256,
                pretrain_lr=1e-3, ift=2000, eft=1800, sft_epochs=5.0, sft_batch_size=32, sft_lr=2e-4,
                n_eval=1000, n_eft_eval=300, eval_batch_size=256),
}


def stage(cfg: Config, name: str, **overrides) -> str:
    """Run one sft.py stage into run_dir/name unless its checkpoint already exists."""
    out_dir = os.path.join(cfg.run_dir, name)
    ckpt = os.path.join(out_dir, "model")
    if os.path.exists(os.path.join(ckpt, "config.json")):
        print(f"[{name}] found {ckpt}, reusing it")
        return ckpt
    common = dict(out_dir=out_dir, seed=cfg.seed, world_seed=cfg.world_seed, device=cfg.device,
                  compile=cfg.compile, dropout=cfg.dropout, max_seq_len=cfg.max_seq_len)  # overrides win
    scfg = sft.SFTConfig(**{**common, **overrides})
    flags = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {v}"
             for k, v in dataclasses.asdict(scfg).items() if v != getattr(sft.SFTConfig(), k)]
    print(f"[{name}] python sft.py " + " ".join(flags))  # the same stage, run by hand
    t0 = time.time()
    path = sft.main(scfg)
    write_json(os.path.join(out_dir, "time.json"), {"seconds": time.time() - t0})
    return path


def evaluate_model(cfg: Config, name: str, path: str, eval_tasks, eft_eval, template, judge_too: bool):
    """Instruction following (T = temperature and greedy) and, for a judge, reward modeling."""
    out_path = os.path.join(cfg.run_dir, name, "eval.json")
    if os.path.exists(out_path):
        with open(out_path) as f:
            return json.load(f)
    device = get_device(cfg.device)
    model, tok = Transformer.from_pretrained(path).to(device).eval(), load_tokenizer(path)
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
    write_jsonl(os.path.join(cfg.run_dir, name, "eval_responses.jsonl"), [
        {"prompt": t.prompt, "response": r, "points": p, "greedy": gr, "greedy_points": gp}
        for t, r, p, gr, gp in zip(eval_tasks, sampled["responses"], sampled["points"],
                                   greedy["responses"], greedy["points"])])
    write_json(out_path, result)
    return result


def fmt_if(r: dict) -> str:
    return (f"{r['sampled']['oracle_mean']:.2f} | {100 * r['sampled']['exact_correct']:.1f} | "
            f"{r['greedy']['oracle_mean']:.2f} | {100 * r['greedy']['exact_correct']:.1f}")


def report(cfg: Config, results: dict, times: dict) -> str:
    names = list(results)
    lines = [
        f"# Self-rewarding run: {cfg.run_dir}", "",
        f"Preset `{cfg.preset}`, seed {cfg.seed}, world seed {cfg.world_seed}. "
        f"Held-out: {cfg.n_eval} instruction prompts, {cfg.n_eft_eval} judge prompts × {cfg.k} responses.", "",
        "## Instruction following (oracle grader, 0-5 points)", "",
        f"| model | mean points (T={cfg.temperature}) | exact-correct % (T={cfg.temperature}) | mean points (greedy) | exact-correct % (greedy) | score histogram 0..5 (T={cfg.temperature}) |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        lines.append(f"| {n} | {fmt_if(results[n])} | {results[n]['sampled']['score_hist']} |")
    if "M1" in results and "SFT" in results:
        h = evaluate.head_to_head(results["M1"]["sampled"]["points"], results["SFT"]["sampled"]["points"])
        lines += ["", f"Head-to-head M1 vs SFT baseline (T={cfg.temperature}, per prompt, higher oracle score wins): "
                      f"win {h['win']:.1f} / tie {h['tie']:.1f} / loss {h['loss']:.1f} "
                      "(the paper: 30.5 / 38.7 / 30.9).", ""]
    lines += [
        "## Reward modeling (the model as judge vs the oracle ranking)", "",
        "| model | pairwise acc % | 5-best % | exact match % | Spearman | Kendall τ | judge parse failures % |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        j = results[n].get("judge")
        if j:
            lines.append(f"| {n} | {j['pairwise_accuracy']:.1f} | {j['five_best']:.1f} | {j['exact_match']:.1f} | "
                         f"{j['spearman']:.3f} | {j['kendall_tau']:.3f} | {j['parse_failure_rate']:.1f} |")
    lines += ["| paper: SFT baseline (70B) | 65.1 | 39.6 | 10.1 | .253 | .233 | |",
              "| paper: M1 (70B) | 78.7 | 41.5 | 13.1 | .279 | .253 | |", "",
              "## Time (seconds)", "", "| stage | train | eval |", "|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {times.get(n, 0.0):.0f} | {results[n]['seconds']:.0f} |")
    lines += ["", "M2 and M3 (DPO on self-judged pairs) are not implemented yet: dpo.py has not landed.", ""]
    return "\n".join(lines)


def main(cfg: Config):
    t_start = time.time()
    os.makedirs(cfg.run_dir, exist_ok=True)
    # finished stages are reused, so a run_dir must hold one configuration only
    cfg_path = os.path.join(cfg.run_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        changed = {k: (old.get(k), v) for k, v in dataclasses.asdict(cfg).items()
                   if k not in ("device", "compile") and old.get(k) != v}
        if changed:
            raise SystemExit(f"{cfg.run_dir} holds a run with other settings {changed} (old, new); "
                             "resume it with the same flags or choose another --run_dir")
    write_json(cfg_path, dataclasses.asdict(cfg))
    model_shape = dict(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                       n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads)

    m0 = stage(cfg, "M0", mode="pretrain", corpus_docs=cfg.corpus_docs, max_steps=cfg.pretrain_steps,
               batch_size=cfg.pretrain_batch_size, seq_len=cfg.pretrain_seq_len, lr=cfg.pretrain_lr,
               min_lr=cfg.pretrain_lr / 10, warmup_steps=min(100, cfg.pretrain_steps // 10),
               eval_every=max(1, cfg.pretrain_steps // 4), **{**model_shape, "dropout": 0.0})

    def sft_stage(name, eft, **kw):
        steps = max(1, math.ceil(cfg.sft_epochs * (cfg.ift + eft) / cfg.sft_batch_size))
        return stage(cfg, name, mode="sft", init=m0, ift=cfg.ift, eft=eft, max_steps=steps,
                     batch_size=cfg.sft_batch_size, lr=cfg.sft_lr, min_lr=cfg.sft_lr / 5,
                     warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 3), **kw)

    baseline = sft_stage("SFT", 0, show_example=False)  # IFT alone
    m1 = sft_stage("M1", cfg.eft)  # IFT + EFT

    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    eft_eval = tasks.eft_eval_set(cfg.world_seed + 4, cfg.n_eft_eval, cfg.k)
    template = tasks.load_judge_template()
    results, times = {}, {}
    for name, path, judge_too in [("M0", m0, False), ("SFT", baseline, True), ("M1", m1, True)]:
        print(f"[eval] {name}")
        results[name] = evaluate_model(cfg, name, path, eval_tasks, eft_eval, template, judge_too)
        tf = os.path.join(cfg.run_dir, name, "time.json")
        if os.path.exists(tf):
            with open(tf) as f:
                times[name] = json.load(f)["seconds"]
    text = report(cfg, results, times)
    tmp = os.path.join(cfg.run_dir, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(cfg.run_dir, "report.md"))
    print("\n" + text)
    print(f"total {time.time() - t_start:.0f} s; report in {os.path.join(cfg.run_dir, 'report.md')}")


if __name__ == "__main__":
    # the preset chooses the defaults; flags given on the command line override them
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    preset = pre.parse_known_args()[0].preset
    defaults = dataclasses.replace(Config(), preset=preset, **PRESETS[preset])
    main(parse_config(Config, __doc__, defaults))
