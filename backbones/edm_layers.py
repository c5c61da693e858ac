"""Layers of NVIDIA's EDM networks (Karras et al. 2022, arXiv 2206.00364, Appendix F), written for sid.

Parameter and buffer names follow the layout of EDM's snapshot files (``weight``, ``bias``, ``resample_filter``,
``freqs``, ``norm0`` ... ``proj``), so the tensors of a ``network-snapshot-*.pkl`` load into these modules by name.
Networks only: no noise levels here (the preconditioners live in ``sid/precond.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding"]

# ----------------------------------------------------------------------------
# Initialisation: EDM's four modes, each scaled by fan-in / fan-out.


def weight_init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A random tensor of ``shape`` for ``mode`` in xavier_uniform | xavier_normal | kaiming_uniform |
    kaiming_normal."""
    uniform = torch.rand(*shape) * 2 - 1
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * uniform
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * uniform
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init mode {mode!r}")


# ----------------------------------------------------------------------------
# Fully connected, convolution with optional 2x resampling, group norm.


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",  # see weight_init
        init_weight: float = 1.0,  # scale of the initial weight
        init_bias: float = 0.0,  # scale of the initial bias
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def resample_kernel(taps: list[float]) -> torch.Tensor:
    """Separable FIR kernel (1, 1, k, k) from 1-D taps, normalised to sum 1: [1,1] is a box, [1,3,3,1] a binomial."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """Convolution (``kernel`` 0 = none) with optional 2x up- or downsampling by a fixed FIR filter.

    Unfused: resample first, then convolve. Fused (EDM's residual encoder path): convolve with extra padding, then
    downsample, or upsample then convolve without padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,  # square kernel size; 0 = resampling only
        bias: bool = True,
        up: bool = False,  # 2x upsampling
        down: bool = False,  # 2x downsampling
        resample_filter: list[float] = (1, 1),  # 1-D taps of the resampling filter
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", resample_kernel(list(resample_filter)) if up or down else None)

    def _resample(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        C = x.shape[1]
        if self.up:
            # Transposed convolution, gain 4 to keep the mean (each output pixel gets a quarter of the taps).
            return F.conv_transpose2d(x, (f * 4).tile(C, 1, 1, 1), groups=C, stride=2, padding=padding)
        return F.conv2d(x, f.tile(C, 1, 1, 1), groups=C, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and w is not None and self.up:
            x = F.conv2d(self._resample(x, w_pad + f_pad), w)
        elif self.fused_resample and w is not None and self.down:
            x = self._resample(F.conv2d(x, w, padding=w_pad + f_pad), 0)
        else:
            if self.up or self.down:
                x = self._resample(x, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group norm with at most ``num_groups`` groups and at least ``min_channels_per_group`` channels each."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


# ----------------------------------------------------------------------------
# Noise-level embeddings: positional (DDPM++, ADM) and random Fourier features (NCSN++).


class PositionalEmbedding(nn.Module):
    """``[cos(x w_i), sin(x w_i)]`` with ``w_i = max_positions ** (-i / (n/2 - endpoint))``, i < n/2."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (i / (half - (1 if self.endpoint else 0)))
        angles = torch.outer(x, freqs.to(x.dtype))  # (B, n/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, n)


class FourierEmbedding(nn.Module):
    """``[cos(2 pi x f_i), sin(2 pi x f_i)]`` with fixed random ``f_i ~ N(0, scale^2)`` (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))  # (B, n/2)
        return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, n)


# ----------------------------------------------------------------------------
# The U-Net block shared by DDPM++, NCSN++ and ADM: residual conv pair, noise conditioning, optional attention.


class UNetBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,  # width of the conditioning vector
        up: bool = False,
        down: bool = False,
        attention: bool = False,  # self-attention after the residual part
        num_heads: int | None = None,  # None = out_channels // channels_per_head
        channels_per_head: int = 64,
        dropout: float = 0.0,  # before the second convolution
        skip_scale: float = 1.0,  # multiplies the residual sum (DDPM++/NCSN++: sqrt(1/2))
        eps: float = 1e-5,  # group norm epsilon
        resample_filter: list[float] = (1, 1),
        resample_proj: bool = False,  # 1x1 projection on the resampled skip path
        adaptive_scale: bool = True,  # conditioning as scale and shift (ADM) or as an added bias (DDPM++)
        init: dict | None = None,  # init kwargs of the convolutions and the affine map
        init_zero: dict | None = None,  # init kwargs of the last convolution (near zero)
        init_attn: dict | None = None,  # init kwargs of qkv; None = init
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else (num_heads if num_heads is not None
                                                  else out_channels // channels_per_head)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Residual part with the conditioning between the two convolutions.
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)  # (B, C or 2C, 1, 1)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels; the qkv channels are laid out (head, channel, q/k/v)."""
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B * self.num_heads, C // self.num_heads, 3, H * W)
        q, k, v = qkv.unbind(2)  # (B * heads, C / heads, H * W) each
        # Softmax of the logits in float32 (or float64) whatever the autocast dtype.
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = torch.einsum("ncq,nck->nqk", q.to(dtype), k.to(dtype)) / math.sqrt(k.shape[1])
            w = logits.softmax(dim=2)  # (B * heads, HW queries, HW keys)
        out = torch.einsum("nqk,nck->ncq", w.to(v.dtype), v)
        return out.reshape(B, C, H, W)
