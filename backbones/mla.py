"""Multi-head latent attention (MLA, DeepSeek-V2 arXiv 2405.04434, eqs 9-19) with axial 2-D RoPE over a token grid,
a standard multi-head attention baseline, and naive einsum references for both."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "axial_rope_angles", "apply_rope", "MLA", "MHA", "naive_attention", "mla_reference",
           "mha_reference"]

# ----------------------------------------------------------------------------
# Helpers.


def _angle_dtype(x: torch.Tensor) -> torch.dtype:
    # Angles and their sin/cos in at least fp32, in fp64 for fp64 inputs.
    return torch.promote_types(x.dtype, torch.float32)


def _check_grid(grid: tuple[int, int] | list[int], L: int) -> tuple[int, int]:
    if len(grid) != 2:
        raise ValueError(f"grid must be (H, W), got {tuple(grid)}.")
    H, W = int(grid[0]), int(grid[1])
    if H * W != L:
        raise ValueError(f"grid {H}x{W} has {H * W} positions but the sequence has L = {L} tokens; expected H * W = L.")
    return H, W


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # Fused attention kernels (flash on CPU and CUDA) need equal q/k and v head dims, else SDPA falls back to the
    # math path that stores the (L, L) attention matrix. Zero-padding v (or q and k) changes nothing numerically.
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk == dv:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if dv < dqk:
        return F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), scale=scale)[..., :dv]
    return F.scaled_dot_product_attention(F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk)), v, scale=scale)


class RMSNorm(nn.Module):
    """Root-mean-square normalization with a learned gain, computed in at least fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = x.to(dtype)
        y = y * torch.rsqrt(y.square().mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dtype)).to(x.dtype)

# ----------------------------------------------------------------------------
# Axial 2-D rotary position embedding. Dimensions are rotated in adjacent pairs; the first half of the pairs turns
# with the row index, the second half with the column index. Tokens are in row-major order (index = row * W + col).
# Base 100 rather than 10000 suits short image axes (RoPE-Mixed, Heo et al. 2024, uses 100 for axial RoPE).


