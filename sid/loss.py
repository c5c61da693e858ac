"""Per-sample losses: EDM denoising (teacher and fake score), the SiD generator loss, each with the classifier-free
guidance of SiD-LSG (Zhou et al., ICLR 2025, arXiv 2406.01561) as an option, and SiDA's adversarial terms (Zhou et
al., ICLR 2025, arXiv 2410.14919), whose discriminator is the fake score's encoder.

All are pure functions of networks and tensors that return one value per sample (summed over C, H, W); the
training loop reduces and scales them. Any callable ``D(x, sigma, class_labels)`` with ``sigma`` of shape
(B, 1, 1, 1) can play teacher, fake score or student; ``class_labels=None`` on a conditional denoiser is the null
class (index label_dim of a HybridDenoiser).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

# ----------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022), the building block of SiD-LSG's kappa1..kappa4.


def guided_denoise(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None,
                   guidance: float = 1.0) -> torch.Tensor:
    """``D_u + guidance * (D_c - D_u)`` with ``D_u = D(x, sigma, None)`` (null class), ``D_c = D(x, sigma, labels)``.

    One plain call when ``guidance == 1`` or there are no labels (the formula is then ``D_c`` exactly), so a scale
    of 1 costs no extra network evaluation and changes no bit. Gradients flow through both calls.
    """
    if guidance == 1 or class_labels is None:
        return denoiser(x, sigma, class_labels)
    D_c = denoiser(x, sigma, class_labels).to(torch.float32)
    D_u = denoiser(x, sigma, None).to(torch.float32)
    return D_u + guidance * (D_c - D_u)


# ----------------------------------------------------------------------------
# EDM loss (Karras et al. 2022, eq. 2 with Table 1's lognormal sigma and weight lambda).


def edm_loss(
    denoiser: Denoiser,
    x0: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """``lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2`` per sample, ``sigma = exp(P_mean + P_std N(0, 1))``.

    Args:
        denoiser: ``D(x, sigma, class_labels) -> x0_hat``.
        x0: clean images (B, C, H, W) in [-1, 1].
        sigma, noise: optional (B, 1, 1, 1) and (B, C, H, W) to make the call deterministic; sampled when None.
        guidance: the prediction that is trained is the guided one, :func:`guided_denoise` (SiD-LSG's kappa1 when
            the fake score is trained on generated images); 1 = plain EDM loss.

    Returns:
        (B,) float32 loss, summed over C, H, W.
    """
    x0 = x0.to(torch.float32)
    if sigma is None:
        sigma = (torch.randn(x0.shape[0], 1, 1, 1, device=x0.device) * P_std + P_mean).exp()
    if noise is None:
        noise = torch.randn_like(x0)
    sigma = sigma.to(torch.float32)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # lambda(sigma), EDM Table 1
    D_x = guided_denoise(denoiser, x0 + sigma * noise, sigma, class_labels, guidance)
    return (weight * (D_x.to(torch.float32) - x0) ** 2).flatten(1).sum(1)


# ----------------------------------------------------------------------------
# SiD generator loss (Zhou et al. 2024, arXiv 2404.04057, eqs. 21-23 with alpha and the normaliser w of sec. 4).


def sid_sigma(t: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """Map ``t`` in [0, 1] to the EDM sampler's noise level: ``t = 0`` -> ``sigma_min``, ``t = 1`` -> ``sigma_max``."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def generator_loss(
    teacher: Denoiser,
    fake_score: Denoiser,
    x_g: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    alpha: float = 1.2,
    tmax: float = 800,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance_fake: float = 1.0,
    guidance_real: float = 1.0,
    score_grad: bool = True,
) -> torch.Tensor:
    """SiD generator loss per sample, optionally with SiD-LSG's guidance of both score networks.

    With ``x_t = x_g + sigma n``, ``f_phi = teacher(x_t)``, ``f_psi = fake_score(x_t)`` and
    ``w = mean_pixels |x_g - f_phi|`` (no gradient, clipped below at 1e-5):

        loss = sum_pixels (f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi)) / w

    which equals ``(1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g)`` (paper eq. 23). Gradients
    reach the generator through ``x_g`` in all three places (directly and through ``x_t``); the parameters of
    ``teacher`` and ``fake_score`` should be frozen by the caller.

    Long and Short Guidance (SiD-LSG): ``f_psi`` is the fake score guided with ``guidance_fake`` (kappa2 = kappa3,
    both places it appears) and ``f_phi`` the teacher guided with ``guidance_real`` (kappa4), each by
    :func:`guided_denoise`; ``w`` uses the guided ``f_phi``. Both 1 = plain SiD, bit for bit.

    ``score_grad=False`` treats ``f_phi`` and ``f_psi`` as constants (both networks run without a graph, nothing is
    differentiated through them): the loss has the same value, and its gradient w.r.t. ``x_g`` is
    ``(f_psi - f_phi) / w``, DMD's distribution-matching gradient (Yin et al., CVPR 2024), whatever ``alpha``.

    Args:
        x_g: generator samples (B, C, H, W), differentiable w.r.t. the generator.
        sigma: optional (B, 1, 1, 1); default ``sid_sigma(t)`` with ``t ~ U(0, tmax / 1000)``.
        noise: optional (B, C, H, W) standard normal.

    Returns:
        (B,) float32 loss.
    """
    x_g, sigma, noise = _generator_inputs(x_g, sigma, noise, tmax, sigma_min, sigma_max, rho)
    x_t = x_g + sigma * noise
    with torch.set_grad_enabled(score_grad and torch.is_grad_enabled()):
        f_phi = guided_denoise(teacher, x_t, sigma, class_labels, guidance_real).to(torch.float32)
        f_psi = guided_denoise(fake_score, x_t, sigma, class_labels, guidance_fake).to(torch.float32)
    return _sid_term(f_phi, f_psi, x_g, alpha)[0]


