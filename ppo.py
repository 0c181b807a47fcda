"""PPO against a reward model with a per-token KL penalty, and PPO-ptx (InstructGPT step 3);
and beside it the critic-free policy gradients RLOO and GRPO (--advantage).

Four models take part (three with --advantage rloo or grpo, which have no V):
  policy     π      starts as the SFT model; trained
  value      V      the RM's trunk and head (InstructGPT), or the SFT trunk with a zero head
                    (--value_init zero); trained: V(s_t) predicts the return from token t on
  reference  π_ref  the SFT model, frozen: the anchor of the KL penalty
  reward     r      reward.py's model, frozen (or, with --reward oracle, the world's grader)

One step: sample one response per prompt from π (sampling.generate, temperature T), score it,
then a few epochs of clipped PPO updates on that batch. The reward of a response y to prompt x
is spread over its tokens (InstructGPT eq. 2, written per token as in Ziegler et al. 2019):

    r_t = -β · (log π(y_t | x, y_<t) - log π_ref(y_t | x, y_<t))          every response token
        + r(x, y)                                                          added at the last one

The first term is the k1 estimate of KL(π || π_ref), token by token: it keeps the policy near
the SFT model, where the RM is still right (with β too small the policy finds what the RM
over-rates: the RM score climbs while the oracle's does not). A response that never emits EOS
gets the fixed score --no_eos_score instead of r(x, y). β is fixed, or adapted towards a target
KL (--kl_target, Ziegler et al. 2019). Advantages by GAE (γ = 1, λ = 0.95; nothing after the
last token counts), whitened over the response tokens of the batch. PPO-ptx adds
γ_ptx · (LM loss on the pretraining corpus) to the policy loss, which keeps the policy a good
language model where RL does not look (InstructGPT: γ = 27.8, on their loss scale).

Critic-free (--advantage rloo | grpo): no value model at all. Each prompt gets k = --group_size
responses from one shared prefill, and a response's advantage is its sequence reward measured
against the other responses to the same prompt, the same for every one of its tokens:
  rloo  REINFORCE Leave-One-Out (Ahmadian et al. 2024): A_i = R_i - mean of the other k-1 R_j,
        R = r(x, y) - β Σ_t (log π - log π_ref), the KL penalty still in the reward.
  grpo  GRPO (Shao et al. 2024, DeepSeekMath): A_i = (r_i - mean_group) / std_group on the score
        alone (--no-grpo_std: only the mean, Dr. GRPO), and β · KL(π || π_ref) (k3 estimator,
        per token) as a term of the loss instead of the reward.
Both keep PPO's clipped surrogate over --ppo_epochs minibatch passes, as TRL's and OpenRLHF's
RLOO and GRPO trainers do (--ppo_epochs 1 --minibatch_size = --batch_size is plain REINFORCE
with that baseline: the ratio is 1 and the clip never acts). Their loss is averaged over all
response tokens of a minibatch, as PPO's here, not per response first (GRPO's 1/|o_i|, the
length bias Dr. GRPO removes). --batch_size counts responses in every mode, so a step of any
estimator samples and trains on as many responses (gae: batch_size prompts, one response each;
rloo, grpo: batch_size / k prompts, k responses each).

Which one: gae is InstructGPT's recipe: a learned per-token baseline V, one response per prompt
(so the most distinct prompts per step), at the cost of a second trained model that must itself
learn (best started from the RM). rloo and grpo need no V (one trained model: about 24 bytes per
parameter instead of 40) and suit a reward given once per response, such as the world's
verifiable oracle (what GRPO was made for). Of the two, rloo's baseline is unbiased and leaves
the KL in the reward; grpo divides by the group's std, which gives more weight to prompts whose k
responses score nearly alike (too easy or too hard; Dr. GRPO, Liu et al. 2025: --no-grpo_std).
A group whose k responses score the same teaches nothing (advantage 0: logged as flat_groups).
Against a learned RM that division also blows the RM's small within-group errors up to unit
size: in RESULTS.md, grpo against an imperfect RM drifted furthest and lost oracle points on
each of three seeds, --no-grpo_std did not.

    python ppo.py --init runs/default/SFT/model --reward_model runs/rm/model --out_dir runs/ppo
    python ppo.py ... --ptx_coef 1.0                      # PPO-ptx
    python ppo.py --init runs/default/SFT/model --reward oracle --value_init zero --out_dir runs/ppo_oracle
    python ppo.py --init runs/default/SFT/model --reward oracle --advantage grpo --out_dir runs/grpo_oracle
    python ppo.py --init runs/default/SFT/model --reward_model runs/rm/model --advantage rloo --out_dir runs/rloo

Prompts: the task world's training prompts (fresh ones every step), or --data (any data.py SFT
format; the responses are ignored). Every step logs (tqdm and out_dir/metrics.jsonl) the RM
score, the oracle score, the KL to the reference, entropy, clip fraction, approx-KL, value loss
and explained variance (gae), the share of flat groups (rloo, grpo), response length and the
share of responses without EOS; every --eval_every steps the oracle's grade of held-out prompts,
the KL from the SFT model there, and the pretraining loss on held-out corpus documents (what
PPO-ptx protects).

Memory: the policy and the value model are trained, so each costs its weights, gradients and two
AdamW moments (16 bytes per parameter in fp32); the reference and the RM cost their weights (4
bytes per parameter). About 40 bytes per model parameter, ten fp32 copies of the model, before
activations: 36 MB for the 0.9M-parameter cpu preset, ~40 GB for a 1B model. RLOO and GRPO
drop the value model: about 24 bytes per parameter (20 with --reward oracle: no RM). On CUDA
the frozen reference and RM are held in bf16 (model.frozen): 2 bytes per parameter each. A
cheaper layout not implemented, to keep this file plain: a value head on the policy's trunk (one
trained model fewer, but the two losses then share features and a learning rate).

Output: out_dir/model/ (the policy, HF layout; its trainer_state.pt also holds the value model
(gae only), its optimizer and β for --resume), out_dir/metrics.jsonl, out_dir/eval.json (SFT vs
the trained policy, with the training time and peak memory).
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import tasks
from data import UserError, decode_response, encode_documents, encode_prompt, load_sft_data, stream_batch
from checkpoint import check_checkpoint_dir, load_checkpoint
from model import autocast, frozen, token_logprobs
from sampling import generate
from train_utils import (OptimFlags, OutDir, RunFlags, SamplingFlags, all_mean, all_sum, check_finite, check_ranges,
                         check_same_on_all_ranks, cli, configure_optimizer, data_parallel, init_distributed, is_main,
                         lr_schedule, no_bars, optim_ranges, rank, rank_batch, sampling_ranges, total_steps, unwrap,
                         world_size)
from reward import load_reward_model
from sft import pretrain_loss, text_corpus, world_corpus


# -----------------------------------------------------------------------------
# Rewards and advantages


def masked_mean(x, mask):
    """Mean of x over the entries where mask is 1 (a scalar); 0 when the mask is empty.
    x, mask (B, N): padding after EOS must not count."""
    # --- exercise: masked_stats ---
    return (x * mask).sum() / mask.sum().clamp(min=1)
    # --- end exercise ---


def masked_whiten(x, mask, eps: float = 1e-8, mean_fn=masked_mean):
    """(x - mean) / std with mean and std over the masked-in entries only, 0 elsewhere: padding
    after EOS must not pull the statistics towards 0. The variance is the plain (biased) mean
    of squared deviations, and eps is added to it before the square root. mean_fn: how a mean
    is taken (all_ranks_masked_mean: over every rank's tokens under torchrun)."""
    # --- exercise: masked_stats ---
    mean = mean_fn(x, mask)
    var = mean_fn((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask
    # --- end exercise ---


def all_ranks_masked_mean(x, mask):
    """masked_mean over the tokens of every rank under torchrun (masked_mean on one process):
    PPO whitens its advantages over the whole batch, as one process with all of it would."""
    if world_size() == 1:
        return masked_mean(x, mask)
    sums = all_sum(torch.stack([(x * mask).sum(), mask.sum()]).detach().cpu())
    return (sums[0] / sums[1].clamp(min=1)).to(device=x.device, dtype=x.dtype)


def per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """r_t = -β (log π - log π_ref) on every response token, plus the sequence's score on its
    last token (InstructGPT eq. 2 per token). scores (B,); the rest (B, N).
    Returns rewards (B, N) and the per-token KL estimate (k1) (B, N)."""
    # --- exercise: kl_reward ---
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(-1).long() - 1  # the last response token: EOS, or where max_new_tokens cut it
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl
    # --- end exercise ---


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), backwards over tokens:
        δ_t = r_t + γ V(s_{t+1}) - V(s_t),   A_t = δ_t + γ λ A_{t+1}
    The episode ends at the last response token: V after it is 0 and nothing after it counts.
    rewards, values, mask (B, N) -> advantages, returns = A + V (the value targets), (B, N), 0
    after the end."""
    # --- exercise: gae ---
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros(B, device=rewards.device)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < N else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask
    # --- end exercise ---


def rloo_advantages(scores, group_size: int):
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): k
    responses y_1..y_k to one prompt, each with the mean reward of the OTHER k-1 as its baseline,
        A_i = R(y_i, x) - 1/(k-1) Σ_{j≠i} R(y_j, x)        (= k/(k-1) · (R_i - mean_j R_j))
    The baseline does not depend on y_i, so the policy gradient stays unbiased.
    scores (B,), B = prompts × k, prompt p owning rows p·k .. p·k+k-1 (generate's num_samples
    order) -> (B,) sequence-level advantages."""
    # --- exercise: group_advantages ---
    r = scores.view(-1, group_size)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).flatten()
    # --- end exercise ---


def grpo_advantages(scores, group_size: int, normalize_std: bool = True, eps: float = 1e-4):
    """GRPO with outcome supervision (Shao et al. 2024, DeepSeekMath, section 4.1.2): G responses
    to one prompt with rewards r = {r_1..r_G}; every token t of response i gets
        Â_{i,t} = r̃_i = (r_i - mean(r)) / std(r)
    std with Bessel's correction and eps added to it, as TRL's GRPOTrainer: a group of equal
    rewards gets 0, not 0/0. normalize_std=False is Dr. GRPO (Liu et al. 2025): Â_i = r_i -
    mean(r), without the scaling that weights groups of nearly equal rewards up.
    scores (B,) grouped as in rloo_advantages -> (B,)."""
    # --- exercise: group_advantages ---
    r = scores.view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    return adv.flatten()
    # --- end exercise ---


def k3_kl(logprobs, ref_logprobs, mask):
    """The KL term of GRPO's loss (DeepSeekMath eq. 4), per token and averaged over response
    tokens: D_KL = π_ref/π - log(π_ref/π) - 1, Schulman's k3 estimator of KL(π || π_ref):
    unbiased, >= 0 for every sample, and its gradient pulls π towards π_ref. All (B, N)."""
    d = (ref_logprobs - logprobs) * mask  # 0 after EOS before exp(): no overflow in the padding
    return masked_mean(d.exp() - d - 1, mask)


def update_kl_coef(kl_coef: float, kl: float, n: int, target: float, horizon: int) -> float:
    """The adaptive KL controller of Ziegler et al. 2019 (section 2.2): β ← β (1 + K_β e) with
    e = clip(KL / KL_target - 1, -0.2, 0.2); K_β = n / horizon for n new responses, as in their
    code (lm-human-preferences). β grows while the KL is above target and shrinks below it."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n / horizon)


# -----------------------------------------------------------------------------
# The losses


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps: float):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised:
        L = -E_t[ min(ρ_t A_t, clip(ρ_t, 1 - ε, 1 + ε) A_t) ],   ρ_t = π(y_t) / π_old(y_t)
    Once ρ has moved past 1 + ε in the direction A favours (or below 1 - ε against it) the
    clipped term is the smaller and the gradient is 0: one batch cannot push the policy far.
    All (B, N); the mean is over response tokens. Returns (loss, stats), stats = floats over
    the response tokens: clip_frac (share with |ρ - 1| > ε), approx_kl (mean of ρ - 1 - log ρ)
    and ratio_dev (max |ρ - 1|, which ppo_update checks is 0 on the first minibatch)."""
    # --- exercise: policy_loss ---
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean(((ratio - 1).abs() > clip_eps).float(), mask).item(),
            # KL(π_old || π) by the k3 estimator (ρ - 1) - log ρ: >= 0 and low-variance
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
            "ratio_dev": ((ratio - 1).abs() * mask).max().item(),
        }
    return masked_mean(losses, mask), stats
    # --- end exercise ---


