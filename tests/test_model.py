"""Tests for model.py: the transformer, its KV cache and sampler, log-prob helpers, checkpoints.

Every model here is tiny (vocab ~100, dim 32, 2 layers) and its weights are re-drawn with a
large std: the default 0.02 init gives near-uniform attention and logits, under which a wrong
rotary layout, a leaked pad key or a mixed-up GQA head would barely move the outputs.
"""

import json
import math
import os

import pytest
import torch
import torch.nn as nn

import checkpoint as C
import model as M
import sampling
import train_utils
from data import pad_batch
from model import KVCache, ModelConfig, Transformer, sequence_logprobs, token_logprobs
from sampling import Generation, filter_logits, generate

V = 97  # vocabulary of the tiny models
PAD = 0
NEG_INF = float("-inf")


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                norm_eps=1e-6)
    base.update(overrides)
    return ModelConfig(**base)


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.3):
    """Redraw every parameter (norm weights around 1, biases non-zero) so outputs are sensitive
    to every detail of the computation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(std * noise)
    return module


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return randomize_(Transformer(tiny_config(**overrides)), seed).eval()


class _EOSBiased(Transformer):
    """A Transformer whose EOS logit is raised by a constant."""

    def forward(self, *args, return_hidden=False, **kwargs):
        out = super().forward(*args, return_hidden=return_hidden, **kwargs)
        if not return_hidden:
            out = out.clone()
            out[..., self.eos_id] += self.eos_bias
        return out


def make_eos_model(eos_id: int, bias: float, seed: int = 0) -> Transformer:
    """An untied model with a bias on the EOS logit, so that greedy and sampled rows stop at
    different steps (some early, some never)."""
    m = make_model(seed, tie_embeddings=False)
    biased = _EOSBiased(m.config)
    biased.load_state_dict(m.state_dict())
    biased.eos_id, biased.eos_bias = eos_id, bias
    return biased.eval()


def rand_prompts(lengths, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, V, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(autouse=True)
def _no_grad():
    """No test here needs autograd (conftest.py sets one thread)."""
    with torch.no_grad():
        yield


def positions_from_mask(mask):
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# -----------------------------------------------------------------------------
# Forward, padding, KV cache


def test_rope_tables_rotate_half_layout():
    """Rotary tables use HF's 'rotate half' layout: dims i and i + hd/2 share one frequency,
    theta**(-2i/hd), and position p rotates by p * freq."""
    hd, theta = 8, 500.0
    cos, sin = M.rope_tables(hd, 5, theta)
    freqs = [theta ** (-2 * i / hd) for i in range(hd // 2)]
    for p in range(5):
        for i, f in enumerate(freqs):
            for col in (i, i + hd // 2):
                assert cos[p, col].item() == pytest.approx(math.cos(p * f), abs=1e-6)
                assert sin[p, col].item() == pytest.approx(math.sin(p * f), abs=1e-6)


def test_rope_preserves_relative_positions():
    """Attention scores after rotary embedding depend only on the position difference (shifting
    both query and key positions by the same amount leaves q.k unchanged)."""
    hd = 8
    cos, sin = M.rope_tables(hd, 40, 10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(pq, pk):
        rq = M.apply_rope(q, cos[pq][None, None, None], sin[pq][None, None, None])
        rk = M.apply_rope(k, cos[pk][None, None, None], sin[pk][None, None, None])
        return (rq * rk).sum().item()

    assert score(7, 3) == pytest.approx(score(27, 23), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_gqa_matches_explicitly_repeated_kv_heads():
    """Grouped-query attention: query head h reads key/value head h // (n_heads / n_kv_heads).
    A GQA model equals a full multi-head model whose k/v projections repeat each kv head."""
    gqa = make_model(1, n_heads=4, n_kv_heads=2)
    mha = Transformer(tiny_config(n_heads=4, n_kv_heads=4)).eval()
    sd = dict(gqa.state_dict())
    hd, rep = gqa.config.head_dim, 2
    for name in list(sd):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[name].view(2, hd, -1)  # (n_kv, hd, dim)
            sd[name] = w.repeat_interleave(rep, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mha(ids), gqa(ids), atol=1e-5, rtol=0)


def test_cached_decoding_equals_full_forward():
    """Prefill + one-token decode steps with the KVCache give the full forward's logits."""
    m = make_model()
    ids = torch.randint(0, V, (3, 14), generator=torch.Generator().manual_seed(1))
    full = m(ids)
    for with_mask in (False, True):
        cache = KVCache(m.config, 3, 14, "cpu", torch.float32)
        mask = torch.ones_like(ids)
        P = 5
        kw = dict(attention_mask=mask[:, :P]) if with_mask else {}
        out = [m(ids[:, :P], cache=cache, start=0, **kw)]
        for t in range(P, 14):
            kw = dict(attention_mask=mask[:, : t + 1], positions=torch.full((3, 1), t)) if with_mask else {}
            out.append(m(ids[:, t : t + 1], cache=cache, start=t, **kw))
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_cached_multi_token_chunks_equal_full_forward():
    """A cached forward of several new tokens at start > 0 (chunked prefill) is causal with
    respect to the absolute columns: query at column start+i sees keys [0, start+i]. Checked
    with and without an attention_mask (the docstring promises plain causal attention then)."""
    m = make_model()
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    full = m(ids)
    chunks = [(0, 4), (4, 7), (7, 10)]
    for with_mask in (True, False):
        cache = KVCache(m.config, 2, 10, "cpu", torch.float32)
        out = []
        for a, b in chunks:
            kw = dict(attention_mask=torch.ones(2, b, dtype=torch.long)) if with_mask else {}
            out.append(m(ids[:, a:b], cache=cache, start=a, **kw))
        torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0,
                                   msg=lambda s: f"with_mask={with_mask}: {s}")


