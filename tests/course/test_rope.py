"""Grader for the exercise `rope`: model.apply_rope, rotary position embeddings (Su et al. 2021)
in the "rotate half" layout of HF Llama.

    python -m pytest -q tests/course/test_rope.py

Dimension i and i + hd/2 of a head form one pair, rotated by the angle pos · θ^(-2i/hd):
    out_i        = x_i cos a - x_{i+hd/2} sin a
    out_{i+hd/2} = x_{i+hd/2} cos a + x_i sin a
The expected values are computed here by a loop over the pairs, independently of model.py.
"""

import math

import torch

from model import apply_rope, rope_tables

HD, THETA = 8, 10000.0


def rotate_by_hand(x, positions):
    """x (T, hd) of one head, positions (T,) ints -> x rotated pair by pair, in fp64."""
    T, hd = x.shape
    half = hd // 2
    out = torch.empty(T, hd, dtype=torch.float64)
    for t in range(T):
        for i in range(half):
            a = positions[t] * THETA ** (-2 * i / hd)
            x1, x2 = x[t, i].item(), x[t, i + half].item()
            out[t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[t, i + half] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def tables(positions):
    cos, sin = rope_tables(HD, 32, THETA)
    return cos[positions], sin[positions]


def test_rotates_each_pair_i_and_i_plus_half_by_its_angle():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, HD)
    cos, sin = tables(torch.arange(5))
    got = apply_rope(x, cos[None, None], sin[None, None])
    assert got.shape == x.shape, f"apply_rope must keep the shape {tuple(x.shape)}, got {tuple(got.shape)}"
    torch.testing.assert_close(
        got[0, 0].double(), rotate_by_hand(x[0, 0], list(range(5))), atol=1e-5, rtol=1e-5,
        msg=lambda m: "dimension i and i + hd/2 must rotate together: out_i = x_i cos - x_(i+hd/2) sin, "
                      "out_(i+hd/2) = x_(i+hd/2) cos + x_i sin (the 'rotate half' layout, not adjacent pairs)\n" + m)


def test_position_zero_is_the_identity():
    x = torch.randn(1, 2, 1, HD)
    cos, sin = tables(torch.tensor([0]))
    torch.testing.assert_close(apply_rope(x, cos[None, None], sin[None, None]), x,
                               msg=lambda m: "at position 0 the angle is 0: apply_rope must return x unchanged\n" + m)


def test_per_row_positions_broadcast_over_heads():
    """cos/sin (B, 1, T, hd): each row its own positions (left padding), the same for every head."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, HD)
    positions = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 2]])
    cos, sin = tables(positions)
    got = apply_rope(x, cos[:, None], sin[:, None])
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(
                got[b, h].double(), rotate_by_hand(x[b, h], positions[b].tolist()), atol=1e-5, rtol=1e-5,
                msg=lambda m: f"row {b}, head {h}: each row must be rotated by its own positions\n" + m)


def test_rotation_keeps_the_norm_and_the_dtype():
    torch.manual_seed(2)
    x = torch.randn(1, 1, 6, HD)
    cos, sin = tables(torch.arange(6))
    got = apply_rope(x, cos[None, None], sin[None, None])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1),
                               msg=lambda m: "a rotation keeps each vector's length\n" + m)
    got16 = apply_rope(x.bfloat16(), cos[None, None], sin[None, None])  # the tables stay fp32
    assert got16.dtype == torch.bfloat16, f"apply_rope must return x's dtype (bf16 in, bf16 out), got {got16.dtype}"


def test_scores_depend_only_on_the_relative_position():
    """The point of RoPE: <rope(q, m), rope(k, n)> is a function of m - n."""
    torch.manual_seed(3)
    q, k = torch.randn(HD), torch.randn(HD)

    def score(m, n):
        cq, sq = tables(torch.tensor([m]))
        ck, sk = tables(torch.tensor([n]))
        return (apply_rope(q.view(1, 1, 1, HD), cq, sq) * apply_rope(k.view(1, 1, 1, HD), ck, sk)).sum().item()

    assert abs(score(7, 3) - score(4, 0)) < 1e-4 and abs(score(12, 8) - score(4, 0)) < 1e-4, \
        "q·k after rotation must depend only on the distance between the positions"
    assert abs(score(7, 3) - score(3, 7)) > 1e-4, "positions m - n and n - m must give different scores"
