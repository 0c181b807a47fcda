"""The reward model (InstructGPT step 2): a transformer that reads a prompt and a response and
returns one number, trained on ranked comparisons.

    r(x, y) = gain * (w · h_last(x, y)) + bias

h_last is the trunk's final hidden state (after the last RMSNorm) at the LAST REAL token of
prompt + response (the response's EOS), w the scalar head. The trunk starts as the SFT model
(InstructGPT started its 6B RM from an SFT model, with the unembedding replaced by this head).

Comparisons, as InstructGPT collected them: per prompt, K responses (K = 4 by default; the paper
showed labellers 4 to 9) ranked best to worst. Every ordered pair (y_w better than y_l) is a
comparison; ties give none. The loss (InstructGPT eq. 1):

    loss(θ) = -1 / C(K,2) · E_(x, y_w, y_l) [ log σ( r(x, y_w) - r(x, y_l) ) ]

All K responses of a prompt go through ONE forward pass and all of its pairs form ONE batch
element (their mean is one prompt's loss): the comparisons of a prompt are strongly correlated,
and treating each as its own shuffled example made InstructGPT's RM overfit in one epoch; it
also costs K forward passes per prompt instead of 2·C(K,2). One epoch by default, lr annealed.

Only differences of rewards enter the loss, so r is defined up to a constant: after training
a gain and a bias are fitted so that responses of the SFT model on held-out prompts score mean 0
and std 1, and saved with the model. (InstructGPT added a bias so that labeller demonstrations
score 0 on average; the gain too gives PPO's KL coefficient and its penalty for responses
without EOS a fixed unit: one standard deviation of SFT responses.)

    python reward.py --init runs/default/SFT/model --world_prompts 2000 --out_dir runs/rm
    python reward.py --init path/to/sft --data comparisons.jsonl --out_dir runs/rm_mine

--world_prompts N needs no file: the SFT model samples K responses to each of N training prompts
of the task world and the oracle ranks them. --data reads preference pairs or Anthropic HH
transcripts (data.load_preference_data; the pairs of one prompt are grouped) or ranked lists:

    {"prompt": str, "responses": [best, ..., worst]}
    {"prompt": str, "responses": [...], "scores": [number, ...]}   (higher is better; ties allowed)

(the world's comparisons are written in the second form, to out_dir/comparisons.jsonl).

Output: out_dir/model/ and out_dir/metrics.jsonl, out_dir/rm_eval.json (held-out pairwise
accuracy and the score distribution). The model directory:

    config.json, model.safetensors   the trunk, as model.py saves any checkpoint (HF Llama names)
    score.safetensors                the head: score.weight (1, dim), no bias
    reward.json                      {"gain", "bias"} and the mean and std they were fitted from
    tokenizer.json, train_config.json, trainer_state.pt

How it maps to HF transformers' LlamaForSequenceClassification (num_labels=1): that class is the
same trunk (`model.*`, the tensors of model.safetensors) plus `score.weight` (1, hidden_size)
WITHOUT a bias, read at the last non-pad token (current transformers takes the rightmost token
that is not pad_token_id, right under left padding too; older versions took the token before the
first pad, right padding only). So our head is exactly HF's `score` (tests/test_reward.py checks
it); the normalisation is not part of HF's layout and lives in reward.json:

    hf = LlamaForSequenceClassification.from_pretrained(d, num_labels=1)   # score: "newly initialized"
    hf.score.weight.data = safetensors.torch.load_file(f"{d}/score.safetensors")["score.weight"]
    r = gain * hf(input_ids, attention_mask=mask).logits[:, 0] + bias

(The head has no bias of its own because it could never learn one: the loss sees only
differences. The normalisation's bias plays that role.)
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from data import (Comparison, UserError, comparison_rows, encode_prompt, encode_response, from_scores,
                  load_comparisons, pad_batch, ranked_comparison, read_json, read_jsonl, write_json)
from checkpoint import check_checkpoint_dir, load_checkpoint
from model import Transformer, autocast
from train_utils import (OptimFlags, OutDir, RunFlags, SamplingFlags, all_mean, check_finite, check_ranges,
                         check_same_on_all_ranks, cli, configure_optimizer, data_parallel, global_batch,
                         init_distributed, is_main, lr_schedule, no_bars, optim_ranges, rank, rank_batch,
                         sampling_ranges, total_steps, world_size)


# -----------------------------------------------------------------------------
# The loss


def comparison_loss(rewards, win, lose, group, n_groups: int):
    """InstructGPT eq. 1: per prompt, -mean over its pairs of log σ(r_w - r_l); then the mean
    over prompts (each prompt one batch element, whatever its number of pairs: C(K,2) when no
    two of its K responses tie). rewards (R,); win, lose, group (P,). F.logsigmoid, never
    log(sigmoid(.)): the latter is -inf once a margin passes about -100 in fp32.
    Returns (loss, the share of pairs ordered right)."""
    # --- exercise: bradley_terry ---
    logp = F.logsigmoid(rewards[win] - rewards[lose])  # (P,)
    per_prompt = torch.zeros(n_groups, device=rewards.device).index_add(0, group, logp)
    per_prompt = per_prompt / torch.bincount(group, minlength=n_groups).clamp(min=1)
    accuracy = (rewards[win] > rewards[lose]).float().mean()
    return -per_prompt.mean(), accuracy
    # --- end exercise ---


# -----------------------------------------------------------------------------
# The model: trunk + scalar head, read at the last real token


def last_token_index(attention_mask):
    """Column of each row's last real token, (B, T) -> (B,). Right for right padding (real
    tokens, then pad) and left padding (pad, then real tokens) alike: it is the last 1."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).argmax(-1)