def test_left_padded_forward_matches_each_prompt_alone():
    """With left padding + attention_mask, each row's real-token logits equal that prompt run
    alone: pad keys are masked and positions come from the mask. The pad tokens' values must
    not matter either (fill them with random ids)."""
    m = make_model()
    prompts = rand_prompts([3, 8, 5, 1], seed=3)
    ids, mask = pad_batch(prompts, PAD, side="left")
    out = m(ids, attention_mask=mask)
    junk = ids.masked_fill(mask == 0, 0) + (1 - mask) * torch.randint(1, V, ids.shape)
    out_junk = m(junk, attention_mask=mask)
    T = ids.shape[1]
    for i, p in enumerate(prompts):
        alone = m(torch.tensor([p]))[0]
        torch.testing.assert_close(out[i, T - len(p):], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_junk[i, T - len(p):], alone, atol=1e-5, rtol=0)
    assert not torch.isnan(out).any(), "pad queries must not produce NaN"


def test_left_padded_cached_decoding_matches_each_prompt_alone():
    """Prefill of a left-padded batch of mixed lengths, then step-by-step decoding with the
    KVCache and a growing mask: each row's logits at its real tokens equal a plain full forward
    of that row alone (no padding)."""
    m = make_model()
    prompts = rand_prompts([2, 7, 4], seed=4)
    ids, mask = pad_batch(prompts, PAD, side="left")
    B, T0 = ids.shape
    n_new = 6
    new = torch.randint(3, V, (B, n_new), generator=torch.Generator().manual_seed(5))
    for explicit_positions in (False, True):
        cache = KVCache(m.config, B, T0 + n_new, "cpu", torch.float32)
        full_mask = torch.cat([mask, torch.ones(B, n_new, dtype=torch.long)], 1)
        pos = positions_from_mask(full_mask)
        kw = dict(positions=pos[:, :T0]) if explicit_positions else {}
        steps = [m(ids, attention_mask=mask, cache=cache, start=0, **kw)]
        for t in range(n_new):
            c = T0 + t
            kw = dict(positions=pos[:, c : c + 1]) if explicit_positions else {}
            steps.append(m(new[:, t : t + 1], attention_mask=full_mask[:, : c + 1], cache=cache,
                           start=c, **kw))
        out = torch.cat(steps, 1)
        for i, p in enumerate(prompts):
            row = torch.tensor([p + new[i].tolist()])
            alone = m(row)[0]
            torch.testing.assert_close(out[i, T0 - len(p):], alone, atol=1e-5, rtol=0)


def test_forward_rejects_sequences_longer_than_max_seq_len():
    """A sequence beyond the rotary table is an error, not a silent wrap-around."""
    m = make_model(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))


# -----------------------------------------------------------------------------
# Log-probs


def test_token_logprobs_applies_temperature():
    """token_logprobs = log_softmax(logits / T) gathered at the targets."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    tgt = torch.randint(0, 5, (2, 3), generator=g)
    for T in (1.0, 0.7):
        got = token_logprobs(logits, tgt, T)
        for b in range(2):
            for t in range(3):
                exp = torch.log(torch.softmax(logits[b, t] / T, -1)[tgt[b, t]])
                assert got[b, t].item() == pytest.approx(exp.item(), abs=1e-6)


def test_sequence_logprobs_shift_and_mask_match_position_loop():
    """sequence_logprobs()[b, t] = log p(ids[b, t+1] | real tokens up to t) where response_mask
    at t+1 is 1, else 0. Reference: one forward per prefix of each row's unpadded tokens."""
    m = make_model()
    prompts = rand_prompts([3, 5], seed=6)
    responses = rand_prompts([4, 2], seed=7)
    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(prompts, responses)]
    for side in ("left", "right"):
        ids, attn, resp = pad_batch(seqs, PAD, side=side, loss_masks=masks)
        for T in (1.0, 0.7):
            got = sequence_logprobs(m, ids, attn, resp, temperature=T)
            assert got.shape == (2, ids.shape[1] - 1)
            expected = torch.zeros_like(got)
            for b, s in enumerate(seqs):
                offset = ids.shape[1] - len(s) if side == "left" else 0
                for j in range(1, len(s)):  # token j of the row, predicted from tokens [0, j)
                    if masks[b][j]:
                        logits = m(torch.tensor([s[:j]]))[0, -1] / T
                        expected[b, offset + j - 1] = logits.log_softmax(-1)[s[j]]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            assert (got[resp[:, 1:] == 0] == 0).all()


