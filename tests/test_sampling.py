"""EDM Heun sampler on an analytic Gaussian teacher; per-seed determinism; seeds parsing; guidance."""

import pytest
import torch

from sid.sampling import edm_sampler, edm_sigmas, guided, nfe, parse_seeds, seed_labels, seed_latents


def gaussian_denoiser(mu, s):
    """Exact denoiser of data N(mu, s^2): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    return lambda x, sigma, labels=None: mu + s**2 / (s**2 + sigma**2) * (x - mu)


def test_heun_reproduces_gaussian_mean_and_std():
    mu, s = 0.3, 0.2
    latents = seed_latents(range(2000), (1, 4, 4))
    x = edm_sampler(gaussian_denoiser(mu, s), latents, num_steps=64)
    assert abs(float(x.mean()) - mu) < 0.01
    assert abs(float(x.std()) - s) < 0.01
    # The probability-flow ODE of a Gaussian is an affine map of the latents: check it per sample, exactly.
    # x(sigma) = mu + sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2) (x_T - mu) with x_T = sigma_max z.
    z = latents.double()
    exact = mu + s / (s**2 + 80.0**2) ** 0.5 * (80.0 * z - mu)
    torch.testing.assert_close(x.double(), exact, atol=5e-3, rtol=0)
    # Heun is second order: halving the step count roughly quadruples the error.
    err = lambda n: float((edm_sampler(gaussian_denoiser(mu, s), latents[:200], num_steps=n).double() - exact[:200])
                          .abs().max())
    assert err(16) > 3 * err(32)


def test_sigmas_and_nfe():
    t = edm_sigmas(18)
    assert len(t) == 19 and float(t[-1]) == 0
    assert float(t[0]) == pytest.approx(80.0) and float(t[-2]) == pytest.approx(0.002)
    assert nfe(18) == 35
    calls = []
    edm_sampler(lambda x, s, c=None: calls.append(1) or x * 0, torch.zeros(1, 1, 2, 2), num_steps=18)
    assert len(calls) == 35


def test_images_depend_on_seed_not_batch():
    D = gaussian_denoiser(0.1, 0.5)
    a = edm_sampler(D, seed_latents(range(8), (1, 4, 4)), num_steps=5)
    b = torch.cat([edm_sampler(D, seed_latents([s], (1, 4, 4)), num_steps=5) for s in range(8)])
    c = edm_sampler(D, seed_latents(range(4, 8), (1, 4, 4)), num_steps=5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a[4:], c, rtol=0, atol=1e-6)
    assert torch.equal(seed_labels([3, 4], 10), seed_labels(range(5), 10)[3:])
    assert torch.equal(seed_labels([3, 4], 10, mode="random"), seed_labels(range(5), 10, mode="random")[3:])
    assert seed_labels([1], 0) is None
    assert not torch.equal(seed_latents([0], (1, 4, 4)), seed_latents([1], (1, 4, 4)))


def test_balanced_labels_hold_every_class_once_in_any_run_of_seeds():
    assert torch.bincount(seed_labels(range(7, 2007), 10), minlength=10).tolist() == [200] * 10
    for start in (0, 3, 1234):
        assert sorted(seed_labels(range(start, start + 10), 10).tolist()) == list(range(10))
    assert seed_labels([13, 20], 10).tolist() == [3, 0] and seed_labels([5], 3).tolist() == [2]
    assert seed_labels([1], 0, mode="random") is None


def test_random_labels_are_the_per_seed_draws_of_earlier_measurements():
    """Frozen: the class counts of seeds 0-1999 that every fd_lenet before 2026-12-07 was measured with."""
    counts = torch.bincount(seed_labels(range(2000), 10, mode="random"), minlength=10)
    assert counts.tolist() == [213, 199, 196, 184, 204, 215, 181, 194, 208, 206]
    with pytest.raises(ValueError, match="label mode 'uniform'"):
        seed_labels([0], 10, mode="uniform")


def test_guidance_combines_conditional_and_unconditional():
    def D(x, sigma, labels=None):
        return x * 0 + (0.0 if labels is None else 1.0)

    x = torch.zeros(2, 1, 2, 2)
    labels = torch.tensor([0, 1])
    assert torch.all(guided(D, 3.0)(x, 1.0, labels) == 3.0)
    assert torch.all(guided(D, 3.0)(x, 1.0, None) == 0.0)
    assert guided(D, 1.0) is D


def test_parse_seeds():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("3-1", "a", "", "-2"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)
