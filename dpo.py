"""Direct Preference Optimization (Rafailov et al., 2023): the optimiser of the self-rewarding
loop, and the baseline beside PPO.

DPO skips the reward model and the RL loop. For a prompt x, a chosen response y_w and a
rejected one y_l, it raises how much more likely the policy makes y_w than the frozen
reference (the starting model) does, relative to y_l:

    loss = -log σ( β · [ (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x)) ] )

β · (log π(y|x) - log π_ref(y|x)) is the "implicit reward" of y. β (0.1 by default) sets how far
the policy may move from the reference: smaller β, weaker anchor.

    python dpo.py --init runs/default/M1/model --data pairs.jsonl --out_dir runs/dpo
    python dpo.py --init runs/default/SFT/model --world_prompts 4000 --out_dir runs/dpo_world

--data reads any preference format of data.py ({"prompt","chosen","rejected"}, Anthropic HH
transcripts, or ranked lists as reward.py reads them: one pair per ranked comparison).
--world_prompts N needs no file: the task world's oracle ranks two samples of --init on
each of N training prompts, and the run ends with the oracle's verdict on held-out prompts, before and
after.

Output: out_dir/model/ (HF layout, the resolved config, the trainer state for --resume),
out_dir/metrics.jsonl, and out_dir/world_pairs.jsonl for --world_prompts.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from data import (Preference, UserError, encode_prompt, encode_response, load_preference_data,
                  pad_batch, read_jsonl)
from checkpoint import load_checkpoint
from model import autocast, frozen, sequence_logprobs
from train_utils import (OptimFlags, OutDir, RunFlags, SamplingFlags, all_mean, all_sum, check_finite, check_ranges,
                         check_same_on_all_ranks, cli, configure_optimizer, data_parallel, gather_rows, get_device,
                         global_batch, init_distributed, is_main, lr_schedule, no_bars, optim_ranges, rank, rank_batch,
                         sampling_ranges, total_steps, world_size)


# -----------------------------------------------------------------------------
# The loss


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                    loss_type: str = "dpo", label_smoothing: float = 0.0, nll_coef: float = 0.0,
                    chosen_lengths=None):
    """Per-pair losses (B,), the implicit rewards β (log π(y) - log π_ref(y)) of chosen and
    rejected, and the chosen response's per-token NLL (None without chosen_lengths), from summed
    response log-probs (all (B,)).

    h = (log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))
      dpo: -log σ(β h)                            Rafailov et al. 2023, eq. 7
           with label smoothing ε (conservative DPO, Mitchell 2023: each label is wrong with
           probability ε): -(1 - ε) log σ(β h) - ε log σ(-β h)
      ipo: (h - 1 / (2β))²                        Azar et al. 2023, eq. 17 (β is their τ): a
           squared loss that stops pushing once the margin reaches 1/(2β), where DPO's
           logistic loss keeps pushing (and can drive both log-probs down). h uses log-probs
           SUMMED over the response's tokens, as the paper and OpenRLHF do; TRL's IPO averages
           them per token, so a β tuned there does not carry over. No label smoothing here.
    At the start policy = reference, so h = 0 and the DPO loss is ln 2 for every pair.

    nll_coef α > 0 adds the NLL of the chosen response per token (iterative RPO, Pang et al.
    2024, eq. 1):  loss + α · (-log π(y_w|x) / |y_w|),  |y_w| = chosen_lengths (B,), its
    response tokens with EOS. DPO alone only widens the margin and may lower log π(y_w) with
    log π(y_l), moving mass to responses in neither set; the NLL term holds the chosen one up."""
    # --- exercise: dpo_loss ---
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "dpo":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    nll = None if chosen_lengths is None else -policy_chosen / chosen_lengths
    if nll_coef:
        losses = losses + nll_coef * nll
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards, nll
    # --- end exercise ---


def batch_stats(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """What DPO logs. reward_accuracy: the share of pairs whose chosen response has the higher
    implicit reward (a tie, as at step 0, counts one half: a coin flip)."""
    margin = chosen_rewards - rejected_rewards
    return {
        "loss": losses.mean().item(),
        "reward_accuracy": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item(),
        "margin": margin.mean().item(),
        "chosen_reward": chosen_rewards.mean().item(),
        "rejected_reward": rejected_rewards.mean().item(),
        "chosen_logp": policy_chosen.detach().mean().item(),
        "rejected_logp": policy_rejected.detach().mean().item(),
    }


# -----------------------------------------------------------------------------
# Data: (prompt, chosen, rejected) -> token ids


def world_preferences(model, tok, cfg: DPOConfig) -> list[dict]:
    """Preference pairs without any file: cfg.world_prompts training prompts of the task world,
    two samples of the model each (temperature, top-p, top-k), ranked by the oracle. A prompt
    whose samples score the same gives no pair, nor does one with a sample cut off by the budget
    (it has no EOS: DPO would teach its text followed by an EOS the model never wrote). Rows
    {"prompt", "chosen", "rejected", "points"}."""
    from sampling import sample_responses

    rng = random.Random(f"dpo-world/{cfg.world_seed}/{cfg.seed}")
    gen = torch.Generator(get_device(cfg.device)).manual_seed(cfg.seed + 1_000_003 * rank())
    batch = [tasks.sample_task(rng, split="train") for _ in range(cfg.world_prompts)]
    batch = batch[rank()::world_size()]  # under torchrun each rank samples its share; the rows are then shared
    samples, finished = sample_responses(model, tok, [t.prompt for t in batch], 2, cfg.temperature, cfg.top_p,
                                         cfg.max_new_tokens, generator=gen, desc="world pairs", return_finished=True,
                                         top_k=cfg.top_k)
    rows, counts = [], {"equal scores": 0, "unfinished": 0}
    for task, (a, b), ended in zip(batch, samples, finished):
        if not all(ended):
            counts["unfinished"] += 1
            continue
        pa, pb = tasks.grade(task, a).points, tasks.grade(task, b).points
        if pa == pb:
            counts["equal scores"] += 1
            continue
        (c, pc), (r, pr) = sorted([(a, pa), (b, pb)], key=lambda x: -x[1])
        rows.append({"prompt": task.prompt, "chosen": c, "rejected": r, "points": [pc, pr]})
    rows, counts = gather_rows(rows), {k: int(all_sum(v)) for k, v in counts.items()}
    print(f"world pairs: {len(rows)} from {cfg.world_prompts} prompts (no pair: {counts})")
    if not rows:
        raise UserError(f"--world_prompts {cfg.world_prompts}: no pair (no pair: {counts}); the model's two "
                        "samples always score the same or never end")
    return rows


def informative_pairs(prefs: list[Preference], path: str) -> list[Preference]:
    """The pairs that say something: a pair whose chosen and rejected are the same text has a
    loss of ln 2 whatever the model does; it is skipped and counted. None left is an error."""
    kept = [p for p in prefs if p.chosen.strip() != p.rejected.strip()]
    if len(kept) < len(prefs):
        print(f"{path}: skipped {len(prefs) - len(kept)} of {len(prefs)} pairs whose chosen and rejected are the same text")
    if not kept:
        raise UserError(f"{path}: no pair to train on (every pair's chosen equals its rejected, or every ranked "
                        "list is one tie)")
    return kept


def split_by_prompt(prefs: list[Preference], eval_frac: float, seed: int):
    """(train, held-out) pairs, split by prompt: a ranked list's C(K,2) pairs share their
    prompt and land on one side together (split by pair, the held-out accuracy would be
    measured on prompts trained on). No held-out pairs below 20 prompts."""
    prompts = list(dict.fromkeys(p.prompt for p in prefs))
    random.Random(seed).shuffle(prompts)
    held_out = set(prompts[: int(len(prompts) * eval_frac) if len(prompts) >= 20 else 0])
    return [p for p in prefs if p.prompt not in held_out], [p for p in prefs if p.prompt in held_out]


def encode_pairs(tok, prefs, max_len: int, what: str) -> list[dict]:
    """Token ids of each pair: the prompt in the chat template, each response closed by EOS.
    A pair whose prompt + longer response does not fit the context is dropped and counted,
    never cut (a cut response would lose its EOS and its ending)."""
    out = []
    for p in prefs:
        prompt = encode_prompt(tok, p.prompt)
        chosen, rejected = encode_response(tok, p.chosen), encode_response(tok, p.rejected)
        if len(prompt) + max(len(chosen), len(rejected)) <= max_len:
            out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if len(out) < len(prefs):
        print(f"{what}: dropped {len(prefs) - len(out)} of {len(prefs)} pairs longer than {max_len} tokens")
    return out


def pair_batch(pairs: list[dict], pad_id: int):
    """Chosen and rejected sequences of B pairs in ONE right-padded batch, rows [chosen_1 ..
    chosen_B, rejected_1 .. rejected_B], so one forward pass scores both. Returns input_ids
    (2B, T) and response_mask (2B, T): 1 on response tokens and their EOS, 0 on prompt and pad."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            seqs.append(p["prompt"] + p[side])
            masks.append([0] * len(p["prompt"]) + [1] * len(p[side]))
    ids, _, response_mask = pad_batch(seqs, pad_id, "right", masks)
    return ids, response_mask