# -----------------------------------------------------------------------------
# filter_logits


def kept(logits):
    return (logits > NEG_INF).tolist()


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize("top_p, n_kept", [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.95, 3),
                                           (0.96, 4), (0.2, 1), (1.0, 4)])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, n_kept):
    """top_p keeps the most likely tokens until their mass reaches top_p (the crossing token is
    kept, nothing after it). Shuffled order so the kept set is the largest, not the first."""
    order = torch.tensor([2, 0, 3, 1])
    logits = PROBS.log()[:, order]  # probs [0.15, 0.5, 0.05, 0.3]
    out = filter_logits(logits, top_p=top_p)
    by_rank = [1, 3, 0, 2]  # columns from most to least likely
    assert kept(out)[0] == [c in by_rank[:n_kept] for c in range(4)]
    torch.testing.assert_close(out[out > NEG_INF], logits[out > NEG_INF])  # kept logits unchanged


def test_top_k_keeps_the_k_largest():
    """top_k keeps exactly the k largest logits of each row (positions anywhere in the row)."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.3], [3.0, -2.0, 0.0, 1.0, 2.5]])
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, False, True, False],
                                                     [True, False, False, False, True]]
    assert kept(filter_logits(logits, top_k=1)) == [[False, True, False, False, False],
                                                     [True, False, False, False, False]]
    assert kept(filter_logits(logits, top_k=5)) == [[True] * 5] * 2
    assert kept(filter_logits(logits, top_k=0)) == [[True] * 5] * 2  # 0 = off


def test_top_k_and_top_p_ties():
    """Ties: top_k keeps every token tied with the k-th largest (as HF does); top_p on a flat
    distribution keeps exactly as many tokens as needed to reach the mass."""
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    assert kept(filter_logits(logits, top_k=2)) == [[False, True, True, True, False]]
    flat = torch.zeros(1, 8)  # 8 tokens of 1/8 each
    assert sum(kept(filter_logits(flat, top_p=0.3))[0]) == 3  # 2/8 < 0.3 <= 3/8
    assert sum(kept(filter_logits(flat, top_p=0.25 + 1e-3))[0]) == 3
    assert sum(kept(filter_logits(flat, top_p=0.99))[0]) == 8


def test_filter_logits_rows_are_independent_and_combined():
    """Each batch row gets its own nucleus; top_k and top_p both apply when both are given."""
    logits = torch.stack([
        torch.tensor([0.5, 0.3, 0.15, 0.05]).log(),   # top_p 0.7 -> 2 tokens
        torch.tensor([0.05, 0.9, 0.03, 0.02]).log(),  # top_p 0.7 -> 1 token
        torch.tensor([0.25, 0.25, 0.25, 0.25]).log(),  # top_p 0.7 -> 3 tokens
    ])
    out = filter_logits(logits, top_p=0.7)
    assert kept(out)[:2] == [[True, True, False, False], [False, True, False, False]]
    assert sum(kept(out)[2]) == 3
    out = filter_logits(logits[:1], top_k=2, top_p=0.9)  # top_p alone keeps 3
    assert kept(out) == [[True, True, False, False]]
    out = filter_logits(logits[:1], top_k=3, top_p=0.6)  # top_k alone keeps 3
    assert kept(out) == [[True, True, False, False]]


# -----------------------------------------------------------------------------
# generate


EOS = 5


def naive_greedy(m, prompt, n, eos):
    """Greedy decoding by full recomputation (no cache, no padding)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        tok = int(m(torch.tensor([seq]))[0, -1].argmax())
        out.append(tok)
        seq.append(tok)
        if tok == eos:
            break
    return out


@pytest.fixture(scope="module")
def eos_model():
    return make_eos_model(EOS, bias=2.5, seed=11)


@pytest.fixture(scope="module")
def prompts():
    return rand_prompts([4, 9, 2, 6, 3, 7], seed=12, low=6)


def test_greedy_single_prompt_matches_full_recomputation(eos_model, prompts):
    """Greedy generate (KV cache) picks the same tokens as an argmax loop over full forwards."""
    for p in prompts[:3]:
        gen = generate(eos_model, [p], max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0)
        n = int(gen.response_mask[0].sum())
        assert gen.tokens[0, :n].tolist() == naive_greedy(eos_model, p, 10, EOS)


