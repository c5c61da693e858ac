"""EDM preconditioning: turn a raw backbone F(x_in, c_noise, class_labels) into a denoiser D(x, sigma, class_labels).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364, Table 1.
:class:`EDMPrecond` wraps sid's own backbones; the ``*Precond`` classes below it wrap EDM's networks
(``backbones.edm_unets``) for teachers read from EDM snapshot files (docs/design.md section 10).
"""

from __future__ import annotations

import contextlib
import math

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
        """Write the backbone (config.json + safetensors) and the preconditioning (``PRECOND_FILE``:
        ``{"precond": "EDMPrecond", "sigma_data": ...}``); ``sid.teachers.load_teacher`` reads both back."""
        import json
        import os

        self.backbone.save_pretrained(folder)
        with open(os.path.join(folder, PRECOND_FILE), "w") as fh:
            json.dump({"precond": "EDMPrecond", "sigma_data": float(self.sigma_data)}, fh, indent=2)


PRECOND_FILE = "sid_precond.json"  # next to a sid denoiser's config.json; folders without it have sigma_data 0.5


# ----------------------------------------------------------------------------
# Preconditioners of EDM's own networks (backbones.edm_unets): EDM, VP, VE and iDDPM columns of EDM Table 1.
# They hold the network as ``model`` (the name in EDM's snapshot files), take INTEGER class labels and feed the
# network one-hot vectors (plus zero augmentation labels when it has them). ``use_fp16`` runs the network under
# fp16 autocast on CUDA; elsewhere it runs in float32 (or under whatever autocast the caller set).


class EDMNetworkPrecond(nn.Module):
    """Base of the EDM-network preconditioners: ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``.

    Subclasses give ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)``. ``init_kwargs`` are EDM's constructor
    keywords of the preconditioner (img_resolution, img_channels, label_dim, use_fp16, model_type, its own constants
    and the network's keywords); ``sid.teachers`` saves them next to the weights.
    """

    def __init__(self, model: nn.Module, *, img_resolution: int, img_channels: int, label_dim: int = 0,
                 use_fp16: bool = False, init_kwargs: dict | None = None):
        super().__init__()
        self.model = model
        self.img_resolution, self.img_channels, self.label_dim = int(img_resolution), int(img_channels), int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.init_kwargs = dict(init_kwargs or {})
        self.augment_dim = int(getattr(getattr(model, "map_augment", None), "in_features", 0) or 0)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def one_hot(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        """(B, label_dim) float32 label vectors: one-hot of integer labels, zeros for None (EDM's convention)."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        if class_labels.ndim == 2:  # already vectors
            return class_labels.to(device=device, dtype=torch.float32)
        return nn.functional.one_hot(class_labels.to(device).long().reshape(-1), self.label_dim).to(torch.float32)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        x = x.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        labels = self.one_hot(class_labels, B, x.device)
        augment = torch.zeros(B, self.augment_dim, device=x.device) if self.augment_dim else None
        fp16 = self.use_fp16 and x.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=True) if fp16 else contextlib.nullcontext():
            F_x = self.model(c_in * x, c_noise.flatten().expand(B), labels, augment)
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def save_pretrained(self, folder: str) -> None:
        """Write config.json (preconditioner + init_kwargs) and safetensors; ``sid.teachers.load_teacher`` reads it."""
        from .teachers.edm import save_folder

        save_folder(self, folder)


class EDMNetPrecond(EDMNetworkPrecond):
    """EDM column (EDM's ``EDMPrecond`` for its own networks); same formulas as :class:`EDMPrecond`."""

    def __init__(self, model, *, sigma_min: float = 0.0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 **kwargs):
        super().__init__(model, **kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def coefficients(self, sigma):
        return edm_coefficients(sigma, self.sigma_data)


class VPPrecond(EDMNetworkPrecond):
    """VP column: ``c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) t(sigma)`` with the VP
    schedule ``sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``."""

    def __init__(self, model, *, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 **kwargs):
        super().__init__(model, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(torch.tensor(self.epsilon_t)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(EDMNetworkPrecond):
    """VE column: ``c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)``."""

    def __init__(self, model, *, sigma_min: float = 0.02, sigma_max: float = 100.0, **kwargs):
        super().__init__(model, **kwargs)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(EDMNetworkPrecond):
    """iDDPM column: VP scaling, ``c_noise = M - 1 - j`` for the index j of the nearest level ``u_j`` of the cosine
    schedule; the network has 2 x img_channels outputs (the variance half is ignored). Buffer ``u`` as in EDM."""

    def __init__(self, model, *, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, **kwargs):
        super().__init__(model, **kwargs)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        u = torch.zeros(self.M + 1)
        for j in range(self.M, 0, -1):  # u_{j-1} from u_j, j = M..1
            ratio = (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=self.C_1)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[self.M - 1]), float(u[0])

    def alpha_bar(self, j) -> torch.Tensor:
        return (0.5 * math.pi * torch.as_tensor(j, dtype=torch.float32) / self.M / (self.C_2 + 1)).sin() ** 2

    def coefficients(self, sigma):
        index = (sigma.reshape(-1, 1) - self.u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1 - index).to(torch.float32)


EDM_PRECONDS = {"EDMPrecond": EDMNetPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                "iDDPMPrecond": iDDPMPrecond}
