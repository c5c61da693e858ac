"""SiD-LSG guidance inside the losses and few-step generators (docs/design.md section 11): the guided losses against
hand computations (values and gradients), all scales 1 = plain SiD bit for bit on the smoke config, a K-step chain
against a hand-unrolled loop, sample.py --steps on a one-step generator, and the error for a teacher without a null
class."""

import copy
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from sid import rng
from sid.cli import sample_main, train_main
from sid.config import UserError, load_config
from sid.generator import FewStepGenerator, generator_sigmas, seed_step_noise
from sid.loss import edm_loss, generator_loss, guided_denoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cond_linear(a_c, a_u, e=0.0):
    """D(x, sigma, labels) = a_c x + e * label (conditional) or a_u x (labels None, the null class)."""

    def D(x, sigma, labels=None):
        if labels is None:
            return a_u * x
        return a_c * x + e * labels.to(x.dtype).view(-1, 1, 1, 1)

    return D


class CondScale(torch.nn.Module):
    """A fake score with two scalar parameters: D = b_c x with labels, b_u x without (the null class)."""

    def __init__(self, b_c, b_u):
        super().__init__()
        self.b_c = torch.nn.Parameter(torch.tensor(b_c, dtype=torch.float64))
        self.b_u = torch.nn.Parameter(torch.tensor(b_u, dtype=torch.float64))
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        return (self.b_u if labels is None else self.b_c) * x


# ----------------------------------------------------------------------------
# Guided losses against hand computations.


def test_guided_denoise_formula_and_one_call_at_scale_one():
    x, sigma, labels = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.ones(3, 1, 1, 1), torch.tensor([1, 0, 2])
    D = CondScale(0.8, 0.3)
    out = guided_denoise(D, x, sigma, labels, 2.5)
    torch.testing.assert_close(out, (0.3 + 2.5 * (0.8 - 0.3)) * x.to(torch.float32), rtol=1e-6, atol=1e-6)
    assert D.calls == 2
    D.calls = 0
    assert torch.equal(guided_denoise(D, x, sigma, labels, 1.0), 0.8 * x) and D.calls == 1
    assert torch.equal(guided_denoise(D, x, sigma, None, 3.0), 0.3 * x) and D.calls == 2  # no labels: one call