class RewardModel(nn.Module):
    """The transformer trunk with a scalar head. `forward` gives the head's value at every
    position, (B, T): ppo.py's value model is this class, V(s_t) read at each response token.
    `reward` reads it at the last real token, (B,): the reward model's r(x, y)."""

    def __init__(self, trunk: Transformer, head: str = "new"):
        super().__init__()
        self.config = trunk.config
        self.transformer = trunk  # its lm_head is kept (tied: free), so the trunk stays a loadable LM
        self.score = nn.Linear(trunk.config.dim, 1, bias=False)  # HF's name and shape: score.weight (1, dim)
        if head == "zero":
            nn.init.zeros_(self.score.weight)  # a value model that starts at V = 0 everywhere
        else:
            # std 1/sqrt(d+1): the final RMSNorm gives hidden states of about unit scale per
            # component, so the initial scores are about N(0, 1), neither flat nor huge
            nn.init.normal_(self.score.weight, std=1 / math.sqrt(trunk.config.dim + 1))
        # the normalisation r = gain * raw + bias (fitted after training; not trained)
        self.register_buffer("gain", torch.ones(()))
        self.register_buffer("bias", torch.zeros(()))
        self.norm_info = {}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, attention_mask):
        """(B, T) -> normalised head output at every position, (B, T), fp32."""
        h = self.transformer(input_ids, attention_mask=attention_mask, return_hidden=True)  # (B, T, dim)
        with torch.autocast(h.device.type, enabled=False):  # the head in fp32: a scalar per row is cheap
            raw = F.linear(h.float(), self.score.weight.float()).squeeze(-1)
        return self.gain * raw + self.bias

    def reward(self, input_ids, attention_mask):
        """r(x, y) of each row: the head at the last real token (the response's EOS), (B,)."""
        values = self(input_ids, attention_mask)
        return values[torch.arange(values.shape[0], device=values.device), last_token_index(attention_mask)]

    def save_pretrained(self, path: str, tokenizer=None, extra_files: dict | None = None,
                        metadata: dict | None = None):
        """The trunk through model.py's one atomic writer, the head and the normalisation as
        extra files written with it (same signature as Transformer.save_pretrained, so
        model.save_checkpoint saves a reward model too). The head carries the step as well, so
        that loading can tell it belongs to the same save as the trunk."""
        from safetensors.torch import save

        head = save({"score.weight": self.score.weight.detach().to("cpu", torch.float32).contiguous()},
                    metadata={"format": "pt", **(metadata or {})})
        norm = {"gain": self.gain.item(), "bias": self.bias.item(), **self.norm_info}
        self.transformer.save_pretrained(path, tokenizer, extra_files={
            "score.safetensors": head, "reward.json": json.dumps(norm, indent=2), **(extra_files or {})},
            metadata=metadata)


