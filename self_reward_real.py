"""The self-rewarding loop from a real chat model and your own files (self_reward.py --init).

The algorithm is self_reward.self_rewarding, unchanged; `Files` gives it what the task world
gives it otherwise: M0 = --init (no pretraining); the SFT baseline = SFT on --ift; M1 = SFT on
--ift + --eft (without --eft, M1 is the baseline and judges with whatever it can already do);
new prompts from the --prompts pool (a held-out part is kept for evaluation, then n_prompts
new ones per iteration); the judge prompt judge_prompt_real.txt; and no oracle. Every model
answers the held-out prompts and the --eval_judge checkpoint (frozen) judges head-to-heads.
"""

from __future__ import annotations

import os
import random

import torch

import evaluate
from evaluate import fmt
import judge
from checkpoint import load_checkpoint
from data import UserError, load_sft_data, read_json, write_json, write_jsonl
from report import iteration_metrics, write_report
from sampling import sample_responses
from self_reward import Config, iter_name, model_name, pair_judges, self_rewarding, sft_stage
from train_utils import Run, check_run_dir, get_device, read_rows

REAL_JUDGE_PROMPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "judge_prompt_real.txt")


class Files:
    """What the loop takes from --init and your JSONL files (self_reward.World is its task-world twin)."""

    def __init__(self, cfg: Config, pool: list[str]):
        self.cfg, self.pool = cfg, pool
        self.template = judge.load_judge_template(cfg.judge_prompt or REAL_JUDGE_PROMPT)

    def base_model(self, run: Run) -> str:
        return self.cfg.init

    def sft(self, run: Run, name: str, eft: bool) -> str:
        """SFT of --init on --ift (the baseline) or on --ift + --eft (M1). Without --ift the
        baseline is --init itself; without --eft, M1 is the baseline."""
        c = self.cfg
        if not (c.eft if eft else c.ift):
            path = self.baseline if eft else c.init
        else:
            files = [f for f in (c.ift, c.eft) if f] if eft else [c.ift]
            rows = [{"prompt": e.prompt, "response": e.response} for f in files for e in load_sft_data(f)]
            data = os.path.join(c.run_dir, f"{name}_data.jsonl")
            write_jsonl(data, rows)
            steps = max(1, int(c.sft_epochs * len(rows) / c.sft_batch_size))  # about; sft.py counts exactly
            path = run.model(name, lambda: sft_stage(
                c, name, mode="sft", init=c.init, data=data, epochs=c.sft_epochs, max_seq_len=0,
                batch_size=min(c.sft_batch_size, len(rows)), lr=c.sft_lr, min_lr_ratio=0.2,
                warmup_steps=max(1, steps // 10), eval_every=max(1, steps // 3), system=c.system))
        if not eft:
            self.baseline = path
        return path

    def new_prompts(self, run: Run, chain: str, t: int, model_path: str, seen: set) -> list[dict]:
        """The t-th chunk of the prompt pool: new prompts each iteration."""
        chunk = self.pool[(t - 1) * self.cfg.n_prompts : t * self.cfg.n_prompts]
        write_json(os.path.join(run.run_dir, iter_name(chain, t), "prompt_filter.json"), {"from the pool": len(chunk)})
        return [{"prompt": p} for p in chunk]

    @staticmethod
    def task_key(prompt: str):
        return prompt

    @staticmethod
    def oracle(prompt: str, response: str):
        return None  # no oracle for real text


def split_pool(cfg: Config) -> tuple[list[str], list[str], int]:
    """(held-out evaluation prompts, the pool of new prompts, how many pool prompts are also in
    --ift/--eft). The pool's distinct prompts are shuffled by --world_seed; a prompt the models
    were trained on never becomes an evaluation prompt (it may still be a new prompt)."""
    pool = list(dict.fromkeys(e.prompt for e in load_sft_data(cfg.prompts)))  # distinct, in file order
    random.Random(cfg.world_seed).shuffle(pool)
    trained = {e.prompt for f in (cfg.ift, cfg.eft) if f for e in load_sft_data(f)}
    eval_prompts = [p for p in pool if p not in trained][: cfg.n_eval]
    overlap = sum(p in trained for p in pool)
    if overlap:
        print(f"{cfg.prompts}: {overlap} prompts are also in --ift/--eft; they are kept out of the evaluation")
    held_out = set(eval_prompts)
    return eval_prompts, [p for p in pool if p not in held_out], overlap


def run_files(cfg: Config) -> dict:
    """The loop from --init on your files, then every model's answers to the held-out prompts,
    head-to-heads judged by --eval_judge, and report.md."""
    if not cfg.prompts:
        raise UserError("--init needs --prompts (a JSONL prompt pool)")
    eval_prompts, pool, overlap = split_pool(cfg)
    if len(pool) < cfg.n_prompts * cfg.iterations:
        raise UserError(f"{cfg.prompts}: {len(pool) + len(eval_prompts)} distinct prompts; need {cfg.n_eval} for "
                        f"evaluation + {cfg.n_prompts} x {cfg.iterations} iterations (lower --n_eval or --n_prompts)")
    check_run_dir(cfg)
    source = Files(cfg, pool)
    models = self_rewarding(cfg, source)
    comparisons = [("M1", "SFT")] if models["M1"] != models["SFT"] else []
    iters, times = {}, {}
    run_times = read_json(os.path.join(cfg.run_dir, "times.json")) if os.path.exists(
        os.path.join(cfg.run_dir, "times.json")) else {}
    for chain in pair_judges(cfg):
        for t in range(1, cfg.iterations + 1):
            name, d = model_name(chain, t), iter_name(chain, t)
            comparisons += [(name, "SFT"), (name, "M1" if t == 1 else model_name(chain, t - 1))]
            iters[name] = iteration_metrics(cfg, chain, t)
            steps = {"candidates": f"{d}/candidates.jsonl", "judgments": f"{d}/judgments.jsonl", "train": d}
            times[name] = " + ".join(f"{k} {run_times[v]:.0f}" for k, v in steps.items() if v in run_times)
    answers = {name: answer_prompts(cfg, name, path, eval_prompts) for name, path in models.items()}
    verdicts = judged_comparisons(cfg, comparisons, answers, eval_prompts, source.template)
    write_report(cfg, report_files(cfg, answers, verdicts, iters, times, overlap))
    return {}


def answer_prompts(cfg: Config, name: str, path: str, prompts: list[str]) -> list[str]:
    """One response (T = temperature) per held-out prompt, kept in run_dir/answers_<name>.jsonl."""
    out = os.path.join(cfg.run_dir, f"answers_{name}.jsonl")
    if not os.path.exists(out):
        device = get_device(cfg.device)
        model, tok = load_checkpoint(path, device)
        tok.system = cfg.system or None
        gen = torch.Generator(device).manual_seed(cfg.seed)
        texts = sample_responses(model.eval(), tok, prompts, 1, cfg.temperature, cfg.top_p,
                                          cfg.max_new_tokens, cfg.eval_batch_size, gen, f"answers {name}", top_k=cfg.top_k)
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
                                                 cfg.eval_batch_size, cfg.temperature, cfg.top_p, cfg.top_k)
        write_json(out_path, done)
    return done


def report_files(cfg: Config, answers: dict, verdicts: dict, iters: dict, times: dict, overlap: int = 0) -> str:
    lines = [f"# Self-rewarding run from {cfg.init}: {cfg.run_dir}", "",
             f"Prompts from {cfg.prompts} ({cfg.n_eval} held out for evaluation, {cfg.n_prompts} new per iteration); "
             f"judge prompt {cfg.judge_prompt or 'judge_prompt_real.txt'}; evaluation judge {cfg.eval_judge or 'none'}. "
             f"{overlap} pool prompts that are also in --ift/--eft were kept out of the evaluation.", "",
             "| model | mean response length (chars) | responses cut by the budget % |", "|---|---|---|"]
    for n, rs in answers.items():
        lines.append(f"| {n} | {sum(len(r or '') for r in rs) / len(rs):.0f} | "
                     f"{100 * sum((r or '').endswith(' …') for r in rs) / len(rs):.0f} |")
    if verdicts:
        lines += ["", f"Head-to-head judged by {cfg.eval_judge} (each response judged in two passes; a win needs "
                      "both to agree; margin = win − loss with its 95% paired-bootstrap interval):", "",
                  "| comparison | win | tie | loss | margin [95% CI] | judge parse failures % |", "|---|---|---|---|---|---|"]
        for key, h in verdicts.items():
            if not h.get("verdict", True):
                lines.append(f"| {key} | no verdict | | | (the judge scored no prompt's two responses) | "
                             f"{h['parse_failure_rate']:.1f} |")
                continue
            lines.append(f"| {key} | {h['win']:.1f} | {h['tie']:.1f} | {h['loss']:.1f} | {h['margin']:+.1f} "
                         f"[{h['margin_ci'][0]:+.1f}, {h['margin_ci'][1]:+.1f}] | {h['parse_failure_rate']:.1f} |")
    lines += ["", "## The iterations: the model as its own judge", "",
              "| model | prompts | pairs (yield %) | ties % | parse failures % | judge scores 0..5 | 5-vs-4 pairs % | "
              "chosen / rejected length | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for n, m in iters.items():
        lines.append(f"| {n} | {m['prompts']} | {m['pairs']} ({m['pair_yield']:.0f}) | {m['tie_rate']:.1f} | "
                     f"{fmt(m['parse_failure_rate'])} | {m['judge_score_hist']} | {fmt(m['five_vs_four'])} | "
                     f"{fmt(m['chosen_length'], '.0f')} / {fmt(m['rejected_length'], '.0f')} | {times.get(n, '')} |")
    return "\n".join(lines) + "\n"
