"""The static-shape decode path of sampling.generate (compile="static" runs it uncompiled,
compile=True under torch.compile): it must give the eager loop's tokens exactly, the same
draws from the same generator, and log-probs equal to float rounding."""

import pytest
import torch

import sampling
from sampling import generate
from test_model import EOS, PAD, eos_model, prompts  # noqa: F401 (the same fixtures as test_model's generate tests)


def assert_same_generation(a, b):
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.attention_mask, b.attention_mask)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_p, top_k, num_samples", [
    (0, 1.0, 0, 1), (0.7, 0.9, 0, 1), (1.3, 1.0, 5, 1), (1.0, 0.8, 3, 3)])
def test_static_loop_equals_eager_loop(eos_model, prompts, temperature, top_p, top_k, num_samples):
    """Left-padded prompts of different lengths, rows stopping at different steps: the static
    loop (whole-capacity attention under a mask, noise drawn outside the step) gives the eager
    loop's tokens, masks and finished flags, and the same generator stream."""
    kw = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=temperature, top_p=top_p, top_k=top_k,
              num_samples=num_samples)
    eager = generate(eos_model, prompts, generator=torch.Generator().manual_seed(4), **kw)
    static = generate(eos_model, prompts, generator=torch.Generator().manual_seed(4), compile="static", **kw)
    assert_same_generation(eager, static)
    lengths = eager.response_mask.sum(-1)
    assert len(set(lengths.tolist())) >= 2, "the fixture must make rows stop at different steps"


def test_static_loop_reuses_its_buffers_without_leaking_old_keys(eos_model, prompts):
    """The buffers of one generation serve the next of the same shapes: keys an earlier call
    left in the cache (a longer prompt's columns) must stay masked, so a second call gives what
    a fresh call gives, and the returned tensors are not views of the reused buffers."""
    kw = dict(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0)
    sampling._state_slot.clear()
    first = generate(eos_model, prompts[:3], compile="static", **kw)
    kept = first.tokens.clone()
    other = [p[::-1] for p in prompts[:3]]  # same lengths, so the same buffers, other keys
    second = generate(eos_model, other, compile="static", **kw)
    assert torch.equal(first.tokens, kept), "a returned tensor was overwritten by the next call"
    assert_same_generation(second, generate(eos_model, other, **kw))


@pytest.mark.parametrize("every", [1, 3])
def test_stop_check_every_k_tokens_cuts_the_output_where_the_last_row_stopped(eos_model, prompts, every):
    """Asking 'all finished?' only every k tokens runs finished rows on padding a few steps
    longer; the output is cut to the columns where some row still ran, as the eager loop's."""
    prompts = [prompts[i] for i in (0, 1, 4, 5)]  # rows that reach EOS greedily
    ids, mask = sampling.pad_batch(prompts, PAD, side="left")
    eager = generate(eos_model, prompts, max_new_tokens=30, eos_id=EOS, pad_id=PAD, temperature=0)
    assert eager.finished.all() and eager.tokens.shape[1] < 30, "the fixture must finish early"
    static = sampling._sample_static(eos_model, ids, mask, 30, EOS, PAD, 0.0, 0, 1.0, None, 1,
                                     compile="static", stop_check_every=every)
    assert_same_generation(eager, static)


def test_compiled_step_equals_eager_loop(eos_model, prompts):
    """torch.compile of the static step (CPU: inductor, C++ codegen) gives the eager tokens,
    sampled with the same generator the same draws (one compilation: ~40 s on a cold cache)."""
    kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.9, top_p=0.9)
    eager = generate(eos_model, prompts, generator=torch.Generator().manual_seed(1), **kw)
    fast = generate(eos_model, prompts, generator=torch.Generator().manual_seed(1), compile=True, **kw)
    assert_same_generation(eager, fast)