def test_greedy_batch_equals_each_prompt_alone(eos_model, prompts):
    """Greedy generation of a left-padded batch gives each row the tokens it gets alone, up to
    its EOS; after EOS tokens are pad, response_mask 0, logprobs 0; finished flags are right."""
    B, N = len(prompts), 12
    gen = generate(eos_model, prompts, max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=0)
    assert isinstance(gen, Generation)
    ids, mask = pad_batch(prompts, PAD, side="left")
    T0 = ids.shape[1]
    lengths = []
    for i, p in enumerate(prompts):
        alone = generate(eos_model, [p], max_new_tokens=N, eos_id=EOS, pad_id=PAD, temperature=0)
        a = alone.tokens[0].tolist()
        n = len(a)
        lengths.append(n)
        assert alone.finished[0].item() == (EOS in a)
        if EOS in a:
            assert a.index(EOS) == n - 1, "generation must stop right after EOS"
        else:
            assert n == N
        assert gen.tokens[i, :n].tolist() == a
        assert (gen.tokens[i, n:] == PAD).all()
        assert gen.response_mask[i].tolist() == [1] * n + [0] * (gen.tokens.shape[1] - n)
        assert (gen.logprobs[i, n:] == 0).all()
        torch.testing.assert_close(gen.logprobs[i, :n], alone.logprobs[0], atol=1e-5, rtol=0)
        assert gen.finished[i].item() == alone.finished[0].item()
    # the fixture must exercise per-row stopping: some rows stop early, at different steps
    assert len(set(lengths)) >= 2 and min(lengths) < N, lengths
    assert gen.finished.any() and not gen.finished.all()
    assert gen.tokens.shape[1] == max(lengths)
    assert torch.equal(gen.sequences, torch.cat([ids, gen.tokens], 1))
    assert torch.equal(gen.attention_mask, torch.cat([mask, gen.response_mask], 1))


def test_generate_accepts_left_padded_tensor_with_mask(eos_model, prompts):
    """Prompts given as a left-padded tensor + attention_mask generate what the list form does."""
    ids, mask = pad_batch(prompts, PAD, side="left")
    a = generate(eos_model, prompts, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0)
    b = generate(eos_model, ids, max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0,
                 attention_mask=mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.response_mask, b.response_mask)


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.7, 0.9, 0), (1.3, 1.0, 5), (0, 1.0, 0)])
def test_sampler_logprobs_equal_fresh_forward(eos_model, prompts, temperature, top_p, top_k):
    """Generation.logprobs are the log-probs of the sampled tokens under softmax(logits / T)
    (T = 1 for greedy), without top-k/top-p renormalisation: a fresh sequence_logprobs forward
    over the returned sequences gives the same numbers. Masked positions are 0."""
    g = torch.Generator().manual_seed(3)
    gen = generate(eos_model, prompts, max_new_tokens=12, eos_id=EOS, pad_id=PAD,
                   temperature=temperature, top_p=top_p, top_k=top_k, generator=g)
    B, T0 = len(prompts), gen.sequences.shape[1] - gen.tokens.shape[1]
    score_T = temperature if temperature > 0 else 1.0
    resp_full = torch.cat([torch.zeros(B, T0, dtype=torch.long), gen.response_mask], 1)
    fresh = sequence_logprobs(eos_model, gen.sequences, gen.attention_mask, resp_full,
                              temperature=score_T)[:, T0 - 1:]
    torch.testing.assert_close(gen.logprobs, fresh, atol=1e-5, rtol=1e-5)
    assert (gen.logprobs[gen.response_mask == 0] == 0).all()
    assert (gen.logprobs[gen.response_mask == 1] < 0).all()
    assert (gen.response_mask == 0).any(), "some row should stop early (EOS) in this fixture"
    if temperature not in (0, 1.0):  # the temperature really is part of the log-prob
        at_1 = sequence_logprobs(eos_model, gen.sequences, gen.attention_mask, resp_full)[:, T0 - 1:]
        assert not torch.allclose(at_1, gen.logprobs, atol=1e-3)
    # finished <=> the row's response contains EOS; EOS is its last real token
    for i in range(B):
        toks = gen.tokens[i][gen.response_mask[i] == 1].tolist()
        assert gen.finished[i].item() == (EOS in toks)
        if EOS in toks:
            assert toks.index(EOS) == len(toks) - 1


def test_sampling_respects_top_k():
    """With top_k=1 sampling at any temperature is greedy decoding."""
    m = make_model(4)
    p = rand_prompts([5, 3], seed=8)
    greedy = generate(m, p, max_new_tokens=8, eos_id=-1, pad_id=PAD, temperature=0)
    sampled = generate(m, p, max_new_tokens=8, eos_id=-1, pad_id=PAD, temperature=1.5, top_k=1,
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, sampled.tokens)