def value_loss(values, old_values, returns, mask, clip: float):
    """Clipped value loss (as in OpenAI baselines' PPO2): the larger of the squared errors of the
    new value and of the new value clipped to old ± clip, so V too moves little per batch:
        L_V = ½ E_t[ max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, -c, c) - R_t)²) ]
    All (B, N); the mean is over response tokens. Returns (loss, the share of tokens with
    |V - V_old| > c, a float)."""
    # --- exercise: value_loss ---
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    losses = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_mean(losses, mask), masked_mean(((values - old_values).abs() > clip).float(), mask).item()
    # --- end exercise ---


def explained_variance(values, returns, mask) -> float:
    """1 - Var(returns - V) / Var(returns) over response tokens: 1 is a perfect value model,
    0 no better than a constant, below 0 worse."""
    var = lambda x: masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    return (1 - var(returns - values) / var(returns).clamp(min=1e-8)).item()


# -----------------------------------------------------------------------------
# Rollouts: sample, then score every response token under the policy, the reference and V


NAMES = {"gae": "PPO", "rloo": "RLOO", "grpo": "GRPO"}  # --advantage -> what the reports call it


def responses_per_prompt(cfg: PPOConfig) -> int:
    """k: one response per prompt for gae, --group_size for the group baselines."""
    return 1 if cfg.advantage == "gae" else cfg.group_size


