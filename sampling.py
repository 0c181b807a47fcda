"""Sampling: the one batched KV-cache sampler every script calls, and its text-level wrapper.

  - `filter_logits`      top-k and top-p (nucleus) truncation of next-token logits
  - `generate`           token ids in, token ids out: left-padded prompts, one prefill, then one
                         token per step from the KV cache; temperature, top-k, top-p, per-row stop
                         at EOS, optional shared prefill for N samples per prompt; returns the
                         sampled tokens, their log-probs, masks and which rows finished
  - `sample_responses`   strings in, strings out: prompts rendered with the chat template
                         (data.encode_prompt), sorted by length, batched, decoded

`generate` has two decoding loops that give the same tokens. `_sample`, the default, is the
one to read: each step attends over the columns filled so far. `_sample_static`, opt-in with
`compile=True`, keeps every shape fixed so that torch.compile can fuse the step (and CUDA
graphs replay it): the cache's whole capacity is attended under a mask, the step's column and
positions are tensors advanced in place, sampling is an argmax over noise drawn outside the
compiled code, and "all rows finished?" is asked only every few tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from data import Tokenizer, UserError, decode_response, encode_prompt, pad_batch
from model import KVCache, ModelConfig, Transformer, autocast, token_logprobs
from train_utils import no_bars


# -----------------------------------------------------------------------------
# Token level: generate


def filter_logits(logits, top_k: int = 0, top_p: float = 1.0):
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p.
    logits (B, V). top_k keeps the k largest logits of each row (and any tied with the k-th, as
    HF does); 0 is off. top_p then keeps the smallest set of most likely tokens, among those
    top_k kept, whose probability (renormalised over them) reaches top_p: the token that
    crosses the threshold is kept. Kept logits are returned unchanged."""
    # --- exercise: top_p ---
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
    # --- end exercise ---


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
    compile: bool | str = False,
) -> Generation:
    """Sample continuations of a batch of prompts with a KV cache.

    prompts: a list of token-id lists (left-padded here) or a left-padded LongTensor (P, T0)
    with its attention_mask. temperature 0 means greedy. Each row stops at its first EOS;
    the loop stops when all rows have stopped or after max_new_tokens.
    num_samples: continuations per prompt. The prompts' prefill runs once and its cache is
    copied, so the output has P * num_samples rows, prompt i owning rows
    i * num_samples ... (i + 1) * num_samples - 1 (best-of-N sampling, the judge's 3 samples).
    `generator` (a torch.Generator on the model's device) makes sampling repeatable.
    compile: False runs the eager loop (`_sample`). True runs the static-shape loop
    (`_sample_static`) with its step compiled by torch.compile: mode "reduce-overhead" (CUDA
    graphs) on CUDA, the default mode elsewhere; a string names the mode; "static" runs the
    static-shape loop uncompiled (tests, debugging). Same tokens as the eager loop, the same
    draws from the same generator; log-probs equal to float rounding (~1e-6)."""
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
        if compile:
            return _sample_static(model, ids, attention_mask, max_new_tokens, eos_id, pad_id,
                                  temperature, top_k, top_p, generator, num_samples, compile)
        return _sample(model, ids, attention_mask, max_new_tokens, eos_id, pad_id, temperature,
                       top_k, top_p, generator, num_samples)
    finally:
        model.train(was_training)


def pick(logits, temperature: float, top_k: int, top_p: float, generator=None, noise=None):
    """Each row's next token from logits (B, V), and its log-prob under the temperature (at
    T = 0: greedy, log-prob at T = 1). A sample is torch.multinomial's draw from `generator`,
    or, given `noise` q ~ Exp(1) of shape (B, V), argmax(probs / q): the very draw
    torch.multinomial(probs, 1) makes with that noise, but free of host syncs (the static path)."""
    logits = logits.float()
    if temperature == 0:
        next_tok, scaled = logits.argmax(-1), logits
    else:
        scaled = logits / temperature
        probs = filter_logits(scaled, top_k, top_p).softmax(-1)
        if noise is None:
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            next_tok = (probs / noise).argmax(-1)
    return next_tok, token_logprobs(scaled[:, None], next_tok[:, None])[:, 0]


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
        next_tok, logp = pick(logits, temperature, top_k, top_p, generator=generator)  # (B,), (B,)
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
# Token level, the fast path: a static-shape decode step for torch.compile / CUDA graphs
#
# The eager loop above is cheap in FLOPs but pays Python and allocator overhead per token:
# a new mask slice, a growing key range, a dozen small tensors, and `finished.all()`, which
# on a GPU waits for the device every token (so does torch.multinomial, which checks its
# input with three .item() calls). The loop below removes each of these:
#   - every buffer is allocated once per shape: the KV cache of a fixed capacity C (bucketed,
#     so that prompts of similar length share one compiled step), the key mask (B, C), the
#     outputs (B, N), the step's column, step and positions as small tensors advanced in place
#   - the step attends over all C columns under the key mask (model.Transformer.decode_step)
#   - torch.multinomial(probs, 1) is, in PyTorch, argmax(probs / q) with q ~ Exp(1) drawn
#     from the generator; q is drawn outside the compiled step (`noise.exponential_`), so the
#     generator's stream, and therefore every draw, is the eager loop's
#   - finished rows keep running on padding (masked), and the loop asks whether every row
#     has finished only every STOP_CHECK_EVERY tokens (every token on CPU, where asking costs
#     nothing); the output is then cut to the columns where some row was still running.

