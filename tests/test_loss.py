"""The losses against hand computations of DESIGN sections 3 and 4, and EDM preconditioning coefficients."""

import math

import pytest
import torch

from sid import EDMPrecond, OneStepGenerator
from sid.loss import edm_loss, generator_loss, sid_sigma


def linear_denoiser(a, c=0.0):
    """D(x, sigma) = a x + c sigma (elementwise), a toy network with a hand-computable gradient."""
    return lambda x, sigma, labels=None: a * x + c * sigma


def test_generator_loss_values_and_gradients_by_hand():
    torch.manual_seed(0)
    B, alpha = 3, 1.2
    a, b = 0.7, 0.4
    x_g = torch.randn(B, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.3, 1.5, 7.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    loss = generator_loss(linear_denoiser(a), linear_denoiser(b), x_g, alpha=alpha, sigma=sigma, noise=noise)
    # By hand, per element: f_phi = a x_t, f_psi = b x_t, w = mean |x_g - f_phi|.
    xg, x_t = x_g.detach(), x_g.detach() + sigma * noise
    diff = (a - b) * x_t
    w = (xg - a * x_t).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (diff * ((a * x_t - xg) - alpha * diff) / w).sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss.to(torch.float64), expected, rtol=1e-6, atol=1e-6)
    # d/dx_g of diff * (a x_t - x_g - alpha diff) with x_t = x_g + sigma n and w held constant.
    grad_expected = ((a - b) * ((a * x_t - xg) - alpha * diff) + diff * ((a - 1) - alpha * (a - b))) / w
    (grad,) = torch.autograd.grad(loss.sum(), x_g)
    torch.testing.assert_close(grad.to(torch.float64), grad_expected, rtol=1e-5, atol=1e-5)


def test_generator_loss_equals_paper_form():
    # (1 - alpha) ||f_phi - f_psi||^2 + (f_phi - f_psi)^T (f_psi - x_g), divided by w (paper eq. 23).
    torch.manual_seed(1)
    x_g = torch.randn(4, 1, 8, 8)
    sigma, noise = torch.full((4, 1, 1, 1), 2.0), torch.randn(4, 1, 8, 8)
    teacher, fake = linear_denoiser(0.9, 0.01), linear_denoiser(0.5, -0.02)
    loss = generator_loss(teacher, fake, x_g, alpha=1.2, sigma=sigma, noise=noise)
    x_t = x_g + sigma * noise
    f_phi, f_psi = teacher(x_t, sigma), fake(x_t, sigma)
    w = (x_g - f_phi).abs().mean(dim=(1, 2, 3))
    d = (f_phi - f_psi).flatten(1)
    paper = ((1 - 1.2) * (d * d).sum(1) + (d * (f_psi - x_g).flatten(1)).sum(1)) / w
    torch.testing.assert_close(loss, paper, rtol=1e-5, atol=1e-5)


def test_generator_loss_zero_when_fake_equals_teacher():
    x_g = torch.randn(5, 3, 8, 8, requires_grad=True)
    teacher = linear_denoiser(0.8)
    loss = generator_loss(teacher, teacher, x_g)
    assert torch.count_nonzero(loss) == 0
    (grad,) = torch.autograd.grad(loss.sum(), x_g)
    assert torch.count_nonzero(grad) == 0


def test_generator_loss_default_sigma_range():
    # t ~ U(0, tmax/1000) maps into [sigma_min, sigma(tmax)]: sample sigma via the recorded call.
    seen = []

    def teacher(x, sigma, labels=None):
        seen.append(sigma)
        return 0.5 * x

    generator_loss(teacher, linear_denoiser(0.4), torch.zeros(4096, 1, 1, 1), tmax=800)
    s = seen[0].flatten()
    assert s.min() >= 0.002 - 1e-6 and s.max() <= float(sid_sigma(torch.tensor(0.8))) + 1e-4
    assert float(sid_sigma(torch.tensor(0.0))) == pytest.approx(0.002, rel=1e-5)
    assert float(sid_sigma(torch.tensor(1.0))) == pytest.approx(80.0, rel=1e-5)