def _generator_inputs(x_g, sigma, noise, tmax, sigma_min, sigma_max, rho):
    """x_g in float32 and the generator phase's sigma and noise (drawn when None)."""
    x_g = x_g.to(torch.float32)
    if sigma is None:
        t = torch.rand(x_g.shape[0], 1, 1, 1, device=x_g.device) * (tmax / 1000)
        sigma = sid_sigma(t, sigma_min, sigma_max, rho)
    if noise is None:
        noise = torch.randn_like(x_g)
    return x_g, sigma.to(torch.float32), noise


def _sid_term(f_phi, f_psi, x_g, alpha):
    """(per-sample SiD loss, the normaliser w of shape (B, 1, 1, 1))."""
    with torch.no_grad():
        w = (x_g - f_phi).abs().flatten(1).mean(1).clamp(min=1e-5).view(-1, 1, 1, 1)
    diff = f_phi - f_psi
    return (diff * ((f_phi - x_g) - alpha * diff) / w).flatten(1).sum(1), w


# ----------------------------------------------------------------------------
# SiDA (Zhou et al., ICLR 2025, arXiv 2410.14919): the fake score's encoder is the discriminator. A fake score for
# SiDA is called as ``fake_score(x, sigma, class_labels, return_logits=True) -> (D_x, logits)`` with a logit map
# (B, ...) taken from the middle of the network in the same forward pass (sid.discriminator.SiDAFakeScore).