def response_logps(model, ids, response_mask):
    """Summed log-probs of each row's response, (2B,) -> split into chosen (B,), rejected (B,).
    Right padding: plain causal attention is exact for the real tokens, so no mask is needed;
    sequence_logprobs applies the one-token shift and zeroes prompt and pad positions."""
    logps = sequence_logprobs(model, ids, None, response_mask).sum(-1)
    return logps.chunk(2)


@torch.no_grad()
def reference_logps(reference, pairs: list[dict], pad_id: int, device, batch_size: int = 64):
    """Precompute log π_ref(y|x) of every pair once (the reference is frozen), so training
    holds one model in memory. Stored in the pair dicts as ref_chosen / ref_rejected."""
    was_training = reference.training
    reference.eval()
    for s in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", leave=False,
                  disable=no_bars()):
        chunk = pairs[s : s + batch_size]
        ids, mask = pair_batch(chunk, pad_id)
        with autocast(device):
            chosen, rejected = response_logps(reference, ids.to(device), mask.to(device))
        for p, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            p["ref_chosen"], p["ref_rejected"] = c, r
    reference.train(was_training)


# -----------------------------------------------------------------------------
# Config


@dataclass
class DPOConfig(RunFlags, OptimFlags, SamplingFlags):
    # what to train on
    init: str = ""  # the starting model: the policy starts here and the reference stays here
    data: str = ""  # preference JSONL (any data.py preference format, or ranked lists)
    world_prompts: int = 0  # instead of --data: this many task-world prompts, two samples of --init each, ranked by the oracle
    eval_frac: float = 0.05  # share of the prompts held out for the evaluation metrics
    system: str = ""  # a system message for every prompt (default: none; a real model's template may add its own)
    world_seed: int = 0  # the task world's data are generated from this seed
    n_eval: int = 300  # --world_prompts: held-out world prompts graded by the oracle before and after (0: skip)
    max_seq_len: int = 0  # context length; 0: the checkpoint's own
    # the loss
    loss: str = "dpo"  # dpo (Rafailov et al., eq. 7) or ipo (Azar et al., eq. 17; log-ratios summed over tokens)
    beta: float = 0.1  # β: how far the policy may move from the reference (smaller: weaker anchor)
    label_smoothing: float = 0.0  # conservative DPO: the chance that a pair's label is flipped (dpo only)
    nll_coef: float = 0.0  # α: + α · NLL of the chosen response per token (Pang et al. 2024, "RPO"); keeps log π(y_w) up
    precompute_ref: bool = True  # reference log-probs computed once before training (one model in memory)
    # run
    out_dir: str = "runs/dpo"
    # optimisation
    batch_size: int = 16  # pairs per micro-batch (each pair is two sequences)
    lr: float = 5e-5  # (the paper, 70B: 1e-6 -> 1e-7; small models want larger rates)
    dropout: float = 0.0  # the paper trained with 0.1; dropout makes the policy differ from the reference at step 0

    def __post_init__(self):
        c = self
        check_ranges(c, {
            **optim_ranges(c), **sampling_ranges(c),
            "loss": (c.loss in ("dpo", "ipo"), "dpo or ipo"), "beta": (c.beta > 0, "> 0"),
            "label_smoothing": (0 <= c.label_smoothing < 0.5 and (c.loss == "dpo" or c.label_smoothing == 0),
                                "in [0, 0.5), and 0 with --loss ipo (IPO has no label smoothing)"),
            "nll_coef": (c.nll_coef >= 0, ">= 0"), "eval_frac": (0 <= c.eval_frac < 1, "in [0, 1)"),
            "max_seq_len": (c.max_seq_len >= 0, ">= 0"), "world_prompts": (c.world_prompts >= 0, ">= 0"),
            "n_eval": (c.n_eval >= 0, ">= 0"), "temperature": (c.temperature > 0, "> 0"),
        })