def test_edm_loss_by_hand():
    torch.manual_seed(2)
    x0 = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.1, 1.0, 10.0]).view(3, 1, 1, 1)
    noise = torch.randn_like(x0)
    D = linear_denoiser(0.6)
    loss = edm_loss(D, x0, sigma=sigma, noise=noise)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (lam * (0.6 * (x0 + sigma * noise) - x0) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected)
    # Default sigma is lognormal with P_mean -1.2, P_std 1.2.
    seen = []
    edm_loss(lambda x, s, c=None: seen.append(s) or x, torch.zeros(20000, 1, 1, 1))
    log_s = seen[0].log().flatten()
    assert abs(float(log_s.mean()) + 1.2) < 0.05 and abs(float(log_s.std()) - 1.2) < 0.05


def test_edm_precond_coefficients():
    class Probe(torch.nn.Module):
        def forward(self, x_in, c_noise, labels=None):
            self.x_in, self.c_noise = x_in, c_noise
            return torch.ones_like(x_in)

    probe = Probe()
    D = EDMPrecond(probe)
    x = torch.full((2, 1, 2, 2), 3.0)
    sigma = torch.tensor([0.5, 2.0])
    out = D(x, sigma)
    sd = 0.5
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        assert probe.c_noise[i].item() == pytest.approx(math.log(s) / 4)
        assert probe.x_in[i].flatten()[0].item() == pytest.approx(c_in * 3.0)
        assert out[i].flatten()[0].item() == pytest.approx(c_skip * 3.0 + c_out * 1.0)
    assert out.dtype == torch.float32


def test_one_step_generator_calls_denoiser_at_sigma_init():
    calls = []

    def D(x, sigma, labels=None):
        calls.append((x.clone(), sigma.clone()))
        return x

    z = torch.randn(3, 1, 4, 4)
    out = OneStepGenerator(D, init_sigma=2.5)(z)
    torch.testing.assert_close(out, 2.5 * z)
    assert torch.all(calls[0][1] == 2.5) and calls[0][1].shape == (3, 1, 1, 1)


def test_generator_loss_without_score_grad_is_dmds_gradient():
    # score_grad=False: same loss value; the gradient w.r.t. x_g is (f_psi - f_phi) / w, whatever alpha, and no
    # gradient reaches the score networks' parameters.
    torch.manual_seed(2)
    B = 3
    x_g = torch.randn(B, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.3, 1.5, 7.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    teacher, fake = (lambda x, s, c=None: a * x), linear_denoiser(0.4)
    for alpha in (1.2, 0.5):
        kw = dict(alpha=alpha, sigma=sigma, noise=noise)
        full = generator_loss(teacher, fake, x_g, **kw)
        stop = generator_loss(teacher, fake, x_g, score_grad=False, **kw)
        torch.testing.assert_close(stop, full)
        assert torch.autograd.grad(stop.sum(), a, retain_graph=True, allow_unused=True)[0] is None
        assert torch.autograd.grad(full.sum(), a, retain_graph=True)[0] != 0  # the full loss does reach a
        x_t = x_g.detach() + sigma * noise
        f_phi, f_psi = 0.7 * x_t, 0.4 * x_t
        w = (x_g.detach() - f_phi).abs().mean(dim=(1, 2, 3), keepdim=True)
        (grad,) = torch.autograd.grad(stop.sum(), x_g)
        torch.testing.assert_close(grad.double(), (f_psi - f_phi) / w, rtol=1e-5, atol=1e-6)  # float32 inside
        (grad_full,) = torch.autograd.grad(full.sum(), x_g)
        assert (grad_full - grad).abs().max() > 1e-3  # differentiating through the scores does change it
