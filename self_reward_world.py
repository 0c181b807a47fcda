"""The task world's side of the self-rewarding loop (self_reward.py --preset cpu|gpu|micro).

`World` gives self_reward.self_rewarding what it needs from the world: M0 pretrained from
scratch on the world's noisy corpus, the world's IFT and EFT data for the SFT baseline and
M1, new instructions written few-shot by a prompt generator each iteration (Self-Instruct, as
the paper did), and the oracle that grades any response (which only measures: pair
precision). self_reward_real.Files is its twin for a real chat model and your own files.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import torch

import judge
import tasks
from checkpoint import load_checkpoint
from data import UserError, write_json
from sampling import generate
from self_reward import Config, iter_name, load_policy, sft_stage
from train_utils import Run, get_device, stage_seed


class World:
    """What the loop takes from the task world (self_reward_real.Files is its real-data twin)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.template = judge.load_judge_template(cfg.judge_prompt or None)
        self.seed_prompts = [p for p, _ in tasks.ift_seed(cfg.world_seed + 1, cfg.n_ift)]
        self.baseline = None

    def base_model(self, run: Run) -> str:
        """M0: a model pretrained from scratch on the world's noisy corpus (sft.py --mode pretrain)."""
        c = self.cfg
        self.m0 = run.model("M0", lambda: sft_stage(
            c, "M0", mode="pretrain", corpus_docs=c.corpus_docs, max_steps=c.pretrain_steps,
            batch_size=c.pretrain_batch_size, seq_len=c.pretrain_seq_len, lr=c.pretrain_lr,
            min_lr_ratio=0.1, warmup_steps=min(100, c.pretrain_steps // 10),
            eval_every=max(1, c.pretrain_steps // 4), vocab_size=c.vocab_size, dim=c.dim, n_layers=c.n_layers,
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, dropout=0.0, judge_prompt=c.judge_prompt))
        return self.m0

    def sft(self, run: Run, name: str, eft: bool) -> str:
        """SFT of M0 on the world's IFT seed (the baseline) or IFT + EFT (M1). Half of M1's EFT
        responses are the baseline's own, graded by the oracle. Both see each IFT example equally often."""
        c = self.cfg
        n_eft = c.n_eft if eft else 0
        steps = c.sft_epochs * (c.n_ift + n_eft) / c.sft_batch_size  # about; sft.py counts exactly
        extra = dict(eft_policy=self.baseline, eft_group=c.eft_group) if eft else dict(show_example=False)
        path = run.model(name, lambda: sft_stage(
            c, name, mode="sft", init=self.m0, n_ift=c.n_ift, n_eft=n_eft, epochs=c.sft_epochs,
            batch_size=c.sft_batch_size, lr=c.sft_lr, min_lr_ratio=0.2, warmup_steps=max(1, int(steps) // 10),
            eval_every=max(1, int(steps) // 3), judge_prompt=c.judge_prompt, **extra))
        if not eft:
            self.baseline = path
        return path

    def new_prompts(self, run: Run, chain: str, t: int, model_path: str, seen: set) -> list[dict]:
        """This iteration's instructions, written few-shot by the prompt generator (generate_prompts)."""
        c, d = self.cfg, iter_name(chain, t)
        generator = {"base": lambda: load_checkpoint(self.m0, get_device(c.device))[0].eval(),
                     "model": lambda: load_policy(c, model_path, get_device(c.device))[0],
                     "world": lambda: None}[c.prompt_generator]()
        tok = load_policy(c, model_path, get_device(c.device))[1]
        rng = random.Random(stage_seed(c, chain, t, "prompts"))
        prompts, counts = generate_prompts(c, generator, tok, self.seed_prompts, seen, rng)
        write_json(os.path.join(run.run_dir, d, "prompt_filter.json"), dict(counts))
        print(f"[{d}] prompts: {len(prompts)} kept; filter {dict(counts)}")
        if not prompts:
            raise UserError(f"{d}: the prompt generator wrote no usable prompt; try --prompt_generator world")
        return [{"prompt": p} for p in prompts]

    @staticmethod
    def task_key(prompt: str):
        return tasks.task_key(tasks.parse_task(prompt))

    @staticmethod
    def oracle(prompt: str, response: str):
        return tasks.grade(tasks.parse_task(prompt), response).points


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
