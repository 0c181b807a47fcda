"""The decoder transformer, its KV cache and sampler, log-prob helpers and checkpoints.

A Llama-style decoder written out by hand (Touvron et al. 2023): token embedding, RMSNorm,
rotary position embeddings, grouped-query attention (optionally with q/k/v bias, as in
Qwen2), a SwiGLU MLP and an output head that may share the embedding matrix.

Everything that runs a model lives here, once:
  - `Transformer`          the network; `forward(idx)` -> logits (B, T, V)
  - `generate`             the one batched KV-cache sampler every trainer calls
  - `token_logprobs`       log-probs of given tokens in one forward (DPO, PPO, evaluation)
  - `save_pretrained` / `from_pretrained`   HF-layout checkpoints (safetensors + config.json)
  - `get_device`, `autocast`                device choice and bf16 autocast on CUDA

Padding convention used across the project: a batch carries an `attention_mask` (B, T) with
1 for real tokens and 0 for padding. Prompts are LEFT-padded for generation so that every
row's next token lands in the same column; positions are computed from the mask, so a
padded row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import UserError, load_tokenizer, pad_batch, write_jsonl


# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    dim: int = 128  # residual stream width (HF: hidden_size)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads gives grouped-query attention
    head_dim: int = 0  # 0 means dim // n_heads
    hidden_dim: int = 0  # SwiGLU inner width (HF: intermediate_size); 0 means ~8/3 * dim
    max_seq_len: int = 256  # size of the rotary table and of the KV cache
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v (not on o)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    dropout: float = 0.0  # on attention probs and residual branches; 0 in RL and sampling
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.hidden_dim == 0:
            # Llama's rule: 2/3 of 4*dim (SwiGLU has three matrices), rounded up to 32
            self.hidden_dim = 32 * math.ceil(int(8 * self.dim / 3) / 32)
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as Llama does) and cast back: bf16 sums of squares lose digits
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float):
    """cos and sin tables, (max_len, head_dim), in the 'rotate half' layout that HF Llama uses:
    dimension i and i + head_dim/2 form one rotating pair."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (L, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); cos/sin: (B, 1, T, hd) broadcastable."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        """x: (B, T, dim). mask: None (plain causal) or bool (B, 1, T, S), True = may attend.
        With a cache, the new keys/values are written at columns [start, start+T) and the
        queries attend to columns [0, start+T)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, n_kv, start+T, hd)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,  # key head h // (H / H_kv) serves query head h
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start))
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of every layer, preallocated once for the whole generation:
    k, v: (n_layers, B, n_kv_heads, max_len, head_dim). Prefill writes the prompt's columns,
    each decode step writes one more column; nothing is concatenated or reallocated."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def repeat_interleave(self, n: int):
        """Copy every row n times in place of one (row i -> rows i*n ... i*n+n-1): one prompt's
        prefill serves n samples."""
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)

    def update(self, layer, start, k, v):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # GPT-2/Llama-style small normal init; RMSNorm weights stay at 1
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied matrix once

    def forward(self, idx, attention_mask=None, cache=None, start=0, positions=None, return_hidden=False):
        """idx: (B, T) token ids -> logits (B, T, V), or the final hidden states (B, T, dim)
        with return_hidden (the reward and value models put their own head on them).

        attention_mask: optional (B, S) with 1 = real token, 0 = padding, where S = start + T
        covers every key the queries can see (the cache's columns and the new ones). Without it
        the batch is taken to be unpadded or right-padded, and plain causal attention is used
        (right padding never leaks: real tokens only look left).
        cache/start: a KVCache and the column at which `idx` begins (prefill: 0).
        positions: optional (B, T) rotary positions; by default derived from attention_mask."""
        B, T = idx.shape
        S = start + T
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={self.config.max_seq_len}")
        mask = None
        if attention_mask is None and start > 0 and T > 1:
            # several new tokens after cached ones: SDPA's is_causal would align the causal
            # triangle to the top-left corner, so spell the mask out
            attention_mask = torch.ones((B, S), dtype=torch.long, device=idx.device)
        if attention_mask is not None:
            am = attention_mask.bool()
            if positions is None:
                # the first real token of each row gets position 0, whatever its column
                positions = (am.long().cumsum(-1) - 1).clamp(min=0)[:, start:]
            q_cols = torch.arange(start, S, device=idx.device)
            causal = q_cols[:, None] >= torch.arange(S, device=idx.device)[None, :]  # (T, S)
            mask = causal[None] & am[:, None, :]  # (B, T, S)
            # a padding query would see no key at all and SDPA would return NaN for it;
            # let it see itself (its output is never used)
            mask = mask | (q_cols[:, None] == torch.arange(S, device=idx.device)[None, :])[None]
            mask = mask[:, None]  # (B, 1, T, S): broadcast over heads
        if positions is None:
            cos = self.rope_cos[start:S][None, None]  # (1, 1, T, hd)
            sin = self.rope_sin[start:S][None, None]
        else:
            cos = self.rope_cos[positions][:, None]  # (B, 1, T, hd)
            sin = self.rope_sin[positions][:, None]

        x = self.dropout(self.embed_tokens(idx))
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i, start)
        x = self.norm(x)
        if return_hidden:
            return x
        # The output head runs in fp32 even under bf16 autocast: log-probs feed PPO's ratios
        # and DPO's margins, and bf16 logits (8 bits of mantissa) are off by up to ~0.1 nats
        # per token, several nats on a summed response.
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.lm_head.weight.float())

    # checkpoints -------------------------------------------------------------

    def save_pretrained(self, path: str, tokenizer=None, extra_files: dict | None = None,
                        metadata: dict | None = None):
        save_pretrained(self, path, tokenizer, extra_files, metadata)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, **overrides):
        return from_pretrained(path, device, dtype, **overrides)


# -----------------------------------------------------------------------------
# Devices


def get_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is named; a named device that is not there is a user
    error, caught before anything is written."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name!r} is not a device name (try auto, cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU (use --device auto or cpu)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available here (use --device auto or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere. Losses and log-softmax are always taken in
    fp32 by the callers (`.float()` first), because bf16 has only 8 bits of mantissa."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# Log-probs


def token_logprobs(logits, targets, temperature: float = 1.0):
    """log p(targets) under softmax(logits / temperature), in fp32.
    logits (B, T, V), targets (B, T) -> (B, T)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature: float = 1.0):
    """Score given responses under `model` in one forward pass.

    input_ids, attention_mask, response_mask: (B, T); response_mask is 1 on the tokens whose
    log-prob we want (the response, EOS included), 0 on prompt and padding.
    Returns per-token log-probs (B, T-1), zero where not in the response: entry t is
    log p(input_ids[:, t+1] | input_ids[:, :t+1]) -- the one-token shift: the logits at
    column t predict the token at column t+1. Sum over T-1 for a sequence log-prob (DPO)."""
    logits = model(input_ids, attention_mask=attention_mask)
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return logp * response_mask[:, 1:].to(logp.dtype)