def test_seeded_generator_repeatable_and_seed_dependent(prompts):
    """Same generator seed -> identical samples whatever the global RNG; different seeds ->
    different samples."""
    m = make_model(5)

    def sample(seed, global_seed):
        torch.manual_seed(global_seed)
        return generate(m, prompts, max_new_tokens=10, eos_id=-1, pad_id=PAD, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed)).tokens

    a, b, c = sample(1, 100), sample(1, 200), sample(2, 100)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_checks_length_budget():
    """prompt + max_new_tokens beyond max_seq_len is refused up front with a clear message."""
    m = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(m, [[1] * 10], max_new_tokens=7, eos_id=EOS, pad_id=PAD)
    gen = generate(m, [[7] * 10], max_new_tokens=6, eos_id=-1, pad_id=PAD, temperature=0)
    assert gen.tokens.shape == (1, 6) and not gen.finished[0]


@pytest.mark.parametrize("kw, what", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(num_samples=0), "num_samples"), (dict(max_new_tokens=0), "max_new_tokens")])
def test_generate_rejects_bad_sampling_arguments(kw, what):
    """Out-of-range sampling settings are refused with a message naming them, not turned into
    garbage (top_p = 0 would mask every token; a negative temperature flips the distribution)."""
    m = make_model()
    args = dict(max_new_tokens=4, eos_id=EOS, pad_id=PAD) | kw
    with pytest.raises(ValueError, match=what):
        generate(m, [[5, 6, 7]], **args)


