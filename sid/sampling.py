"""Samplers: EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) and one-step generation.

Every image depends only on its seed: latents come from a generator seeded per image and class labels from the seed
(:func:`seed_labels`), so results do not change with batch size or process count.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import rng

# ----------------------------------------------------------------------------
# Per-seed latents and labels.


def parse_seeds(text: str) -> list[int]:
    """'0-99' -> [0..99]; '1,5,7-9' -> [1, 5, 7, 8, 9]. Raises ValueError naming the bad text."""
    bad = f"'{text}' is not a list of non-negative seeds such as 0-99 or 1,5,7-9"
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(bad) from None
        if last < first:
            raise ValueError(f"'{text}' has the range {first}-{last} reversed; expected seeds low-high "
                             f"{last}-{first}")
        seeds.extend(range(first, last + 1))
    if not seeds or min(seeds) < 0:
        raise ValueError(bad)
    return seeds


def seed_latents(seeds, shape: tuple[int, int, int], device="cpu") -> torch.Tensor:
    """Standard-normal latents (len(seeds), C, H, W), one independent generator per seed."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=rng.generator(int(s), "latent"))
    return out.to(device)


LABEL_MODES = ("balanced", "random")


def seed_labels(seeds, num_classes: int, device="cpu", mode: str = "balanced") -> torch.Tensor | None:
    """One class label per seed, or None for an unconditional model.

    ``balanced`` (default): ``seed % num_classes``, so every ``num_classes`` consecutive seeds hold each class once.
    A Frechet distance on a few thousand samples then does not move with the chance class counts of the seed set:
    over 8 disjoint sets of 2,000 seeds, two MNIST generators' fd_lenet varied with a standard deviation of 2.9 and
    2.5 instead of 4.0 and 3.5 (benchmarks/BENCHMARKS.md, "Class-balanced labels for evaluation"). These are the
    data's own proportions when its classes are balanced (MNIST, CIFAR-10); on unbalanced data neither mode is.
    ``random``: a uniform draw per seed, as EDM's generate.py does (sid's convention before 2026-12-07).
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode {mode!r} is not known, expected one of {', '.join(LABEL_MODES)}")
    if num_classes <= 0:
        return None
    if mode == "balanced":
        labels = [int(s) % num_classes for s in seeds]
    else:
        labels = [int(torch.randint(num_classes, (1,), generator=rng.generator(int(s), "label"))) for s in seeds]
    return torch.tensor(labels, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------
# Guidance.


def guided(denoiser: Callable, guidance: float) -> Callable:
    """Classifier-free guidance: ``D_u + guidance (D_c - D_u)`` with the unconditional call ``class_labels=None``."""
    if guidance == 1:
        return denoiser

    def D(x, sigma, class_labels=None):
        if class_labels is None:
            return denoiser(x, sigma, None)
        D_c = denoiser(x, sigma, class_labels)
        D_u = denoiser(x, sigma, None)
        return D_u + guidance * (D_c - D_u)

    return D


# ----------------------------------------------------------------------------
# EDM Heun sampler.


def edm_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device="cpu") -> torch.Tensor:
    """EDM time steps (eq. 5) in float64, with a final 0 appended: (num_steps + 1,)."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    if num_steps == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64, device=device)
    else:
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


@torch.no_grad()
def edm_sampler(
    denoiser: Callable,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
) -> torch.Tensor:
    """Deterministic EDM Heun sampler; ``2 * num_steps - 1`` network evaluations (the last step is Euler).

    Args:
        denoiser: ``D(x, sigma, class_labels)``.
        latents: standard normal (B, C, H, W); scaled by ``sigma_max`` inside.

    Returns:
        x0 (B, C, H, W) float32.
    """
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    B = latents.shape[0]

    def D(x, t):
        sigma = torch.full((B, 1, 1, 1), float(t), dtype=torch.float32, device=x.device)
        return denoiser(x.to(torch.float32), sigma, class_labels).to(torch.float64)

    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Euler step.
        d_cur = (x_cur - D(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        # Second-order correction, except at the last step.
        if i < num_steps - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def nfe(num_steps: int) -> int:
    """Network evaluations of :func:`edm_sampler`."""
    return 2 * num_steps - 1
