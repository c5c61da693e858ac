"""The one-step generator of SiD: G_theta(z, c) = D_theta(sigma_init * z, sigma_init, c) with z ~ N(0, I)."""

from __future__ import annotations

import torch
from torch import nn


class OneStepGenerator(nn.Module):
    """Wrap a denoiser ``D(x, sigma, class_labels)`` into a generator of one network evaluation (SiD, sec. 4)."""

    def __init__(self, denoiser: nn.Module, init_sigma: float = 2.5):
        super().__init__()
        self.denoiser = denoiser
        self.init_sigma = float(init_sigma)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((z.shape[0], 1, 1, 1), self.init_sigma, dtype=torch.float32, device=z.device)
        return self.denoiser(self.init_sigma * z.to(torch.float32), sigma, class_labels)
