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
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import pad_batch


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
        return self.lm_head(x)

    # checkpoints -------------------------------------------------------------

    def save_pretrained(self, path: str, tokenizer=None, extra_files: dict | None = None):
        save_pretrained(self, path, tokenizer, extra_files)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, **overrides):
        return from_pretrained(path, device, dtype, **overrides)


# -----------------------------------------------------------------------------
# Devices


def get_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu unless a device is named."""
    if name != "auto":
        return torch.device(name)
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
) -> Generation:
    """Sample continuations of a batch of prompts with a KV cache.

    prompts: a list of token-id lists (left-padded here) or a left-padded LongTensor (B, T0)
    with its attention_mask. temperature 0 means greedy. Each row stops at its first EOS;
    the loop stops when all rows have stopped or after max_new_tokens.
    `generator` (a torch.Generator on the model's device) makes sampling repeatable."""
    if pad_id == eos_id:
        raise ValueError("pad_id must differ from eos_id: padding would read as end of sequence")
    device = model.embed_tokens.weight.device
    if isinstance(prompts, torch.Tensor):
        ids = prompts.to(device)
        attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    else:
        ids, attention_mask = pad_batch(prompts, pad_id, side="left")
        ids, attention_mask = ids.to(device), attention_mask.to(device)
    B, T0 = ids.shape
    total = T0 + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({T0} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
            f"({model.config.max_seq_len}); shorten the prompt or the generation budget"
        )
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        dtype = torch.bfloat16
    cache = KVCache(model.config, B, total, device, dtype)
    # the mask grows with the sequence; preallocate it, and the outputs, once
    full_mask = torch.zeros((B, total), dtype=torch.long, device=device)
    full_mask[:, :T0] = attention_mask
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T0)
    next_pos = attention_mask.sum(-1, keepdim=True)  # (B, 1) position of the first new token
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    with autocast(device):
        logits = model(ids, full_mask[:, :T0], cache=cache, start=0, positions=positions)[:, -1]
    n = 0
    for t in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            next_tok = logits.argmax(-1)
            scaled = logits
        else:
            scaled = logits / temperature
            probs = filter_logits(scaled, top_k, top_p).softmax(-1)
            next_tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
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
    model.train(was_training)
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


def config_from_hf(hf: dict) -> ModelConfig:
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch!r}; tinyalign loads {sorted(SUPPORTED_ARCHITECTURES)}")
    # transformers < 5 writes rope_theta / rope_scaling at the top level, 5.x nests them in
    # rope_parameters; a scaled rotary (linear, llama3, yarn...) would load silently wrong
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not implemented (plain rotary only)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama attention_bias/mlp_bias (bias on o_proj/MLP) is not implemented")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window and window < hf.get("max_position_embeddings", 0):
        raise ValueError(f"sliding-window attention (window {window}) is not implemented")
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


def _atomic_dir(path: str):
    """A temp directory beside `path`; `_commit_dir` renames it into place."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(path)) + ".tmp-", dir=parent)


def _commit_dir(tmp: str, path: str):
    # rename is atomic on one filesystem; an existing checkpoint is moved aside first and
    # removed only after the new one is in place, so a crash never leaves neither
    old = None
    if os.path.exists(path):
        old = tmp + ".old"
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old:
            os.rename(old, path)  # put the previous checkpoint back
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: Transformer, path: str, tokenizer=None, extra_files: dict | None = None):
    """Write model.safetensors + config.json (+ tokenizer.json, + extra files: name -> str or
    bytes) to `path`,
    atomically: everything goes to a temp directory that is renamed into place at the end."""
    from safetensors.torch import save_file

    cfg = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # tied: HF stores only the embedding
        tensors[_hf_name(name)] = t.detach().to("cpu", torch.float32).contiguous()
    tmp = _atomic_dir(path)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg), f, indent=2)
        if tokenizer is not None:
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        for name, content in (extra_files or {}).items():  # e.g. the trainer's config and state
            with open(os.path.join(tmp, name), "wb" if isinstance(content, bytes) else "w") as f:
                f.write(content)
        _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state_dict_files(path: str) -> dict:
    """All tensors of a checkpoint directory: model.safetensors, or the shards listed in
    model.safetensors.index.json."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(load_file(os.path.join(path, shard)))
        return tensors
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def from_pretrained(path: str, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """Load a tinyalign or HF Llama-family checkpoint directory. `overrides` replace config
    fields that do not change tensor shapes (dropout, max_seq_len, ...)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f))
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
        raise ValueError(f"{path}: checkpoint does not match config: missing tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected tensors {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, p in expected.items():
        if tensors[name].shape != p.shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"config expects {tuple(p.shape)}")
    ours = {n: tensors[_hf_name(n)].to(dtype) for n in model.state_dict() if _hf_name(n) in tensors}
    model.load_state_dict(ours, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # buffers were created on the meta device: rebuild the rotary tables for real
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device)