# -----------------------------------------------------------------------------
# Sampling


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
# Checkpoints: a directory in the Hugging Face layout
#   config.json        LlamaForCausalLM (or Qwen2ForCausalLM when q/k/v carry a bias)
#   model.safetensors  tensors under HF names ("model.layers.0.self_attn.q_proj.weight", ...)
#   tokenizer.json     when a tokenizer is given
# so `transformers.AutoModelForCausalLM.from_pretrained(dir)` loads what we save, and we load
# Llama-family checkpoints that others saved (single-file or sharded).


def _hf_name(name: str) -> str:
    # our module names are HF's, minus the "model." prefix on everything but the head
    return name if name.startswith("lm_head.") else "model." + name


def config_to_hf(cfg: ModelConfig) -> dict:
    arch, model_type = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False)
    return out


SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our config from an HF config.json dict; `where` names the file in error messages."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: unsupported architecture {arch!r}; tinyalign loads {sorted(SUPPORTED_ARCHITECTURES)}")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise UserError(f"{where}: missing key(s) {missing}; is this a Llama-family config.json?")
    # transformers < 5 writes rope_theta / rope_scaling at the top level, 5.x nests them in
    # rope_parameters; a scaled rotary (linear, llama3, yarn...) would load silently wrong
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UserError(f"{where}: rope scaling {rope_type!r} is not implemented (plain rotary only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"{where}: Llama attention_bias/mlp_bias (bias on o_proj/MLP) is not implemented")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window and window < hf.get("max_position_embeddings", 0):
        raise UserError(f"{where}: sliding-window attention (window {window}) is not implemented")
    n_heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def save_pretrained(model: Transformer, path: str, tokenizer=None, extra_files: dict | None = None,
                    metadata: dict | None = None):
    """Write model.safetensors + config.json (+ tokenizer.json and its tokenizer_config.json,
    + extra files: name -> str or bytes) into the directory `path`. Like transformers, it
    touches no other file there.

    Every file is first written under a hidden temp name in the same directory, then renamed
    over its final name (atomic on one filesystem): a crash or Ctrl-C while writing leaves the
    previous version of every file intact. The weights are renamed last and carry `metadata`
    (str -> str; a trainer stores its step there, so that --resume can tell that the weights
    and the trainer state come from the same save)."""
    from safetensors.torch import save_file

    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: HF stores only the embedding
        tensors[_hf_name(name)] = t.detach().to("cpu", torch.float32).contiguous()

    def write_text(content):
        def write(p):
            with open(p, "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        return write

    writers = {}  # final name -> function writing the file at a given path; renamed in this order
    if tokenizer is not None:
        writers["tokenizer.json"] = tokenizer.save
        for name, content in getattr(tokenizer, "config_files", dict)().items():
            writers[name] = write_text(content)  # tokenizer_config.json, chat template
    for name, content in (extra_files or {}).items():  # e.g. the trainer's config and state
        writers[name] = write_text(content)
    writers["config.json"] = write_text(json.dumps(config_to_hf(cfg), indent=2))
    writers["model.safetensors"] = lambda p: save_file(tensors, p, metadata={"format": "pt", **(metadata or {})})

    created = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    temps = []
    try:
        for name, write in writers.items():
            tmp = os.path.join(path, f".{name}.tmp-{os.getpid()}")
            temps.append(tmp)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files private (0600)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())  # on disk before it replaces anything
        for tmp, name in zip(temps, writers):
            os.replace(tmp, os.path.join(path, name))
    except BaseException:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
        if created and not os.listdir(path):
            os.rmdir(path)  # a failed first save leaves nothing behind
        raise


def _read_safetensors(file: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except Exception as e:  # safetensors raises its own error type for a truncated/corrupt file
        raise UserError(f"{file}: cannot read the weights ({e}); the file is damaged or truncated") from None


def checkpoint_metadata(path: str) -> dict:
    """The metadata stored in a checkpoint's model.safetensors header (empty when sharded)."""
    from safetensors import safe_open

    file = os.path.join(path, "model.safetensors")
    if not os.path.exists(file):
        return {}
    try:
        with safe_open(file, "pt") as f:
            return f.metadata() or {}
    except Exception as e:
        raise UserError(f"{file}: cannot read the weights ({e}); the file is damaged or truncated") from None


def load_state_dict_files(path: str) -> dict:
    """All tensors of a checkpoint directory: model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return _read_safetensors(single)
    if os.path.exists(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(path, shard)))
        return tensors
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_json(path: str) -> dict:
    """A JSON file that the user gave us (config.json, ...), with errors that name it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise UserError(f"{path}: cannot be read as a JSON file ({e})") from None


def check_checkpoint_dir(path: str):
    """A clear error for a path that is not a checkpoint directory at all."""
    if not path or not os.path.exists(path):
        raise UserError(f"{path or '(empty path)'}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise UserError(f"{path}: is a file; a checkpoint is a directory holding config.json and model.safetensors")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"{path}: no config.json; a checkpoint is a directory holding config.json and model.safetensors")


def from_pretrained(path: str, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """Load a tinyalign or HF Llama-family checkpoint directory. `overrides` replace config
    fields that do not change tensor shapes (dropout, max_seq_len, ...)."""
    check_checkpoint_dir(path)
    cfg_path = os.path.join(path, "config.json")
    cfg = config_from_hf(read_json(cfg_path), cfg_path)
    for k, v in overrides.items():
        if k not in {f.name for f in fields(ModelConfig)}:
            raise ValueError(f"unknown config field {k!r}")
        setattr(cfg, k, v)
    with torch.device("meta"):
        model = Transformer(cfg)  # shapes only; real tensors come from the files
    tensors = {k: v for k, v in load_state_dict_files(path).items() if "rotary_emb" not in k}
    expected = {_hf_name(n): p for n, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match config: missing tensors {missing[:5]}"
                        f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                        f"{'...' if len(unexpected) > 5 else ''}")
    for name, p in expected.items():
        if tensors[name].shape != p.shape:
            raise UserError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                            f"config expects {tuple(p.shape)}")
    ours = {n: tensors[_hf_name(n)].to(dtype) for n in model.state_dict() if _hf_name(n) in tensors}
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # buffers were created on the meta device: rebuild the rotary tables for real
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device)


def load_checkpoint(path: str, device="cpu", **overrides):
    """(model, tokenizer) from one checkpoint directory, checked against each other: every
    token id the tokenizer can produce must have a row in the model's embedding."""
    model = from_pretrained(path, device, **overrides)
    tok = load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size} embeddings; they do not belong together")
    return model, tok


# -----------------------------------------------------------------------------
# What every script shares: flags, user errors, and the plumbing of a training run
# (sft.py, reward.py, dpo.py and ppo.py each read top to bottom and call these).


def parse_config(cls, description: str = "", defaults=None, argv=None):
    """Command-line flags that mirror a config dataclass: one --flag per field, typed by its
    default (bools as --flag / --no-flag). Every script uses this, so a flag is always spelled
    as the field it sets."""
    import argparse

    defaults = defaults or cls()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        v = getattr(defaults, f.name)
        if isinstance(v, bool):
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=v)
        else:
            p.add_argument(f"--{f.name}", type=type(v), default=v)
    return cls(**vars(p.parse_args(argv)))


