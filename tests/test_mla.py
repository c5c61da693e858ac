"""MLA and MHA: fast paths against naive einsum references, absorption, shared rope key, axial 2-D RoPE."""

import pytest
import torch

from backbones.mla import MHA, MLA, apply_rope, axial_rope_angles, mha_reference, mla_reference

GRID = (3, 4)
L = GRID[0] * GRID[1]


def make_mla(q_lora_rank=None, v_head_dim=6, seed=0):
    torch.manual_seed(seed)
    m = MLA(48, 3, kv_lora_rank=20, q_lora_rank=q_lora_rank, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=v_head_dim)
    m = m.double()
    # Non-trivial norm gains and output bias so that every weight is exercised.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return m


def forward_and_grads(m, x, fn):
    """Output, input gradient and all weight gradients of a fixed random linear functional of fn(x)."""
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


def assert_same(a, b, tol=1e-12):
    ya, xa, wa = a
    yb, xb, wb = b
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    torch.testing.assert_close(xa, xb, atol=tol, rtol=tol)
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], atol=tol, rtol=tol, msg=n)

# ----------------------------------------------------------------------------
# MLA.


# v_head_dim 6 < 16 = qk head dim, 16 = qk, 24 > qk: all three ways of matching head dims for fused SDPA.
@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(None, 6), (16, 6), (16, 16), (None, 24)])
def test_mla_absorbed_equals_plain(q_lora_rank, v_head_dim):
    m = make_mla(q_lora_rank, v_head_dim)
    x = torch.randn(2, L, 48, dtype=torch.float64)
    plain = forward_and_grads(m, x, lambda x: m(x, GRID))
    absorbed = forward_and_grads(m, x, lambda x: m(x, GRID, absorb=True))
    assert plain[0].abs().max() > 0.1
    assert_same(plain, absorbed)


@pytest.mark.parametrize("q_lora_rank, v_head_dim", [(None, 6), (16, 6), (16, 16), (None, 24)])
def test_mla_matches_naive_reference(q_lora_rank, v_head_dim):
    m = make_mla(q_lora_rank, v_head_dim)
    x = torch.randn(2, L, 48, dtype=torch.float64)
    fast = forward_and_grads(m, x, lambda x: m(x, GRID))
    assert_same(fast, forward_and_grads(m, x, lambda x: mla_reference(m, x, GRID)))


def test_mla_rope_key_is_shared():
    m = make_mla(16)
    r, rope, h, nope = m.kv_lora_rank, m.qk_rope_head_dim, m.n_heads, m.qk_nope_head_dim
    # One projection from h to [c_kv; k_r]: the rope key has rope dims, not h * rope.
    assert m.wkv_a.weight.shape == (r + rope, 48)
    assert m.wq_b.weight.shape == (h * (nope + rope), 16)
    assert m.latent_size_per_token == r + rope == 28
    q_c, q_r, c_kv, k_r = m.project(torch.randn(2, L, 48, dtype=torch.float64), GRID)
    assert q_r.shape == (2, h, L, rope) and k_r.shape == (2, 1, L, rope) and c_kv.shape == (2, L, r)
    assert MHA(48, 3).latent_size_per_token == 96


def test_mla_positions_matter():
    m = make_mla(16)
    x = torch.randn(2, L, 48, dtype=torch.float64)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3))
    y = m(x, GRID)
    # With RoPE, permuting the tokens does not simply permute the outputs, and the grid shape matters.
    assert (m(x[:, perm], GRID) - y[:, perm]).abs().max() > 1e-3
    assert (m(x, (4, 3)) - y).abs().max() > 1e-3
    # Without the rope dims (zero W_qr and W_kr) attention is exactly permutation-equivariant.
    with torch.no_grad():
        m.wq_b.weight.view(m.n_heads, -1, 16)[:, m.qk_nope_head_dim:].zero_()
        m.wkv_a.weight[m.kv_lora_rank:].zero_()
    torch.testing.assert_close(m(x[:, perm], GRID), m(x, GRID)[:, perm], atol=1e-12, rtol=1e-12)


def test_bad_grid_and_rope_dim():
    m = make_mla()
    with pytest.raises(ValueError, match="H \\* W = L"):
        m(torch.randn(1, L, 48, dtype=torch.float64), (3, 5))
    with pytest.raises(ValueError, match="H \\* W = L"):
        MHA(48, 3).double()(torch.randn(1, L, 48, dtype=torch.float64), (2, 5))
    with pytest.raises(ValueError, match="divisible by 4"):
        MLA(48, 3, kv_lora_rank=20, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=6)
    with pytest.raises(ValueError, match="divisible by 4"):
        MHA(40, 4)


def test_mla_bf16_autocast_runs():
    m = make_mla(16).float()
    x = torch.randn(2, L, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x, GRID)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), m(x, GRID), atol=0.1, rtol=0.1)

# ----------------------------------------------------------------------------
# RoPE.


def test_rope_is_rotation_and_relative():
    grid, R = (5, 6), 16
    angles = axial_rope_angles(grid, R, dtype=torch.float64)
    n = grid[0] * grid[1]
    x = torch.randn(n, R, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, angles).norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)

    # The same q at every position and the same k at every position: scores depend on (dr, dc) only.
    q = torch.randn(R, dtype=torch.float64).expand(n, R)
    k = torch.randn(R, dtype=torch.float64).expand(n, R)
    s = (apply_rope(q, angles) @ apply_rope(k, angles).T).view(*grid, *grid)         # (r1, c1, r2, c2)
    torch.testing.assert_close(s[0, 0, 2, 3], s[2, 2, 4, 5], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s[1, 4, 0, 1], s[4, 5, 3, 2], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(s[3, 3, 3, 3], s[0, 1, 0, 1], atol=1e-12, rtol=1e-12)
    # ... and both axes matter.
    assert (s[0, 0, 0, 1] - s[0, 0, 1, 0]).abs() > 1e-3
    assert (s[0, 0, 0, 0] - s[0, 0, 1, 0]).abs() > 1e-3
    # Row-major: token index = row * W + col, rows turn the first half of the pairs.
    assert angles[1, 0] == 0 and angles[1, R // 4] == 1 and angles[grid[1], 0] == 1 and angles[grid[1], R // 4] == 0

# ----------------------------------------------------------------------------
# MHA.


def test_mha_matches_naive_reference():
    torch.manual_seed(0)
    m = MHA(48, 3).double()
    with torch.no_grad():
        m.qkv.bias.normal_()
        m.wo.bias.normal_()
    x = torch.randn(2, L, 48, dtype=torch.float64)
    fast = forward_and_grads(m, x, lambda x: m(x, GRID))
    assert_same(fast, forward_and_grads(m, x, lambda x: mha_reference(m, x, GRID)))