def token_entropy(logits, temperature: float = 1.0):
    """Entropy of the policy at every position, H_t = -Σ_v p_v log p_v with p = softmax(logits / T),
    in fp32 (logged: PPO that collapses the entropy has stopped exploring).
    logits (B, N, V) -> (B, N)."""
    # --- exercise: entropy ---
    dist = (logits.float() / temperature).log_softmax(-1)
    return -(dist.exp() * dist).sum(-1)
    # --- end exercise ---


def response_logprobs(model, sequences, attention_mask, prompt_len: int, temperature: float):
    """log π(y_t | x, y_<t) of every response token and the entropy of π there, (B, N) each.
    sequences (B, P+N): left-padded prompts in the first P columns, responses after; the logits
    at column P-1+t predict response token t (the one-token shift), so only those are kept."""
    logits = model(sequences, attention_mask=attention_mask)[:, prompt_len - 1 : -1]  # (B, N, V)
    logp = token_logprobs(logits, sequences[:, prompt_len:], temperature)  # fp32, at the sampling T
    return logp, token_entropy(logits, temperature)


@torch.no_grad()
def rollout(policy, reference, value_model, prompts: list[list[int]], cfg: PPOConfig, tok, gen) -> dict:
    """k = responses_per_prompt(cfg) responses per prompt from the policy (one shared prefill;
    prompt p owns rows p·k .. p·k+k-1), and everything PPO needs about them, (B, N) each: old
    log-probs (recomputed by a full forward, the same computation as the update's, so the first
    ratio is exactly 1), the reference's log-probs, the values V(s_t) (gae only: value_model is
    None for rloo and grpo) and the entropy. Every tensor is zero after a row's last token
    (response_mask 0: padding after EOS)."""
    policy, value_model = unwrap(policy), unwrap(value_model)  # sampling and scoring: no DDP sync
    g = generate(policy, prompts, cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                 generator=gen, num_samples=responses_per_prompt(cfg))
    seq, attn = g.sequences, g.attention_mask
    P = seq.shape[1] - g.tokens.shape[1]  # width of the left-padded prompts
    mask = g.response_mask.float()  # (B, N): 1 on response tokens, EOS included
    device = seq.device
    with autocast(device):
        logprobs, entropy = response_logprobs(policy, seq, attn, P, cfg.temperature)
        ref_logprobs, _ = response_logprobs(reference, seq, attn, P, cfg.temperature)
        if value_model is not None:
            values = value_model(seq, attn)[:, P - 1 : -1].float()  # V of the state before each response token
    batch = {"sequences": seq, "attention_mask": attn, "prompt_len": P, "tokens": g.tokens, "finished": g.finished,
             "response_mask": mask, "logprobs": logprobs * mask, "ref_logprobs": ref_logprobs * mask,
             "entropy": entropy * mask}
    if value_model is not None:
        batch["values"] = values * mask
    return batch


# -----------------------------------------------------------------------------
# One PPO step