def test_generate_rejects_a_right_padded_tensor_prompt():
    """A right-padded tensor would put the first new token after the padding: refused."""
    m = make_model()
    ids = torch.tensor([[5, 6, 7], [5, 6, PAD]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(m, ids, 4, EOS, PAD, attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_generate_restores_training_mode_when_it_raises(monkeypatch):
    """A failure inside sampling leaves the model in train mode if it was in train mode."""
    m = make_model(dropout=0.1).train()
    monkeypatch.setattr(sampling, "filter_logits", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        generate(m, [[5, 6, 7]], 4, EOS, PAD, temperature=0.7)
    assert m.training


def test_shared_prefill_greedy_equals_each_row_alone(eos_model, prompts):
    """num_samples=3 (one prefill per prompt, cache copied) gives, greedily, every row exactly
    what the prompt gives alone, rows grouped by prompt."""
    n = 3
    shared = generate(eos_model, prompts, 12, EOS, PAD, temperature=0, num_samples=n)
    assert shared.tokens.shape[0] == len(prompts) * n
    for i, p in enumerate(prompts):
        alone = generate(eos_model, [p], 12, EOS, PAD, temperature=0)
        L = alone.tokens.shape[1]
        for r in range(i * n, (i + 1) * n):
            assert shared.tokens[r, :L].tolist() == alone.tokens[0].tolist()
            assert (shared.tokens[r, L:] == PAD).all()
            torch.testing.assert_close(shared.logprobs[r, :L], alone.logprobs[0], atol=1e-5, rtol=0)


def test_shared_prefill_samples_equal_repeated_prompts_and_first_tokens_differ(eos_model):
    """Sampled with a seeded generator, num_samples=8 draws the same tokens as the prompt
    written out 8 times (each row its own first token), and those first tokens are not all one
    token (the known bug copies one sampled first token to every row)."""
    p = rand_prompts([5], seed=3)[0]
    kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=3.0)
    shared = generate(eos_model, [p], num_samples=8, generator=torch.Generator().manual_seed(0), **kw)
    spelled = generate(eos_model, [p] * 8, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(shared.tokens, spelled.tokens)
    torch.testing.assert_close(shared.logprobs, spelled.logprobs, atol=1e-5, rtol=0)
    assert len(set(shared.tokens[:, 0].tolist())) > 1


def test_output_head_is_fp32_under_bf16_autocast():
    """Under bf16 autocast the trunk runs in bf16 but the logits come from an fp32 head: equal
    to the fp32 product of the (bf16-computed) final hidden state and the head matrix. bf16
    logits would round a logit of ~10 by up to 0.03, which sums to nats over a response."""
    m = make_model(3)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(ids)
        hidden = m(ids, return_hidden=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.float() @ m.lm_head.weight.float().T, atol=1e-5, rtol=1e-5)
    # and the log-probs that PPO and DPO read are fp32 end to end
    lp = sequence_logprobs_under_autocast(m, ids)
    assert lp.dtype == torch.float32


def sequence_logprobs_under_autocast(m, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return sequence_logprobs(m, ids, torch.ones_like(ids), torch.ones_like(ids))


# -----------------------------------------------------------------------------
# Dropout and training mode


def test_dropout_active_in_train_deterministic_in_eval():
    """train() with dropout > 0 makes forwards random; eval() makes them deterministic and equal
    to the same weights without dropout."""
    m = make_model(6, dropout=0.3)
    plain = Transformer(tiny_config(dropout=0.0)).eval()
    plain.load_state_dict(m.state_dict())
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    m.train()
    assert not torch.allclose(m(ids), m(ids))
    m.eval()
    assert torch.equal(m(ids), m(ids))
    torch.testing.assert_close(m(ids), plain(ids), atol=1e-6, rtol=0)


def test_generate_runs_in_eval_and_restores_training_mode():
    """generate() samples without dropout even from a model in train mode, and leaves the model
    in the mode it found (train stays train, eval stays eval, for every submodule)."""
    m = make_model(7, dropout=0.5)
    p = rand_prompts([4, 6], seed=9)
    m.eval()
    ref = generate(m, p, max_new_tokens=6, eos_id=-1, pad_id=PAD, temperature=0)
    assert not m.training and not any(x.training for x in m.modules())
    m.train()
    for _ in range(2):
        out = generate(m, p, max_new_tokens=6, eos_id=-1, pad_id=PAD, temperature=0)
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.logprobs, ref.logprobs, atol=1e-6, rtol=0)
    assert m.training and all(x.training for x in m.modules())


# -----------------------------------------------------------------------------
# Checkpoints


def safetensor_keys(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def assert_same_model(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip_exact(tmp_path, tied):
    """save_pretrained -> from_pretrained restores every tensor, the config and the logits
    exactly; a tied checkpoint stores no lm_head.weight and loads tied again."""
    m = make_model(8, tie_embeddings=tied, qkv_bias=not tied, rope_theta=500.0, eos_token_id=5,
                   bos_token_id=1, pad_token_id=0)
    path = str(tmp_path / "ckpt")
    m.save_pretrained(path)
    keys = safetensor_keys(path)
    assert ("lm_head.weight" in keys) == (not tied)
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in keys)
    loaded = Transformer.from_pretrained(path)
    assert loaded.config == m.config
    assert_same_model(m.eval(), loaded.eval())
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    assert loaded.num_params() == m.num_params()
    assert os.listdir(tmp_path) == ["ckpt"], "no temp directory may be left behind"


def test_save_writes_tokenizer_and_extra_files(tmp_path):
    """Extra text files and the tokenizer land in the checkpoint directory."""
    class Tok:
        def save(self, p):
            with open(p, "w") as f:
                f.write("{}")

    m = make_model()
    path = tmp_path / "ckpt"
    m.save_pretrained(str(path), tokenizer=Tok(), extra_files={"train_config.json": '{"lr": 1}'})
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "tokenizer.json",
                                        "train_config.json"]
    assert json.loads((path / "train_config.json").read_text()) == {"lr": 1}


def snapshot(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


def test_overwrite_replaces_our_files_and_touches_no_other(tmp_path):
    """Saving into a directory replaces the checkpoint's files and leaves every other file and
    folder there as it was (as transformers does): saving into "." must never empty it."""
    path = tmp_path / "ckpt"
    make_model(1).save_pretrained(str(path), extra_files={"old.txt": "old"})
    (path / "notes.txt").write_text("mine")
    (path / "data").mkdir()
    (path / "data" / "x.jsonl").write_text("{}")
    new = make_model(2)
    new.save_pretrained(str(path))
    assert sorted(os.listdir(path)) == ["config.json", "data", "model.safetensors", "notes.txt", "old.txt"]
    assert (path / "notes.txt").read_text() == "mine" and (path / "data" / "x.jsonl").read_text() == "{}"
    assert_same_model(new, Transformer.from_pretrained(str(path)).eval())
    assert os.listdir(tmp_path) == ["ckpt"]


def test_checkpoint_is_readable_by_others(tmp_path):
    """A new checkpoint directory and its files get the usual permissions (umask 022: 755 and
    644), not the 700/600 of a private temp directory."""
    old = os.umask(0o022)
    try:
        make_model().save_pretrained(str(tmp_path / "ckpt"), extra_files={"a.json": "{}"})
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    for f in ("config.json", "model.safetensors", "a.json"):
        assert (tmp_path / "ckpt" / f).stat().st_mode & 0o777 == 0o644, f


def test_save_metadata_lands_in_the_weights_header(tmp_path):
    """metadata= is stored in model.safetensors (trainers keep their step there) and read back."""
    make_model().save_pretrained(str(tmp_path / "c"), metadata={"step": "7"})
    assert C.checkpoint_metadata(str(tmp_path / "c"))["step"] == "7"


def test_interrupted_rename_never_leaves_a_mix_that_loads_silently(tmp_path, monkeypatch):
    """A kill between the renames of one save leaves every file complete (old or new) and no
    temp file once the next save runs; the weights, renamed last, still carry the old step."""
    path = tmp_path / "ckpt"
    make_model(1).save_pretrained(str(path), extra_files={"state.txt": "1"}, metadata={"step": "1"})
    real_replace, calls = os.replace, []

    def replace_then_die(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        make_model(2).save_pretrained(str(path), extra_files={"state.txt": "2"}, metadata={"step": "2"})
    monkeypatch.undo()
    assert (path / "state.txt").read_text() == "2"  # renamed before the kill
    assert C.checkpoint_metadata(str(path))["step"] == "1"  # weights: still the old ones
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors", "state.txt"]
    Transformer.from_pretrained(str(path))  # loads: every file is whole


@pytest.mark.parametrize("fail_at", ["save_file", "tokenizer", "interrupt"])
def test_failed_save_keeps_old_checkpoint_intact(tmp_path, monkeypatch, fail_at):
    """If saving raises midway (safetensors write, tokenizer write, Ctrl-C), the existing
    checkpoint's files are byte-for-byte intact and no temp directory is left behind."""
    import safetensors.torch

    path = tmp_path / "ckpt"
    old = make_model(1)
    old.save_pretrained(str(path))
    before = snapshot(path)

    class Boom(RuntimeError):
        pass

    class BadTok:
        def __init__(self, exc):
            self.exc = exc

        def save(self, p):
            with open(p, "w") as f:
                f.write("partial")
            raise self.exc

    tok = None
    if fail_at == "save_file":
        def broken_save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"half written")
            raise Boom("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    else:
        tok = BadTok(Boom("disk full") if fail_at == "tokenizer" else KeyboardInterrupt())
    with pytest.raises((Boom, KeyboardInterrupt)):
        make_model(2).save_pretrained(str(path), tokenizer=tok)
    assert snapshot(path) == before
    assert os.listdir(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    assert_same_model(old, Transformer.from_pretrained(str(path)).eval())
    # a failed first save leaves nothing at all
    fresh = tmp_path / "fresh"
    with pytest.raises(Boom):
        make_model(2).save_pretrained(str(fresh), tokenizer=BadTok(Boom("x")))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_missing_tensor_error_names_it(tmp_path):
    """A checkpoint lacking a tensor fails to load with an error naming that tensor."""
    path = str(tmp_path / "ckpt")
    make_model().save_pretrained(path)
    rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Transformer.from_pretrained(path)


def test_wrong_shape_error_names_it(tmp_path):
    """A tensor of the wrong shape fails to load with an error naming the tensor."""
    path = str(tmp_path / "ckpt")
    make_model().save_pretrained(path)
    rewrite_tensors(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)}))
    with pytest.raises(Exception, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        Transformer.from_pretrained(path)


def test_untied_config_needs_lm_head(tmp_path):
    """An untied checkpoint without lm_head.weight is an error naming lm_head.weight (not a
    silently random output head)."""
    path = str(tmp_path / "ckpt")
    make_model(tie_embeddings=False).save_pretrained(path)
    rewrite_tensors(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(Exception, match=r"lm_head\.weight"):
        Transformer.from_pretrained(path)


@pytest.mark.parametrize("damage, message", [
    ("no dir", "no such checkpoint directory"),
    ("config not json", r"config\.json: not valid JSON"),
    ("config key missing", r"config\.json: missing key\(s\) \['hidden_size'\]"),
    ("truncated weights", r"model\.safetensors: cannot read the weights"),
])
def test_broken_checkpoint_errors_name_the_file(tmp_path, damage, message):
    """A user's broken checkpoint gives one UserError naming the file and what is wrong, not a
    KeyError or a library traceback."""
    from data import UserError

    path = tmp_path / "ckpt"
    make_model().save_pretrained(str(path))
    if damage == "no dir":
        path = tmp_path / "nowhere"
    elif damage == "config not json":
        (path / "config.json").write_text("{oops")
    elif damage == "config key missing":
        cfg = json.loads((path / "config.json").read_text())
        del cfg["hidden_size"]
        (path / "config.json").write_text(json.dumps(cfg))
    else:
        w = path / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match=message):
        Transformer.from_pretrained(str(path))


def test_load_checkpoint_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    """A tokenizer with more tokens than the model has embeddings fails at load time, not with
    an IndexError at the first training step."""
    from data import UserError, train_tokenizer

    tok = train_tokenizer(["sort 3 1 2 please", "add 4 and 5"] * 20, 300)
    assert tok.vocab_size > V
    make_model().save_pretrained(str(tmp_path / "c"), tokenizer=tok)
    with pytest.raises(UserError, match="tokenizer has"):
        C.load_checkpoint(str(tmp_path / "c"))


def test_get_device_names_a_missing_device():
    """--device cuda on a machine without CUDA is a UserError, not an AssertionError later."""
    from data import UserError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="no CUDA"):
        train_utils.get_device("cuda")
    with pytest.raises(UserError, match="not a device"):
        train_utils.get_device("gpu0")
    assert train_utils.get_device("cpu").type == "cpu"


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    """A checkpoint split into two shards + model.safetensors.index.json loads the same
    tensors and logits as the single-file checkpoint."""
    from safetensors.torch import load_file, save_file

    m = make_model(9, tie_embeddings=False)
    single = tmp_path / "single"
    m.save_pretrained(str(single))
    tensors = load_file(str(single / "model.safetensors"))
    names = sorted(tensors)
    half = {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
            for i, n in enumerate(names)}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    for shard in set(half.values()):
        save_file({n: tensors[n] for n in names if half[n] == shard}, str(sharded / shard),
                  metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())}, "weight_map": half}))
    a = Transformer.from_pretrained(str(single)).eval()
    b = Transformer.from_pretrained(str(sharded)).eval()
    assert_same_model(a, b)
    assert_same_model(m, b)


