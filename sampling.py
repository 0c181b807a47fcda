"""Sampling: the one batched KV-cache sampler every script calls, and its text-level wrapper.

  - `filter_logits`      top-k and top-p (nucleus) truncation of next-token logits
  - `generate`           token ids in, token ids out: left-padded prompts, one prefill, then one
                         token per step from the KV cache; temperature, top-k, top-p, per-row stop
                         at EOS, optional shared prefill for N samples per prompt; returns the
                         sampled tokens, their log-probs, masks and which rows finished
  - `sample_responses`   strings in, strings out: prompts rendered with the chat template
                         (data.encode_prompt), sorted by length, batched, decoded
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import Tokenizer, UserError, decode_response, encode_prompt, pad_batch
from model import KVCache, Transformer, autocast, token_logprobs


# -----------------------------------------------------------------------------
# Token level: generate


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p.
    logits (B, V). top_p keeps the smallest set of most likely tokens whose probability
    reaches top_p (the token that crosses the threshold is kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # mass strictly before each token; drop a token if that mass already reached top_p
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@dataclass
class Generation:
    """What `generate` returns. N = number of generated columns (<= max_new_tokens).
    sequences (B, T0+N): prompt (left-padded) + response; attention_mask (B, T0+N) marks real
    tokens of both; tokens (B, N): the response alone, padded with pad_id after EOS;
    logprobs (B, N): log-prob of each sampled token under softmax(logits / temperature)
    (no top-k/top-p renormalisation: the policy's own distribution, as PPO needs; greedy
    decoding reports them at temperature 1), 0 on padding;
    response_mask (B, N): 1 on response tokens, EOS included; finished (B,): True where the
    row emitted EOS (a row without EOS was cut by max_new_tokens: PPO penalises it)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    response_mask: torch.Tensor
    finished: torch.Tensor


@torch.no_grad()
def generate(
    model: Transformer,
    prompts,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    attention_mask=None,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> Generation:
    """Sample continuations of a batch of prompts with a KV cache.

    prompts: a list of token-id lists (left-padded here) or a left-padded LongTensor (P, T0)
    with its attention_mask. temperature 0 means greedy. Each row stops at its first EOS;
    the loop stops when all rows have stopped or after max_new_tokens.
    num_samples: continuations per prompt. The prompts' prefill runs once and its cache is
    copied, so the output has P * num_samples rows, prompt i owning rows
    i * num_samples ... (i + 1) * num_samples - 1 (best-of-N sampling, the judge's 3 samples).
    `generator` (a torch.Generator on the model's device) makes sampling repeatable."""
    if pad_id == eos_id:
        raise ValueError("pad_id must differ from eos_id: padding would read as end of sequence")
    if not (temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and max_new_tokens >= 1 and num_samples >= 1):
        raise ValueError(f"generate: need temperature >= 0, top_k >= 0, 0 < top_p <= 1, "
                         f"max_new_tokens >= 1 and num_samples >= 1; got {temperature}, {top_k}, "
                         f"{top_p}, {max_new_tokens}, {num_samples}")
    device = model.embed_tokens.weight.device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
        # every row's next token goes in the same column, so prompts must end in the last one
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate: tensor prompts must be LEFT-padded (the attention mask's "
                             "last column is 0 in some row)")
    else:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        ids, attention_mask = pad_batch(prompts, pad_id, side="left")
        ids, attention_mask = ids.to(device), attention_mask.to(device)
    T0 = ids.shape[1]
    if T0 + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
            f"({model.config.max_seq_len}); shorten the prompt or the generation budget"
        )
    was_training = model.training
    model.eval()  # no dropout while sampling; restored below even if sampling raises
    try:
        return _sample(model, ids, attention_mask, max_new_tokens, eos_id, pad_id, temperature,
                       top_k, top_p, generator, num_samples)
    finally:
        model.train(was_training)


