"""S4ND-style 2-D state-space mixer (Nguyen et al., arXiv 2210.06583): one bidirectional S4 kernel per image axis,
combined as a separable 2-D kernel K(dy, dx) = k_row(dy) * k_col(dx) per channel and applied with one 2-D FFT.

Unlike a 1-D S4 run over the raster-flattened token grid, the result is translation-equivariant in both directions
and vertical neighbours are as close as horizontal ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .s4 import S4

__all__ = ["S4ND", "axis_kernel", "conv2d_separable", "conv2d_separable_naive"]

# ----------------------------------------------------------------------------
# Separable 2-D convolution: FFT path and naive reference.


def axis_kernel(k: Tensor) -> Tensor:
    """Bidirectional kernels (2, H, n) -> one circular kernel (H, 2n) over offsets -(n-1)..(n-1).

    Offset d >= 0 (input at or before the output) uses k0[d]; offset -m (m >= 1 positions after it) uses k1[m-1],
    stored at index 2n - m. Index n (offset +-n) is never reached by outputs in [0, n).
    """
    return torch.cat([k[0], k[1].flip(-1)], dim=-1)


def conv2d_separable(u: Tensor, k_row: Tensor, k_col: Tensor) -> Tensor:
    """u (B, D, H, W) convolved with K(dy, dx) = k_row(dy) k_col(dx), zero padding, one 2-D FFT of (2H, 2W).

    k_row: (2, D, H) bidirectional kernels along the rows' axis (vertical), k_col: (2, D, W) along columns.
    """
    H, W = u.shape[-2:]
    kh = torch.fft.fft(axis_kernel(k_row), n=2 * H)                                # (D, 2H) complex
    kw = torch.fft.rfft(axis_kernel(k_col), n=2 * W)                               # (D, W+1)
    U = torch.fft.rfft2(u, s=(2 * H, 2 * W))                                       # (B, D, 2H, W+1)
    y = torch.fft.irfft2(U * (kh[:, :, None] * kw[:, None, :]), s=(2 * H, 2 * W))  # (B, D, 2H, 2W)
    return y[..., :H, :W]


def conv2d_separable_naive(u: Tensor, k_row: Tensor, k_col: Tensor) -> Tensor:
    """Reference: y[i, j] = sum_{a, b} K(i - a, j - b) u[a, b] with the full 2-D kernel written out."""
    B, D, H, W = u.shape

    def full(k: Tensor, n: int) -> Tensor:  # (D, n, n): entry [i, a] is the weight of input a for output i
        out = torch.zeros(k.shape[1], n, n, dtype=k.dtype, device=k.device)
        for i in range(n):
            for a in range(n):
                out[:, i, a] = k[0, :, i - a] if a <= i else k[1, :, a - i - 1]
        return out

    Kh, Kw = full(k_row, H), full(k_col, W)                                        # (D, H, H), (D, W, W)
    return torch.einsum("dia,djb,xdab->xdij", Kh, Kw, u)

# ----------------------------------------------------------------------------
# The layer.


class S4ND(S4):
    """2-D S4 mixer: u (B, H*W, d_model) on an (H, W) grid -> separable 2-D SSM convolution + D skip -> GELU ->
    Linear(d, 2d) -> GLU, like :class:`S4` but over the image plane.

    The kernels of both axes come from one S4 core of 2 * d_model channels (channels [0, d) run along the vertical
    axis, [d, 2d) along the horizontal one), so a layer builds them in one call and caches them like S4.
    ``dt`` is drawn in [dt_min, dt_max] = [1 / n, 1] by default for an axis of n tokens, so at initialisation the
    kernels' memory ranges from about one token to the whole axis instead of being mostly global.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,                  # N per axis.
        *,
        grid: tuple[int, int],              # Token grid (H, W) the layer sees; fixes l_max = max(H, W).
        kernel: str = "dplr",               # "dplr" (S4) or "diag" (S4D).
        dt_min: float | None = None,        # None: 1 / max(H, W).
        dt_max: float | None = None,        # None: 1.
        dropout: float = 0.0,               # After GELU.
    ) -> None:
        n = max(grid)
        super().__init__(2 * d_model, d_state, kernel=kernel, bidirectional=True, l_max=n,
                         dt_min=dt_min if dt_min is not None else 1.0 / n,
                         dt_max=dt_max if dt_max is not None else 1.0, readout=False)
        self.d_model_2d, self.grid = d_model, tuple(grid)
        self.D = nn.Parameter(torch.randn(d_model))                                # (d,)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(d_model, 2 * d_model)

    def axis_kernels(self) -> tuple[Tensor, Tensor]:
        """(k_row (2, d, H), k_col (2, d, W)), fp32, from the cached core kernel."""
        H, W = self.grid
        d = self.d_model_2d
        k = self.cached_kernel(max(H, W))                                          # (2, 2d, n)
        return k[:, :d, :H], k[:, d:, :W]

    def forward(self, u: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """u (B, H*W, d_model), tokens in row-major order -> (B, H*W, d_model), in u's dtype."""
        H, W = self.grid
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"S4ND was built for the token grid {self.grid}, got {tuple(grid)}")
        if u.ndim != 3 or u.shape[1] != H * W or u.shape[2] != self.d_model_2d:
            raise ValueError(f"S4ND expects input (batch, {H * W}, {self.d_model_2d}), got {tuple(u.shape)}")
        B = u.shape[0]
        with torch.autocast(device_type=u.device.type, enabled=False):
            k_row, k_col = self.axis_kernels()
            x = u.to(k_row.dtype).transpose(1, 2).reshape(B, -1, H, W)             # (B, d, H, W)
            y = conv2d_separable(x, k_row, k_col) + self.D.to(x.dtype)[:, None, None] * x
        y = y.reshape(B, -1, H * W).transpose(1, 2)                                # (B, L, d)
        y = self.dropout(F.gelu(y))
        return F.glu(self.out_proj(y.to(self.out_proj.weight.dtype)), dim=-1).to(u.dtype)