# -----------------------------------------------------------------------------
# Main


def main(cfg: DPOConfig) -> str:
    """Train; returns the checkpoint directory."""
    device = init_distributed(cfg.device)  # get_device, and under torchrun the process group
    torch.manual_seed(cfg.seed)

    # data first: a bad file fails here, before a model is loaded or anything is written
    if not cfg.init:
        raise UserError("--init is required: the checkpoint that the policy starts from and the reference stays at")
    if bool(cfg.data) == bool(cfg.world_prompts):
        raise UserError("give exactly one of --data (a preference JSONL) and --world_prompts N")
    prefs = informative_pairs(load_preference_data(cfg.data), cfg.data) if cfg.data else None
    out = OutDir(cfg, {"--data": cfg.data, "--init": cfg.init})  # nothing in out_dir is touched before out.start()
    ckpt_dir = out.ckpt
    # the reference is the starting model, frozen (eval mode: no dropout, no gradients)
    overrides = {"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}
    reference, tok = load_checkpoint(cfg.init, device, **overrides)
    tok.system = cfg.system or None
    frozen(reference.eval().requires_grad_(False), device)  # bf16 on CUDA: only read

    world_file = os.path.join(cfg.out_dir, "world_pairs.jsonl")
    if cfg.world_prompts:
        if cfg.resume and os.path.exists(world_file):  # the pairs this run was trained on
            rows = [obj for _, obj in read_jsonl(world_file)]
        else:
            rows = world_preferences(reference, tok, cfg)
            out.write_rows("world_pairs.jsonl", rows)
        prefs = [Preference(r["prompt"], r["chosen"], r["rejected"]) for r in rows]

    # train / eval split by prompt, then token ids; over-long pairs are dropped and counted
    train_prefs, eval_prefs = split_by_prompt(prefs, cfg.eval_frac, cfg.seed)
    max_len = reference.config.max_seq_len
    train_pairs = encode_pairs(tok, train_prefs, max_len, "train")
    eval_pairs = encode_pairs(tok, eval_prefs, max_len, "eval")
    if not train_pairs:
        raise UserError(f"no training pair fits in {max_len} tokens")
    if cfg.batch_size * world_size() > len(train_pairs):
        raise UserError(f"--batch_size {cfg.batch_size} x {world_size()} rank(s) > {len(train_pairs)} training pairs")
    max_steps = total_steps(cfg, len(train_pairs))
    check_same_on_all_ranks("the training pairs", (max_steps, train_pairs))
    print(f"dpo: {len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs; {max_steps} steps "
          f"of {global_batch(cfg)} pairs ({max_steps * global_batch(cfg) / len(train_pairs):.2f} epochs)")

    if cfg.precompute_ref:  # log π_ref once, then only the policy sits in memory
        reference_logps(reference, train_pairs + eval_pairs, tok.pad_id, device)
        reference = None
    policy, _ = load_checkpoint(ckpt_dir if cfg.resume else cfg.init, device, dropout=cfg.dropout, **overrides)
    print(f"policy: {policy.num_params() / 1e6:.2f}M parameters, device {device}")

    def reference_of(chunk, ids, mask):
        if reference is None:
            return (torch.tensor([p["ref_chosen"] for p in chunk], device=device),
                    torch.tensor([p["ref_rejected"] for p in chunk], device=device))
        with torch.no_grad(), autocast(device):
            return response_logps(reference, ids, mask)

    def forward(model, chunk):
        ids, mask = (t.to(device) for t in pair_batch(chunk, tok.pad_id))
        with autocast(device):
            policy_chosen, policy_rejected = response_logps(model, ids, mask)
        ref_chosen, ref_rejected = reference_of(chunk, ids, mask)
        n_chosen = mask[: len(chunk), 1:].sum(-1)  # response tokens (EOS included) per chosen row
        losses, cr, rr, nll = preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, cfg.beta,
                                              cfg.loss, cfg.label_smoothing, cfg.nll_coef, n_chosen)
        stats = batch_stats(losses, cr, rr, policy_chosen, policy_rejected)
        if cfg.nll_coef:
            stats["nll"] = nll.mean().item()
        return losses, stats

    @torch.no_grad()
    def evaluate_pairs():
        """The same statistics on the held-out pairs, dropout off."""
        policy.eval()
        totals, n = {}, 0
        for s in range(0, len(eval_pairs), 64):
            chunk = eval_pairs[s : s + 64]
            _, stats = forward(policy, chunk)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(chunk)
            n += len(chunk)
        policy.train()
        return {f"eval_{k}": v / n for k, v in totals.items()}

    out.start()  # data and models checked: from here on the run writes into out_dir
    optimizer = configure_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), device)
    step = 0
    if cfg.resume:
        step = out.load_state(optimizer, device)["step"]
        print(f"resumed at step {step}")
        if step >= max_steps:
            print(f"nothing to do: the checkpoint is at step {step} of {max_steps}")
            out.close()
            return ckpt_dir
    train_model = data_parallel(policy, device)  # DDP under torchrun; `policy` is saved and evaluated
    train_model = torch.compile(train_model) if cfg.compile else train_model

    eval_before = evaluate_pairs() if eval_pairs and step == 0 and is_main() else {}
    policy.train()
    start_step = step
    pbar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc="dpo", dynamic_ncols=True,
                disable=no_bars())
    t0 = time.time()
    for step in pbar:
        # dropout masks: a function of the step (for --resume) and of the rank
        torch.manual_seed(cfg.seed + step + 1_000_003 * rank())
        lr = lr_schedule(step, cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats = {}
        for k in range(cfg.grad_accum):  # equal-sized micro-batches (and ranks): a plain mean is exact
            chunk = [train_pairs[i] for i in rank_batch(len(train_pairs), cfg.batch_size, cfg.seed,
                                                         step * cfg.grad_accum + k)]
            losses, s = forward(train_model, chunk)
            (losses.mean() / cfg.grad_accum).backward()
            for key, v in s.items():
                stats[key] = stats.get(key, 0.0) + v / cfg.grad_accum
        stats = all_mean(stats)  # the global batch's statistics
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item()
        check_finite(step + 1, cfg.out_dir, loss=stats["loss"], grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, **stats, "grad_norm": grad_norm, "lr": lr}
        pbar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['reward_accuracy']:.2f}",
                         margin=f"{stats['margin']:.2f}")
        last = step + 1 == max_steps
        if eval_pairs and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and is_main():
            row.update(evaluate_pairs())
            row["pairs_per_s"] = ((step + 1 - start_step) * global_batch(cfg)
                                  / (time.time() - t0))
            tqdm.write(f"step {step + 1}: loss {row['loss']:.4f} eval_loss {row['eval_loss']:.4f} "
                       f"eval reward accuracy {row['eval_reward_accuracy']:.3f} eval margin {row['eval_margin']:.3f} "
                       f"chosen logp {row['eval_chosen_logp']:.2f} rejected logp {row['eval_rejected_logp']:.2f}")
        out.log(row)
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            out.save(policy, tok, optimizer, step + 1)
    if eval_before:
        after = row if "eval_reward_accuracy" in row else evaluate_pairs()
        print(f"held-out pairs, before -> after: reward accuracy {eval_before['eval_reward_accuracy']:.3f} -> "
              f"{after['eval_reward_accuracy']:.3f}, chosen logp {eval_before['eval_chosen_logp']:.2f} -> "
              f"{after['eval_chosen_logp']:.2f}, rejected logp {eval_before['eval_rejected_logp']:.2f} -> "
              f"{after['eval_rejected_logp']:.2f}")
    if cfg.world_prompts and cfg.n_eval and is_main():
        world_report(cfg, policy, tok, device)
    out.close()
    print(f"saved {ckpt_dir}")
    return ckpt_dir