def axial_rope_angles(grid: tuple[int, int], rope_dim: int, base: float = 100.0, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rotation angles (H*W, rope_dim // 2) for an (H, W) grid; rope_dim must be divisible by 4."""
    if rope_dim % 4 != 0 or rope_dim <= 0:
        raise ValueError(f"axial 2-D RoPE needs a rope dimension divisible by 4, got {rope_dim}.")
    H, W = int(grid[0]), int(grid[1])
    n = rope_dim // 4
    freqs = base ** (-torch.arange(n, device=device, dtype=dtype) / n)                          # (n,)
    rows = torch.arange(H, device=device, dtype=dtype).repeat_interleave(W)                     # (L,)
    cols = torch.arange(W, device=device, dtype=dtype).repeat(H)                                # (L,)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)                    # (L, rope_dim/2)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dimension of x (..., L, R) by angles (L, R/2)."""
    cos = angles.cos().to(x.dtype)
    sin = angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]                                                         # (..., L, R/2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)          # (..., L, R)

# ----------------------------------------------------------------------------
# Multi-head latent attention (DeepSeek-V2 section 2.1). Projections carry no bias so that absorption is exact.


class MLA(nn.Module):
    """Non-causal multi-head latent attention with decoupled axial 2-D RoPE.

    Keys and values are reconstructed from a per-token latent ``c_kv`` of size ``kv_lora_rank``; position enters
    only through ``qk_rope_head_dim`` extra query dims per head and ONE rope key shared by all heads.
    ``forward(x, grid, absorb=True)`` folds ``W_uk`` into the queries and ``W_uv`` into the output projection and
    attends over ``[c_kv; k_r]`` directly; it gives the same output as the plain path.
    """

    def __init__(
        self,
        d_model: int,                       # Model width d.
        n_heads: int,                       # Number of attention heads n_h.
        *,
        kv_lora_rank: int,                  # KV compression dim d_c.
        q_lora_rank: int | None = None,     # Query compression dim d_c'; None = no query compression (V2-Lite).
        qk_nope_head_dim: int,              # Per-head query/key dims without position, d_h.
        qk_rope_head_dim: int,              # Per-head decoupled RoPE dims d_h^R (divisible by 4).
        v_head_dim: int,                    # Per-head value dims.
        rope_base: float = 100.0,           # RoPE frequency base.
    ):
        super().__init__()
        if qk_rope_head_dim % 4 != 0 or qk_rope_head_dim <= 0:
            raise ValueError(f"qk_rope_head_dim must be positive and divisible by 4 for axial 2-D RoPE, "
                             f"got {qk_rope_head_dim}.")
        self.d_model, self.n_heads = d_model, n_heads
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_base = rope_base
        self.scale = 1.0 / math.sqrt(qk_nope_head_dim + qk_rope_head_dim)
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim

        # Queries: q_c = W_uq c_q (eq 13) and q_r = RoPE(W_qr c_q) (eq 14), one fused matrix [W_uq; W_qr].
        if q_lora_rank is None:
            self.wq = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)                 # W_dq (eq 12)
            self.q_norm = RMSNorm(q_lora_rank)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        # Keys/values: c_kv = W_dkv h (eq 9) and k_r = RoPE(W_kr h) (eq 15), one fused matrix [W_dkv; W_kr].
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.w_uk = nn.Linear(kv_lora_rank, n_heads * qk_nope_head_dim, bias=False)  # W_uk (eq 10)
        self.w_uv = nn.Linear(kv_lora_rank, n_heads * v_head_dim, bias=False)        # W_uv (eq 11)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model)                           # W_o (eq 19)

    @property
    def latent_size_per_token(self) -> int:
        """Numbers per token a cache would keep: the latent c_kv plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def project(self, x: torch.Tensor, grid: tuple[int, int]):
        """Return per-head query parts, the normalized latent and the shared rope key (plain tensors, for tests).

        q_c (B, h, L, nope), q_r (B, h, L, rope), c_kv (B, L, kv_lora_rank), k_r (B, 1, L, rope).
        """
        B, L, _ = x.shape
        H, W = _check_grid(grid, L)
        h, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        angles = axial_rope_angles((H, W), rope, self.rope_base, x.device, _angle_dtype(x))  # (L, rope/2)

        # Queries, optionally through the compressed c_q.
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, L, h, nope + rope).transpose(1, 2)                                # (B, h, L, nope+rope)
        q_c, q_r = q.split([nope, rope], dim=-1)
        q_r = apply_rope(q_r, angles)                                                   # eq 14

        # Latent and the one rope key shared by all heads.
        c_kv, k_r = self.wkv_a(x).split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_norm(c_kv)                                                       # (B, L, d_c)
        k_r = apply_rope(k_r[:, None], angles)                                          # (B, 1, L, rope), eq 15
        return q_c, q_r, c_kv, k_r

    def forward(self, x: torch.Tensor, grid: tuple[int, int], absorb: bool = False) -> torch.Tensor:
        """x (B, L, d_model) with tokens of an (H, W) grid in row-major order -> (B, L, d_model)."""
        B, L, _ = x.shape
        h, nope, rope, dv = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        r = self.kv_lora_rank
        q_c, q_r, c_kv, k_r = self.project(x, grid)

        if not absorb:
            # Plain form: reconstruct per-head keys and values from the latent (eqs 10, 11, 16-18).
            k_c = self.w_uk(c_kv).view(B, L, h, nope).transpose(1, 2)                   # (B, h, L, nope)
            v = self.w_uv(c_kv).view(B, L, h, dv).transpose(1, 2)                       # (B, h, L, dv)
            q = torch.cat([q_c, q_r], dim=-1)                                           # (B, h, L, nope+rope)
            k = torch.cat([k_c, k_r.expand(B, h, L, rope)], dim=-1)                     # (B, h, L, nope+rope)
            o = _sdpa(q, k, v, self.scale)                                              # (B, h, L, dv)
            return self.wo(o.transpose(1, 2).reshape(B, L, h * dv))

        # Absorbed form: q_c^T W_uk c_kv = (W_uk^T q_c)^T c_kv, so attend in latent space.
        w_uk = self.w_uk.weight.view(h, nope, r)
        q_lat = torch.einsum("bhln,hnr->bhlr", q_c, w_uk)                               # (B, h, L, d_c)
        q = torch.cat([q_lat, q_r], dim=-1)                                             # (B, h, L, d_c+rope)
        k = torch.cat([c_kv[:, None], k_r], dim=-1).expand(B, h, L, r + rope)           # (B, h, L, d_c+rope)
        o_lat = _sdpa(q, k, c_kv[:, None].expand(B, h, L, r), self.scale)              # (B, h, L, d_c)
        # W_o W_uv folded into one (d_model, h * d_c) matrix.
        w_ov = torch.einsum("dhv,hvr->dhr", self.wo.weight.view(-1, h, dv), self.w_uv.weight.view(h, dv, r))
        return F.linear(o_lat.transpose(1, 2).reshape(B, L, h * r), w_ov.reshape(-1, h * r), self.wo.bias)

# ----------------------------------------------------------------------------
# Standard multi-head attention baseline with the same axial RoPE (over the whole head dim).


class MHA(nn.Module):
    """Non-causal multi-head attention: fused qkv projection, axial 2-D RoPE on q and k, SDPA, output projection."""

    def __init__(
        self,
        d_model: int,                       # Model width d.
        n_heads: int,                       # Number of heads; head_dim = d_model / n_heads, divisible by 4.
        *,
        rope_base: float = 100.0,           # RoPE frequency base.
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}.")
        head_dim = d_model // n_heads
        if head_dim % 4 != 0:
            raise ValueError(f"MHA head_dim = d_model / n_heads = {head_dim} must be divisible by 4 for axial RoPE.")
        self.d_model, self.n_heads, self.head_dim, self.rope_base = d_model, n_heads, head_dim, rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.wo = nn.Linear(d_model, d_model)

    @property
    def latent_size_per_token(self) -> int:
        """Numbers per token a KV cache would keep: K and V of all heads."""
        return 2 * self.d_model

    def project(self, x: torch.Tensor, grid: tuple[int, int]):
        """Return rotated q, k and v, each (B, h, L, head_dim)."""
        B, L, _ = x.shape
        H, W = _check_grid(grid, L)
        angles = axial_rope_angles((H, W), self.head_dim, self.rope_base, x.device, _angle_dtype(x))
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(q, angles), apply_rope(k, angles), v

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, L, d_model) with tokens of an (H, W) grid in row-major order -> (B, L, d_model)."""
        B, L, _ = x.shape
        q, k, v = self.project(x, grid)
        o = F.scaled_dot_product_attention(q, k, v)                                     # (B, h, L, head_dim)
        return self.wo(o.transpose(1, 2).reshape(B, L, self.d_model))