# -----------------------------------------------------------------------------
# Parity with Hugging Face transformers


@pytest.fixture
def transformers():
    """HF parity tests need transformers (a dev requirement); skip them, not the file, without it."""
    return pytest.importorskip("transformers")


PARITY = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]


def padded_batch(seed=0):
    prompts = rand_prompts([9, 4, 6], seed=seed)
    ids, mask = pad_batch(prompts, PAD, side="left")
    return prompts, ids, mask


def assert_logits_match(ours, hf):
    """Unpadded batch, and a left-padded batch compared on real positions (HF gets position_ids
    from the mask, cumsum - 1 clamped at 0)."""
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)
        prompts, pids, mask = padded_batch()
        a = ours(pids, attention_mask=mask)
        b = hf(pids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        for i, p in enumerate(prompts):
            real = slice(pids.shape[1] - len(p), None)
            torch.testing.assert_close(a[i, real], b[i, real], atol=1e-4, rtol=0)


def hf_model(arch, tied, rope_theta=10000.0, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    Config = LlamaConfig if arch == "llama" else Qwen2Config
    cfg = Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-6, rope_theta=rope_theta, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg).float()
    randomize_(m, seed)
    if tied:
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    return m.eval()


@pytest.mark.parametrize("arch, tied", PARITY)
def test_ours_loads_in_hf_transformers(tmp_path, transformers, arch, tied):
    """Our save_pretrained is read by transformers.AutoModelForCausalLM as the same network
    (Llama, or Qwen2 with non-zero q/k/v biases; GQA; tied/untied; rope_theta != 10000)."""
    from transformers import AutoModelForCausalLM

    ours = make_model(10, qkv_bias=arch == "qwen2", tie_embeddings=tied, rope_theta=300.0)
    if arch == "qwen2":
        assert ours.layers[0].self_attn.q_proj.bias.abs().sum() > 0
    ours.save_pretrained(str(tmp_path))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).float().eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM")
    assert_logits_match(ours, hf)