def world_report(cfg: DPOConfig, policy, tok, device):
    """The oracle's verdict on held-out world prompts: the starting model vs the trained one,
    same prompts, same seed, with a paired bootstrap interval."""
    import evaluate

    eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval)
    start, _ = load_checkpoint(cfg.init, device)
    results = {}
    for name, model in (("before", start), ("after", policy)):
        gen = torch.Generator(device).manual_seed(cfg.seed)
        results[name] = evaluate.instruction_following(model.eval(), tok, eval_tasks, cfg.temperature, gen,
                                                       cfg.max_new_tokens, top_p=cfg.top_p, top_k=cfg.top_k)
    c = evaluate.compare(results["after"]["points"], results["before"]["points"], seed=cfg.seed)
    print(f"held-out world prompts ({len(eval_tasks)}, T={cfg.temperature}), oracle mean points: "
          f"{results['before']['oracle_mean']:.2f} -> {results['after']['oracle_mean']:.2f} "
          f"(difference {c['mean_diff']:+.2f}, 95% CI {c['mean_diff_ci'][0]:+.2f} .. {c['mean_diff_ci'][1]:+.2f}); "
          f"exact-correct {100 * results['before']['exact_correct']:.1f}% -> {100 * results['after']['exact_correct']:.1f}%; "
          f"after vs before win/tie/loss {c['win']:.1f}/{c['tie']:.1f}/{c['loss']:.1f}")


if __name__ == "__main__":
    cli(main, DPOConfig, __doc__)