def test_guided_generator_loss_values_and_gradients_by_hand():
    torch.manual_seed(0)
    B, alpha, k_fake, k_real = 3, 1.2, 1.7, 2.5
    a_c, a_u, e, b_c, b_u = 0.7, 0.5, 0.05, 0.4, 0.6
    x_g = torch.randn(B, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 0, 7])
    sigma = torch.tensor([0.3, 1.5, 7.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    loss = generator_loss(cond_linear(a_c, a_u, e), cond_linear(b_c, b_u), x_g, labels, alpha=alpha, sigma=sigma,
                          noise=noise, guidance_fake=k_fake, guidance_real=k_real)
    # By hand: f_phi = A x_t + k_real e c (kappa4), f_psi = B x_t (kappa2 = kappa3), w from the guided f_phi.
    A, Bf = a_u + k_real * (a_c - a_u), b_u + k_fake * (b_c - b_u)
    xg, x_t = x_g.detach(), x_g.detach() + sigma * noise
    f_phi = A * x_t + k_real * e * labels.to(torch.float64).view(B, 1, 1, 1)
    f_psi = Bf * x_t
    diff = f_phi - f_psi
    w = (xg - f_phi).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (diff * ((f_phi - xg) - alpha * diff) / w).sum(dim=(1, 2, 3))
    torch.testing.assert_close(loss.to(torch.float64), expected, rtol=1e-6, atol=1e-6)
    # d/dx_g with x_t = x_g + sigma n and w held constant: d diff = (A - B), d (f_phi - x_g) = (A - 1).
    grad_expected = ((A - Bf) * ((f_phi - xg) - alpha * diff) + diff * ((A - 1) - alpha * (A - Bf))) / w
    (grad,) = torch.autograd.grad(loss.sum(), x_g)
    torch.testing.assert_close(grad.to(torch.float64), grad_expected, rtol=1e-5, atol=1e-5)
    # Guidance changes the value (the scales reach the loss) and scale 1 is the plain loss.
    plain = generator_loss(cond_linear(a_c, a_u, e), cond_linear(b_c, b_u), x_g, labels, alpha=alpha, sigma=sigma,
                           noise=noise)
    same = generator_loss(cond_linear(a_c, a_u, e), cond_linear(b_c, b_u), x_g, labels, alpha=alpha, sigma=sigma,
                          noise=noise, guidance_fake=1.0, guidance_real=1.0)
    assert torch.equal(plain, same) and not torch.allclose(plain, loss)


def test_guided_fake_score_loss_values_and_parameter_gradients_by_hand():
    torch.manual_seed(1)
    k1, sd = 1.8, 0.5
    x0 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    labels = torch.tensor([1, 2, 3, 4])
    sigma = torch.tensor([0.1, 0.8, 2.0, 9.0], dtype=torch.float64).view(4, 1, 1, 1)
    noise = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    fake = CondScale(0.9, 0.6)
    loss = edm_loss(fake, x0, labels, sigma=sigma, noise=noise, guidance=k1)
    assert fake.calls == 2  # conditional and null class
    # By hand: D_x = (b_u + k1 (b_c - b_u)) x_n is the prediction that is trained (kappa1).
    b_c, b_u = 0.9, 0.6
    x_n = (x0.to(torch.float32) + sigma.to(torch.float32) * noise).to(torch.float64)
    lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
    r = (b_u + k1 * (b_c - b_u)) * x_n - x0
    torch.testing.assert_close(loss.to(torch.float64), (lam * r**2).sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    loss.sum().backward()
    torch.testing.assert_close(fake.b_c.grad, (lam * 2 * r * k1 * x_n).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fake.b_u.grad, (lam * 2 * r * (1 - k1) * x_n).sum(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# The loop: scales 1 are plain SiD; a guided K-step run trains.


def make_loop(teacher, run_dir, *extra):
    from sid.train_sid import SiDLoop
    from sid.training import make_accelerator

    cfg = load_config(os.path.join(ROOT, "configs", "sid", "smoke.yaml"),
                      [f"teacher={teacher}", "data.name=digits", f"run_dir={run_dir}", "mixed_precision=fp32", *extra])
    return SiDLoop(cfg, make_accelerator(cfg))


def plain_sid_step(loop, step, teacher, gen_net, fake, opt_g, opt_f):
    """One iteration of plain SiD (docs/design.md section 4) written out: one-step generator D(2.5 z, 2.5), EDM loss
    of the fake score, SiD loss of the generator, with the loop's random draws."""
    cfg, s = loop.cfg, loop.cfg.sid
    n, shape = loop.micro_batch, loop.shape
    torch.manual_seed(rng.derive_seed(cfg.seed, step, 0, "dropout"))

    def inputs(phase):
        g = rng.generator(cfg.seed, step, 0, 0, phase)
        z = torch.randn((n, *shape), generator=g)
        labels = loop.label_table[torch.randint(len(loop.label_table), (n,), generator=g)]
        return g, z, labels

    def G(z, labels):
        return gen_net(s.sigma_init * z, torch.full((n, 1, 1, 1), s.sigma_init), labels)

    # Fake score.
    fake.requires_grad_(True).train()
    gen_net.requires_grad_(False).eval()
    opt_f.zero_grad(set_to_none=True)
    g, z, labels = inputs("fake_score")
    with torch.no_grad():
        x_g = G(z, labels)
    sigma = (torch.randn(n, 1, 1, 1, generator=g) * s.P_std + s.P_mean).exp()
    noise = torch.randn(x_g.shape, generator=g)
    weight = (sigma**2 + s.sigma_data**2) / (sigma * s.sigma_data) ** 2
    loss_f = (weight * (fake(x_g + sigma * noise, sigma, labels) - x_g) ** 2).flatten(1).sum(1)
    (loss_f.sum() / loop.batch_per_process).backward()
    for p in fake.parameters():
        torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    opt_f.step()
    # Generator.
    fake.requires_grad_(False).eval()
    gen_net.requires_grad_(True).train()
    opt_g.zero_grad(set_to_none=True)
    g, z, labels = inputs("generator")
    t = torch.rand(n, 1, 1, 1, generator=g) * (s.tmax / 1000)
    lo, hi = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)
    sigma = (hi + (1 - t) * (lo - hi)) ** s.rho
    noise = torch.randn((n, *shape), generator=g)
    x_g = G(z, labels)
    x_t = x_g + sigma * noise
    f_phi, f_psi = teacher(x_t, sigma, labels), fake(x_t, sigma, labels)
    with torch.no_grad():
        w = (x_g - f_phi).abs().flatten(1).mean(1).clamp(min=1e-5).view(-1, 1, 1, 1)
    diff = f_phi - f_psi
    loss_g = (diff * ((f_phi - x_g) - s.alpha * diff) / w).flatten(1).sum(1)
    (loss_g.sum() / loop.batch_per_process).backward()
    for p in gen_net.parameters():
        torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
    opt_g.step()
    return loss_f.mean(), loss_g.mean()


def test_scales_one_are_plain_sid_bit_for_bit(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path / "run", "sid.guidance.train_fake=1", "sid.guidance.eval_fake=1",
                     "sid.guidance.eval_real=1", "sid.generator_steps=1")
    s = loop.cfg.sid
    teacher = copy.deepcopy(loop.teacher)
    gen_net, fake = copy.deepcopy(loop.generator_net), copy.deepcopy(loop.fake_score)
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=s.lr_generator, betas=tuple(s.betas), eps=s.eps)
    opt_f = torch.optim.Adam(fake.parameters(), lr=s.lr_fake_score, betas=tuple(s.betas), eps=s.eps)
    calls = []
    loop.teacher.register_forward_hook(lambda *_: calls.append(1))
    for step in range(3):
        loop.step = step
        stats = loop.train_step()
        loss_f, loss_g = plain_sid_step(loop, step, teacher, gen_net, fake, opt_g, opt_f)
        assert stats["loss_fake_score"].item() == loss_f.item() and stats["loss_generator"].item() == loss_g.item()
        loop.cur_nimg += loop.cfg.batch_size
    assert len(calls) == 3  # one teacher evaluation per generator phase: scales of 1 cost nothing
    for a, b in ((loop.generator_net, gen_net), (loop.fake_score, fake)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name


def test_guided_few_step_loop_evaluates_what_it_should(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path / "run", "sid.guidance.eval_real=2", "sid.guidance.eval_fake=1.5",
                     "sid.generator_steps=2")
    counts = {"teacher": 0, "fake_score": 0, "generator": 0}
    for name, net in (("teacher", loop.teacher), ("fake_score", loop.fake_score), ("generator", loop.generator_net)):
        net.register_forward_hook(lambda *_, k=name: counts.__setitem__(k, counts[k] + 1))
    before = [p.detach().clone() for p in loop.generator_net.parameters()]
    stats = loop.train_step()
    # Generator: 2 steps in each phase; teacher and fake score guided in the generator loss (2 calls each); the
    # fake score's EDM loss unguided (train_fake = 1): 1 call.
    assert counts == {"teacher": 2, "fake_score": 3, "generator": 4}
    assert all(torch.isfinite(v).all() for v in stats.values()) and stats["nonfinite_grads"] == 0
    assert any(not torch.equal(p, q) for p, q in zip(loop.generator_net.parameters(), before))
    assert loop.fake_label_dropout == 0.1  # eval_fake != 1: the fake score also trains its null class


# ----------------------------------------------------------------------------
# K-step generators.


def vp_levels(K, sigma_init):
    """The noise levels written out: SiD-LSG's t_init (1 - k / K) on the VP schedule (beta_d 19.9, beta_min 0.1)."""
    bd, bm = 19.9, 0.1
    t_init = (math.sqrt(bm**2 + 2 * bd * math.log(1 + sigma_init**2)) - bm) / bd
    return [math.sqrt(math.exp(0.5 * bd * t**2 + bm * t) - 1) for t in (t_init * (1 - k / K) for k in range(K))]


def test_generator_sigmas():
    for K in (1, 2, 3, 4):
        levels = generator_sigmas(K, 2.5)
        assert levels[0] == 2.5 and all(a > b for a, b in zip(levels, levels[1:]))
        assert levels == pytest.approx(vp_levels(K, 2.5), rel=1e-12)
    # The values docs/design.md and the generator module quote.
    assert generator_sigmas(2) == pytest.approx([2.5, 0.812], abs=5e-4)
    assert generator_sigmas(4) == pytest.approx([2.5, 1.440, 0.812, 0.376], abs=5e-4)


class SmallDenoiser(torch.nn.Module):
    """A nonlinear, label- and sigma-dependent denoiser with parameters, so gradients through the chain matter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.w = torch.nn.Parameter(torch.randn(4, dtype=torch.float64) * 0.3 + 1.0)
        self.calls = []

    def forward(self, x, sigma, labels=None):
        self.calls.append(sigma.flatten()[0].item())
        x = x.to(torch.float64)
        c = 0.0 if labels is None else 0.1 * labels.to(torch.float64).view(-1, 1, 1, 1)
        return torch.tanh(self.w[0] * x / (1 + sigma**2).sqrt() + c) * self.w[1] + self.w[2] * sigma.log() * self.w[3]


def test_k_step_chain_equals_hand_unrolled_loop_values_and_gradients():
    K, B = 3, 2
    torch.manual_seed(4)
    z, noise = torch.randn(B, 1, 4, 4), torch.randn(K - 1, B, 1, 4, 4)
    labels = torch.tensor([2, 5])
    D = SmallDenoiser()
    out = FewStepGenerator(D, init_sigma=2.5, steps=K)(z, labels, noise)
    (grad,) = torch.autograd.grad(out.sum(), D.w)
    assert D.calls == pytest.approx(vp_levels(K, 2.5), rel=1e-6)
    # Hand-unrolled: x0 = D(2.5 z); then x0 = D(x0 + sigma_k n_k) with the previous x0 kept differentiable.
    s = vp_levels(K, 2.5)
    sig = [torch.full((B, 1, 1, 1), v, dtype=torch.float32) for v in s]
    x0 = D(2.5 * z, sig[0], labels).to(torch.float32)
    x0 = D(x0 + s[1] * noise[0], sig[1], labels).to(torch.float32)
    x0 = D(x0 + s[2] * noise[1], sig[2], labels).to(torch.float32)
    (grad_hand,) = torch.autograd.grad(x0.sum(), D.w)
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_hand, rtol=1e-5, atol=1e-6)
    # End to end: cutting the chain after step 1 changes the gradient.
    x_cut = D(2.5 * z, sig[0], labels).to(torch.float32).detach()
    x_cut = D(x_cut + s[1] * noise[0], sig[1], labels).to(torch.float32).detach()
    (grad_cut,) = torch.autograd.grad(D(x_cut + s[2] * noise[1], sig[2], labels).sum(), D.w)
    assert not torch.allclose(grad, grad_cut)
    # K = 1 is the one-step generator exactly, and steps= overrides the trained K.
    one = FewStepGenerator(D, 2.5)(z, labels)
    assert torch.equal(one, D(2.5 * z.to(torch.float32), sig[0], labels).to(torch.float32))
    assert torch.equal(FewStepGenerator(D, 2.5, steps=K)(z, labels, steps=1), one)


# ----------------------------------------------------------------------------
# sample.py and SiDPipeline with --steps.


@pytest.fixture(scope="module")
def one_step_generator(tiny_teacher_32, tmp_path_factory):
    from sid.teachers import load_teacher, save_generator

    folder = str(tmp_path_factory.mktemp("fewstep") / "generator")
    save_generator(load_teacher(tiny_teacher_32), folder, sigma_init=2.5, extra={"teacher": "tiny", "kimg": 0.0})
    return folder


@pytest.fixture(scope="module")
def lenet_ref(tmp_path_factory):
    """Reference statistics in LeNet's 128-d feature space, so that fd_lenet needs no pass over a dataset."""
    from sid.metrics import save_ref

    path = str(tmp_path_factory.mktemp("ref") / "ref.npz")
    save_ref(path, np.zeros(128), np.eye(128))
    return path


def run_sample(generator, outdir, ref, *extra):
    sample_main(["--generator", generator, "--seeds", "0-7", "--outdir", str(outdir), "--npz", "--metrics",
                 "fd_lenet", "--ref", ref, "--batch", "3", *extra])
    with open(outdir / "metrics.jsonl") as fh:
        (row,) = [json.loads(ln) for ln in fh if ln.strip()]
    with np.load(outdir / "images.npz") as f:
        return row, f["images"]


def test_steps_on_a_one_step_generator(one_step_generator, lenet_ref, tmp_path):
    from sid import SiDPipeline
    from sid.data import to_uint8
    from sid.sampling import seed_labels, seed_latents

    row1, img1 = run_sample(one_step_generator, tmp_path / "k1", lenet_ref)
    row2, img2 = run_sample(one_step_generator, tmp_path / "k2", lenet_ref, "--steps", "2")
    assert row1["nfe"] == 1 and row2["nfe"] == 2 and row2["num_samples"] == 8
    assert not np.array_equal(img1, img2)
    # The same images as the pipeline with num_inference_steps=2, and as the chain unrolled by hand per seed.
    pipe = SiDPipeline.from_pretrained(one_step_generator)
    assert pipe.generator.steps == 1
    assert np.array_equal(pipe(seeds=list(range(8)), num_inference_steps=2, output_type="np").images, img2)
    assert np.array_equal(pipe(seeds=list(range(8)), output_type="np").images, img1)
    D, seeds = pipe.generator.denoiser, list(range(8))
    z, labels = seed_latents(seeds, (1, 32, 32)), seed_labels(seeds, 10)
    (n2,) = seed_step_noise(seeds, (1, 32, 32), 2)
    s = generator_sigmas(2, 2.5)
    with torch.no_grad():
        x0 = D(2.5 * z, torch.full((8, 1, 1, 1), s[0]), labels)
        x0 = D(x0 + s[1] * n2, torch.full((8, 1, 1, 1), s[1]), labels)
    assert np.array_equal(to_uint8(x0).permute(0, 2, 3, 1).numpy(), img2)


def test_exported_steps_are_the_default(one_step_generator, lenet_ref, tmp_path):
    from sid import SiDPipeline
    from sid.teachers import load_generator

    pipe = SiDPipeline.from_pretrained(one_step_generator)
    pipe.generator.steps = 2
    pipe.save_pretrained(str(tmp_path / "g2"))
    assert json.load(open(tmp_path / "g2" / "sid_generator.json"))["generator_steps"] == 2
    assert load_generator(str(tmp_path / "g2")).steps == 2
    row, img = run_sample(str(tmp_path / "g2"), tmp_path / "o", lenet_ref)
    assert row["nfe"] == 2
    assert np.array_equal(SiDPipeline.from_pretrained(str(tmp_path / "g2"))(seeds=list(range(8)),
                                                                             output_type="np").images, img)
    with open(tmp_path / "g2" / "sid_generator.json") as fh:
        meta = json.load(fh)
    with open(tmp_path / "g2" / "sid_generator.json", "w") as fh:
        json.dump({**meta, "generator_steps": 0}, fh)
    with pytest.raises(UserError, match="generator_steps 0, expected a positive integer"):
        load_generator(str(tmp_path / "g2"))


# ----------------------------------------------------------------------------
# A teacher without a null class.


@pytest.fixture(scope="module")
def unconditional_teacher(tmp_path_factory):
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("uncond") / "tiny")
    EDMPrecond(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=0)).save_pretrained(path)
    return path


def test_guidance_on_a_teacher_without_null_class_is_one_sentence(unconditional_teacher, tmp_path, capsys):
    with pytest.raises(UserError, match=r"'sid.guidance.eval_real' is 2.0, but guidance needs a null class and the "
                                        r"teacher .* is unconditional \(label_dim 0\); expected 1"):
        make_loop(unconditional_teacher, tmp_path / "a", "sid.guidance.eval_real=2")
    make_loop(unconditional_teacher, tmp_path / "b", "sid.generator_steps=2")  # few steps need no labels
    # The command line: exit 2, one line on stderr, no traceback.
    with pytest.raises(SystemExit) as e:
        train_main(["--config", os.path.join(ROOT, "configs", "sid", "smoke.yaml"), f"teacher={unconditional_teacher}",
                    "data.name=digits", f"run_dir={tmp_path / 'c'}", "sid.guidance.train_fake=3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "'sid.guidance.train_fake' is 3.0" in err and "unconditional" in err


def test_null_class_of_edm_networks_follows_label_dropout():
    from edm_snapshots import TINY, make_denoiser

    from sid.train_sid import null_class_problem, with_null_class

    precond, kwargs = TINY["ddpmpp_cond_edm"]
    assert "label dropout" in null_class_problem(make_denoiser(precond, kwargs))
    D = make_denoiser(precond, {**kwargs, "label_dropout": 0.1})
    assert null_class_problem(D) is None
    labels, drop = torch.tensor([1, 4, 9]), torch.tensor([False, True, False])
    vectors = with_null_class(D, labels, drop)  # EDM's null class is the zero label vector
    assert torch.equal(vectors, torch.nn.functional.one_hot(labels, 10).float() * torch.tensor([[1.0], [0.0], [1.0]]))
    assert null_class_problem(make_denoiser(*TINY["ddpmpp_uncond_vp"])) == "is unconditional (label_dim 0)"


def test_null_labels_of_a_hybrid_denoiser(tiny_teacher):
    from sid.teachers import load_teacher
    from sid.train_sid import null_class_problem, with_null_class

    D = load_teacher(tiny_teacher)
    assert null_class_problem(D) is None
    labels = with_null_class(D, torch.tensor([1, 4, 9]), torch.tensor([True, False, True]))
    assert labels.tolist() == [10, 4, 10]
    # Index label_dim is the null class: the same prediction as class_labels=None.
    x, sigma = torch.randn(3, 1, 16, 16), torch.full((3, 1, 1, 1), 1.3)
    with torch.no_grad():
        torch.testing.assert_close(D(x, sigma, labels)[[0, 2]], D(x, sigma, None)[[0, 2]])


def test_schema_rejects_bad_values():
    for item, needle in (("sid.generator_steps=0", "'sid.generator_steps' is 0, expected a positive integer"),
                         ("sid.guidance.fake_label_dropout=1", "expected in [0, 1)"),
                         ("sid.guidance.eval_real=.nan", "'sid.guidance.eval_real' is nan, expected a finite number")):
        with pytest.raises(UserError, match=re.escape(needle)):
            load_config(os.path.join(ROOT, "configs", "sid", "smoke.yaml"), [item])