# ----------------------------------------------------------------------------
# Naive references: explicit einsum softmax attention from the raw weights, for tests.


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with explicit einsums; q, k (..., L, d), v (..., L, dv)."""
    s = torch.einsum("...id,...jd->...ij", q, k) * scale
    return torch.einsum("...ij,...jd->...id", s.softmax(dim=-1), v)


def mla_reference(m: MLA, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MLA output computed term by term (eqs 9-19) from m's weights, per head, without SDPA or fused layouts."""
    B, L, _ = x.shape
    H, W = _check_grid(grid, L)
    h, nope, rope, dv, r = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    angles = axial_rope_angles((H, W), rope, m.rope_base, x.device, _angle_dtype(x))

    def rms(z, norm):
        return z * torch.rsqrt(z.square().mean(-1, keepdim=True) + norm.eps) * norm.weight

    # Query weights per head: W_uq (h, nope, in) and W_qr (h, rope, in).
    w_q = (m.wq if m.q_lora_rank is None else m.wq_b).weight.view(h, nope + rope, -1)
    src = x if m.q_lora_rank is None else rms(torch.einsum("bld,cd->blc", x, m.wq_a.weight), m.q_norm)
    q_c = torch.einsum("blc,hnc->bhln", src, w_q[:, :nope])
    q_r = apply_rope(torch.einsum("blc,hnc->bhln", src, w_q[:, nope:]), angles)
    # Latent, keys and values.
    w_dkv, w_kr = m.wkv_a.weight[:r], m.wkv_a.weight[r:]
    c_kv = rms(torch.einsum("bld,rd->blr", x, w_dkv), m.kv_norm)
    k_r = apply_rope(torch.einsum("bld,nd->bln", x, w_kr), angles)                      # (B, L, rope) shared
    k_c = torch.einsum("blr,hnr->bhln", c_kv, m.w_uk.weight.view(h, nope, r))
    v = torch.einsum("blr,hvr->bhlv", c_kv, m.w_uv.weight.view(h, dv, r))
    # Scores per head, softmax over keys, output projection.
    s = (torch.einsum("bhin,bhjn->bhij", q_c, k_c) + torch.einsum("bhin,bjn->bhij", q_r, k_r)) * m.scale
    o = torch.einsum("bhij,bhjv->bihv", s.softmax(dim=-1), v).reshape(B, L, h * dv)
    return torch.einsum("blk,dk->bld", o, m.wo.weight) + m.wo.bias


def mha_reference(m: MHA, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MHA output with explicit per-head einsums from m's weights."""
    B, L, _ = x.shape
    H, W = _check_grid(grid, L)
    h, dh = m.n_heads, m.head_dim
    angles = axial_rope_angles((H, W), dh, m.rope_base, x.device, _angle_dtype(x))
    w = m.qkv.weight.view(3, h, dh, -1)
    b = m.qkv.bias.view(3, h, 1, dh)
    q, k, v = (torch.einsum("bld,hnd->bhln", x, w[i]) + b[i] for i in range(3))
    o = naive_attention(apply_rope(q, angles), apply_rope(k, angles), v, 1.0 / math.sqrt(dh))
    return torch.einsum("bhlv,dhv->bld", o, m.wo.weight.view(-1, h, dh)) + m.wo.bias