def load_reward_model(path: str, device="cpu", head: str = "saved", **overrides):
    """(RewardModel, tokenizer) from a checkpoint directory.
    head="saved": a reward model directory (reward.py's output): its head and normalisation.
    head="new":   any causal-LM checkpoint (the SFT model) with a fresh head, std 1/sqrt(d+1).
    head="zero":  any checkpoint with a zero head (ppo.py --value_init zero)."""
    from checkpoint import checkpoint_metadata
    from safetensors import safe_open

    trunk, tok = load_checkpoint(path, device, kind="reward_model" if head == "saved" else "language_model",
                                 **overrides)
    rm = RewardModel(trunk, head="zero" if head == "zero" else "new").to(device)
    if head == "saved":
        file, norm_file = os.path.join(path, "score.safetensors"), os.path.join(path, "reward.json")
        for f in (file, norm_file):
            if not os.path.exists(f):
                raise UserError(f"{path}: no {os.path.basename(f)}; the reward model was not saved whole "
                                "(train it again with reward.py)")
        try:
            with safe_open(file, "pt") as f:
                weight, step = f.get_tensor("score.weight"), (f.metadata() or {}).get("step")
        except Exception as e:  # safetensors has its own error types for a damaged file
            raise UserError(f"{file}: cannot read the head ({e}); the file is damaged or truncated") from None
        if step != checkpoint_metadata(path).get("step"):
            raise UserError(f"{path}: the head and the trunk come from different saves; "
                            "train again with --overwrite")
        if weight.shape != rm.score.weight.shape:
            raise UserError(f"{path}: score.weight has shape {tuple(weight.shape)}, "
                            f"expected {tuple(rm.score.weight.shape)}")
        rm.score.weight.data.copy_(weight)
        norm = read_json(norm_file)
        gain, bias = norm.get("gain"), norm.get("bias")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (gain, bias)) or not 0 < gain < 1e6 \
                or abs(bias) > 1e6:
            raise UserError(f"{norm_file}: gain {gain!r}, bias {bias!r} is no usable normalisation (it maps the "
                            "SFT responses' scores to mean 0, std 1: gain in (0, 1e6), |bias| <= 1e6)")
        rm.gain.fill_(gain)
        rm.bias.fill_(bias)
        rm.norm_info = {k: v for k, v in norm.items() if k not in ("gain", "bias")}
    return rm, tok


# -----------------------------------------------------------------------------
# Comparison data (the ranked-list format and its reader live in data.py)


def world_comparisons(model, tok, world_tasks: list, k: int, cfg: RewardConfig, gen, desc: str) -> list[Comparison]:
    """K samples of the SFT model per task, ranked by the oracle's points. A sample cut by
    max_new_tokens (no EOS) is left out: PPO gives such responses a fixed penalty instead of
    asking the RM. Prompts whose samples all score the same give no comparison."""
    from sampling import sample_responses

    texts, ended = sample_responses(model, tok, [t.prompt for t in world_tasks], k, cfg.temperature, cfg.top_p,
                                    cfg.max_new_tokens, generator=gen, desc=desc, return_finished=True,
                                    top_k=cfg.top_k)
    out = []
    for task, rs, es in zip(world_tasks, texts, ended):
        kept = list(dict.fromkeys(r for r, e in zip(rs, es) if e and r is not None))  # distinct finished texts
        if len(kept) >= 2:
            c = from_scores(task.prompt, kept, [tasks.grade(task, r).points for r in kept])
            if c.pairs:
                out.append(c)
    return out


