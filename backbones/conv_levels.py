"""Convolutional U-Net levels around the token blocks (HybridDenoiser ``conv_channels``).

The token blocks (S4, S4ND, MLA) then run at a coarse grid only, where global mixing is cheap and pays, while
residual 3x3 convolutions at full and half resolution give the strong local bias images need. This is the split of
"simple diffusion" (Hoogeboom et al. 2023, U-ViT: convolutions at high resolution, transformer blocks at 16x16) and
of DiffuSSM / DiS-style U-shaped SSM denoisers; the skip at every level is concatenated, as in DDPM's U-Net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvResBlock", "ConvEncoder", "ConvDecoder", "group_count"]


def group_count(channels: int) -> int:
    """GroupNorm groups for a width: at most 8 groups, at least 4 channels per group."""
    for g in (8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


class ConvResBlock(nn.Module):
    """GN -> SiLU -> conv3x3 -> GN * (1 + scale) + shift -> SiLU -> conv3x3, plus the input (1x1 conv when the
    width changes). scale and shift come from the conditioning vector c; the second conv is zero-initialised, so
    the block starts as its skip path."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(group_count(in_channels), in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(cond_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(group_count(out_channels), out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        for layer in (self.conv2, self.affine):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """x (B, in, H, W), c (B, cond_dim) -> (B, out, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(F.silu(c)).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.conv2(F.silu(h))
        return h + (self.skip(x) if self.skip is not None else x)


class ConvEncoder(nn.Module):
    """conv3x3 in, then per level: ``blocks`` ConvResBlocks (each output kept as a skip) and a stride-2 3x3 conv.

    Level i runs at resolution R / 2**i with ``channels[i]`` channels; the output is at R / 2**len(channels) with
    ``channels[-1]`` channels.
    """

    def __init__(self, img_channels: int, channels: tuple[int, ...], blocks: int, cond_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(img_channels, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        cur = channels[0]
        for ch in channels:
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ConvResBlock(cur, ch, cond_dim))
                cur = ch
            self.levels.append(level)
            self.downs.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
        self.out_channels = cur

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor]]:
        h = self.conv_in(x)
        skips = []
        for level, down in zip(self.levels, self.downs):
            for block in level:
                h = block(h, c)
                skips.append(h)
            h = down(h)
        return h, skips


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: per level (coarsest first) nearest x2 upsampling + conv3x3, then ``blocks``
    ConvResBlocks on [h, skip] concatenated; GN -> SiLU -> zero-initialised conv3x3 out to ``out_channels``."""

    def __init__(self, out_channels: int, channels: tuple[int, ...], blocks: int, cond_dim: int):
        super().__init__()
        self.ups = nn.ModuleList()
        self.levels = nn.ModuleList()
        cur = channels[-1]
        for ch in reversed(channels):
            self.ups.append(nn.Conv2d(cur, cur, 3, padding=1))
            level = nn.ModuleList()
            for _ in range(blocks):
                level.append(ConvResBlock(cur + ch, ch, cond_dim))
                cur = ch
            self.levels.append(level)
        self.norm_out = nn.GroupNorm(group_count(cur), cur, eps=1e-6)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h: Tensor, skips: list[Tensor], c: Tensor) -> Tensor:
        skips = list(skips)
        for up, level in zip(self.ups, self.levels):
            h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            for block in level:
                h = block(torch.cat([h, skips.pop()], dim=1), c)
        return self.conv_out(F.silu(self.norm_out(h)))