STOP_CHECK_EVERY = 8  # tokens between two "all finished?" checks (host-device syncs) on GPUs
CAPACITY_BUCKET = 64  # the cache's capacity is T0 + max_new_tokens rounded up to this


class _StaticState:
    """Every tensor the static step reads or writes. The step mutates them in place; their
    shapes never change during one generation."""

    def __init__(self, key, cfg: ModelConfig, B: int, C: int, N: int, V: int, device, dtype):
        self.key = key
        self.cache = KVCache(cfg, B, C, device, dtype)
        self.key_mask = torch.zeros((B, C), dtype=torch.bool, device=device)  # True = real key
        self.tok = torch.zeros((B, 1), dtype=torch.long, device=device)  # last token chosen
        self.pos = torch.zeros((B, 1), dtype=torch.long, device=device)  # its rotary position
        self.col = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # its index in the response
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.tokens = torch.zeros((B, N), dtype=torch.long, device=device)
        self.logprobs = torch.zeros((B, N), dtype=torch.float32, device=device)
        self.noise = torch.empty((B, V), dtype=torch.float32, device=device)  # q ~ Exp(1)
        if device.type == "cuda":
            # CUDA graphs replay on fixed addresses: tell them these inputs stay put
            for x in (*self.cache.k, *self.cache.v, self.key_mask, self.tok, self.pos, self.col,
                      self.t, self.finished, self.tokens, self.logprobs, self.noise):
                torch._dynamo.mark_static_address(x)


_state_slot: list[_StaticState] = []  # the last generation's buffers, reused by the next of the same shapes


def _static_state(cfg: ModelConfig, B, C, N, V, device, dtype) -> _StaticState:
    """Buffers for one generation. The last set is kept and reused when the shapes repeat (a
    CUDA graph replays only on the addresses it recorded); one set only, so memory stays
    that of one generation."""
    key = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, B, C, N, V, str(device), dtype)
    if not (_state_slot and _state_slot[0].key == key):
        _state_slot.clear()  # free the old buffers before allocating the new ones
        _state_slot.append(_StaticState(key, cfg, B, C, N, V, device, dtype))
    return _state_slot[0]


def _choose(logits, s: _StaticState, temperature, top_k, top_p, eos_id, pad_id):
    """Pick each row's next token from logits (B, V) and record it at response index s.t,
    cache column s.col: the body of the eager loop, without a Python branch on tensor values
    and without allocating anything that outlives the step."""
    next_tok, logp = pick(logits, temperature, top_k, top_p, noise=s.noise)
    alive = ~s.finished
    out_tok = torch.where(alive, next_tok, pad_id)
    s.tokens.index_copy_(1, s.t, out_tok[:, None])
    s.logprobs.index_copy_(1, s.t, torch.where(alive, logp, 0.0)[:, None])
    s.key_mask.index_copy_(1, s.col, alive[:, None])  # a finished row's token is no key
    s.finished |= alive & (next_tok == eos_id)
    s.tok.copy_(out_tok[:, None])


def _decode_step(model, s: _StaticState, temperature, top_k, top_p, eos_id, pad_id):
    """Forward the last chosen token, choose the next: what torch.compile compiles."""
    with autocast(s.col.device):
        logits = model(s.tok, s.key_mask, cache=s.cache, start=s.col, positions=s.pos)[:, -1]
    s.col += 1
    s.pos += 1
    s.t += 1
    _choose(logits, s, temperature, top_k, top_p, eos_id, pad_id)


_compiled_steps: dict = {}


