"""Teachers from diffusers: a ``UNet2DModel`` + DDPM-family scheduler folder as an EDM denoiser
(docs/design.md section 2).

EDM paper, Table 1, VP column: ``D(x, sigma) = x - sigma * eps_hat(x / sqrt(1 + sigma^2), t(sigma))``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..config import UserError


class DiffusersVPDenoiser(nn.Module):
    """``D(x, sigma) = x0`` prediction of a discrete-time VP model at the noise level ``sigma``.

    ``sigma_i = sqrt((1 - alphabar_i) / alphabar_i)`` from the scheduler's table; the model sees the VP-scaled
    input ``x / sqrt(1 + sigma^2)`` at the fractional timestep ``t(sigma)``, interpolated linearly in log-sigma
    over the table, with sigma clamped into the table's range for ``t`` only.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 scheduler_config: dict | None = None):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"scheduler prediction_type is {prediction_type!r}, expected epsilon, v_prediction or "
                            "sample")
        self.unet = unet
        self.prediction_type = prediction_type
        self.scheduler_config = dict(scheduler_config or {})
        abar = alphas_cumprod.to(torch.float64)
        self.register_buffer("log_sigmas", ((1 - abar) / abar).sqrt().log().to(torch.float32), persistent=False)

    @property
    def label_dim(self) -> int:
        return int(self.unet.config.num_class_embeds or 0)

    @property
    def img_resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def img_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep (B,) for noise levels (B,), linear in log-sigma, clamped to the table."""
        log_sigmas = self.log_sigmas
        log_s = sigma.to(torch.float32).log().clamp(log_sigmas[0], log_sigmas[-1])
        idx = torch.searchsorted(log_sigmas, log_s.contiguous()).clamp(1, len(log_sigmas) - 1)
        lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
        return (idx - 1).to(torch.float32) + (log_s - lo) / (hi - lo)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, class_labels: torch.Tensor | None = None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        x_in = x / (1 + sigma**2).sqrt()  # (B, C, H, W), VP scaling
        kwargs = {}
        if self.label_dim > 0:
            if class_labels is None:
                raise UserError("this diffusers teacher is class-conditional and has no null class; pass labels")
            kwargs["class_labels"] = class_labels
        out = self.unet(x_in, self.timestep(sigma.flatten()), **kwargs).sample.to(torch.float32)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "v_prediction":
            abar = 1 / (1 + sigma**2)
            return abar.sqrt() * x_in - (1 - abar).sqrt() * out
        return out

    def save_pretrained(self, folder: str) -> None:
        """Write a diffusers pipeline folder: ``unet/``, ``scheduler/``, ``model_index.json``."""
        os.makedirs(folder, exist_ok=True)
        self.unet.save_pretrained(os.path.join(folder, "unet"))
        os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as fh:
            json.dump(self.scheduler_config, fh, indent=2)
        index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", self.scheduler_config.get("_class_name", "DDPMScheduler")]}
        with open(os.path.join(folder, "model_index.json"), "w") as fh:
            json.dump(index, fh, indent=2)


def load_diffusers(path: str) -> DiffusersVPDenoiser:
    """A diffusers pipeline folder with ``unet/`` and ``scheduler/`` as a :class:`DiffusersVPDenoiser`."""
    from diffusers import DDPMScheduler, UNet2DModel

    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_file):
        raise UserError(f"teacher '{path}' has unet/ but no scheduler/scheduler_config.json")
    try:
        with open(sched_file) as fh:
            sched_cfg = json.load(fh)
        scheduler = DDPMScheduler.from_config(sched_cfg)
    except (json.JSONDecodeError, ValueError, TypeError) as e:
        raise UserError(f"cannot read the scheduler config '{sched_file}' ({e})") from e
    try:
        unet = UNet2DModel.from_pretrained(os.path.join(path, "unet"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the UNet2DModel in '{path}/unet' ({str(e).splitlines()[0]})") from e
    return DiffusersVPDenoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, sched_cfg)