def ppo_update(policy, value_model, policy_opt, value_opt, batch: dict, cfg: PPOConfig, gen, ptx_stream=None,
               kl_coef: float = 0.0) -> dict:
    """cfg.ppo_epochs passes over the batch in shuffled minibatches; each minibatch takes one
    step of the policy (clipped loss, + β · k3 KL with grpo, + γ_ptx · LM loss) and one of the
    value model (gae; rloo and grpo have none: value_model and value_opt are None)."""
    B, P = batch["sequences"].shape[0], batch["prompt_len"]
    device = batch["sequences"].device
    sums, n = {}, 0
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for s in range(0, B, cfg.minibatch_size):
            idx = order[s : s + cfg.minibatch_size].to(device)
            seq, attn, mask = batch["sequences"][idx], batch["attention_mask"][idx], batch["response_mask"][idx]
            with autocast(device):
                logprobs, _ = response_logprobs(policy, seq, attn, P, cfg.temperature)
            pg_loss, stats = policy_loss(logprobs, batch["logprobs"][idx], batch["advantages"][idx], mask, cfg.clip_eps)
            loss = pg_loss
            if cfg.advantage == "grpo":
                # GRPO's KL to the reference is a loss term (DeepSeekMath eq. 3), not a reward
                kl_loss = k3_kl(logprobs, batch["ref_logprobs"][idx], mask)
                loss = loss + kl_coef * kl_loss
                stats["kl_loss"] = kl_loss.item()
            if cfg.ptx_coef > 0:
                # PPO-ptx: the pretraining objective on fresh corpus windows (InstructGPT eq. 2, last term)
                x, y = (t.to(device) for t in stream_batch(ptx_stream, cfg.ptx_batch_size, cfg.ptx_seq_len, gen))
                with autocast(device):
                    ptx_loss = pretrain_loss(policy, x, y)
                loss = loss + cfg.ptx_coef * ptx_loss
                stats["ptx_loss"] = ptx_loss.item()
            policy_opt.zero_grad(set_to_none=True)
            loss.backward()
            stats["policy_grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item()
            policy_opt.step()

            if value_model is not None:
                with autocast(device):
                    values = value_model(seq, attn)[:, P - 1 : -1].float()
                vf_loss, stats["value_clip_frac"] = value_loss(values, batch["values"][idx], batch["returns"][idx],
                                                               mask, cfg.value_clip)
                value_opt.zero_grad(set_to_none=True)
                vf_loss.backward()
                stats["value_grad_norm"] = torch.nn.utils.clip_grad_norm_(value_model.parameters(),
                                                                          cfg.grad_clip).item()
                value_opt.step()
            stats["pg_loss"] = pg_loss.item()
            if value_model is not None:
                stats["value_loss"] = vf_loss.item()
            if n == 0:
                # the first minibatch sees the very weights that scored the rollout: ρ must be 1
                # (if not, dropout is on or the temperatures differ). Bit for bit in fp32 on the
                # CPU; under bf16 autocast a minibatch and the whole batch may round differently.
                stats["first_ratio_dev"] = stats["ratio_dev"]
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
    out = {k: v / n for k, v in sums.items() if k not in ("first_ratio_dev", "ratio_dev")}
    out["first_ratio_dev"] = sums["first_ratio_dev"]
    return out


def ppo_step(policy, reference, value_model, policy_opt, value_opt, prompts: list[list[int]], score_fn,
             kl_coef: float, cfg: PPOConfig, tok, sample_gen, gen, ptx_stream=None) -> dict:
    """Rollout -> scores (score_fn(batch) -> ((B,) scores, stats)) -> advantages -> PPO epochs.
    gae: per-token rewards -> GAE -> whitened advantages. rloo: R = score - β Σ_t KL_t per
    response -> leave-one-out advantage. grpo: score -> group-normalised advantage (the KL is in
    the loss). rloo's and grpo's sequence advantage goes to every token of the response (0 after
    EOS); they are not whitened (the group baseline is their normalisation). For rloo and grpo
    `prompts` holds B / k distinct prompts and value_model, value_opt are None. Returns the
    step's statistics."""
    batch = rollout(policy, reference, value_model, prompts, cfg, tok, sample_gen)
    scores, stats = score_fn(batch)
    mask = batch["response_mask"]
    rewards, kl = per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, kl_coef)
    if cfg.advantage == "gae":
        advantages, returns = gae(rewards, batch["values"], mask, cfg.gamma, cfg.lam)
        batch["advantages"], batch["returns"] = masked_whiten(advantages, mask, mean_fn=all_ranks_masked_mean), returns
    else:
        if cfg.advantage == "rloo":  # the KL penalty stays in the reward (Ahmadian et al.), summed per response
            seq_adv = rloo_advantages(scores - kl_coef * kl.sum(-1), cfg.group_size)
        else:  # grpo: the score alone; β · KL is a loss term (ppo_update)
            seq_adv = grpo_advantages(scores, cfg.group_size, normalize_std=cfg.grpo_std)
        batch["advantages"] = seq_adv[:, None] * mask
    stats.update({
        "score": scores.mean().item(),
        "kl": kl.sum(-1).mean().item(),  # KL(π || π_ref) per response, summed over its tokens
        "kl_coef": kl_coef,
        "entropy": masked_mean(batch["entropy"], mask).item(),
        "response_len": mask.sum(-1).mean().item(),
        "no_eos": 1 - batch["finished"].float().mean().item(),
    })
    if cfg.advantage == "gae":
        stats.update({
            "explained_var": explained_variance(batch["values"], returns, mask),
            "value_mean": masked_mean(batch["values"], mask).item(),
        })
    else:
        groups = scores.view(-1, cfg.group_size)
        # groups whose k responses all score the same: advantage 0 (grpo; rloo up to the KL), nothing learnt
        stats["flat_groups"] = (groups.amax(-1) == groups.amin(-1)).float().mean().item()
        stats["adv_abs"] = seq_adv.abs().mean().item()
    stats.update(ppo_update(policy, value_model, policy_opt, value_opt, batch, cfg, gen, ptx_stream, kl_coef))
    return stats


# -----------------------------------------------------------------------------
# Scores: the reward model or the oracle, and the penalty for no EOS


@torch.no_grad()
def score_rollout(batch: dict, prompt_tasks: list, reward_model, tok, cfg: PPOConfig, oracle_norm) -> tuple:
    """The sequence score r(x, y) of each response, (B,), and what to log about them.
    rm: the reward model at the last real token (normalised: mean 0, std 1 on SFT responses).
    oracle: the world's points, normalised the same way, (points - mean) / std over SFT responses.
    Either way a response without EOS scores --no_eos_score. The other score is logged when it
    can be computed: RM score and oracle points side by side show reward hacking."""
    device = batch["sequences"].device
    finished = batch["finished"]
    stats, rm_scores, points = {}, None, None
    if reward_model is not None:
        with autocast(device):
            rm_scores = reward_model.reward(batch["sequences"], batch["attention_mask"]).float()
        if bool(finished.any()):
            stats["rm_score"] = rm_scores[finished].mean().item()
    if all(t is not None for t in prompt_tasks):
        texts = [decode_response(tok, row) for row in batch["tokens"].tolist()]
        points = torch.tensor([tasks.grade(t, x).points for t, x in zip(prompt_tasks, texts)], dtype=torch.float,
                              device=device)
        stats["oracle"] = points.mean().item()
        stats["exact"] = (points >= 4).float().mean().item()
    raw = rm_scores if cfg.reward == "rm" else (points - oracle_norm[0]) / oracle_norm[1]
    scores = torch.where(finished, raw, torch.full_like(raw, cfg.no_eos_score))
    return scores, stats