def encode_comparisons(tok, comps: list[Comparison], max_len: int, what: str) -> list[dict]:
    """Token ids: the prompt in the chat template and each response closed by EOS. A prompt
    whose longest response does not fit the context is dropped and counted, never cut."""
    out = []
    for c in comps:
        prompt = encode_prompt(tok, c.prompt)
        responses = [encode_response(tok, r) for r in c.responses]
        if c.pairs and len(prompt) + max(len(r) for r in responses) <= max_len:
            out.append({"prompt": prompt, "responses": responses, "pairs": c.pairs, "scores": c.scores})
    if len(out) < len(comps):
        print(f"{what}: dropped {len(comps) - len(out)} of {len(comps)} prompts "
              f"(longer than {max_len} tokens, or no pair)")
    return out


def comparison_batch(groups: list[dict], pad_id: int):
    """All responses of B prompts as rows of ONE right-padded batch, and every comparison as
    row indices: input_ids, attention_mask (R, T) with R = the responses of all B prompts;
    win, lose, group (P,): the preferred row, the other row and the prompt of each pair."""
    seqs, win, lose, group = [], [], [], []
    for g, c in enumerate(groups):
        first = len(seqs)
        seqs += [c["prompt"] + r for r in c["responses"]]
        for w, l in c["pairs"]:
            win.append(first + w)
            lose.append(first + l)
            group.append(g)
    ids, attn = pad_batch(seqs, pad_id, "right")
    return ids, attn, torch.tensor(win), torch.tensor(lose), torch.tensor(group)


# -----------------------------------------------------------------------------
# Config


@dataclass
class RewardConfig(RunFlags, OptimFlags, SamplingFlags):
    # what to train on
    init: str = ""  # the SFT checkpoint: the trunk starts here; it samples the responses to rank and normalise on
    data: str = ""  # comparisons JSONL: preference pairs, HH transcripts or ranked lists (see the docstring)
    world_prompts: int = 0  # instead of --data: this many world training prompts, K samples each, oracle-ranked
    k: int = 4  # responses per prompt in the world (InstructGPT: 4 to 9)
    eval_frac: float = 0.05  # --data: share of the prompts held out for the pairwise accuracy
    system: str = ""  # a system message for every prompt (default: none; a real model's template may add its own)
    world_seed: int = 0  # the task world's data are generated from this seed
    n_eval: int = 200  # world: held-out prompts (K samples each) for the pairwise accuracy (0: skip)
    n_eft_eval: int = 60  # world: the self-rewarding judge's held-out set, scored by the RM (0: skip)
    eft_k: int = 4  # responses per prompt in that set (self_reward.py's --k)
    n_norm: int = 300  # held-out prompts whose SFT responses set gain and bias (mean 0, std 1)
    max_seq_len: int = 0  # context length; 0: the checkpoint's own
    # run
    out_dir: str = "runs/rm"
    # optimisation
    batch_size: int = 8  # prompts per micro-batch, each with all its responses
    lr: float = 3e-4  # (InstructGPT's 6B RM: one epoch, lr 9e-6 cosine; a small model wants more)
    # sampling
    top_p: float = 1.0  # the SFT model's samples (comparisons, normalisation set) as PPO's rollouts will be: no nucleus

    def __post_init__(self):
        c = self
        check_ranges(c, {
            **optim_ranges(c), **sampling_ranges(c),
            "k": (2 <= c.k <= 16, "in 2..16"), "world_prompts": (c.world_prompts >= 0, ">= 0"),
            "n_eval": (c.n_eval >= 0, ">= 0"), "n_eft_eval": (c.n_eft_eval >= 0, ">= 0"),
            "eft_k": (c.eft_k >= 2, ">= 2"), "n_norm": (c.n_norm >= 2, ">= 2"),
            "eval_frac": (0 <= c.eval_frac < 1, "in [0, 1)"), "max_seq_len": (c.max_seq_len >= 0, ">= 0"),
            "temperature": (c.temperature > 0, "> 0"),
        })