@pytest.mark.parametrize("arch, tied", PARITY)
def test_hf_checkpoint_loads_in_ours(tmp_path, transformers, arch, tied):
    """A random transformers Llama/Qwen2 (GQA, tied/untied, q/k/v biases for Qwen2) saved with
    save_pretrained loads in Transformer.from_pretrained with the same logits."""
    hf = hf_model(arch, tied, seed=3)
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    assert ours.config.qkv_bias == (arch == "qwen2")
    assert ours.config.tie_embeddings == tied
    assert_logits_match(ours, hf)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_checkpoint_with_custom_rope_theta_loads_in_ours(tmp_path, transformers, arch):
    """rope_theta != 10000 survives the HF -> tinyalign direction (transformers 5 stores it
    under "rope_parameters", older versions at top level): same config value, same logits."""
    hf = hf_model(arch, tied=False, rope_theta=500.0, seed=4)
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    ours = Transformer.from_pretrained(str(tmp_path)).eval()
    assert ours.config.rope_theta == 500.0
    assert_logits_match(ours, hf)


def test_hf_checkpoint_with_scaled_rope_is_refused(tmp_path):
    """A checkpoint whose rotary embedding is scaled (rope_type other than 'default', under the
    legacy 'rope_scaling' key or transformers 5's 'rope_parameters') is refused, not loaded as
    plain rotary with silently wrong outputs."""
    path = str(tmp_path / "ckpt")
    make_model().save_pretrained(path)
    cfg_file = os.path.join(path, "config.json")
    base = json.load(open(cfg_file))
    for extra in ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                  {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}):
        with open(cfg_file, "w") as f:
            json.dump({**base, **extra}, f)
        with pytest.raises(ValueError, match="rope"):
            Transformer.from_pretrained(path)
