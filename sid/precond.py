"""EDM preconditioning: turn a raw backbone F(x_in, c_noise, class_labels) into a denoiser D(x, sigma, class_labels).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364, Table 1.
"""

from __future__ import annotations

import torch
from torch import nn


def edm_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for a float32 ``sigma``."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``; coefficients and the combination in float32.

    The backbone itself may run under autocast (bf16); its output is cast back to float32 before mixing.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data

    @property
    def label_dim(self) -> int:
        return int(getattr(getattr(self.backbone, "config", None), "label_dim", 0) or 0)

    @property
    def img_resolution(self) -> int:
        return int(self.backbone.config.img_resolution)

    @property
    def img_channels(self) -> int:
        return int(self.backbone.config.img_channels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        F_x = self.backbone(c_in * x, c_noise.flatten().expand(x.shape[0]), class_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def save_pretrained(self, folder: str) -> None:
        """Write the backbone (config.json + safetensors); ``sid.teachers.load_teacher`` reads it back."""
        self.backbone.save_pretrained(folder)