# -----------------------------------------------------------------------------
# Config


@dataclass
class PPOConfig(RunFlags, OptimFlags, SamplingFlags):
    # the models
    init: str = ""  # the SFT checkpoint: the policy starts here and the reference stays here
    reward_model: str = ""  # reward.py's output (out_dir/model); needed for --reward rm and (gae) --value_init rm
    reward: str = "rm"  # rm: the learned reward model (InstructGPT); oracle: the world's exact grader
    value_init: str = "rm"  # gae: rm: the value model starts as the RM (InstructGPT); zero: SFT trunk, zero head
    data: str = ""  # prompts JSONL (any data.py SFT format); empty: the task world's training prompts
    world_seed: int = 0  # the task world's data are generated from this seed
    system: str = ""  # a system message for every prompt (default: none; a real model's template may add its own)
    # rollouts
    no_eos_score: float = -3.0  # the score of a response cut by max_new_tokens (RM scores are mean 0, std 1 on SFT)
    # the KL to the reference
    kl_coef: float = 0.05  # β of the per-token penalty -β (log π - log π_ref) in the reward (gae, rloo); grpo: β of the k3 KL term in the loss
    kl_target: float = 0.0  # > 0: adapt β so that the KL per response approaches this (Ziegler et al. 2019)
    kl_horizon: int = 10000  # responses over which the adaptive controller closes the gap
    # PPO (Schulman et al. 2017)
    advantage: str = "gae"  # gae: PPO with a value model and GAE (InstructGPT); rloo: leave-one-out baseline over --group_size responses per prompt (Ahmadian et al. 2024); grpo: (r - group mean) / group std, KL in the loss (DeepSeekMath). rloo and grpo train no value model
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatch_size: int = 16  # responses per PPO update
    clip_eps: float = 0.2  # ε of the clipped surrogate
    value_clip: float = 0.2  # gae: the value model's move per update is clipped to ± this
    gamma: float = 1.0  # gae: discount
    lam: float = 0.95  # gae: GAE's λ
    value_lr: float = 1e-4  # gae: the value model's learning rate (its schedule follows --lr's)
    # group baselines (--advantage rloo or grpo)
    group_size: int = 4  # k responses per prompt from one shared prefill (>= 2); a step has --batch_size / k prompts (gae: one response per prompt, this is not used)
    grpo_std: bool = True  # grpo: divide by the group's std (DeepSeekMath); --no-grpo_std only subtracts the mean (Dr. GRPO, Liu et al. 2025)
    # PPO-ptx
    ptx_coef: float = 0.0  # γ: weight of the pretraining LM loss in the policy loss (InstructGPT: 27.8)
    ptx_data: str = ""  # a .txt corpus (blank-line separated documents); empty: the world's pretraining corpus
    ptx_batch_size: int = 16  # pretraining windows per minibatch
    ptx_seq_len: int = 128  # tokens per pretraining window
    corpus_docs: int = 20000  # the world's corpus, split as sft.py splits it (the first --eval_frac held out)
    eval_frac: float = 0.05  # share of the corpus (and of --data's prompts) held out
    # evaluation
    n_eval: int = 300  # held-out prompts graded before, during and after
    n_norm: int = 300  # --reward oracle: held-out prompts whose SFT responses normalise the oracle's points
    eval_temperature: float = 0.7  # the project's evaluation protocol (evaluate.py, self_reward.py)
    eval_top_p: float = 0.9  # the project's evaluation protocol
    eval_batches: int = 8  # pretraining-loss windows (of --ptx_batch_size) at each evaluation
    # run
    out_dir: str = "runs/ppo"
    eval_every: int = 20
    # optimisation
    batch_size: int = 64  # responses per PPO step: gae one per prompt, rloo and grpo --group_size per prompt (batch_size / group_size prompts)
    max_steps: int = 60  # PPO steps (rollout + update); 60 x 64 responses: ~5 min on one CPU thread; 0: --epochs over --data
    lr: float = 5e-5  # the policy's learning rate
    min_lr_ratio: float = 0.0  # both learning rates decay linearly to this fraction of themselves
    warmup_steps: int = 5
    # sampling
    top_p: float = 1.0  # rollouts come from the policy itself (PPO's ratio needs that): no nucleus, no top-k

    def __post_init__(self):
        c = self
        check_ranges(c, {
            **optim_ranges(c), **sampling_ranges(c),
            "reward": (c.reward in ("rm", "oracle"), "rm or oracle"),
            "value_init": (c.value_init in ("rm", "zero"), "rm or zero"),
            "advantage": (c.advantage in ("gae", "rloo", "grpo"), "gae, rloo or grpo"),
            "group_size": (c.group_size >= 2 or (c.advantage == "gae" and c.group_size >= 1),
                           ">= 2: rloo and grpo compare each response with the others to its prompt"),
            "batch_size": (c.batch_size >= 2 and (c.advantage == "gae" or c.batch_size % max(c.group_size, 1) == 0),
                           ">= 2" + ("" if c.advantage == "gae" else f", a multiple of --group_size {c.group_size}")),
            "grad_accum": (c.grad_accum == 1, "1: PPO steps on minibatches"),
            "dropout": (c.dropout == 0, "0: the rollout's log-probs and the update's must be the same function"),
            "temperature": (c.temperature > 0, "> 0"), "top_p": (c.top_p == 1, "1: rollouts sample the policy itself"),
            "top_k": (c.top_k == 0, "0: rollouts sample the policy itself"),
            "max_steps": (c.max_steps >= 1 or c.data, ">= 1 in the task world (0 counts --epochs over --data)"),
            "kl_coef": (c.kl_coef >= 0, ">= 0"),
            "kl_target": (c.kl_target >= 0, ">= 0"), "kl_horizon": (c.kl_horizon >= 1, ">= 1"),
            "ppo_epochs": (c.ppo_epochs >= 1, ">= 1"),
            "minibatch_size": (1 <= c.minibatch_size <= c.batch_size, "in 1..--batch_size"),
            "clip_eps": (0 < c.clip_eps < 1, "in (0, 1)"), "value_clip": (c.value_clip > 0, "> 0"),
            "gamma": (0 < c.gamma <= 1, "in (0, 1]"), "lam": (0 <= c.lam <= 1, "in [0, 1]"),
            "value_lr": (c.value_lr > 0, "> 0"),
            "ptx_coef": (c.ptx_coef >= 0, ">= 0"), "ptx_batch_size": (c.ptx_batch_size >= 1, ">= 1"),
            "ptx_seq_len": (c.ptx_seq_len >= 2, ">= 2"), "corpus_docs": (c.corpus_docs >= 2, ">= 2"),
            "eval_frac": (0 < c.eval_frac < 1, "in (0, 1)"), "n_eval": (c.n_eval >= 0, ">= 0"),
            "n_norm": (c.n_norm >= 2, ">= 2"),
            "eval_temperature": (c.eval_temperature >= 0, ">= 0"), "eval_top_p": (0 < c.eval_top_p <= 1, "in (0, 1]"),
            "eval_batches": (c.eval_batches >= 1, ">= 1"),
        })


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate_policy(policy, reference, reward_model, tok, eval_prompts: list[str], eval_tasks, cfg: PPOConfig,
                    corpus_eval, device) -> dict:
    """On held-out prompts: the oracle's grade by the project's protocol (evaluate.py; world
    prompts only, eval_tasks), the KL from the SFT model and the RM score of responses sampled at
    the rollout temperature, and the LM loss on held-out pretraining documents."""
    import evaluate

    out = {}
    gen = torch.Generator(device).manual_seed(cfg.seed)
    if eval_tasks:
        r = evaluate.instruction_following(policy, tok, eval_tasks, cfg.eval_temperature, gen, cfg.max_new_tokens,
                                           top_p=cfg.eval_top_p)
        out.update(oracle_mean=r["oracle_mean"], exact_correct=r["exact_correct"], points=r["points"])
    if eval_prompts:
        prompts = [ids for ids in (encode_prompt(tok, p) for p in eval_prompts)
                   if len(ids) + cfg.max_new_tokens <= policy.config.max_seq_len]
        kls, rms = [], []
        for s in range(0, len(prompts), 64):
            chunk = prompts[s : s + 64]
            g = generate(policy, chunk, cfg.max_new_tokens, tok.eos_id, tok.pad_id, temperature=cfg.temperature,
                         generator=gen)
            P = g.sequences.shape[1] - g.tokens.shape[1]
            with autocast(device):
                logp, _ = response_logprobs(policy, g.sequences, g.attention_mask, P, cfg.temperature)
                ref, _ = response_logprobs(reference, g.sequences, g.attention_mask, P, cfg.temperature)
            kls += ((logp - ref) * g.response_mask).sum(-1).tolist()
            if reward_model is not None and bool(g.finished.any()):
                with autocast(device):
                    scores = reward_model.reward(g.sequences, g.attention_mask).float()
                rms += scores[g.finished].tolist()
        if kls:
            out["kl_from_sft"] = sum(kls) / len(kls)
        if rms:
            out["rm_score"] = sum(rms) / len(rms)
    if corpus_eval is not None:
        gen = torch.Generator().manual_seed(12345)  # the same windows at every evaluation
        losses = []
        for _ in range(cfg.eval_batches):
            x, y = (t.to(device) for t in stream_batch(corpus_eval, cfg.ptx_batch_size, cfg.ptx_seq_len, gen))
            with autocast(device):
                losses.append(pretrain_loss(policy, x, y).item())
        out["pretrain_loss"] = sum(losses) / len(losses)
    return out


