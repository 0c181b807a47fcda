"""The decoder transformer, its KV cache and the log-prob helpers.

A Llama-style decoder written out by hand (Touvron et al. 2023): token embedding, RMSNorm,
rotary position embeddings, grouped-query attention (optionally with q/k/v bias, as in
Qwen2), a SwiGLU MLP and an output head that may share the embedding matrix.

  - `Transformer`          the network; `forward(idx)` -> logits (B, T, V); `decode_step`, the
                           static-shape one-token step of the compiled sampler
  - `KVCache`              keys and values of every layer, preallocated for one generation
                           (the sampler that fills it is sampling.py's `generate`)
  - `token_logprobs`, `sequence_logprobs`   log-probs of given tokens in one forward (SFT, DPO,
                           PPO, evaluation), always in fp32
  - `autocast`             bf16 autocast on CUDA
  - `frozen`               a model that is only read (reference, reward model, judge) in bf16 on CUDA
Checkpoints (HF layout) are read and written by checkpoint.py; `Transformer.save_pretrained`
and `Transformer.from_pretrained` call it.

Padding convention used across the project: a batch carries an `attention_mask` (B, T) with
1 for real tokens and 0 for padding. Prompts are LEFT-padded for generation so that every
row's next token lands in the same column; positions are computed from the mask, so a
padded row sees exactly the positions it would see alone.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # --- exercise: rope ---
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
    # --- end exercise ---


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
        """x: (B, T, dim) -> (B, T, dim). mask: None (plain causal) or bool (B, 1, T, S), True =
        may attend. With a cache, the new keys/values are written at columns [start, start+T)
        and the queries attend to columns [0, start+T). Query head h reads key/value head
        h // (n_heads / n_kv_heads); dropout on the attention weights in training only."""
        # --- exercise: attention ---
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
        # --- end exercise ---


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
    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim). Prefill writes the prompt's
    columns, each decode step writes one more column; nothing is concatenated or reallocated.
    One tensor per layer, not one stacked tensor: compiled code writes a column of a stacked
    cache by rewriting every layer's slice of it (a full copy per layer per token)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def repeat_interleave(self, n: int):
        """Copy every row n times in place of one (row i -> rows i*n ... i*n+n-1): one prompt's
        prefill serves n samples."""
        self.k = [k.repeat_interleave(n, dim=0) for k in self.k]
        self.v = [v.repeat_interleave(n, dim=0) for v in self.v]

    def update(self, layer, start, k, v):
        if isinstance(start, torch.Tensor):
            # the static-shape decode step (Transformer.forward with a tensor `start`): write the
            # one new column where the 1-element tensor says, in place (an index_put, which
            # compiled code keeps in place), and hand back the whole capacity; the step's mask
            # hides the columns that are not real keys
            self.k[layer][:, :, start] = k
            self.v[layer][:, :, start] = v
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


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
        positions: optional (B, T) rotary positions; by default derived from attention_mask.
        A tensor `start` selects the static-shape decode step instead (`decode_step`)."""
        if isinstance(start, torch.Tensor):
            return self.decode_step(idx, attention_mask, cache, start, positions)
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

    def decode_step(self, idx, key_mask, cache, col, positions):
        """One new token per row with every shape fixed for the whole generation: the step of
        sampling.py's fast path (`generate(..., compile=True)`), which torch.compile traces
        once and CUDA graphs can replay. `forward` comes here when `start` is a tensor.

        idx (B, 1): the new tokens; their keys and values go to the cache column held by the
        1-element LongTensor `col` (a tensor, not an int: an int would be baked into the
        compiled code, one compilation per column). key_mask (B, C) bool over the cache's whole
        capacity C: True = a real key. Attention runs over all C columns, and the mask hides
        the padding, the finished rows' tokens and the columns not written yet; each query
        sees its own column, as in `forward`. positions (B, 1): rotary positions.
        Compared with `forward` over the cache's first col+1 columns, the only difference is
        the length of the masked attention row: the same tokens, logits within float rounding."""
        cols = torch.arange(key_mask.shape[1], device=idx.device)
        mask = (key_mask | (cols == col))[:, None, None, :]  # (B, 1, 1, C): broadcast over heads
        cos = self.rope_cos[positions][:, None]  # (B, 1, 1, hd)
        sin = self.rope_sin[positions][:, None]
        x = self.dropout(self.embed_tokens(idx))
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, mask, cache, i, col)
        x = self.norm(x)
        with torch.autocast(x.device.type, enabled=False):  # fp32 head, as in forward
            return F.linear(x.float(), self.lm_head.weight.float())

    # checkpoints (checkpoint.py: the Hugging Face layout) ------------------------

    def save_pretrained(self, path: str, tokenizer=None, extra_files: dict | None = None,
                        metadata: dict | None = None):
        from checkpoint import save_pretrained

        save_pretrained(self, path, tokenizer, extra_files, metadata)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, **overrides):
        from checkpoint import from_pretrained

        return from_pretrained(path, device, dtype, **overrides)


# -----------------------------------------------------------------------------
# bf16 on CUDA


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere. Losses and log-softmax are always taken in
    fp32 by the callers (`.float()` first), because bf16 has only 8 bits of mantissa."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def frozen(model: nn.Module, device) -> nn.Module:
    """A model that is only read, never trained (PPO's reference and reward models, DPO's
    reference, the judge), in bf16 on CUDA: half the memory and bandwidth of fp32, and under
    bf16 autocast its matmuls ran in bf16 anyway. Parameters only: the rotary tables stay
    fp32, and the output head still runs in fp32 (on bf16-rounded weights). Elsewhere nothing
    changes. The model being trained keeps fp32 master weights under bf16 autocast."""
    if torch.device(device).type == "cuda":
        for p in model.parameters():  # a tied matrix is one Parameter: cast once, still tied
            p.data = p.data.to(torch.bfloat16)
    return model


# -----------------------------------------------------------------------------
# Log-probs


def token_logprobs(logits, targets, temperature: float = 1.0):
    """log p(targets) under softmax(logits / temperature), in fp32.
    logits (B, T, V), targets (B, T) -> (B, T)."""
    # --- exercise: logprobs ---
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(logits.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)
    # --- end exercise ---


def sequence_logprobs(model, input_ids, attention_mask, response_mask, temperature: float = 1.0):
    """Score given responses under `model` in one forward pass.

    input_ids, attention_mask, response_mask: (B, T); response_mask is 1 on the tokens whose
    log-prob we want (the response, EOS included), 0 on prompt and padding.
    Returns per-token log-probs (B, T-1), zero where not in the response: entry t is
    log p(input_ids[:, t+1] | input_ids[:, :t+1]) -- the one-token shift: the logits at
    column t predict the token at column t+1. Sum over T-1 for a sequence log-prob (DPO)."""
    # --- exercise: logprobs ---
    logits = model(input_ids, attention_mask=attention_mask)
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return logp * response_mask[:, 1:].to(logp.dtype)
    # --- end exercise ---