def compiled_step(mode: str):
    """`_decode_step` under torch.compile, one wrapper per mode (torch.compile keeps the
    compiled code per shape and argument values; the static shapes make it one compilation
    per (batch, capacity, budget))."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, fullgraph=True,
                                              dynamic=False if mode == "reduce-overhead" else None)
    return _compiled_steps[mode]


def _sample_static(model, ids, attention_mask, max_new_tokens, eos_id, pad_id, temperature, top_k,
                   top_p, generator, num_samples, compile=True, stop_check_every=None) -> Generation:
    """The decoding loop of `generate(..., compile=...)`: the same tokens as `_sample`, with
    every shape fixed (see the comment above `STOP_CHECK_EVERY`)."""
    device = ids.device
    P, T0 = ids.shape
    B, N = P * num_samples, max_new_tokens
    cfg = model.config
    C = min(cfg.max_seq_len, -(-(T0 + N) // CAPACITY_BUCKET) * CAPACITY_BUCKET)
    dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype

    # prefill, as in the eager loop, into a cache of the prompt's length
    prefill = KVCache(cfg, P, T0, device, dtype)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with autocast(device):
        logits = model(ids, attention_mask, cache=prefill, start=0, positions=positions)[:, -1]
    if num_samples > 1:  # shared prefill: copy the prompt to its rows; each row draws its own token
        prefill.repeat_interleave(num_samples)
        ids = ids.repeat_interleave(num_samples, dim=0)
        attention_mask = attention_mask.repeat_interleave(num_samples, dim=0)
        logits = logits.repeat_interleave(num_samples, dim=0)

    s = _static_state(cfg, B, C, N, logits.shape[-1], device, dtype)
    for layer in range(cfg.n_layers):  # columns >= T0 may hold an earlier call's keys: masked
        s.cache.k[layer][:, :, :T0] = prefill.k[layer]
        s.cache.v[layer][:, :, :T0] = prefill.v[layer]
    del prefill
    s.key_mask.zero_()
    s.key_mask[:, :T0] = attention_mask.bool()
    s.pos.copy_(attention_mask.sum(-1, keepdim=True))  # position of the first new token
    s.col.fill_(T0)
    s.t.zero_()
    s.finished.zero_()
    s.tokens.fill_(pad_id)
    s.logprobs.zero_()

    if compile is True:
        compile = "reduce-overhead" if device.type == "cuda" else "default"
    step = _decode_step if compile == "static" else compiled_step(compile)
    graphs = compile == "reduce-overhead"
    every = stop_check_every or (1 if device.type == "cpu" else STOP_CHECK_EVERY)
    sampling = temperature > 0
    args = (temperature, top_k, top_p, eos_id, pad_id)

    if sampling:
        s.noise.exponential_(1, generator=generator)  # the draw torch.multinomial would make
    _choose(logits, s, *args)  # the first token, from the prefill's logits
    for t in range(1, N):
        if t % every == 0 and bool(s.finished.all()):  # the loop's only host-device sync
            break
        if sampling:
            s.noise.exponential_(1, generator=generator)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
        step(model, s, *args)

    # the columns in which some row was still running: a prefix, as rows only ever stop
    n = int(s.key_mask[:, T0 : T0 + N].any(0).sum())
    tokens = s.tokens[:, :n].clone()  # clones: the buffers serve the next call
    return Generation(
        sequences=torch.cat([ids, tokens], dim=1),
        attention_mask=s.key_mask[:, : T0 + n].long(),
        tokens=tokens,
        logprobs=s.logprobs[:, :n].clone(),
        response_mask=s.key_mask[:, T0 : T0 + n].long(),
        finished=s.finished.clone(),
    )


# -----------------------------------------------------------------------------
# Text level: prompts in, responses out


@torch.no_grad()
def sample_responses(model: Transformer, tok: Tokenizer, prompts: list[str], n: int = 1,
                     temperature: float = 0.7, top_p: float = 0.9, max_new_tokens: int = 48,
                     batch_size: int = 64, generator: torch.Generator | None = None,
                     desc: str = "sampling", return_finished: bool = False, top_k: int = 0,
                     compile: bool | str = False):
    """n responses per prompt, in the chat template. Each prompt's prefill runs once and is
    shared by its n samples (generate's num_samples); prompts are sorted by length before
    batching, so a batch carries little left-padding; batch_size counts sampled rows.
    Returns out[i] = n strings for prompts[i]; a prompt that does not fit the context gets
    n `None`s (reported, not cut). A response cut by max_new_tokens (no EOS) ends in " …", so
    nobody mistakes it for a finished one; with return_finished, the texts stay as sampled
    and a second list of lists says which ones ended with EOS. compile: generate's fast path."""
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
    quiet = len(todo) <= per_batch or no_bars()  # one batch, not rank 0, or TQDM_DISABLE: no bar
    for s in tqdm(range(0, len(todo), per_batch), desc=desc, leave=False, disable=quiet):
        chunk = todo[s : s + per_batch]
        g = generate(model, [encoded[i] for i in chunk], max_new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id,
                     temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, num_samples=n,
                     compile=compile)
        rows, done = g.tokens.tolist(), g.finished.tolist()
        for r, i in enumerate(chunk):
            for k in range(n):
                text = decode_response(tok, rows[r * n + k])
                ended[i][k] = done[r * n + k]
                out[i][k] = text if ended[i][k] or return_finished else text + " …"
    return (out, ended) if return_finished else out