# -----------------------------------------------------------------------------
# Main


def main(cfg: PPOConfig) -> str:
    """Train; returns the checkpoint directory of the policy."""
    device = init_distributed(cfg.device)  # get_device, and under torchrun the process group
    torch.manual_seed(cfg.seed)

    # flags and data first: a bad file fails here, before a model is loaded or anything is written
    if not cfg.init:
        raise UserError("--init is required: the SFT checkpoint the policy starts from and the reference stays at")
    critic = cfg.advantage == "gae"  # rloo and grpo have no value model
    k = responses_per_prompt(cfg)
    needs_rm = cfg.reward == "rm" or (critic and cfg.value_init == "rm")
    if needs_rm and not cfg.reward_model:
        raise UserError("--reward rm and --value_init rm need --reward_model (reward.py's out_dir/model); "
                        "for a run without one: --reward oracle --value_init zero (or --advantage rloo/grpo)")
    if cfg.data:
        prompts_all = list(dict.fromkeys(e.prompt for e in load_sft_data(cfg.data)))
        random.Random(cfg.seed).shuffle(prompts_all)
        n_eval = min(cfg.n_eval, int(len(prompts_all) * cfg.eval_frac))
        eval_prompts, train_prompts = prompts_all[:n_eval], prompts_all[n_eval:]
        eval_tasks = [tasks.parse_task(p) for p in eval_prompts]
        eval_tasks = eval_tasks if eval_tasks and all(eval_tasks) else None  # the oracle grades world prompts only
        if cfg.reward == "oracle" and not all(tasks.parse_task(p) for p in train_prompts):
            raise UserError(f"--reward oracle: some prompts of {cfg.data} are not task-world prompts "
                            "the oracle can grade")
        if cfg.ptx_coef > 0 and not cfg.ptx_data:
            raise UserError("--ptx_coef with --data needs --ptx_data (a .txt corpus of your model's pretraining kind)")
    else:
        train_prompts = None
        eval_tasks = tasks.eval_prompts(cfg.world_seed + 3, cfg.n_eval) if cfg.n_eval else []
        eval_prompts = [t.prompt for t in eval_tasks]
    # the pretraining corpus: PPO-ptx trains on it, every evaluation measures the loss on its held-out part
    corpus_train = corpus_eval = None
    if cfg.ptx_data:
        corpus_train, corpus_eval = text_corpus(cfg.ptx_data, cfg.eval_frac)
    elif not cfg.data:
        corpus_train, corpus_eval = world_corpus(cfg)  # split exactly as sft.py split it for M0
    for path in filter(None, [cfg.init, cfg.reward_model]):
        check_checkpoint_dir(path)  # a wrong path fails before out_dir is touched
    out = OutDir(cfg, {"--data": cfg.data, "--init": cfg.init, "--reward_model": cfg.reward_model, "--ptx_data": cfg.ptx_data})  # nothing in out_dir is touched before out.start()
    ckpt_dir = out.ckpt

    # the four models; dropout 0 in all of them (overriding what the checkpoints say), and eval
    # mode throughout: the rollout's log-probs and the update's must be the same function
    reference, tok = load_checkpoint(cfg.init, device, dropout=0.0)
    tok.system = cfg.system or None
    frozen(reference.eval().requires_grad_(False), device)  # bf16 on CUDA: only read
    policy, _ = load_checkpoint(ckpt_dir if cfg.resume else cfg.init, device, dropout=0.0)
    policy.eval()
    reward_model = None
    if cfg.reward_model:
        reward_model, rm_tok = load_reward_model(cfg.reward_model, device, head="saved", dropout=0.0)
        frozen(reward_model.eval().requires_grad_(False), device)
        if rm_tok.tk.to_str() != tok.tk.to_str():
            raise UserError(f"--reward_model {cfg.reward_model} and --init {cfg.init} use different tokenizers")
    value_model = None
    if critic:
        if cfg.value_init == "rm":
            value_model, _ = load_reward_model(cfg.reward_model, device, head="saved", dropout=0.0)
        else:
            value_model, _ = load_reward_model(cfg.init, device, head="zero", dropout=0.0)
        value_model.eval()
    models = ["policy"] + (["value"] if critic else []) + ["reference"] + (["RM"] if reward_model is not None else [])
    print(f"policy {policy.num_params() / 1e6:.2f}M parameters; {len(models)} models ({', '.join(models)}"
          f"{'' if reward_model is not None else '; oracle reward'}); advantages {cfg.advantage}, {k} response(s) "
          f"to each of {cfg.batch_size // k * world_size()} prompts per step; device {device}")

    max_prompt = policy.config.max_seq_len - cfg.max_new_tokens
    if train_prompts is not None:
        encoded = [(p, encode_prompt(tok, p)) for p in train_prompts]
        train_prompts = [(p, ids) for p, ids in encoded if len(ids) <= max_prompt]
        if len(train_prompts) < len(encoded):
            print(f"{cfg.data}: dropped {len(encoded) - len(train_prompts)} prompts longer than {max_prompt} tokens")
        if len(train_prompts) < cfg.batch_size // k * world_size():
            raise UserError(f"--batch_size {cfg.batch_size} x {world_size()} rank(s) needs "
                            f"{cfg.batch_size // k * world_size()} prompts per step, more than the "
                            f"{len(train_prompts)} training prompts")
    stream_eval = encode_documents(tok, corpus_eval) if corpus_eval else None
    stream_train = encode_documents(tok, corpus_train) if cfg.ptx_coef > 0 else None
    for name, s in (("held-out corpus", stream_eval), ("ptx corpus", stream_train)):
        if s is not None and len(s) <= cfg.ptx_seq_len + 1:
            raise UserError(f"the {name} has {len(s)} tokens, fewer than one --ptx_seq_len {cfg.ptx_seq_len} window")

    # PPO steps: --max_steps, or --epochs passes over --data's prompts (k responses to each)
    max_steps = total_steps(cfg, len(train_prompts) * k) if train_prompts is not None else cfg.max_steps

    def prompt_batch(step: int):
        """(token ids, Task or None) of the step's batch_size / k prompts: a pure function of the
        step. The tasks come repeated k times, one per response (rows p·k .. p·k+k-1). Under
        torchrun: this rank's part of the step's prompts."""
        n = cfg.batch_size // k
        if train_prompts is None:  # the world: fresh training prompts every step
            rng = random.Random(f"ppo/{cfg.world_seed}/{cfg.seed}/{step}")
            batch = [tasks.sample_task(rng, split="train") for _ in range(n * world_size())][rank() * n:][:n]
            return [encode_prompt(tok, t.prompt) for t in batch], [t for t in batch for _ in range(k)]
        chosen = [train_prompts[i] for i in rank_batch(len(train_prompts), n, cfg.seed, step)]
        return [ids for _, ids in chosen], [tasks.parse_task(p) for p, _ in chosen for _ in range(k)]

    out.start()  # data and models checked: from here on the run writes into out_dir
    policy_opt = configure_optimizer(policy, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), device)
    value_opt = (configure_optimizer(value_model, cfg.value_lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2),
                                     device) if critic else None)
    step, kl_coef, oracle_norm = 0, cfg.kl_coef, None
    if cfg.resume:
        state = out.load_state(policy_opt, device)
        if critic:
            value_model.load_state_dict(state["value_model"])
            value_opt.load_state_dict(state["value_optimizer"])
        step, kl_coef, oracle_norm = state["step"], state["kl_coef"], state["oracle_norm"]
        print(f"resumed at step {step}")
        if step >= max_steps:
            print(f"nothing to do: the checkpoint is at step {step} of {max_steps}")
            out.close()
            return ckpt_dir
    if cfg.reward == "oracle" and oracle_norm is None:
        # normalise the oracle's points like the RM: SFT responses to held-out prompts score mean 0, std 1
        from sampling import sample_responses

        norm_tasks = tasks.eval_prompts(cfg.world_seed + 8, cfg.n_norm)
        texts, ended = sample_responses(reference, tok, [t.prompt for t in norm_tasks], 1, cfg.temperature, 1.0,
                                        cfg.max_new_tokens, generator=torch.Generator(device).manual_seed(cfg.seed),
                                        desc="oracle normalisation", return_finished=True)
        pts = torch.tensor([float(tasks.grade(t, x[0]).points) for t, x, e in zip(norm_tasks, texts, ended) if e[0]])
        if len(pts) < 2:
            raise UserError(f"--reward oracle: only {len(pts)} of {len(norm_tasks)} SFT responses ended with EOS; "
                            "cannot normalise (raise --max_new_tokens)")
        oracle_norm = (pts.mean().item(), max(pts.std(unbiased=False).item(), 1e-3))
        print(f"oracle points of SFT responses to {len(pts)} held-out prompts: mean {oracle_norm[0]:.3f}, "
              f"std {oracle_norm[1]:.3f} (the reward is (points - mean) / std)")

    check_same_on_all_ranks("the step count or the oracle's normalisation", (max_steps, oracle_norm))

    def do_eval():
        return evaluate_policy(policy, reference, reward_model, tok, eval_prompts, eval_tasks, cfg, stream_eval, device)

    # DDP under torchrun (`policy` and `value_model` are saved, sampled and evaluated; rank 0 evaluates)
    train_policy = data_parallel(policy, device)
    train_value = data_parallel(value_model, device, unused_parameters=not value_model.config.tie_embeddings) \
        if critic else None
    before = do_eval() if step == 0 and is_main() else None
    if before:
        tqdm.write("SFT (step 0): " + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if k != "points"))
    pbar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc="ppo", dynamic_ncols=True,
                disable=no_bars())
    t0 = time.time()
    for step in pbar:
        frac = lr_schedule(step, 1.0, cfg.min_lr_ratio, cfg.warmup_steps, max_steps)
        for opt, lr in ((policy_opt, cfg.lr), (value_opt, cfg.value_lr)) if critic else ((policy_opt, cfg.lr),):
            for g in opt.param_groups:
                g["lr"] = lr * frac
        # every random draw of the step (samples, minibatch order, ptx windows) is a function of
        # the step, so --resume continues exactly where the run stopped
        # (and of the rank: each samples its own responses and ptx windows)
        sample_gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step + 999_999_937 * rank())
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_033 + step + 999_999_937 * rank())
        prompts, prompt_tasks = prompt_batch(step)
        stats = ppo_step(train_policy, reference, train_value, policy_opt, value_opt, prompts,
                         lambda b: score_rollout(b, prompt_tasks, reward_model, tok, cfg, oracle_norm),
                         kl_coef, cfg, tok, sample_gen, gen, stream_train)
        stats = all_mean(stats)  # the global batch's: every rank then adapts β the same way
        finite = {name: stats[name] for name in ("pg_loss", "value_loss", "policy_grad_norm", "value_grad_norm",
                                                 "kl_loss") if name in stats}
        check_finite(step + 1, cfg.out_dir, **finite)
        if cfg.kl_target > 0:
            kl_coef = update_kl_coef(kl_coef, stats["kl"], cfg.batch_size * world_size(), cfg.kl_target,
                                     cfg.kl_horizon)
        row = {"step": step + 1, **stats, "lr": cfg.lr * frac, "elapsed_s": time.time() - t0}
        pbar.set_postfix({k: f"{stats[k]:.2f}" for k in ("score", "rm_score", "oracle", "kl", "clip_frac")
                          if k in stats})
        last = step + 1 == max_steps
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and is_main():
            e = do_eval()
            row.update({f"eval_{k}": v for k, v in e.items() if k != "points"})
            tqdm.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in e.items() if k != "points"))
        out.log(row)
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            critic_state = ({"value_model": value_model.state_dict(), "value_optimizer": value_opt.state_dict()}
                            if critic else {})  # rloo, grpo: nothing of a value model is saved
            out.save(policy, tok, policy_opt, step + 1, extra_state={
                **critic_state, "kl_coef": kl_coef, "oracle_norm": oracle_norm})
    if eval_tasks and is_main():
        final_report(cfg, policy, reference, reward_model, tok, eval_prompts, eval_tasks, stream_eval, device,
                     before, time.time() - t0, peak_memory_mb(device))
    out.close()
    print(f"saved {ckpt_dir}")
    return ckpt_dir


