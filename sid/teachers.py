"""Teachers from anywhere, adapted to the one boundary ``D(x, sigma, class_labels) -> x0_hat`` (DESIGN 2).

- a sid denoiser folder (``HybridDenoiser.save_pretrained``): wrapped in :class:`EDMPrecond`;
- a diffusers pipeline folder with ``unet/`` (UNet2DModel) and ``scheduler/`` (a DDPM-family config):
  wrapped in :class:`DiffusersVPDenoiser` (EDM Table 1, VP column).

Both kinds write themselves back with ``save_pretrained(folder)`` in the same layout, so a distilled generator
exported from either loads again with :func:`load_teacher`.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import UserError
from .generator import OneStepGenerator
from .precond import EDMPrecond
from .runs import save_pretrained_atomic

GENERATOR_FILE = "sid_generator.json"

# ----------------------------------------------------------------------------
# diffusers UNet2DModel + DDPM-family scheduler -> EDM denoiser.


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


def _load_diffusers(path: str) -> DiffusersVPDenoiser:
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


# ----------------------------------------------------------------------------
# sid denoiser folders.


def _load_sid(path: str) -> EDMPrecond:
    from backbones import HybridDenoiser

    try:
        backbone = HybridDenoiser.from_pretrained(path)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot load the sid denoiser in '{path}' ({str(e).splitlines()[0]})") from e
    return EDMPrecond(backbone)


def load_teacher(path: str) -> nn.Module:
    """Load a denoiser ``D(x, sigma, class_labels)`` from a sid denoiser folder or a diffusers pipeline folder.

    Raises:
        UserError: the path does not exist or holds neither layout.
    """
    if not os.path.exists(path):
        raise UserError(f"teacher path '{path}' does not exist")
    if not os.path.isdir(path):
        raise UserError(f"teacher path '{path}' is a file, expected a folder (sid denoiser or diffusers pipeline)")
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file) as fh:
                class_name = json.load(fh).get("_class_name")
        except json.JSONDecodeError as e:
            raise UserError(f"'{config_file}' is not valid JSON ({e})") from e
        if class_name == "HybridDenoiser":
            return _load_sid(path).eval().requires_grad_(False)
        raise UserError(f"teacher '{path}' holds a {class_name} model; expected a sid HybridDenoiser folder or a "
                        "diffusers pipeline folder with unet/ and scheduler/")
    if os.path.isdir(os.path.join(path, "unet")):
        return _load_diffusers(path).eval().requires_grad_(False)
    raise UserError(f"teacher '{path}' is neither a sid denoiser folder (config.json + safetensors) nor a diffusers "
                    "pipeline folder (unet/ + scheduler/)")


# ----------------------------------------------------------------------------
# Exported one-step generators: a denoiser folder plus sid_generator.json.


def save_generator(denoiser: nn.Module, folder: str, sigma_init: float, extra: dict | None = None) -> None:
    """Write ``denoiser`` with ``save_pretrained`` plus ``sid_generator.json``, atomically."""
    save_pretrained_atomic(denoiser, folder, {GENERATOR_FILE: {"sigma_init": float(sigma_init), **(extra or {})}})


def load_generator(path: str) -> OneStepGenerator:
    """Load an exported one-step generator (a denoiser folder with ``sid_generator.json``)."""
    meta_file = os.path.join(path, GENERATOR_FILE)
    if not os.path.isfile(meta_file):
        raise UserError(f"generator path '{path}' has no {GENERATOR_FILE}; expected the generator/ folder of a sid run")
    try:
        with open(meta_file) as fh:
            sigma_init = float(json.load(fh)["sigma_init"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"'{meta_file}' is not a valid generator description ({e})") from e
    return OneStepGenerator(load_teacher(path), sigma_init).eval()