# -----------------------------------------------------------------------------
# Evaluation and normalisation


@torch.no_grad()
def score_sequences(rm: RewardModel, seqs: list[list[int]], pad_id: int, device, batch_size: int = 64):
    """r of each token-id sequence (prompt + response), batched, (n,) on the CPU."""
    out = []
    for s in range(0, len(seqs), batch_size):
        ids, attn = pad_batch(seqs[s : s + batch_size], pad_id, "right")
        with autocast(device):
            out.append(rm.reward(ids.to(device), attn.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def fit_normalisation(rm: RewardModel, seqs: list[list[int]], pad_id: int, device) -> dict:
    """Set gain and bias so that these sequences (SFT responses to held-out prompts) score mean 0
    and std 1. Returns the raw mean and std they were fitted from."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    raw = score_sequences(rm, seqs, pad_id, device).double()
    mean, std = raw.mean().item(), raw.std(unbiased=False).item()
    rm.gain.fill_(1.0 / max(std, 1e-6))
    rm.bias.fill_(-mean / max(std, 1e-6))
    rm.norm_info = {"raw_mean": mean, "raw_std": std, "n": len(seqs)}
    return rm.norm_info


@torch.no_grad()
def evaluate_comparisons(rm: RewardModel, groups: list[dict], pad_id: int, device, batch_size: int = 16) -> dict:
    """Held-out loss and pairwise accuracy (the share of pairs the RM orders like the ranking),
    and every response's score with the value it was ranked by (for the score distribution)."""
    loss = correct = pairs = 0.0
    scored = []  # (ranking score, RM score) of each response
    for s in range(0, len(groups), batch_size):
        chunk = groups[s : s + batch_size]
        ids, attn, win, lose, group = comparison_batch(chunk, pad_id)
        with autocast(device):
            r = rm.reward(ids.to(device), attn.to(device)).float().cpu()
        l, acc = comparison_loss(r, win, lose, group, len(chunk))
        loss += l.item() * len(chunk)
        correct += acc.item() * len(win)
        pairs += len(win)
        k = 0
        for c in chunk:  # rows are the chunk's responses in order
            ranking = c["scores"] or [None] * len(c["responses"])
            scored += zip(ranking, r[k : k + len(ranking)].tolist())
            k += len(ranking)
    return {"loss": loss / len(groups), "pairwise_accuracy": correct / max(1, pairs), "pairs": int(pairs),
            "scored": scored}


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return {"mean": sum(xs) / len(xs), "std": float(torch.tensor(xs).std(unbiased=False)), "min": xs[0],
            "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "max": xs[-1], "n": len(xs)}


# -----------------------------------------------------------------------------
# Main


def main(cfg: RewardConfig) -> str:
    """Train; returns the checkpoint directory."""
    from sampling import sample_responses

    device = init_distributed(cfg.device)  # get_device, and under torchrun the process group
    torch.manual_seed(cfg.seed)

    # data first: a bad file fails here, before a model is loaded or anything is written
    if not cfg.init:
        raise UserError("--init is required: the SFT checkpoint the reward model starts from")
    if bool(cfg.data) == bool(cfg.world_prompts):
        raise UserError("give exactly one of --data (a comparisons JSONL) and --world_prompts N")
    comps = load_comparisons(cfg.data) if cfg.data else None
    if comps is not None:
        comps = [c for c in comps if c.pairs]  # a ranked list that is one tie compares nothing
        if not comps:
            raise UserError(f"{cfg.data}: no comparison to train on (every pair's chosen equals its rejected, or every "
                            "ranked list is one tie)")
    check_checkpoint_dir(cfg.init)  # a wrong path fails before out_dir is touched
    out = OutDir(cfg, {"--data": cfg.data, "--init": cfg.init})  # nothing in out_dir is touched before out.start()
    ckpt_dir = out.ckpt
    overrides = {"max_seq_len": cfg.max_seq_len} if cfg.max_seq_len else {}

    # --data: a fixed train / held-out split of the file's prompts
    if comps is not None:
        order = list(range(len(comps)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = int(len(comps) * cfg.eval_frac) if len(comps) >= 20 else 0
        eval_comps, train_comps = [comps[i] for i in order[:n_eval]], [comps[i] for i in order[n_eval:]]
    # what the SFT model samples (the world's comparisons, the normalisation set) is sampled once,
    # up front, and written down: a --resume reads it back. Under torchrun every rank samples
    # the same (same seed), so all hold the same comparisons and take their parts of each batch.
    world_file, eval_file = (os.path.join(cfg.out_dir, f) for f in ("comparisons.jsonl", "eval_comparisons.jsonl"))
    norm_file = os.path.join(cfg.out_dir, "norm_responses.jsonl")
    if cfg.resume and os.path.exists(norm_file):
        norm_rows = [o for _, o in read_jsonl(norm_file)]
        if cfg.world_prompts:
            train_comps = [ranked_comparison(o, f"{world_file}:{n}") for n, o in read_jsonl(world_file)]
            eval_comps = ([ranked_comparison(o, f"{eval_file}:{n}") for n, o in read_jsonl(eval_file)]
                          if os.path.getsize(eval_file) else [])
    else:
        sft, tok = load_checkpoint(cfg.init, device, **overrides)
        tok.system = cfg.system or None
        sft.eval()
        gen = torch.Generator(device).manual_seed(cfg.seed)
        if cfg.world_prompts:
            rng = random.Random(f"rm-world/{cfg.world_seed}/{cfg.seed}")
            train_tasks = [tasks.sample_task(rng, split="train") for _ in range(cfg.world_prompts)]
            train_comps = world_comparisons(sft, tok, train_tasks, cfg.k, cfg, gen, "ranking samples")
            eval_comps = world_comparisons(sft, tok, tasks.eval_prompts(cfg.world_seed + 7, cfg.n_eval), cfg.k,
                                           cfg, gen, "held-out samples") if cfg.n_eval else []
            norm_prompts = [t.prompt for t in tasks.eval_prompts(cfg.world_seed + 8, cfg.n_norm)]
            print(f"world comparisons: {len(train_comps)} of {cfg.world_prompts} prompts give pairs "
                  f"({sum(len(c.pairs) for c in train_comps)} pairs); held out: {len(eval_comps)} prompts")
            out.write_rows("comparisons.jsonl", comparison_rows(train_comps))
            out.write_rows("eval_comparisons.jsonl", comparison_rows(eval_comps))
        else:
            # held-out prompts first; training prompts top the set up (it needs SFT samples, no labels)
            norm_prompts = [c.prompt for c in eval_comps + train_comps][: cfg.n_norm]
        # the normalisation set: one finished SFT response per held-out prompt
        texts, ended = sample_responses(sft, tok, norm_prompts, 1, cfg.temperature, cfg.top_p, cfg.max_new_tokens,
                                        generator=gen, desc="normalisation samples", return_finished=True,
                                        top_k=cfg.top_k)
        norm_rows = [{"prompt": p, "response": t[0]} for p, t, e in zip(norm_prompts, texts, ended) if e[0]]
        out.write_rows("norm_responses.jsonl", norm_rows)
        del sft  # the sampler is done: from here on one model sits in memory
    if len(norm_rows) < 2:
        raise UserError("fewer than 2 SFT responses ended with EOS; cannot normalise (raise --max_new_tokens)")

    rm, tok = load_reward_model(ckpt_dir if cfg.resume else cfg.init, device, head="saved" if cfg.resume else "new",
                                dropout=cfg.dropout, **overrides)
    tok.system = cfg.system or None
    rm.gain.fill_(1.0)  # train on the raw head; the normalisation is fitted again at the end
    rm.bias.fill_(0.0)
    max_len = rm.config.max_seq_len
    train = encode_comparisons(tok, train_comps, max_len, "train")
    evals = encode_comparisons(tok, eval_comps, max_len, "eval")
    norm_seqs = [encode_prompt(tok, r["prompt"]) + encode_response(tok, r["response"]) for r in norm_rows]
    norm_seqs = [s for s in norm_seqs if len(s) <= max_len]
    if cfg.batch_size * world_size() > len(train):
        raise UserError(f"--batch_size {cfg.batch_size} x {world_size()} rank(s) > {len(train)} training prompts "
                        "with comparisons")
    max_steps = total_steps(cfg, len(train))
    check_same_on_all_ranks("the comparisons or the normalisation set", (max_steps, train, norm_seqs))
    print(f"reward model: {rm.num_params() / 1e6:.2f}M parameters, device {device}; {len(train)} prompts, "
          f"{sum(len(c['pairs']) for c in train)} pairs; {max_steps} steps of {global_batch(cfg)} "
          f"prompts ({max_steps * global_batch(cfg) / len(train):.2f} epochs)")

    out.start()  # data and models checked: from here on the run writes into out_dir
    optimizer = configure_optimizer(rm, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), device)
    step = 0
    if cfg.resume:
        step = out.load_state(optimizer, device)["step"]
        print(f"resumed at step {step}")
        if step >= max_steps:
            print(f"nothing to do: the checkpoint is at step {step} of {max_steps}")
            out.close()
            return ckpt_dir

    def evaluate_held_out():
        rm.eval()
        e = evaluate_comparisons(rm, evals, tok.pad_id, device)
        rm.train()
        return {"eval_loss": e["loss"], "eval_accuracy": e["pairwise_accuracy"]}

    # DDP under torchrun; `rm` itself is saved and evaluated
    train_rm = data_parallel(rm, device, unused_parameters=not rm.config.tie_embeddings)
    rm.train()
    start_step = step
    pbar = tqdm(range(step, max_steps), initial=step, total=max_steps, desc="reward model", dynamic_ncols=True,
                disable=no_bars())
    t0 = time.time()
    for step in pbar:
        # dropout masks: a function of the step (for --resume) and of the rank
        torch.manual_seed(cfg.seed + step + 1_000_003 * rank())
        lr = lr_schedule(step, cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, max_steps)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss = accuracy = 0.0
        for k in range(cfg.grad_accum):  # equal numbers of prompts per micro-batch (and rank): a plain mean is exact
            chunk = [train[i] for i in rank_batch(len(train), cfg.batch_size, cfg.seed, step * cfg.grad_accum + k)]
            ids, attn, win, lose, group = (t.to(device) for t in comparison_batch(chunk, tok.pad_id))
            with autocast(device):
                values = train_rm(ids, attn)  # (R, T), through forward: DDP syncs only what forward made
            # (R,): r(x, y) of the K responses of every prompt, read at each one's last token (RewardModel.reward)
            rewards = values[torch.arange(len(values), device=device), last_token_index(attn)].float()
            l, acc = comparison_loss(rewards, win, lose, group, len(chunk))
            (l / cfg.grad_accum).backward()
            loss += l.item() / cfg.grad_accum
            accuracy += acc.item() / cfg.grad_accum
        both = all_mean({"loss": loss, "accuracy": accuracy})  # the global batch's
        loss, accuracy = both["loss"], both["accuracy"]
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip).item()
        check_finite(step + 1, cfg.out_dir, loss=loss, grad_norm=grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss, "accuracy": accuracy, "grad_norm": grad_norm, "lr": lr}
        pbar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
        last = step + 1 == max_steps
        if evals and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and is_main():
            row.update(evaluate_held_out())
            row["prompts_per_s"] = ((step + 1 - start_step) * global_batch(cfg)
                                    / (time.time() - t0))
            tqdm.write(f"step {step + 1}: loss {loss:.4f} eval_loss {row['eval_loss']:.4f} "
                       f"held-out pairwise accuracy {row['eval_accuracy']:.3f}")
        out.log(row)
        if last and is_main():
            rm.eval()
            norm = fit_normalisation(rm, norm_seqs, tok.pad_id, device)
            print(f"normalised on {norm['n']} SFT responses to held-out prompts: raw mean {norm['raw_mean']:.3f}, "
                  f"std {norm['raw_std']:.3f} -> gain {rm.gain.item():.4f}, bias {rm.bias.item():.4f}")
            report(cfg, rm, tok, evals, norm_seqs, device)
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            out.save(rm, tok, optimizer, step + 1)
    out.close()
    print(f"saved {ckpt_dir}")
    return ckpt_dir


def report(cfg: RewardConfig, rm: RewardModel, tok, evals: list[dict], norm_seqs, device):
    """Held-out pairwise accuracy, the score distribution (of the normalisation set, and by
    oracle points on the held-out comparisons) and, in the world, the RM on the self-rewarding
    judge's evaluation set: the same metrics as evaluate.reward_modeling gives the judge M1."""
    import evaluate

    out = {"normalisation": rm.norm_info,
           "sft_scores": quantiles(score_sequences(rm, norm_seqs, tok.pad_id, device).tolist())}
    if evals:
        e = evaluate_comparisons(rm, evals, tok.pad_id, device)  # (its loss depends on the gain: not reported)
        out.update(pairwise_accuracy=e["pairwise_accuracy"], eval_pairs=e["pairs"])
        levels = sorted({s for s, _ in e["scored"] if s is not None})
        out["score_by_ranking_value"] = {str(v): quantiles([r for s, r in e["scored"] if s == v]) for v in levels}
        print(f"held-out comparisons: pairwise accuracy {100 * e['pairwise_accuracy']:.1f}% on {e['pairs']} pairs; "
              f"normalised RM score by the value each response was ranked by (the world: oracle points):")
        for v, q in out["score_by_ranking_value"].items():
            print(f"  {v}: mean {q['mean']:+.2f} (p10 {q['p10']:+.2f}, p90 {q['p90']:+.2f}, n {q['n']})")
    if cfg.world_prompts and cfg.n_eft_eval:
        eft = tasks.eft_eval_set(cfg.world_seed + 4, cfg.n_eft_eval, cfg.eft_k)
        seqs = [encode_prompt(tok, t.prompt) + encode_response(tok, r) for t, rs, _ in eft for r in rs]
        scores = score_sequences(rm, seqs, tok.pad_id, device).tolist()
        judged = [scores[i * cfg.eft_k : (i + 1) * cfg.eft_k] for i in range(len(eft))]
        m = evaluate.reward_modeling(judged, [pts for _, _, pts in eft])
        out["eft_eval"] = {k: m[k] for k in ("pairwise_accuracy", "exact_match", "spearman", "kendall_tau", "n_pairs")}
        print(f"judge evaluation set ({len(eft)} prompts x {cfg.eft_k}, as self_reward.py scores its judge): pairwise "
              f"accuracy {m['pairwise_accuracy']:.1f}%, Spearman {m['spearman']:.3f}, "
              f"Kendall tau {m['kendall_tau']:.3f}")
    write_json(os.path.join(cfg.out_dir, "rm_eval.json"), out)


if __name__ == "__main__":
    cli(main, RewardConfig, __doc__)


