"""SiD generators: one network D_theta applied K times with shared weights (docs/design.md sections 4 and 11).

K = 1 is SiD's one-step generator ``G_theta(z, c) = D_theta(sigma_init * z, sigma_init, c)``. For K > 1 each step
re-noises the previous step's x0 prediction with fresh noise at a lower level and denoises it again (the few-step
generator of the SiD-LSG code and of Zhou et al. 2025, arXiv 2505.12674):

    x0_1 = D(sigma_1 * z, sigma_1, c)
    x0_k = D(x0_{k-1} + sigma_k * n_k, sigma_k, c)         k = 2..K, n_k ~ N(0, I) fresh

Noise levels: the SiD-LSG code's rule ``t_k = t_init * (1 - (k - 1) / K)``, linear in the DDPM timestep, on the
VP schedule of DDPM's linear betas in continuous time (EDM paper, Table 1, VP column: beta_d 19.9, beta_min 0.1):

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1),    t_init = sigma^-1(sigma_init),   sigma_k = sigma(t_k)

so sigma_1 = sigma_init, and for sigma_init = 2.5 the levels are 2.5, 0.812 (K = 2) and 2.5, 1.440, 0.812, 0.376
(K = 4), close to what that code uses on Stable Diffusion (t_init 625 is sigma 2.50 there; K = 4 gives 2.50, 1.46,
0.87, 0.47). Training backpropagates through the whole chain.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import rng

BETA_D, BETA_MIN = 19.9, 0.1  # the VP schedule (EDM Table 1) in which the chain's timesteps are linear


def vp_sigma(t: float, beta_d: float = BETA_D, beta_min: float = BETA_MIN) -> float:
    """Noise level of the VP schedule at time t in [0, 1]."""
    return math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_time(sigma: float, beta_d: float = BETA_D, beta_min: float = BETA_MIN) -> float:
    """The inverse of :func:`vp_sigma`."""
    return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d


def generator_sigmas(steps: int, init_sigma: float = 2.5) -> list[float]:
    """The K noise levels of a K-step generator: ``init_sigma`` and then ``vp_sigma(t_init * (1 - k / K))``."""
    t_init = vp_time(float(init_sigma))
    return [float(init_sigma)] + [vp_sigma(t_init * (1 - k / steps)) for k in range(1, steps)]


def seed_step_noise(seeds, shape: tuple[int, int, int], steps: int, device="cpu") -> torch.Tensor | None:
    """The fresh noise of steps 2..K for each seed, (K - 1, len(seeds), C, H, W), or None for K = 1. Like
    :func:`sid.sampling.seed_latents`, one generator per seed (and step), so an image depends only on its seed."""
    if steps <= 1:
        return None
    out = torch.empty(steps - 1, len(seeds), *shape)
    for k in range(1, steps):
        for i, s in enumerate(seeds):
            out[k - 1, i] = torch.randn(shape, generator=rng.generator(int(s), "step-noise", k))
    return out.to(device)


class FewStepGenerator(nn.Module):
    """Wrap a denoiser ``D(x, sigma, class_labels)`` into a generator of ``steps`` network evaluations.

    Args:
        denoiser: the generator's network D_theta.
        init_sigma: noise level of the first step (sigma_init).
        steps: K, the number of steps it was trained for; ``forward(..., steps=K')`` samples with another K'.
    """

    def __init__(self, denoiser: nn.Module, init_sigma: float = 2.5, steps: int = 1):
        super().__init__()
        self.denoiser = denoiser
        self.init_sigma = float(init_sigma)
        self.steps = int(steps)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                *, steps: int | None = None) -> torch.Tensor:
        """x0 of the last step (B, C, H, W). ``z`` is the first step's noise; ``noise`` (K - 1, B, C, H, W) that of
        steps 2..K (drawn with ``torch.randn`` when None)."""
        steps = self.steps if steps is None else int(steps)
        B = z.shape[0]
        x0 = None
        for k, s in enumerate(generator_sigmas(steps, self.init_sigma)):
            sigma = torch.full((B, 1, 1, 1), s, dtype=torch.float32, device=z.device)
            if k == 0:
                x = self.init_sigma * z.to(torch.float32)
            else:
                n = noise[k - 1].to(torch.float32) if noise is not None else torch.randn_like(x0)
                x = x0 + s * n  # the previous x0 prediction stays differentiable: end-to-end training
            x0 = self.denoiser(x, sigma, class_labels).to(torch.float32)
        return x0


# The name of the one-step case (steps=1, the default) in the public API and in older generator folders.
OneStepGenerator = FewStepGenerator