def peak_memory_mb(device):
    """This process's peak memory so far, in MiB: on CUDA the allocator's peak (tensors only: the
    models, optimizer states, activations), elsewhere the peak resident set (all of the process:
    Python and PyTorch too, so small models differ little). None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def final_report(cfg, policy, reference, reward_model, tok, eval_prompts, eval_tasks, stream_eval, device, before,
                 seconds, peak_mb=None):
    """SFT vs the trained policy on the held-out prompts, with a paired bootstrap interval;
    written to out_dir/eval.json (the trained policy under "ppo" whatever --advantage, with the
    training's wall time and peak memory)."""
    import evaluate
    from data import write_json

    if before is None:  # a resumed run: the SFT model is the reference
        before = evaluate_policy(reference, reference, reward_model, tok, eval_prompts, eval_tasks, cfg, stream_eval,
                                 device)
    after = evaluate_policy(policy, reference, reward_model, tok, eval_prompts, eval_tasks, cfg, stream_eval, device)
    c = evaluate.compare(after["points"], before["points"], seed=cfg.seed)
    print(f"held-out prompts ({len(eval_tasks)}, T={cfg.eval_temperature}, top-p {cfg.eval_top_p}), oracle mean points "
          f"SFT {before['oracle_mean']:.3f} -> {NAMES[cfg.advantage]} {after['oracle_mean']:.3f} (difference {c['mean_diff']:+.3f}, "
          f"95% CI {c['mean_diff_ci'][0]:+.3f} .. {c['mean_diff_ci'][1]:+.3f}); exact-correct "
          f"{100 * before['exact_correct']:.1f}% -> {100 * after['exact_correct']:.1f}%; win/tie/loss "
          f"{c['win']:.1f}/{c['tie']:.1f}/{c['loss']:.1f}; KL from SFT {after['kl_from_sft']:.2f} nats; "
          + (f"RM score {before.get('rm_score', math.nan):+.2f} -> {after['rm_score']:+.2f}; "
             if "rm_score" in after else "")
          + (f"pretraining loss {before['pretrain_loss']:.3f} -> {after['pretrain_loss']:.3f}; "
             if "pretrain_loss" in after else "") + f"{seconds:.0f} s of training"
          + (f", peak memory {peak_mb:.0f} MiB" if peak_mb is not None else ""))
    strip = lambda d: {k: v for k, v in d.items() if k != "points"}
    write_json(os.path.join(cfg.out_dir, "eval.json"), {"sft": strip(before), "ppo": strip(after), "compare": c,
                                                        "train_seconds": seconds, "advantage": cfg.advantage,
                                                        "peak_memory_mb": peak_mb})


if __name__ == "__main__":
    cli(main, PPOConfig, __doc__)


