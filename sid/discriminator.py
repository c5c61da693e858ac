"""SiDA's discriminator: the fake score's own encoder (Zhou et al., ICLR 2025, arXiv 2410.14919; docs/design.md
section 11).

:class:`SiDAFakeScore` wraps a fake-score denoiser. Called plainly it is that denoiser; called with
``return_logits=True`` it also returns one logit map per sample, read from the middle of the same forward pass by a
forward hook, so the backbones stay untouched (``backbones/`` knows nothing about distillation):

- sid ``HybridDenoiser``: the token sequence (B, L, d_model) after the middle block ``blocks[(depth - 1) // 2]``,
  through a linear head: one logit per token, (B, L).
- EDM ``SongUNet`` / ``DhariwalUNet``: the output of the encoder (its last non-auxiliary module), (B, C', h, w),
  averaged over channels as the official SiDA code does for EDM2 networks: (B, h * w).
- diffusers ``UNet2DModel``: the output of ``mid_block``, (B, C', h, w), averaged over channels: (B, h * w).

The head (HybridDenoiser only) is zero-initialised: every logit starts at 0, i.e. D = 1/2 for every input. It is a
parameter of the fake score, trained in the fake-score phase with it and frozen with it in the generator phase.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import UserError


def encoder_site(denoiser: nn.Module) -> tuple[nn.Module, int | None, str]:
    """(module whose output is the encoder's features, token width for a linear head or None, description)."""
    backbone = getattr(denoiser, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and hasattr(backbone, "config"):
        i = (len(blocks) - 1) // 2
        return blocks[i], int(backbone.config.d_model), f"HybridDenoiser blocks[{i}] of {len(blocks)} (tokens)"
    enc = getattr(getattr(denoiser, "model", None), "enc", None)
    if isinstance(enc, nn.ModuleDict) and len(enc) > 0:
        name = [k for k in enc.keys() if "aux" not in k][-1]
        return enc[name], None, f"{type(denoiser.model).__name__} enc.{name} (channel mean)"
    mid = getattr(getattr(denoiser, "unet", None), "mid_block", None)
    if isinstance(mid, nn.Module):
        return mid, None, "UNet2DModel mid_block (channel mean)"
    raise UserError(f"SiDA needs the fake score's encoder as discriminator, but a {type(denoiser).__name__} has no "
                    "known encoder site; expected a sid HybridDenoiser, an EDM SongUNet/DhariwalUNet or a diffusers "
                    "UNet2DModel")


class SiDAFakeScore(nn.Module):
    """A fake score ``D(x, sigma, class_labels)`` with SiDA's discriminator logits on request.

    Args:
        denoiser: the fake-score network (a copy of the teacher).
    """

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        site, width, self.site_description = encoder_site(denoiser)
        self.head = nn.Linear(width, 1) if width is not None else None
        if self.head is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self._capture = False
        self._features: torch.Tensor | None = None
        site.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if self._capture:
            self._features = output[0] if isinstance(output, tuple) else output

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    @property
    def img_resolution(self) -> int:
        return self.denoiser.img_resolution

    @property
    def img_channels(self) -> int:
        return self.denoiser.img_channels

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The logit map (B, N) of encoder features: tokens (B, L, D) through the head, maps (B, C, h, w) averaged
        over channels."""
        if self.head is not None:
            return self.head(features).squeeze(-1).to(torch.float32)  # (B, L)
        return features.to(torch.float32).mean(1).flatten(1)  # (B, h * w)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None,
                return_logits: bool = False):
        """``D_x`` or, with ``return_logits``, ``(D_x, logits)`` from one forward pass."""
        if not return_logits:
            return self.denoiser(x, sigma, class_labels)
        self._capture, self._features = True, None
        try:
            D_x = self.denoiser(x, sigma, class_labels)
        finally:
            self._capture = False
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError(f"the encoder site ({self.site_description}) did not run in the forward pass")
        return D_x, self.logits(features)
