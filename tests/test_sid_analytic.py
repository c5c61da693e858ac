"""SiD on an analytic case: Gaussian data has a closed-form teacher; an affine generator must find mu and s."""

import torch

from sid.loss import edm_loss, generator_loss


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(m, v I): D(x, sigma) = m + v / (v + sigma^2) (x - m); m and log v are parameters."""

    def __init__(self, m: float, v: float):
        super().__init__()
        self.m = torch.nn.Parameter(torch.tensor(float(m)))
        self.log_v = torch.nn.Parameter(torch.tensor(float(v)).log())

    def forward(self, x, sigma, class_labels=None):
        v = self.log_v.exp()
        return self.m + v / (v + sigma**2) * (x - self.m)


class AffineGenerator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(-1.0))
        self.log_b = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, z):
        return self.a + self.log_b.exp() * z


def test_exact_gaussian_denoiser_is_a_minimiser_of_edm_loss():
    # Sanity of the analytic teacher: the EDM loss prefers the true (m, v) over perturbed ones.
    torch.manual_seed(0)
    mu, s = 0.3, 0.4
    x0 = mu + s * torch.randn(20000, 1, 2, 2)
    sigma, noise = torch.exp(torch.randn(20000, 1, 1, 1) * 1.2 - 1.2), torch.randn(20000, 1, 2, 2)
    true = edm_loss(GaussianDenoiser(mu, s**2), x0, sigma=sigma, noise=noise).mean()
    for m, v in [(mu + 0.1, s**2), (mu, s**2 * 1.5), (mu - 0.1, s**2 / 1.5)]:
        assert edm_loss(GaussianDenoiser(m, v), x0, sigma=sigma, noise=noise).mean() > true


def test_sid_recovers_gaussian_mean_and_std():
    torch.manual_seed(0)
    mu, s = 0.5, 0.3
    teacher = GaussianDenoiser(mu, s**2).requires_grad_(False)
    generator = AffineGenerator()
    fake_score = GaussianDenoiser(mu, s**2)  # initialised as a copy of the teacher, as in SiD
    opt_g = torch.optim.Adam(generator.parameters(), lr=1e-2, betas=(0.0, 0.999))
    opt_f = torch.optim.Adam(fake_score.parameters(), lr=1e-1, betas=(0.0, 0.999))
    B, shape = 256, (1, 4, 4)
    for _ in range(700):
        # Fake-score phase: EDM loss on generator samples.
        fake_score.requires_grad_(True)
        with torch.no_grad():
            x_g = generator(torch.randn(B, *shape))
        opt_f.zero_grad(set_to_none=True)
        edm_loss(fake_score, x_g).mean().backward()
        opt_f.step()
        # Generator phase: SiD loss, fake score frozen but differentiated through.
        fake_score.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        generator_loss(teacher, fake_score, generator(torch.randn(B, *shape))).mean().backward()
        opt_g.step()
    mean, std = generator.a.item(), generator.log_b.exp().item()
    assert abs(mean - mu) < 0.03, mean
    assert abs(std - s) < 0.03, std
    # Started far away: mean -1, std 1.65.
    # The fake score tracks the generator's distribution.
    assert abs(fake_score.m.item() - mean) < 0.05