def _sample(model, ids, attention_mask, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
            generator, num_samples) -> Generation:
    """The decoding loop of `generate` (arguments checked there)."""
    device = ids.device
    P, T0 = ids.shape  # P distinct prompts
    B = P * num_samples  # rows being sampled
    total = T0 + max_new_tokens
    dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    cache = KVCache(model.config, P, total, device, dtype)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (P, T0)
    with autocast(device):
        logits = model(ids, attention_mask, cache=cache, start=0, positions=positions)[:, -1]
    if num_samples > 1:
        # Shared prefill: the prompt was run once; its cache, mask and last logits are copied
        # to its num_samples rows. Each row then draws its OWN first token below (copying
        # one sampled first token to every row is a classic bug of this optimisation).
        cache.repeat_interleave(num_samples)
        ids = ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        logits = logits.repeat_interleave(num_samples, dim=0)
    # the mask grows with the sequence; preallocate it, and the outputs, once
    full_mask = torch.zeros((B, total), dtype=torch.long, device=device)
    full_mask[:, :T0] = attention_mask
    next_pos = attention_mask.sum(-1, keepdim=True)  # (B, 1) position of the first new token
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    n = 0
    for t in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            next_tok = logits.argmax(-1)
            scaled = logits
        else:
            scaled = logits / temperature
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
        logp = token_logprobs(scaled[:, None], next_tok[:, None])[:, 0]  # greedy: at T = 1
        alive = ~finished
        tokens[:, t] = torch.where(alive, next_tok, torch.full_like(next_tok, pad_id))
        logprobs[:, t] = torch.where(alive, logp, torch.zeros_like(logp))
        full_mask[:, T0 + t] = alive.long()
        finished = finished | (alive & (next_tok == eos_id))
        n = t + 1
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        # a finished row still runs (the batch stays rectangular) but its token is padding
        # and masked out of every later key set
        with autocast(device):
            logits = model(
                tokens[:, t : t + 1], full_mask[:, : T0 + t + 1], cache=cache, start=T0 + t,
                positions=next_pos + t,
            )[:, -1]
    tokens, logprobs = tokens[:, :n], logprobs[:, :n]
    response_mask = full_mask[:, T0 : T0 + n]
    return Generation(
        sequences=torch.cat([ids, tokens], dim=1),
        attention_mask=full_mask[:, : T0 + n],
        tokens=tokens,
        logprobs=logprobs,
        response_mask=response_mask,
        finished=finished,
    )


# -----------------------------------------------------------------------------
# Text level: prompts in, responses out


@torch.no_grad()
def sample_responses(model: Transformer, tok: Tokenizer, prompts: list[str], n: int = 1,
                     temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 48,
                     batch_size: int = 64, generator: torch.Generator | None = None,
                     desc: str = "sampling", return_finished: bool = False, top_k: int = 0):
    """n responses per prompt, in the chat template. Each prompt's prefill runs once and is
    shared by its n samples (generate's num_samples); prompts are sorted by length before
    batching, so a batch carries little left-padding; batch_size counts sampled rows.
    Returns out[i] = n strings for prompts[i]; a prompt that does not fit the context gets
    n `None`s (reported, not cut). A response cut by max_new_tokens (no EOS) ends in " …", so
    nobody mistakes it for a finished one; with return_finished, the texts stay as sampled
    and a second list of lists says which ones ended with EOS."""
    limit = model.config.max_seq_len - max_new_tokens
    if limit < 1:
        raise UserError(f"a budget of {max_new_tokens} new tokens leaves no room for a prompt in the model's context "
                        f"of {model.config.max_seq_len} tokens; lower the token budget")
    encoded = [encode_prompt(tok, p) for p in prompts]
    todo = sorted((i for i in range(len(prompts)) if len(encoded[i]) <= limit), key=lambda i: len(encoded[i]))
    too_long = len(prompts) - len(todo)
    if too_long:
        print(f"{desc}: {too_long} of {len(prompts)} prompts exceed {limit} tokens and are not answered")
    per_batch = max(1, batch_size // n)
    out: list[list] = [[None] * n for _ in prompts]
    ended: list[list] = [[False] * n for _ in prompts]
    for s in tqdm(range(0, len(todo), per_batch), desc=desc, leave=False, disable=len(todo) <= per_batch):
        chunk = todo[s : s + per_batch]
        g = generate(model, [encoded[i] for i in chunk], max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, num_samples=n)
        rows, done = g.tokens.tolist(), g.finished.tolist()
        for r, i in enumerate(chunk):
            for k in range(n):
                text = decode_response(tok, rows[r * n + k])
                ended[i][k] = done[r * n + k]
                out[i][k] = text if ended[i][k] or return_finished else text + " …"
    return (out, ended) if return_finished else out
