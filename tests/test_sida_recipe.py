"""The recipe knobs of issue 13 and SiDA (docs/design.md sections 4 and 11): SiDA's losses against written-out
formulas (values and gradients), the discriminator hook, real images only in the fake-score phase, the fake-score
warm-up and fake_score_steps, per-sample masking of a NaN sample, train/eval modes per phase, sigma_data in saved
denoisers, the power-function EMA against its closed form and its exact resume, SiD2A, two seed sets."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from sid.config import UserError, load_config
from sid.ema import PowerEMA, power_beta, power_exponent, power_sigma_rel
from sid.generator import FewStepGenerator
from sid.loss import edm_loss, gan_logit_loss, generator_loss, sid_sigma, sida_fake_score_loss, sida_generator_loss
from sid.training import make_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "sid", "smoke.yaml")


def make_loop(teacher, run_dir, *extra, data="digits"):
    from sid.train_sid import SiDLoop

    cfg = load_config(SMOKE, [f"teacher={teacher}", f"data.name={data}", f"run_dir={run_dir}", "mixed_precision=fp32",
                              "total_kimg=0.016", *extra])
    return SiDLoop(cfg, make_accelerator(cfg))


# ----------------------------------------------------------------------------
# SiDA losses against written-out formulas, on small float64 tensors.


class ToyFake(torch.nn.Module):
    """D(x) = a x (+ e * label), logits = b * x + d per pixel: a logit map (B, C*H*W)."""

    def __init__(self, a=0.6, b=0.8, d=-0.3, e=0.05):
        super().__init__()
        for name, v in dict(a=a, b=b, d=d).items():
            setattr(self, name, torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)))
        self.e = e

    def forward(self, x, sigma, labels=None, return_logits=False):
        D = self.a * x + (0 if labels is None else self.e * labels.to(x.dtype).view(-1, 1, 1, 1))
        if not return_logits:
            return D
        return D, (self.b * x + self.d).flatten(1)


def softplus(v):
    return torch.log1p(torch.exp(v))  # BCE(l, 1) = softplus(-l), BCE(l, 0) = softplus(l)


def test_sida_fake_score_loss_values_and_gradients_by_hand():
    torch.manual_seed(0)
    B, sd = 3, 0.5
    x_g, x_real = torch.randn(B, 1, 2, 2, dtype=torch.float64), torch.randn(B, 1, 2, 2, dtype=torch.float64)
    labels, real_labels = torch.tensor([1, 0, 2]), torch.tensor([4, 4, 1])
    sigma = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 1, 2, 2, dtype=torch.float64)
    net = ToyFake()
    loss_edm, loss_disc = sida_fake_score_loss(net, x_g, x_real, labels, real_labels, sigma=sigma, noise=noise,
                                               sigma_data=sd)
    # By hand: one sigma and one n for both halves; the generated half carries the generated labels.
    lam = ((sigma**2 + sd**2) / (sigma * sd) ** 2).flatten()
    xg_t, xr_t = x_g + sigma * noise, x_real + sigma * noise
    ref_edm = lam * ((net.a * xg_t + 0.05 * labels.view(-1, 1, 1, 1) - x_g) ** 2).flatten(1).sum(1)
    l_fake, l_real = (net.b * xg_t + net.d).flatten(1), (net.b * xr_t + net.d).flatten(1)
    ref_disc = lam * (softplus(-l_real).mean(1) + softplus(l_fake).mean(1)) / 2
    torch.testing.assert_close(loss_edm.double(), ref_edm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss_disc.double(), ref_disc, rtol=1e-6, atol=1e-6)
    # Gradients of loss_edm + lsd * loss_disc with respect to the network (a: EDM term; b, d: discriminator).
    lsd = 1.0
    got = torch.autograd.grad((loss_edm + lsd * loss_disc).sum(), [net.a, net.b, net.d], retain_graph=True)
    ref = torch.autograd.grad((ref_edm + lsd * ref_disc).sum(), [net.a, net.b, net.d])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6)
    # d loss_disc / d d = lam * (mean(sigmoid(l_fake)) - mean(sigmoid(-l_real))) / 2, written out.
    dd = (lam * (torch.sigmoid(l_fake).mean(1) - torch.sigmoid(-l_real).mean(1)) / 2).sum()
    torch.testing.assert_close(torch.autograd.grad(loss_disc.sum(), net.d)[0].double(), dd.detach(), rtol=1e-5,
                               atol=1e-6)


def test_sida_generator_loss_values_and_gradients_by_hand():
    torch.manual_seed(1)
    B, alpha, clamp = 3, 1.2, 10.0
    x_g = torch.randn(B, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.2, 2.0, 9.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 1, 2, 2, dtype=torch.float64)
    teacher = lambda x, s, c=None: 0.7 * x  # noqa: E731
    fake = ToyFake(a=0.4, b=30.0, d=0.1)  # b large: some logits beyond the clamp
    loss_sid, loss_gan = sida_generator_loss(teacher, fake, x_g, alpha=alpha, sigma=sigma, noise=noise,
                                             logit_clamp=clamp)
    # The SiD term is generator_loss exactly.
    torch.testing.assert_close(loss_sid, generator_loss(teacher, fake, x_g, alpha=alpha, sigma=sigma, noise=noise))
    # By hand: loss_gan = C*H*W * mean(softplus(-clamp(l))) / w, w = mean |x_g - f_phi| without gradient.
    x_t = x_g + sigma * noise
    f_phi = 0.7 * x_t
    w = (x_g - f_phi).abs().flatten(1).mean(1).detach()
    logits = (fake.b * x_t + fake.d).flatten(1).clamp(-clamp, clamp)
    ref_gan = 4 * softplus(-logits).mean(1) / w
    torch.testing.assert_close(loss_gan.double(), ref_gan, rtol=1e-6, atol=1e-6)
    assert (logits.abs() == clamp).any()  # the clamp binds somewhere
    lsg, lsg_gan = 100.0, 0.01
    got = torch.autograd.grad((0.5 * lsg * loss_sid + 0.5 * lsg_gan * loss_gan).sum(), x_g)[0]
    diff = f_phi - fake.a * x_t
    ref_sid = (diff * ((f_phi - x_g) - alpha * diff) / w.view(-1, 1, 1, 1)).flatten(1).sum(1)
    ref = torch.autograd.grad((0.5 * lsg * ref_sid + 0.5 * lsg_gan * ref_gan).sum(), x_g)[0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_gan_logit_loss_is_a_map_mean_of_bce():
    logits = torch.tensor([[0.0, 2.0, -1.0, 30.0]], dtype=torch.float64)
    assert math.isclose(float(gan_logit_loss(logits, 1.0)), float(softplus(-logits).mean()), rel_tol=1e-6)
    assert math.isclose(float(gan_logit_loss(logits, 0.0, clamp=10)), float(softplus(logits.clamp(-10, 10)).mean()),
                        rel_tol=1e-6)


# ----------------------------------------------------------------------------
# The discriminator hook: logits from the middle of the same forward pass.


def test_hybrid_discriminator_is_the_token_sequence_after_the_middle_block(tiny_teacher):
    from sid.discriminator import SiDAFakeScore
    from sid.teachers import load_teacher

    D = load_teacher(tiny_teacher)
    fake = SiDAFakeScore(copy.deepcopy(D))
    torch.nn.init.normal_(fake.head.weight)
    torch.nn.init.normal_(fake.head.bias)
    torch.manual_seed(0)
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 3.0]).view(2, 1, 1, 1), torch.tensor([3, 10])
    D_x, logits = fake(x, sigma, labels, return_logits=True)
    assert torch.equal(D_x, D(x, sigma, labels)) and torch.equal(fake(x, sigma, labels), D_x)
    # Written out: embeddings, patch tokens, the first block (depth 2: the middle one is blocks[0]), the head.
    bb = fake.denoiser.backbone
    with torch.no_grad():
        c_in = 1 / (0.5**2 + sigma**2).sqrt()
        c = bb.map_layer(bb.map_noise((sigma.log() / 4).flatten())) + bb.label_embed(labels)
        h = bb.x_embedder(c_in * x).flatten(2).transpose(1, 2) + bb.pos_embed
        h = bb.blocks[0](h, c, bb.grid)
        ref = fake.head(h).squeeze(-1)
    assert logits.shape == (2, bb.grid[0] * bb.grid[1])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    # The head starts at zero: D = 1/2 for every input.
    assert torch.equal(SiDAFakeScore(copy.deepcopy(D))(x, sigma, labels, return_logits=True)[1], torch.zeros(2, 16))


def test_edm_unet_discriminator_is_the_encoder_output_channel_mean():
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from edm_snapshots import TINY, make_denoiser

    from sid.discriminator import SiDAFakeScore

    D = make_denoiser(*TINY["ddpmpp_cond_edm"])
    fake = SiDAFakeScore(D)
    seen = []
    last = [k for k in D.model.enc.keys() if "aux" not in k][-1]
    D.model.enc[last].register_forward_hook(lambda m, i, o: seen.append(o))
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 7])
    D_x, logits = fake(x, sigma, labels, return_logits=True)
    assert seen[0].shape[-2:] == (4, 4)  # the 4x4 bottleneck of channel_mult [1, 2]
    torch.testing.assert_close(logits, seen[0].mean(1).flatten(1))
    torch.testing.assert_close(D_x, D(x, sigma, labels))


# ----------------------------------------------------------------------------
# The loop: phases, real images, schedule, masking.


def test_real_images_reach_the_discriminator_only_in_the_fake_score_phase(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path, "sid.sida.enabled=true", "sid.sida.gan_start_kimg=0",
                     "sid.fake_score_steps=2")
    reads, fake_batches = [], []
    get_batch = loop.dataset.get_batch

    def spy(indices):
        reads.append((loop.fake_score.training, loop.generator_net.training))
        return get_batch(indices)

    loop.dataset.get_batch = spy
    loop.fake_score_plain.register_forward_pre_hook(
        lambda m, args, kwargs: fake_batches.append((m.training, args[0].shape[0], kwargs.get("return_logits"))),
        with_kwargs=True)
    stats = loop.train_step()
    B = loop.micro_batch
    assert reads == [(True, False)] * 2  # one draw per fake-score update, none in the generator phase
    # Fake-score phase: generated + real in one batch of 2B; generator phase: B generated images only.
    assert fake_batches == [(True, 2 * B, True)] * 2 + [(False, B, True)]
    assert {"loss_discriminator", "loss_gan", "loss_fake_score", "loss_generator"} <= set(stats)
    assert all(torch.isfinite(v) for v in stats.values())


def test_each_phase_sets_train_eval_and_requires_grad(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path, "sid.sida.enabled=true")
    calls = []

    def rec(name):
        def hook(module, args):
            calls.append((name, loop.generator_net.training, loop.fake_score.training, loop.teacher.training,
                          all(p.requires_grad for p in loop.generator_net.parameters()),
                          all(p.requires_grad for p in loop.fake_score.parameters()),
                          any(p.requires_grad for p in loop.teacher.parameters())))
        return hook

    for name, net in (("generator", loop.generator_net), ("fake", loop.fake_score_plain), ("teacher", loop.teacher)):
        net.register_forward_pre_hook(rec(name))
    loop.train_step()
    fake_phase = (False, True, False, False, True, False)  # G eval + frozen, f_psi train + trainable, teacher eval
    gen_phase = (True, False, False, True, False, False)
    assert set(calls) == {("generator", *fake_phase), ("fake", *fake_phase), ("generator", *gen_phase),
                          ("teacher", *gen_phase), ("fake", *gen_phase)}


def test_warmup_has_no_generator_update_and_fake_score_steps_per_generator_step(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path, "sid.fake_score_warmup_kimg=0.016", "sid.fake_score_steps=3",
                     "ema.kind=power")
    counts = {"f": 0, "g": 0}
    for key, opt in (("f", loop.opt_f), ("g", loop.opt_g)):
        step = opt.step

        def counted(*a, _step=step, _key=key, **k):
            counts[_key] += 1
            return _step(*a, **k)
        opt.step = counted
    start = copy.deepcopy(loop.generator_net.state_dict())
    history = []
    for _ in range(4):  # batch 8: warm-up 16 images = the first two steps
        stats = loop.train_step()
        loop.cur_nimg += loop.cfg.batch_size
        loop.step += 1
        same = all(torch.equal(v, loop.generator_net.state_dict()[k]) for k, v in start.items())
        history.append((counts["f"], counts["g"], "loss_generator" in stats, same))
    assert history == [(3, 0, False, True), (6, 0, False, True), (9, 1, True, False), (12, 2, True, False)]
    assert loop.ema.num_updates == 2  # the EMA follows generator updates only


def test_reuse_samples_trains_the_fake_score_on_the_generator_updates_samples(tiny_teacher, tmp_path, monkeypatch):
    import sid.train_sid as train_sid

    loop = make_loop(tiny_teacher, tmp_path, "sid.sida.enabled=true", "sid.fake_score_warmup_kimg=0.008",
                     "sid.fake_score_steps=2", "sid.reuse_samples=true")
    events = []  # in call order: generator forwards (with or without grad) and the x_g of each fake-score update
    loop.generator_net.register_forward_hook(
        lambda m, args, out: events.append(("G", torch.is_grad_enabled(), out.detach().clone())))
    fake_loss = train_sid.sida_fake_score_loss

    def spy(net, x_g, *a, **k):
        events.append(("F", x_g.clone()))
        return fake_loss(net, x_g, *a, **k)
    monkeypatch.setattr(train_sid, "sida_fake_score_loss", spy)
    for _ in range(2):  # batch 8: the first step is the warm-up (fake score only)
        loop.train_step()
        loop.cur_nimg += loop.cfg.batch_size
        loop.step += 1
    assert [(e[0], e[1]) if e[0] == "G" else "F" for e in events] == [
        ("G", False), "F", ("G", False), "F",  # warm-up: each fake-score update makes its own samples
        ("G", True), "F", ("G", False), "F"]  # the generator update first; the first fake-score update reuses
    torch.testing.assert_close(events[5][1], events[4][2], rtol=0, atol=0)
    assert not torch.equal(events[7][1], events[4][2])  # the second update has fresh inputs
    # The generator's optimizer step came between: its samples were made before the update, as DMD2's loop does.
    loop.step = 1
    with torch.no_grad():
        g, z, labels, chain = loop._inputs(0, "generator")
        after = loop.generator_plain(z, labels, chain)
    assert after.shape == events[4][2].shape and not torch.equal(after, events[4][2])


def test_lr_decay_follows_cur_nimg_for_both_networks(tiny_teacher, tmp_path):
    loop = make_loop(tiny_teacher, tmp_path, "sid.lr_generator=4e-5", "sid.lr_fake_score=2e-5",
                     "sid.lr_decay_kimg=0.008")
    seen = []
    for nimg in (0, 8, 32, 72):  # kimg / decay = 0, 1, 4, 9 -> factors 1, 1, 1/2, 1/3
        loop.cur_nimg = nimg
        loop.train_step()
        seen += [loop.opt_g.param_groups[0]["lr"], loop.opt_f.param_groups[0]["lr"]]
    assert seen == pytest.approx([4e-5, 2e-5, 4e-5, 2e-5, 2e-5, 1e-5, 4e-5 / 3, 2e-5 / 3])
    loop.load_state_dict(loop.state_dict())  # resume resets the groups to the base rates; the next step decays
    loop.train_step()
    assert loop.opt_g.param_groups[0]["lr"] == pytest.approx(4e-5 / 3)


@pytest.mark.parametrize("with_fake_score", [False, True])
def test_lr_cooldown_falls_to_zero_at_the_end_of_the_run(tiny_teacher, tmp_path, with_fake_score):
    # total_kimg 0.064 with a 0.032 kimg cool-down: full rate until 32 images, then linear to 0 at 64.
    loop = make_loop(tiny_teacher, tmp_path, "total_kimg=0.064", "sid.lr_generator=4e-5", "sid.lr_fake_score=2e-5",
                     "sid.lr_cooldown_kimg=0.032", f"sid.lr_cooldown_fake_score={str(with_fake_score).lower()}")
    seen = []
    for nimg in (0, 32, 48, 56):
        loop.cur_nimg = nimg
        loop.train_step()
        seen += [loop.opt_g.param_groups[0]["lr"], loop.opt_f.param_groups[0]["lr"]]
    fake = [2e-5, 2e-5, 1e-5, 5e-6] if with_fake_score else [2e-5] * 4
    assert seen == pytest.approx([r for pair in zip([4e-5, 4e-5, 2e-5, 1e-5], fake) for r in pair])


def test_cooldown_factor_is_linear_and_clamped():
    from sid.training import cooldown_factor

    assert cooldown_factor(5_000, 14, 0) == 1.0  # off
    assert [cooldown_factor(n, 14, 7) for n in (0, 7_000, 10_500, 14_000, 20_000)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.0])
    assert cooldown_factor(0, 2, 7) == pytest.approx(2 / 7)  # a cool-down longer than the run starts below 1


def test_nan_sample_is_masked_per_sample(tiny_teacher, tmp_path):
    # Non-default fake-score noise (the mnist5k configs' kind): the reference below draws sigma from the config, so
    # a loop that ignored sid.P_mean / sid.P_std would fail here too.
    loop = make_loop(tiny_teacher, tmp_path, "sid.P_mean=0.0", "sid.P_std=1.6")
    inputs = loop._inputs

    def nan_first(micro, phase):
        g, z, labels, chain = inputs(micro, phase)
        z = z.clone()
        z[0] = float("nan")
        return g, z, labels, chain

    loop._inputs = nan_first
    gen0, fake0 = copy.deepcopy(loop.generator_net), copy.deepcopy(loop.fake_score_plain)
    seen = []
    step = loop._optimizer_step

    def spy(opt, model, clip=None):
        seen.append(({n: p.grad.clone() for n, p in model.named_parameters()}, copy.deepcopy(loop.fake_score_plain)))
        return step(opt, model, clip)

    loop._optimizer_step = spy
    stats = loop.train_step()
    assert float(stats["nonfinite_samples"]) == 2 and float(stats["nonfinite_grads"]) == 0  # one per phase
    assert all(torch.isfinite(p).all() for p in loop.generator_net.parameters())
    s, B = loop.cfg.sid, loop.micro_batch
    # Reference: the same draws, the losses of samples 1..B-1 only, divided by the full batch.
    g, z, labels, _ = inputs(0, "fake_score")
    with torch.no_grad():
        x_g = FewStepGenerator(gen0, s.sigma_init)(z, labels)
    sigma = (torch.randn(B, 1, 1, 1, generator=g) * s.P_std + s.P_mean).exp()
    noise = torch.randn(x_g.shape, generator=g)
    (edm_loss(fake0, x_g[1:], labels[1:], sigma=sigma[1:], noise=noise[1:]).sum() / B).backward()
    for n, p in fake0.named_parameters():
        torch.testing.assert_close(seen[0][0][n], p.grad, rtol=1e-4, atol=1e-7)
    g, z, labels, _ = inputs(0, "generator")
    sigma = sid_sigma(torch.rand(B, 1, 1, 1, generator=g) * (s.tmax / 1000), s.sigma_min, s.sigma_max, s.rho)
    noise = torch.randn(z.shape, generator=g)
    fake_now = seen[1][1]
    loss = generator_loss(loop.teacher, fake_now, FewStepGenerator(gen0, s.sigma_init)(z[1:], labels[1:]), labels[1:],
                          alpha=s.alpha, sigma=sigma[1:], noise=noise[1:])
    (loss.sum() / B).backward()
    for n, p in gen0.named_parameters():
        torch.testing.assert_close(seen[1][0][n], p.grad, rtol=1e-4, atol=1e-7)


def test_fake_score_sigma_generator_draws_the_generator_losses_sigmas(tiny_teacher, tmp_path, monkeypatch):
    import sid.train_sid as train_sid

    loop = make_loop(tiny_teacher, tmp_path, "sid.fake_score_sigma=generator", "sid.tmax=600", "sid.sigma_min=0.01")
    seen = []
    for name in ("edm_loss", "sida_fake_score_loss"):
        fn = getattr(train_sid, name)
        monkeypatch.setattr(train_sid, name, lambda *a, fn=fn, **k: seen.append(k["sigma"]) or fn(*a, **k))
    loop.train_step()
    s, B = loop.cfg.sid, loop.micro_batch
    g = loop._inputs(0, "fake_score")[0]
    expect = sid_sigma(torch.rand(B, 1, 1, 1, generator=g) * 0.6, 0.01, s.sigma_max, s.rho)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expect, rtol=0, atol=0)
    assert float(seen[0].min()) >= 0.01 and float(seen[0].max()) <= float(sid_sigma(torch.tensor(0.6), 0.01))


# ----------------------------------------------------------------------------
# sigma_data in saved denoisers.


def test_sigma_data_round_trips_through_a_saved_denoiser(tmp_path):
    from backbones import HybridDenoiser
    from sid import EDMPrecond
    from sid.teachers import load_generator, load_teacher, save_generator

    torch.manual_seed(0)
    D = EDMPrecond(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=10), sigma_data=0.7)
    D.save_pretrained(str(tmp_path / "d"))
    assert json.loads((tmp_path / "d" / "sid_precond.json").read_text())["sigma_data"] == 0.7
    back = load_teacher(str(tmp_path / "d"))
    assert back.sigma_data == 0.7
    x, sigma = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 2.0])
    torch.testing.assert_close(back(x, sigma), D(x, sigma))
    save_generator(D, str(tmp_path / "g"), 2.5)
    assert load_generator(str(tmp_path / "g")).denoiser.sigma_data == 0.7
    # A folder written before the file existed reads as EDM's 0.5; a corrupt one is one sentence.
    os.remove(tmp_path / "d" / "sid_precond.json")
    assert load_teacher(str(tmp_path / "d")).sigma_data == 0.5
    (tmp_path / "d" / "sid_precond.json").write_text('{"sigma_data": -1}')
    with pytest.raises(UserError, match="sigma_data -1.0, expected a positive number") as e:
        load_teacher(str(tmp_path / "d"))
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------
# Power-function EMA.


def test_power_ema_against_its_closed_form():
    # The EDM2 paper's pairs: sigma_rel 0.10 <-> gamma 6.94, 0.05 <-> 16.97.
    assert round(power_exponent(0.10), 2) == 6.94 and round(power_exponent(0.05), 2) == 16.97
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert math.isclose(power_sigma_rel(power_exponent(s)), s, rel_tol=1e-9)
    assert power_beta(1, 6.94) == 0.0
    net = torch.nn.Linear(1, 2, bias=False).double()
    ema = PowerEMA(net, [0.05, 0.10])
    torch.manual_seed(0)
    history = []
    for t in range(1, 31):
        with torch.no_grad():
            net.weight.copy_(torch.randn(2, 1, dtype=torch.float64))
        history.append(net.weight.detach().clone())
        ema.update(net)
        for model, g in zip(ema.models, ema.gammas, strict=True):
            # Written out: weight of snapshot tau after t updates = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1).
            ref = sum(((tau ** (g + 1) - (tau - 1) ** (g + 1)) / t ** (g + 1)) * p
                      for tau, p in enumerate(history, start=1))
            torch.testing.assert_close(model.weight, ref, rtol=1e-10, atol=1e-12)
    assert ema.num_updates == 30


@pytest.mark.parametrize("order", [[], ["sid.reuse_samples=true"]], ids=["sid-order", "reuse-samples"])
def test_power_ema_and_sida_resume_exactly(tiny_teacher, tmp_path, order):
    from sid.cli import run
    from sid.runs import list_checkpoints, load_checkpoint

    args = ["sid.sida.enabled=true", "sid.sida.gan_start_kimg=0.016", "sid.fake_score_steps=2",
            "sid.fake_score_warmup_kimg=0.008", "ema.kind=power", "checkpoint_kimg=0.016", "snapshot_kimg=1",
            "grid_seeds=2", *order]

    def cfg(run_dir, total, *extra):
        return load_config(SMOKE, [f"teacher={tiny_teacher}", "data.name=digits", f"run_dir={run_dir}",
                                   "mixed_precision=fp32", f"total_kimg={total}", *args, *extra])

    run(cfg(tmp_path / "a", 0.032))
    run(cfg(tmp_path / "b", 0.016))
    run(cfg(tmp_path / "b", 0.032, "resume=auto"))
    a, b = (load_checkpoint(list_checkpoints(str(tmp_path / r / "checkpoints"))[-1]) for r in "ab")
    assert a["cur_nimg"] == b["cur_nimg"] == 32
    for key in ("generator", "fake_score", "generator_ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert int(a["generator_ema"]["num_updates"][0]) == 3  # 4 steps, the first in the warm-up
    rows = [json.loads(ln) for ln in (tmp_path / "a" / "stats.jsonl").read_text().splitlines()]
    assert "loss_generator" not in rows[0] and "loss_gan" in rows[1] and "loss_discriminator" in rows[0]
    # A resume that would change what the averages are is refused.
    with pytest.raises(UserError, match="ema.kind: 'power' -> 'halflife'"):
        run(cfg(tmp_path / "b", 0.048, "resume=auto", "ema.kind=halflife"))
    # SiD2A: a new run starts its generator from the exported one.
    loop = make_loop(tiny_teacher, tmp_path / "c", f"sid.init_generator={tmp_path / 'a' / 'generator'}")
    from sid.teachers import load_generator

    exported = load_generator(str(tmp_path / "a" / "generator")).denoiser.state_dict()
    assert all(torch.equal(v, loop.generator_net.state_dict()[k]) for k, v in exported.items())
    assert all(torch.equal(v, loop.fake_score_plain.state_dict()[k]) for k, v in loop.teacher.state_dict().items())


# ----------------------------------------------------------------------------
# Configuration errors and evaluation on two seed sets.


@pytest.mark.parametrize("args, message", [
    (["sid.fake_score_steps=0"], "config key 'sid.fake_score_steps' is 0, expected a positive integer"),
    (["sid.lr_decay_kimg=-1"], "config key 'sid.lr_decay_kimg' is -1.0, expected a number >= 0"),
    (["sid.lr_cooldown_kimg=-2"], "config key 'sid.lr_cooldown_kimg' is -2.0, expected a number >= 0"),
    (["sid.lr_cooldown_fake_score=true"], "config key 'sid.lr_cooldown_fake_score' is true but sid.lr_cooldown_kimg"),
    (["ema.kind=power", "ema.export=2"], "config key 'ema.export' is '2', expected best or an index"),
    (["ema.sigma_rel=[0.5]"], "config key 'ema.sigma_rel' is [0.5], expected one or more numbers in (0, 0.2887]"),
    (["sid.betas_fake_score=[0.9]"], "config key 'sid.betas_fake_score' is [0.9], expected two numbers"),
    (["sid.init_generator=/nonexistent"], "config key 'sid.init_generator' is '/nonexistent', which is not a folder"),
    (["sid.sida.enabled=true", "data.name=none"], "SiDA needs real images and data.name is none"),
])
def test_bad_recipe_values_are_one_sentence(args, message):
    with pytest.raises(UserError) as e:
        load_config(SMOKE, args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_recipe_value_on_the_command_line_exits_2_without_traceback(capsys):
    from sid.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--config", SMOKE, "sid.fake_score_warmup_kimg=-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "sid.fake_score_warmup_kimg' is -1.0, expected a number >= 0" in err


def test_evaluation_on_two_disjoint_seed_sets(tiny_teacher_32, tmp_path):
    from sid.metrics import compute_metrics, small_sample_warning

    ref = tmp_path / "ref.npz"  # reference statistics of 128-d LeNet features: no pass over a dataset
    np.savez(ref, mu=np.full(128, 0.1), sigma=np.eye(128))
    loop = make_loop(tiny_teacher_32, tmp_path, "eval.metrics=[fd_lenet]", "eval.num_samples=12",
                     "eval.seed_sets=2", "eval.batch_size=12", f"eval.ref={ref}", "data.resolution=32")
    out = loop.evaluate()
    assert set(out) == {"fd_lenet", "fd_lenet_set0", "fd_lenet_set1", "fd_lenet_num_samples"}
    assert out["fd_lenet_num_samples"] == 12 and out["fd_lenet_set0"] != out["fd_lenet_set1"]
    assert math.isclose(out["fd_lenet"], (out["fd_lenet_set0"] + out["fd_lenet_set1"]) / 2)
    e = loop.cfg.eval
    second = compute_metrics(loop.make_images, list(range(12, 24)), ["fd_lenet"], batch_size=12, lenet_path=e.lenet,
                             ref_path=e.ref, progress=False)
    assert math.isclose(second[0]["value"], out["fd_lenet_set1"], rel_tol=1e-9)
    # 12 samples of 128-d LeNet features: a singular covariance, and the warning says so.
    assert "not meaningful" in small_sample_warning("fd_lenet", 12, 128)
    assert small_sample_warning("fd_lenet", 2000, 128) is None
    assert np.isfinite(out["fd_lenet"])


def test_sida_requires_the_encoder_of_a_known_network():
    from sid.discriminator import SiDAFakeScore

    with pytest.raises(UserError, match="has no known encoder site"):
        SiDAFakeScore(torch.nn.Linear(2, 2))


def test_export_best_picks_the_average_with_the_lowest_distance(tiny_teacher_32, tmp_path):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.full(128, 0.1), sigma=np.eye(128))
    loop = make_loop(tiny_teacher_32, tmp_path, "eval.metrics=[fd_lenet]", "eval.num_samples=12", "eval.batch_size=12",
                     f"eval.ref={ref}", "data.resolution=32", "ema.kind=power", "ema.sigma_rel=[0.05,0.1,0.2]",
                     "ema.export=best")
    with torch.no_grad():  # make the three averages differ
        for i, model in enumerate(loop.ema.models):
            for p in model.parameters():
                p.mul_(1 + 0.3 * i)
    out = loop.evaluate()
    values = {name: out[f"fd_lenet_{name}"] for name in ("ema0.05", "ema0.1", "ema0.2")}
    best = min(values, key=values.get)
    assert out["ema_best"] == best and out["fd_lenet"] == values[best] and len(set(values.values())) == 3
    assert loop.export_index() == loop.ema.names.index(best)
    assert torch.equal(loop.sample_grid(), loop.make_images(list(range(loop.cfg.grid_seeds)),
                                                            loop.ema.models[loop.export_index()]))


def test_sida_generator_loss_without_score_grad_keeps_the_gan_gradient():
    # score_grad=False: the SiD term's gradient is DMD's (f_psi - f_phi) / w, the GAN term's still flows through
    # the discriminator's logits to x_g.
    torch.manual_seed(3)
    B, clamp = 3, 10.0
    x_g = torch.randn(B, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor([0.2, 2.0, 9.0], dtype=torch.float64).view(B, 1, 1, 1)
    noise = torch.randn(B, 1, 2, 2, dtype=torch.float64)
    teacher = lambda x, s, c=None: 0.7 * x  # noqa: E731
    fake = ToyFake(a=0.4, b=0.9, d=0.1)
    loss_sid, loss_gan = sida_generator_loss(teacher, fake, x_g, sigma=sigma, noise=noise, logit_clamp=clamp,
                                             score_grad=False)
    full_sid, full_gan = sida_generator_loss(teacher, fake, x_g, sigma=sigma, noise=noise, logit_clamp=clamp)
    torch.testing.assert_close(loss_sid, full_sid)
    torch.testing.assert_close(loss_gan, full_gan)
    x_t = x_g.detach() + sigma * noise
    f_phi, f_psi = 0.7 * x_t, 0.4 * x_t
    w = (x_g.detach() - f_phi).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    (g_sid,) = torch.autograd.grad(loss_sid.sum(), x_g, retain_graph=True)
    torch.testing.assert_close(g_sid.double(), (f_psi - f_phi) / w, rtol=1e-5, atol=1e-6)  # float32 inside
    # GAN term: d/dx_g of 4 * mean(softplus(-(b x_t + d))) / w = -b * sigmoid(-(b x_t + d)) / w (no clamp binds).
    (g_gan,) = torch.autograd.grad(loss_gan.sum(), x_g)
    ref = -fake.b.detach() * torch.sigmoid(-(fake.b.detach() * x_t + fake.d.detach())) / w
    torch.testing.assert_close(g_gan.double(), ref, rtol=1e-5, atol=1e-6)
    # The fake score's decoder output is a constant: nothing reaches its parameter a.
    assert torch.autograd.grad(loss_sid.sum(), fake.a, allow_unused=True)[0] is None


@pytest.mark.parametrize("flag", ["true", "false"])
def test_score_grad_reaches_the_generator_loss_and_the_teacher_runs_without_a_graph(tiny_teacher, tmp_path,
                                                                                     monkeypatch, flag):
    import sid.train_sid as train_sid

    loop = make_loop(tiny_teacher, tmp_path, f"sid.score_grad={flag}")
    seen, grad_modes = [], []
    for name in ("generator_loss", "sida_generator_loss"):
        fn = getattr(train_sid, name)
        monkeypatch.setattr(train_sid, name, lambda *a, fn=fn, **k: seen.append(k["score_grad"]) or fn(*a, **k))
    teacher = loop.teacher
    loop.teacher = lambda *a, **k: grad_modes.append(torch.is_grad_enabled()) or teacher(*a, **k)
    loop.cur_nimg = loop.g_start_nimg  # past any warm-up: this step updates the generator
    loop.train_step()
    assert seen == [flag == "true"]
    assert grad_modes and all(m == (flag == "true") for m in grad_modes)


def test_stratified_sigma_puts_one_quantile_in_each_stratum(tiny_teacher, tmp_path, monkeypatch):
    import sid.train_sid as train_sid

    loop = make_loop(tiny_teacher, tmp_path, "sid.stratified_sigma=true", "sid.P_mean=0.3", "sid.P_std=1.4")
    seen = {}

    def recording(fn, key):
        def wrapped(*a, **k):
            seen.setdefault(key, k["sigma"])  # the first call of each phase
            return fn(*a, **k)
        return wrapped

    for name, key in (("sida_fake_score_loss", "fake"), ("edm_loss", "fake"), ("sida_generator_loss", "gen"),
                      ("generator_loss", "gen")):
        monkeypatch.setattr(train_sid, name, recording(getattr(train_sid, name), key))
    loop.cur_nimg = loop.g_start_nimg
    loop.train_step()
    s, B = loop.cfg.sid, loop.micro_batch
    assert B >= 4 and set(seen) == {"fake", "gen"}
    # Back to quantiles: the fake score's lognormal through the normal CDF, the generator's sid_sigma through its
    # inverse; with B draws, sample i lies in [i / B, (i + 1) / B).
    lo, hi = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)

    def gen_quantile(sigma):  # sid_sigma's inverse, over the range of t
        return (sigma.flatten().double() ** (1 / s.rho) - lo) / (hi - lo) / (s.tmax / 1000)

    q_fake = torch.special.ndtr((seen["fake"].flatten().double().log() - 0.3) / 1.4)
    q_gen = gen_quantile(seen["gen"])
    strata = torch.arange(B, dtype=torch.float64)
    for q in (q_fake, q_gen):
        torch.testing.assert_close(torch.floor(q * B + 1e-6).clamp(max=B - 1), strata, rtol=0, atol=0)
    # The default draws are unstratified: over the same step, some stratum is empty or doubled.
    loop2 = make_loop(tiny_teacher, tmp_path / "plain", "sid.P_mean=0.3", "sid.P_std=1.4")
    g = loop2._inputs(0, "generator")[0]
    q2 = gen_quantile(loop2._generator_sigma(g, 64))
    assert torch.unique(torch.floor(q2 * 64)).numel() < 64
