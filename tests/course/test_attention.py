"""Grader for the exercise `attention`: model.Attention.forward, causal grouped-query attention
with rotary embeddings and the KV cache.

    python -m pytest -q tests/course/test_attention.py

    q, k, v = x W_q, x W_k, x W_v, split into heads (B, H, T, hd) / (B, H_kv, T, hd)
    q, k    = rope(q), rope(k)
    with a cache: write k, v at columns [start, start + T), attend over columns [0, start + T)
    y_h     = softmax(q_h k_g^T / sqrt(hd) + mask) v_g,   g = h // (H / H_kv)
    out     = concat_h(y_h) W_o
mask: None means plain causal attention (when T > 1); otherwise a bool (B, 1, T, S), True = may
attend. The expected values come from a loop over rows, heads and queries written here.
apply_rope is given (the grader swaps in its own, so this grader does not need the `rope`
exercise).
"""

import math

import pytest
import torch

import model
from model import Attention, KVCache, ModelConfig, rope_tables


def given_rope(x, cos, sin):
    """The `rope` exercise's answer, supplied so that this grader tests attention alone."""
    half = x.shape[-1] // 2
    return (x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin).to(x.dtype)


@pytest.fixture(autouse=True)
def _given_rope(monkeypatch):
    monkeypatch.setattr(model, "apply_rope", given_rope)


def make(n_kv_heads=2):
    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=32)
    torch.manual_seed(0)
    attn = Attention(cfg).eval()
    for p in attn.parameters():  # larger weights than the default init: sharper, more telling attention
        p.data.mul_(3)
    return cfg, attn


def by_hand(attn, x, positions, allowed):
    """x (B, T, dim), positions (B, T), allowed (B, T, T) bool over x's own tokens."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    cos, sin = rope_tables(hd, 32, 10000.0)
    cos, sin = cos[positions][:, None], sin[positions][:, None]
    q = given_rope(attn.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin)
    k = given_rope(attn.k_proj(x).view(B, T, Hkv, hd).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    y = torch.zeros(B, T, H, hd)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)  # the key/value head that serves query head h
            for t in range(T):
                cols = [s for s in range(T) if allowed[b, t, s]]
                scores = torch.stack([q[b, h, t] @ k[b, g, s] / math.sqrt(hd) for s in cols])
                weights = scores.softmax(0)
                y[b, t, h] = sum(w * v[b, g, s] for w, s in zip(weights, cols))
    return attn.o_proj(y.reshape(B, T, H * hd))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@torch.no_grad()
def test_plain_causal_attention_equals_a_loop(n_kv_heads):
    cfg, attn = make(n_kv_heads)
    torch.manual_seed(1)
    x = torch.randn(2, 5, cfg.dim)
    cos, sin = rope_tables(cfg.head_dim, 32, 10000.0)
    got = attn(x, cos[:5][None, None], sin[:5][None, None], None)
    assert got.shape == (2, 5, cfg.dim), f"output must be (B, T, dim) = (2, 5, 16), got {tuple(got.shape)}"
    want = by_hand(attn, x, torch.arange(5).expand(2, 5), torch.ones(5, 5).tril().bool().expand(2, 5, 5))
    torch.testing.assert_close(
        got, want, atol=1e-5, rtol=1e-4,
        msg=lambda m: f"H = 4 query heads, H_kv = {n_kv_heads}: causal softmax(q k^T / sqrt(hd)) v per head, "
                      "query head h reads key/value head h // (H / H_kv), q and k rotated, then o_proj\n" + m)


@torch.no_grad()
def test_a_bool_mask_hides_left_padding():
    """Row 0 is left-padded by 2: its real queries see only its real keys, at positions 0, 1, 2;
    a padding query sees only itself (as Transformer.forward builds the mask)."""
    cfg, attn = make()
    torch.manual_seed(2)
    x = torch.randn(2, 5, cfg.dim)
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    positions = (am.long().cumsum(-1) - 1).clamp(min=0)
    allowed = torch.ones(5, 5).tril().bool()[None] & am[:, None, :]
    allowed = allowed | torch.eye(5, dtype=torch.bool)[None]
    cos, sin = rope_tables(cfg.head_dim, 32, 10000.0)
    got = attn(x, cos[positions][:, None], sin[positions][:, None], allowed[:, None])
    torch.testing.assert_close(
        got, by_hand(attn, x, positions, allowed), atol=1e-5, rtol=1e-4,
        msg=lambda m: "with a mask, a query attends exactly to the keys where mask is True (padding hidden)\n" + m)


@torch.no_grad()
def test_the_cache_gives_what_the_full_sequence_gives():
    """Prefill 4 tokens into the cache, then decode 1 token (mask None, T = 1: it sees every
    cached column), then a chunk of 2 with an explicit mask: each equals the full causal pass."""
    cfg, attn = make()
    torch.manual_seed(3)
    x = torch.randn(2, 7, cfg.dim)
    cos, sin = rope_tables(cfg.head_dim, 32, 10000.0)
    full = attn(x, cos[:7][None, None], sin[:7][None, None], None)
    torch.testing.assert_close(full, by_hand(attn, x, torch.arange(7).expand(2, 7),
                                             torch.ones(7, 7).tril().bool().expand(2, 7, 7)), atol=1e-5, rtol=1e-4)
    cache = KVCache(cfg, 2, 16, "cpu", torch.float32)
    pre = attn(x[:, :4], cos[:4][None, None], sin[:4][None, None], None, cache, 0, 0)
    torch.testing.assert_close(pre, full[:, :4], atol=1e-5, rtol=1e-4,
                               msg=lambda m: "prefill with a cache must equal the plain causal pass\n" + m)
    one = attn(x[:, 4:5], cos[4:5][None, None], sin[4:5][None, None], None, cache, 0, 4)
    torch.testing.assert_close(
        one, full[:, 4:5], atol=1e-5, rtol=1e-4,
        msg=lambda m: "decoding token 4 with the cache: write k, v at column `start` and attend over "
                      "columns [0, start + T) (all of them: a single query is not causally masked)\n" + m)
    mask = (torch.arange(5, 7)[:, None] >= torch.arange(7)[None, :])[None, None].expand(2, 1, 2, 7)
    two = attn(x[:, 5:7], cos[5:7][None, None], sin[5:7][None, None], mask, cache, 0, 5)
    torch.testing.assert_close(two, full[:, 5:7], atol=1e-5, rtol=1e-4,
                               msg=lambda m: "a chunk of 2 after 5 cached tokens, with its mask (T=2, S=7)\n" + m)