def gan_logit_loss(logits: torch.Tensor, target: float, clamp: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits against ``target`` (1 = real, 0 = generated) on every element of the
    logit map, averaged over the map: (B, ...) -> (B,) float32. ``clamp`` limits the logits to [-clamp, clamp]."""
    logits = logits.to(torch.float32)
    if clamp is not None:
        logits = logits.clamp(-clamp, clamp)
    bce = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(target)), reduction="none")
    return bce.flatten(1).mean(1)


def guided_denoise_logits(denoiser, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None,
                          guidance: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`guided_denoise` of a SiDA fake score plus the logit map of its labelled call (the discriminator is
    never guided); one call when ``guidance == 1`` or there are no labels."""
    D_c, logits = denoiser(x, sigma, class_labels, return_logits=True)
    if guidance == 1 or class_labels is None:
        return D_c, logits
    D_u = denoiser(x, sigma, None).to(torch.float32)
    return D_u + guidance * (D_c.to(torch.float32) - D_u), logits


def sida_fake_score_loss(
    fake_score,
    x_g: torch.Tensor,
    x_real: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    real_labels: torch.Tensor | None = None,
    *,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_data: float = 0.5,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA's fake-score phase: the EDM loss on generated images and the discriminator loss, per sample.

    With one lognormal ``sigma`` and one ``noise`` n for both halves, ``lambda = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2`` and D the logit map of ``fake_score``:

        loss_edm  = lambda * || f_psi(x_g + sigma n) - x_g ||^2                       (sum over C, H, W)
        loss_disc = lambda * (BCE(D(x_real + sigma n), 1) + BCE(D(x_g + sigma n), 0)) / 2   (each BCE a map mean)

    The phase's loss is ``loss_edm + lsd * loss_disc`` (lsd = 1 in SiDA); the caller weights. Real and generated
    images go through the network in one batch of 2B. ``guidance`` (kappa1) guides the trained prediction, as in
    :func:`edm_loss`; the logits are those of the labelled call.

    Returns:
        (loss_edm, loss_disc), each (B,) float32.
    """
    x_g, x_real = x_g.to(torch.float32), x_real.to(torch.float32)
    if x_real.shape != x_g.shape:
        raise ValueError(f"x_real has shape {tuple(x_real.shape)}, expected that of x_g {tuple(x_g.shape)}")
    if (class_labels is None) != (real_labels is None):
        raise ValueError("class_labels and real_labels must both be given or both be None")
    B = x_g.shape[0]
    if sigma is None:
        sigma = (torch.randn(B, 1, 1, 1, device=x_g.device) * P_std + P_mean).exp()
    if noise is None:
        noise = torch.randn_like(x_g)
    sigma = sigma.to(torch.float32)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # lambda(sigma), EDM Table 1
    x = torch.cat([x_g + sigma * noise, x_real + sigma * noise])  # (2B, C, H, W): generated, then real
    labels = torch.cat([class_labels, real_labels]) if class_labels is not None else None
    D_x, logits = guided_denoise_logits(fake_score, x, torch.cat([sigma, sigma]), labels, guidance)
    loss_edm = (weight * (D_x[:B].to(torch.float32) - x_g) ** 2).flatten(1).sum(1)
    bce = gan_logit_loss(logits[B:], 1.0) + gan_logit_loss(logits[:B], 0.0)
    return loss_edm, weight.flatten() * bce / 2


def sida_generator_loss(
    teacher: Denoiser,
    fake_score,
    x_g: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    alpha: float = 1.2,
    tmax: float = 800,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    guidance_fake: float = 1.0,
    guidance_real: float = 1.0,
    logit_clamp: float | None = 10.0,
    score_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiDA's generator phase: the SiD loss of :func:`generator_loss` and the adversarial term, per sample, from
    one fake-score call at the same ``x_t = x_g + sigma n``:

        loss_gan = C * H * W * mean_map BCE(clamp(D(x_t)), 1) / w        (w: SiD's normaliser)

    The phase's loss is ``0.5 * lsg * loss_sid + 0.5 * lsg_gan * loss_gan`` (lsg 100, lsg_gan 0.01 in SiDA); the
    caller weights. The factor C*H*W puts the map mean on the scale of the SiD loss, a sum over pixels.
    ``score_grad=False``: the SiD term as in :func:`generator_loss` (DMD's gradient; the teacher runs without a
    graph), while the adversarial term still reaches ``x_g`` through the discriminator.

    Returns:
        (loss_sid, loss_gan), each (B,) float32.
    """
    x_g, sigma, noise = _generator_inputs(x_g, sigma, noise, tmax, sigma_min, sigma_max, rho)
    x_t = x_g + sigma * noise
    with torch.set_grad_enabled(score_grad and torch.is_grad_enabled()):
        f_phi = guided_denoise(teacher, x_t, sigma, class_labels, guidance_real).to(torch.float32)
    f_psi, logits = guided_denoise_logits(fake_score, x_t, sigma, class_labels, guidance_fake)
    if not score_grad:
        f_psi = f_psi.detach()
    loss_sid, w = _sid_term(f_phi, f_psi.to(torch.float32), x_g, alpha)
    loss_gan = x_g[0].numel() * gan_logit_loss(logits, 1.0, logit_clamp) / w.flatten()
    return loss_sid, loss_gan