def cli(main, cls, description: str = "", defaults=None):
    """Run a script: flags -> config -> main(config). A user's mistake (UserError: a bad flag,
    file or checkpoint) is printed as one line and exits with status 2; a bug keeps its
    traceback."""
    import sys

    try:
        return main(parse_config(cls, description, defaults))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_ranges(cfg, rules: dict):
    """rules: {flag: (ok, what it must be)}. Raises one UserError listing every flag that is
    out of range, so a user fixes them all at once."""
    bad = [f"--{name} {getattr(cfg, name)!r} (must be {what})" for name, (ok, what) in rules.items() if not ok]
    if bad:
        raise UserError("invalid flag(s): " + "; ".join(bad))


class TrainingDiverged(UserError):
    """A non-finite loss or gradient: training stops before the bad step can be saved."""


def check_finite(step: int, out_dir: str, **values):
    """Stop on NaN/inf with the step and the quantity named; the last checkpoint is kept
    (nothing is saved after a bad step). JSON cannot even write NaN (metrics.jsonl)."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise TrainingDiverged(
                f"step {step}: {name} is {v}; training stopped and nothing was saved for this step "
                f"(the last checkpoint in {out_dir} is kept). Lower --lr, check --init's weights "
                f"and the data, then start again or --resume")


def configure_optimizer(model, lr: float, weight_decay: float, betas, device):
    """AdamW with weight decay on matrices only (embeddings and linear weights), not on norms
    and biases, as in GPT-2 / Llama training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_schedule(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up over warmup_steps, then linear decay from lr to min_lr at max_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return lr + (min_lr - lr) * min(1.0, frac)


# Flags that may change between a run and its --resume: they do not change what is computed.
RESUMABLE_CHANGES = {"resume", "overwrite", "device", "compile", "save_every", "eval_every", "show_example"}


def prepare_out_dir(cfg) -> str:
    """Check out_dir before anything is trained; returns the checkpoint directory out_dir/model.

    A fresh run refuses an out_dir that holds an earlier run (its metrics.jsonl would be
    appended to, its checkpoint replaced) unless --overwrite says so. --resume needs a
    checkpoint there and refuses settings that differ from the saved ones (other than the
    RESUMABLE_CHANGES, and max_steps, which extends a run)."""
    import dataclasses

    ckpt = os.path.join(cfg.out_dir, "model")
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    state = os.path.join(ckpt, "trainer_state.pt")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; choose one")
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise UserError(f"--out_dir {cfg.out_dir} is a file")
    if cfg.resume:
        if not os.path.exists(state):
            raise UserError(f"--resume: no checkpoint with trainer state in {ckpt}")
        saved = read_json(os.path.join(ckpt, "train_config.json"))
        now = dataclasses.asdict(cfg)
        changed = {k: (saved.get(k), v) for k, v in now.items()
                   if k not in RESUMABLE_CHANGES | {"max_steps"} and saved.get(k) != v}
        if changed:
            raise UserError(f"--resume: {ckpt} was trained with other settings {changed} (saved, now); "
                            "resume with the same flags, or start a new run in another --out_dir")
    elif os.path.exists(metrics) or os.path.exists(state):
        if not cfg.overwrite:
            raise UserError(f"--out_dir {cfg.out_dir} holds an earlier run; use --resume to continue it, "
                            "--overwrite to start afresh there, or another --out_dir")
        for f in (metrics, state):  # the old weights stay until the first save replaces them
            if os.path.exists(f):
                os.remove(f)
    os.makedirs(cfg.out_dir, exist_ok=True)
    return ckpt


def save_checkpoint(model, tok, cfg, optimizer, step: int, extra_state: dict | None = None):
    """out_dir/model/: weights (their header records the step), tokenizer, the resolved
    config and the trainer state for --resume, each file written atomically."""
    import dataclasses
    import io

    buf = io.BytesIO()
    torch.save({"step": step, "optimizer": optimizer.state_dict(), **(extra_state or {})}, buf)
    model.save_pretrained(os.path.join(cfg.out_dir, "model"), tok, extra_files={
        "train_config.json": json.dumps(dataclasses.asdict(cfg), indent=2),
        "trainer_state.pt": buf.getvalue(),
    }, metadata={"step": str(step)})


def load_trainer_state(cfg, optimizer, device) -> dict:
    """The trainer state saved beside the weights (optimizer restored in place). Refuses a
    checkpoint whose weights and state come from two different saves (a kill mid-save), and
    drops the metrics rows logged after the checkpoint (they are redone)."""
    ckpt = os.path.join(cfg.out_dir, "model")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location=device, weights_only=True)
    weights_step = checkpoint_metadata(ckpt).get("step")
    if weights_step is not None and int(weights_step) != state["step"]:
        raise UserError(f"{ckpt}: the weights are from step {weights_step} but the trainer state from "
                        f"step {state['step']} (a save was interrupted); start again with --overwrite")
    optimizer.load_state_dict(state["optimizer"])
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            rows = [json.loads(r) for r in f if r.strip()]
        write_jsonl(metrics, [r for r in rows if r["step"] <= state["step"]])
    return state


def log_metrics(out_dir: str, row: dict):
    """Append one row to out_dir/metrics.jsonl (strict JSON: NaN never gets here)."""
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
