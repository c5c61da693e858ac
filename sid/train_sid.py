"""SiD distillation (``kind=sid``): alternate fake-score and generator phases (Zhou et al. 2024; docs/design.md
sections 4 and 11).

Roles: ``teacher`` f_phi (frozen, never prepared), ``fake_score`` f_psi and the generator's network D_theta, both
initialised as copies of the teacher (the generator from a distilled generator with ``sid.init_generator``, SiD2A).
Plain SiD never uses real images; the dataset only supplies the label distribution and the metrics' reference.
Optional terms: SiD-LSG guidance scales (``sid.guidance.*``), a K-step generator (``sid.generator_steps``), and
SiDA (``sid.sida.*``), whose discriminator, the fake score's encoder, sees real images in the fake-score phase only.
Schedule knobs: ``sid.fake_score_steps`` fake-score updates per generator update, a fake-score warm-up
(``sid.fake_score_warmup_kimg``) without generator updates, ``sid.reuse_samples`` (the generator update first, its
samples then train the fake score: one generator forward less per step, as in DMD2's loop) and the EMA kind
(``ema.*``).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

from . import rng
from .config import Config, UserError
from .data import load_dataset, to_model_range, to_uint8
from .ema import EMA, PowerEMA
from .generator import FewStepGenerator, generator_sigmas, seed_step_noise
from .loss import edm_loss, generator_loss, sid_sigma, sida_fake_score_loss, sida_generator_loss
from .precond import EDMNetworkPrecond
from .sampling import seed_labels, seed_latents
from .teachers import DiffusersVPDenoiser, load_generator, load_teacher, save_generator
from .teachers.autoguidance import AutoGuidedDenoiser, autoguidance_weight, main_network
from .training import TrainingLoop, cooldown_factor, lr_factor, sanitize_gradients


def teacher_reference(teacher_path: str, metric: str, num_samples: int, autoguidance: float = 1.0) -> dict | None:
    """The teacher's own value of ``metric`` from ``<teacher>/metrics.jsonl`` (written by sample.py), if present:
    a line without classifier-free guidance or ``--class`` and with the autoguidance weight SiD uses; prefers a line
    measured with the labels the trainer's metrics use (``"labels": "balanced"``, or ``"none"`` for an unconditional
    teacher; lines written before 2026-12-07 have no ``labels`` key and drew them at random), then one with the same
    number of samples."""
    path = os.path.join(teacher_path, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    rows = [r for r in rows if r.get("metric") == metric and r.get("guidance", 1) == 1  # SiD distils D, no CFG
            and r.get("autoguidance", 1) == autoguidance and "class" not in r and "value" in r]  # not --trials' summary
    if not rows:
        return None
    return min(rows, key=lambda r: (r.get("labels") not in ("balanced", "none"),
                                    abs(int(r.get("num_samples", 0)) - num_samples)))


def null_class_problem(teacher) -> str | None:
    """Why ``teacher`` has no null class for classifier-free guidance, or None when it has one."""
    if isinstance(teacher, AutoGuidedDenoiser):  # both networks see the null class
        return null_class_problem(teacher.main) or (None if (p := null_class_problem(teacher.guide)) is None
                                                    else f"has a guide network that {p}")
    if teacher.label_dim == 0:
        return "is unconditional (label_dim 0)"
    if isinstance(teacher, DiffusersVPDenoiser):
        return "is a diffusers UNet2DModel, whose class embedding has no null class"
    if isinstance(teacher, EDMNetworkPrecond) and not teacher.init_kwargs.get("label_dropout", 0):
        return "was not trained with label dropout (label_dropout 0 in its init kwargs)"
    return None  # a HybridDenoiser: row label_dim of its label embedding (train.label_dropout trains it)


def with_null_class(denoiser, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """``labels`` with the null class where ``drop``: index label_dim, or a zero vector for EDM networks."""
    if isinstance(denoiser, EDMNetworkPrecond):
        return denoiser.one_hot(labels, labels.shape[0], labels.device) * (~drop).to(torch.float32)[:, None]
    return torch.where(drop, torch.full_like(labels, denoiser.label_dim), labels)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: which samples hold only finite values."""
    return torch.isfinite(x.detach()).flatten(1).all(1)


def zero_rows(keep: torch.Tensor):
    """A gradient hook that zeroes the rows of a (B, ...) gradient where ``keep`` is False."""
    mask = keep.view(-1, *([1] * 3))
    return lambda grad: torch.where(mask, grad, 0.0)


def init_generator_weights(net: torch.nn.Module, path: str) -> float:
    """Load the denoiser of the generator folder ``path`` into ``net`` (a copy of the teacher), for SiD2A; returns
    that generator's sigma_init."""
    generator = load_generator(path)
    try:
        net.load_state_dict(generator.denoiser.state_dict())
    except RuntimeError as e:
        raise UserError(f"config key 'sid.init_generator' is '{path}', whose network does not match the teacher's "
                        f"({str(e).splitlines()[0]})") from e
    return generator.init_sigma


def launch_command() -> str:
    """The command line of this process as a user would type it again."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.basename(argv[0])
    return shlex.join(["python", *argv])


def compile_networks(networks: list[torch.nn.Module], backend: str = "inductor") -> list[torch.nn.Module]:
    """Compile each network in place with ``nn.Module.compile`` (docs/design.md section 13): calling it runs the
    compiled forward, while the module object, its parameters and its state-dict keys stay those of the eager
    network (no ``_orig_mod.`` wrapper), so optimizers, the EMA (a copy made before), checkpoints, exports and exact
    resume see nothing new. Called after accelerate's ``prepare`` on the unwrapped modules, so a DDP wrapper calls
    the compiled module and keeps its own gradient hooks. Shapes are static (a new micro-batch shape compiles
    again); S4 kernel generation stays eager (a graph break), so frozen layers keep their kernel cache."""
    import torch._dynamo

    # One code object (Module._call_impl, the blocks' forwards) serves every network, phase (train/eval mode,
    # frozen or not, grad or no_grad) and precision: allow more variants than the default before falling back.
    c = torch._dynamo.config
    c.recompile_limit = max(c.recompile_limit, 64)
    c.accumulated_recompile_limit = max(c.accumulated_recompile_limit, 512)
    for net in networks:
        net.compile(backend=backend, dynamic=False)
    return networks


class SiDLoop(TrainingLoop):
    kind = "sid"

    def __init__(self, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        s = cfg.sid
        # The teacher's score; with sid.guidance.autoguidance != 1 guided by the guide network its folder names.
        self.teacher = load_teacher(cfg.teacher, autoguidance=s.guidance.autoguidance).to(self.device)
        self.shape = (self.teacher.img_channels, self.teacher.img_resolution, self.teacher.img_resolution)
        self.label_dim = self.teacher.label_dim
        cond = f"{self.label_dim} classes" if self.label_dim else "unconditional"
        self.log(f"teacher: {cfg.teacher} ({type(self.teacher).__name__}, {'x'.join(map(str, self.shape))}, {cond})")
        if isinstance(self.teacher, AutoGuidedDenoiser):
            guide_params = sum(p.numel() for p in self.teacher.guide.parameters()) / 1e6
            self.log(f"autoguidance: the teacher's score is guide + {self.teacher.weight:g} x (main - guide); guide: "
                     f"{type(self.teacher.guide).__name__}, {guide_params:.2f} M parameters; generator and fake score "
                     "start from the main network")
        # The dataset: label distribution and metric reference; its images must match the teacher.
        self.dataset = load_dataset(cfg.data) if cfg.data.name != "none" else None
        if self.dataset is not None:
            self.log(f"data: {self.dataset.describe()}")
            ds_shape = (self.dataset.channels, self.dataset.resolution, self.dataset.resolution)
            if ds_shape != self.shape:
                raise UserError(f"the teacher makes {'x'.join(map(str, self.shape))} images but {self.dataset.name} "
                                f"holds {'x'.join(map(str, ds_shape))} images; images are never resized")
        gd = s.guidance
        self.guided = {k: getattr(gd, k) for k in ("train_fake", "eval_fake", "eval_real") if getattr(gd, k) != 1}
        problem = null_class_problem(self.teacher) if self.guided else None
        if problem:
            key, value = next(iter(self.guided.items()))
            raise UserError(f"config key 'sid.guidance.{key}' is {value}, but guidance needs a null class and the "
                            f"teacher {cfg.teacher} {problem}; expected 1")
        # SiD-LSG's fake score also learns its unconditional branch when it is guided (null labels in its phase).
        self.fake_label_dropout = gd.fake_label_dropout if ("train_fake" in self.guided or "eval_fake" in
                                                            self.guided) else 0.0
        self.steps = s.generator_steps
        if self.guided or self.steps > 1:
            sigmas = ", ".join(f"{x:.3g}" for x in generator_sigmas(self.steps, s.sigma_init))
            self.log(f"guidance: kappa1 (train_fake) {gd.train_fake}, kappa2 = kappa3 (eval_fake) {gd.eval_fake}, "
                     f"kappa4 (eval_real) {gd.eval_real}; fake-score null labels {self.fake_label_dropout}; "
                     f"generator: {self.steps} step(s) at sigma {sigmas}")
        self.label_table = None
        if self.label_dim > 0 and s.labels == "data":
            if self.dataset is None or self.dataset.labels is None:
                raise UserError(f"the teacher is class-conditional but data.name={cfg.data.name} has no labels; set "
                                "sid.labels=uniform or give a labelled dataset")
            if self.dataset.num_classes > self.label_dim:
                raise UserError(f"{self.dataset.name} has {self.dataset.num_classes} classes but the teacher only "
                                f"{self.label_dim}")
            self.label_table = torch.as_tensor(self.dataset.labels, device=self.device)
        if cfg.eval.metrics:
            from .metrics import check_metrics

            check_metrics(cfg.eval.metrics, self.shape, detector_path=cfg.eval.detector, lenet_path=cfg.eval.lenet,
                          ref_path=cfg.eval.ref, has_ref_dataset=self.dataset is not None, training=True)
        # SiDA: real images (and their labels) for the discriminator.
        self.sida = s.sida.enabled
        if self.sida:
            if self.dataset is None:
                raise UserError("config key 'sid.sida.enabled' is true, but SiDA needs real images and data.name is "
                                "none; expected a dataset")
            if self.label_dim > 0 and self.dataset.labels is None:
                raise UserError(f"config key 'sid.sida.enabled' is true and the teacher is class-conditional, but "
                                f"{self.dataset.name} has no labels for its real images; expected a labelled dataset")
            if self.label_dim > 0 and self.dataset.num_classes > self.label_dim:
                raise UserError(f"{self.dataset.name} has {self.dataset.num_classes} classes but the teacher only "
                                f"{self.label_dim}")
        if cfg.ema.export == "best" and cfg.ema.kind == "power" and not cfg.eval.metrics:
            raise UserError("config key 'ema.export' is best, which picks the average by its metric, but eval.metrics "
                            "is empty; expected an index into ema.sigma_rel or some metrics")
        # Generator and fake score start as copies of the teacher (of the foreign model for adapters; of the main
        # network of an autoguided teacher).
        generator_net = copy.deepcopy(main_network(self.teacher)).train().requires_grad_(True)
        if s.init_generator is not None:
            init_sigma = init_generator_weights(generator_net, s.init_generator)
            self.log(f"generator: initialised from {s.init_generator} (SiD2A; its sigma_init {init_sigma:g}, this run "
                     f"{s.sigma_init:g})")
        fake_score = copy.deepcopy(main_network(self.teacher)).train().requires_grad_(True)
        if self.sida:
            from .discriminator import SiDAFakeScore

            fake_score = SiDAFakeScore(fake_score).train().requires_grad_(True)
            a = s.sida
            self.log(f"SiDA: discriminator = fake score's {fake_score.site_description}; lsd {a.lsd}, lsg {a.lsg}, "
                     f"lsg_gan {a.lsg_gan} from {a.gan_start_kimg:g} kimg, fake-score gradients clipped at "
                     f"{a.fake_score_grad_clip}")
        opt_g = torch.optim.Adam(generator_net.parameters(), **self._adam("generator"))
        opt_f = torch.optim.Adam(fake_score.parameters(), **self._adam("fake_score"))
        self.generator_net, self.fake_score, self.opt_g, self.opt_f = accelerator.prepare(
            generator_net, fake_score, opt_g, opt_f)
        unwrap = accelerator.unwrap_model
        # Through DDP: gradients all-reduced.
        self.generator = FewStepGenerator(self.generator_net, s.sigma_init, self.steps)
        self.generator_plain = FewStepGenerator(unwrap(self.generator_net), s.sigma_init, self.steps)
        self.fake_score_plain = unwrap(self.fake_score)
        self.fake_denoiser = self.fake_score_plain.denoiser if self.sida else self.fake_score_plain
        # Schedule: the generator's first update is the first step at or after the warm-up.
        warmup_nimg = int(round(s.fake_score_warmup_kimg * 1000))
        self.g_start_nimg = -(-warmup_nimg // cfg.batch_size) * cfg.batch_size
        if s.fake_score_steps > 1 or self.g_start_nimg > 0 or s.reuse_samples:
            self.log(f"schedule: {s.fake_score_steps} fake-score update(s) per generator update; generator updates "
                     f"from {self.g_start_nimg / 1000:g} kimg"
                     + ("; the generator update first, the fake score on its samples" if s.reuse_samples else ""))
        if s.lr_cooldown_kimg > 0:
            which = "generator's and the fake score's" if s.lr_cooldown_fake_score else "generator's"
            self.log(f"learning rates: the {which} fall linearly from {max(cfg.total_kimg - s.lr_cooldown_kimg, 0):g} "
                     f"kimg to 0 at {cfg.total_kimg:g} kimg")
        e = cfg.ema
        if e.kind == "power":
            self.ema = PowerEMA(unwrap(self.generator_net), e.sigma_rel)
            self.log(f"EMA: power function, sigma_rel {', '.join(f'{v:g}' for v in e.sigma_rel)} (gamma "
                     f"{', '.join(f'{g:.3f}' for g in self.ema.gammas)}); exported: "
                     f"{'best by ' + cfg.eval.metrics[0] if e.export == 'best' else self.ema.names[int(e.export)]}")
        else:
            self.ema = EMA(unwrap(self.generator_net), e.halflife_kimg, e.rampup)
        self.best_index = 0  # export=best: the average with the lowest first metric at the last evaluation
        self.teacher_ref = {m: teacher_reference(cfg.teacher, m, cfg.eval.num_samples, autoguidance_weight(
            self.teacher)) for m in cfg.eval.metrics}
        if cfg.compile:
            compile_networks([self.teacher, unwrap(self.generator_net), unwrap(self.fake_score)], cfg.compile_backend)
            self.log(f"compile: teacher, generator and fake score with torch.compile (backend {cfg.compile_backend}); "
                     "the first steps compile each phase's graphs")

    def _adam(self, network: str) -> dict:
        """Adam settings of ``network`` (generator | fake_score): its own lr and betas (sid.betas when null)."""
        s = self.cfg.sid
        betas = getattr(s, f"betas_{network}")
        # foreach: the multi-tensor Adam, bit-identical to the per-parameter loop and ~25 % cheaper on CPU (CUDA
        # picks it by default).
        return {"lr": getattr(s, f"lr_{network}"), "betas": tuple(s.betas if betas is None else betas), "eps": s.eps,
                "foreach": True if self.device.type in ("cpu", "cuda") else None}

    def export_index(self) -> int:
        """Which tracked average is exported (and drawn in the grids)."""
        e = self.cfg.ema
        if e.kind != "power":
            return 0
        return self.best_index if e.export == "best" else int(e.export)

    # Random inputs: pure functions of (seed, step, rank, micro-batch, phase).

    def _inputs(self, micro: int, phase: str):
        g = rng.generator(self.cfg.seed, self.step, self.rank, micro, phase, device=self.device)
        n = self.micro_batch
        z = torch.randn((n, *self.shape), generator=g, device=self.device)
        if self.label_dim == 0:
            labels = None
        elif self.label_table is not None:
            labels = self.label_table[torch.randint(len(self.label_table), (n,), generator=g, device=self.device)]
        else:
            labels = torch.randint(self.label_dim, (n,), generator=g, device=self.device)
        # Fresh noise of generator steps 2..K; nothing is drawn for K = 1.
        chain = torch.randn((self.steps - 1, n, *self.shape), generator=g, device=self.device) \
            if self.steps > 1 else None
        return g, z, labels, chain

    def _phase(self, train_fake_score: bool) -> None:
        """The one place that decides which network trains; the teacher is always frozen. The other network is in
        eval mode for the phase (no dropout, e.g. in EDM teachers' copies), as in the SiD reference loop."""
        self.fake_score.requires_grad_(train_fake_score).train(train_fake_score)
        self.generator_net.requires_grad_(not train_fake_score).train(not train_fake_score)

    def _optimizer_step(self, opt, model, clip_value: float | None = None) -> torch.Tensor:
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients(opt)
        bad = sanitize_gradients(model.parameters())
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(model.parameters(), clip_value)
        opt.step()
        return bad

    def _fake_score_sigma(self, g: torch.Generator, n: int) -> torch.Tensor:
        """The fake score's noise levels: EDM's lognormal (sid.P_mean, sid.P_std), or with sid.fake_score_sigma =
        generator the generator loss's own distribution, sid_sigma(t) with t ~ U(0, tmax / 1000) (as DMD2 trains its
        fake score on the timesteps of its generator loss)."""
        s = self.cfg.sid
        if s.fake_score_sigma == "generator":
            return self._generator_sigma(g, n)
        if s.stratified_sigma:
            q = self._uniforms(g, n).clamp(1e-7, 1 - 1e-7)
            return (torch.special.ndtri(q) * s.P_std + s.P_mean).exp()
        return (torch.randn(n, 1, 1, 1, generator=g, device=self.device) * s.P_std + s.P_mean).exp()

    def _generator_sigma(self, g: torch.Generator, n: int) -> torch.Tensor:
        """The generator loss's noise levels: sid_sigma(t) with t ~ U(0, tmax / 1000)."""
        s = self.cfg.sid
        t = self._uniforms(g, n) * (s.tmax / 1000)
        return sid_sigma(t, s.sigma_min, s.sigma_max, s.rho)

    def _uniforms(self, g: torch.Generator, n: int) -> torch.Tensor:
        """n draws of U(0, 1) as (n, 1, 1, 1); with sid.stratified_sigma one in each interval [i / n, (i + 1) / n)
        (stratified sampling: the same marginal distribution, and every batch covers the whole range)."""
        u = torch.rand(n, 1, 1, 1, generator=g, device=self.device)
        if self.cfg.sid.stratified_sigma:
            u = (torch.arange(n, device=self.device).view(-1, 1, 1, 1) + u) / n
        return u

    def _real_images(self, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SiDA: n real images in [-1, 1], drawn uniformly with replacement, and their labels (None when the teacher
        is unconditional). Only the fake-score phase calls this."""
        idx = torch.randint(len(self.dataset), (n,), generator=g, device=self.device).cpu()
        images, labels = self.dataset.get_batch(idx)
        labels = labels.to(self.device) if self.label_dim > 0 else None
        return to_model_range(images).to(self.device), labels

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.cfg.sid
        zero = lambda: torch.zeros((), device=self.device)
        stats = {k: zero() for k in ("loss_fake_score", "nonfinite_samples")}
        if self.sida:
            stats["loss_discriminator"] = zero()
        if s.lr_decay_kimg > 0 or s.lr_cooldown_kimg > 0:  # pure functions of cur_nimg (and the run length)
            factor = lr_factor(self.cur_nimg, 0.0, s.lr_decay_kimg)
            cool = cooldown_factor(self.cur_nimg, cfg.total_kimg, s.lr_cooldown_kimg)
            factors = {"generator": factor * cool, "fake_score": factor * (cool if s.lr_cooldown_fake_score else 1.0)}
            for opt, network in ((self.opt_g, "generator"), (self.opt_f, "fake_score")):
                for group in opt.param_groups:
                    group["lr"] = getattr(s, f"lr_{network}") * factors[network]
        # Dropout (e.g. in copies of EDM teachers) draws from the global RNG: seed it per step for exact resume.
        torch.manual_seed(rng.derive_seed(cfg.seed, self.step, self.rank, "dropout"))

        bad, samples = zero(), None
        g_update = self.cur_nimg >= self.g_start_nimg  # after the fake-score warm-up
        if g_update and s.reuse_samples:
            # The order of DMD2's loop: the generator update comes first and keeps its samples (made before its
            # optimizer step), so the fake score's first update below needs no generator forward of its own.
            samples = []
            bad += self._generator_update(stats, samples)

        # Update fake score, fake_score_steps times (fresh inputs each, or the generator phase's samples for the
        # first with sid.reuse_samples; the first has the phase name of plain SiD).
        for j in range(s.fake_score_steps):
            bad += self._fake_score_update("fake_score" if j == 0 else f"fake_score{j}", stats, s.fake_score_steps,
                                           samples if j == 0 else None)

        if g_update and not s.reuse_samples:
            bad += self._generator_update(stats)
        stats["nonfinite_grads"] = bad
        return stats

    def _fake_score_update(self, phase: str, stats: dict, n_updates: int, samples: list | None = None
                           ) -> torch.Tensor:
        """One fake-score step: the EDM loss on G's samples (plus SiDA's discriminator loss on real and generated
        images). A sample whose image or loss is not finite is masked out (zero image in, zero loss out) and
        counted in nonfinite_samples. ``samples``: per micro-batch (x_g, labels, ok) kept by the generator update
        (sid.reuse_samples), used instead of a fresh generator forward."""
        cfg, s = self.cfg, self.cfg.sid
        self._phase(train_fake_score=True)
        self.opt_f.zero_grad(set_to_none=True)
        for micro in range(cfg.accum_steps):
            g, z, labels, chain = self._inputs(micro, phase)
            if samples:
                x_g, labels, ok = samples[micro]
            else:
                with torch.no_grad(), self.autocast():
                    x_g = self.generator_plain(z, labels, chain)
                ok = finite_rows(x_g)
                x_g = torch.where(ok.view(-1, 1, 1, 1), x_g.to(torch.float32), 0.0)
            sigma = self._fake_score_sigma(g, x_g.shape[0])
            noise = torch.randn(x_g.shape, generator=g, device=self.device)
            labels_f, drop = labels, None
            if self.fake_label_dropout > 0 and labels is not None:
                drop = torch.rand(labels.shape, generator=g, device=self.device) < self.fake_label_dropout
                labels_f = with_null_class(self.fake_denoiser, labels, drop)
            if self.sida:  # the only place real images enter
                x_real, real_labels = self._real_images(g, x_g.shape[0])
                if drop is not None:
                    real_labels = with_null_class(self.fake_denoiser, real_labels, drop)
            with self.no_sync_unless_last(self.fake_score, micro), self.autocast():
                if self.sida:
                    loss_edm, loss_disc = sida_fake_score_loss(
                        self.fake_score, x_g, x_real, labels_f, real_labels, sigma=sigma, noise=noise,
                        sigma_data=s.sigma_data, guidance=s.guidance.train_fake)
                    loss = loss_edm + s.sida.lsd * loss_disc
                else:
                    loss_edm = loss = edm_loss(self.fake_score, x_g, labels_f, sigma=sigma, noise=noise,
                                               sigma_data=s.sigma_data, guidance=s.guidance.train_fake)
                keep = ok & torch.isfinite(loss.detach())
                loss = torch.where(keep, loss, 0.0)
                self.accelerator.backward(loss.sum() / self.batch_per_process)
            stats["nonfinite_samples"] += (~keep).sum().float()
            stats["loss_fake_score"] += torch.where(keep, loss_edm.detach().float(), 0.0).mean() / (
                cfg.accum_steps * n_updates)
            if self.sida:
                stats["loss_discriminator"] += torch.where(keep, loss_disc.detach().float(), 0.0).mean() / (
                    cfg.accum_steps * n_updates)
        clip = s.sida.fake_score_grad_clip if self.sida else None
        return self._optimizer_step(self.opt_f, self.fake_score, clip)

    def _generator_update(self, stats: dict, samples: list | None = None) -> torch.Tensor:
        """One generator step, then the EMA update: the SiD loss (SiDA: 0.5 lsg loss_sid + 0.5 lsg_gan loss_gan once
        the GAN term is on). A non-finite generated sample is masked out: the generator runs again with that sample's
        inputs zeroed, so no NaN enters the backward pass, and its loss is zero; a non-finite loss of a finite sample
        is zeroed and its gradient stopped at x_g. Both are counted in nonfinite_samples. ``samples``, when a list,
        receives each micro-batch's (x_g detached in float32 with masked rows zeroed, labels, finite-row mask)."""
        cfg, s = self.cfg, self.cfg.sid
        gan_on = self.sida and self.cur_nimg >= s.sida.gan_start_kimg * 1000
        stats["loss_generator"] = torch.zeros((), device=self.device)
        if self.sida:
            stats["loss_gan"] = torch.zeros((), device=self.device)
        self._phase(train_fake_score=False)
        self.opt_g.zero_grad(set_to_none=True)
        for micro in range(cfg.accum_steps):
            g, z, labels, chain = self._inputs(micro, "generator")
            sigma = self._generator_sigma(g, z.shape[0])
            noise = torch.randn(z.shape, generator=g, device=self.device)
            with self.no_sync_unless_last(self.generator_net, micro), self.autocast():
                x_g = self.generator(z, labels, chain)
                ok = finite_rows(x_g)
                if not bool(ok.all()):
                    m = ok.view(-1, 1, 1, 1)
                    z = torch.where(m, z, 0.0)
                    chain = torch.where(m[None], chain, 0.0) if chain is not None else None
                    x_g = torch.where(m, self.generator(z, labels, chain).to(torch.float32), 0.0)
                if samples is not None:
                    samples.append((torch.where(ok.view(-1, 1, 1, 1), x_g.detach().to(torch.float32), 0.0), labels,
                                    ok))
                kw = dict(alpha=s.alpha, sigma=sigma, noise=noise, guidance_fake=s.guidance.eval_fake,
                          guidance_real=s.guidance.eval_real, score_grad=s.score_grad)
                if self.sida:
                    loss_sid, loss_gan = sida_generator_loss(self.teacher, self.fake_score_plain, x_g, labels,
                                                             logit_clamp=s.sida.logit_clamp, **kw)
                    loss = 0.5 * s.sida.lsg * loss_sid
                    if gan_on:
                        loss = loss + 0.5 * s.sida.lsg_gan * loss_gan
                else:
                    loss_sid = loss = generator_loss(self.teacher, self.fake_score_plain, x_g, labels, **kw)
                keep = ok & torch.isfinite(loss.detach())
                if not bool(keep.all()) and x_g.requires_grad:
                    x_g.register_hook(zero_rows(keep))
                loss = torch.where(keep, loss, 0.0)
                self.accelerator.backward(loss.sum() / self.batch_per_process)
            stats["nonfinite_samples"] += (~keep).sum().float()
            stats["loss_generator"] += torch.where(keep, loss_sid.detach().float(), 0.0).mean() / cfg.accum_steps
            if self.sida:
                stats["loss_gan"] += torch.where(keep, loss_gan.detach().float(), 0.0).mean() / cfg.accum_steps
        bad = self._optimizer_step(self.opt_g, self.generator_net)
        self.ema.update(self.accelerator.unwrap_model(self.generator_net), self.cur_nimg - self.g_start_nimg,
                        cfg.batch_size)
        return bad

    # State, grids, metrics, export.

    def state_dict(self) -> dict:
        unwrap = self.accelerator.unwrap_model
        return {"generator": unwrap(self.generator_net).state_dict(),
                "fake_score": unwrap(self.fake_score).state_dict(), "generator_ema": self.ema.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_f": self.opt_f.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        unwrap = self.accelerator.unwrap_model
        unwrap(self.generator_net).load_state_dict(state["generator"])
        unwrap(self.fake_score).load_state_dict(state["fake_score"])
        self.ema.load_state_dict(state["generator_ema"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_f.load_state_dict(state["opt_f"])
        # The optimizers' saved hyperparameters yield to this run's config (a changed lr or betas is listed on
        # resume and must then apply).
        for opt, network in ((self.opt_g, "generator"), (self.opt_f, "fake_score")):
            for group in opt.param_groups:
                group.update(self._adam(network))

    @torch.no_grad()
    def make_images(self, seeds, model: torch.nn.Module | None = None) -> torch.Tensor:
        """uint8 samples of the exported EMA generator (or of ``model``; K steps) for the given seeds, as sample.py
        makes them."""
        model = self.ema.models[self.export_index()] if model is None else model
        generator = FewStepGenerator(model, self.cfg.sid.sigma_init, self.steps)
        z = seed_latents(seeds, self.shape, self.device)
        chain = seed_step_noise(seeds, self.shape, self.steps, self.device)
        with self.autocast():
            return to_uint8(generator(z, seed_labels(seeds, self.label_dim, self.device), chain))

    def sample_grid(self) -> torch.Tensor:
        return self.make_images(list(range(self.cfg.grid_seeds)))

    def evaluate(self) -> dict[str, float]:
        """Metrics of the exported average on ``eval.seed_sets`` disjoint seed sets of ``eval.num_samples`` each
        (set k: seeds k*N..(k+1)*N-1): ``<metric>`` is their mean, ``<metric>_set<k>`` each set's value (when there
        are several). With ``ema.export=best`` every tracked average is measured (``<metric>_<name>``) and the one
        with the best first metric (lowest distance, highest Inception Score) becomes the exported one
        (``ema_best``)."""
        from .metrics import compute_metrics

        e = self.cfg.eval
        if not e.metrics:
            return {}
        best = self.cfg.ema.kind == "power" and self.cfg.ema.export == "best" and len(self.ema.models) > 1
        candidates = range(len(self.ema.models)) if best else [self.export_index()]
        N, out, score = e.num_samples, {}, {}
        for i in candidates:
            model = self.ema.models[i]
            values = {m: [] for m in e.metrics}
            for k in range(e.seed_sets):
                rows = compute_metrics(lambda seeds, model=model: self.make_images(seeds, model),
                                       list(range(k * N, (k + 1) * N)), e.metrics, accelerator=self.accelerator,
                                       batch_size=e.batch_size, detector_path=e.detector, lenet_path=e.lenet,
                                       ref_path=e.ref, ref_dataset=self.dataset, nfe=self.steps, progress=False,
                                       cache_dir=self.run.path)
                for r in rows:
                    values[r["metric"]].append(r["value"])
            suffix = f"_{self.ema.names[i]}" if best else ""
            for m, v in values.items():
                out[m + suffix] = float(np.mean(v))
                if e.seed_sets > 1:
                    out.update({f"{m}{suffix}_set{k}": x for k, x in enumerate(v)})
            score[i] = out[e.metrics[0] + suffix]
        if best:
            from .metrics import SCORE_METRICS  # Inception Scores: higher is better; distances: lower

            sign = -1.0 if e.metrics[0] in SCORE_METRICS else 1.0
            self.best_index = min(score, key=lambda i: sign * score[i])
            name = self.ema.names[self.best_index]
            for m in e.metrics:
                out[m] = out[f"{m}_{name}"]
                for k in range(e.seed_sets if e.seed_sets > 1 else 0):
                    out[f"{m}_set{k}"] = out[f"{m}_{name}_set{k}"]
            out["ema_best"] = name
        # Each value with its sample count (per seed set): a Frechet distance falls as the count grows.
        for m in e.metrics:
            out[f"{m}_num_samples"] = N
        return out

    def on_start(self) -> None:
        if self.cfg.metrics_kimg > 0 and self.cfg.eval.metrics:
            self.log_record({"kimg": 0.0, "step": 0, **self.evaluate()})

    def export(self) -> str:
        """The EMA generator as a SiDPipeline folder with a model card (teacher, kimg, metrics, command)."""
        from .config import to_yaml
        from .pipeline import model_card

        path = os.path.join(self.cfg.run_dir, "generator")
        if self.accelerator.is_main_process:
            i = self.export_index()
            meta = {"teacher": self.cfg.teacher, "kimg": self.cur_nimg / 1000, "generator_steps": self.steps,
                    "generator_sigmas": generator_sigmas(self.steps, self.cfg.sid.sigma_init),
                    **({"guidance": {k: getattr(self.cfg.sid.guidance, k) for k in ("train_fake", "eval_fake",
                                                                                     "eval_real")}}
                       if self.guided else {}),
                    **({"ema": {"kind": "power", "sigma_rel": self.ema.sigma_rels[i]}}
                       if self.cfg.ema.kind == "power" else {}),
                    **({"sida": True} if self.sida else {}),
                    **({"init_generator": self.cfg.sid.init_generator} if self.cfg.sid.init_generator else {})}
            card = model_card({**meta, "sigma_init": self.cfg.sid.sigma_init}, self._last_metrics(),
                              command=launch_command(), config_yaml=to_yaml(self.cfg))
            save_generator(self.ema.models[i], path, self.cfg.sid.sigma_init, meta, card=card)
        return path

    def _last_metrics(self) -> dict:
        """The newest value of each metric in stats.jsonl, with its kimg and sample count."""
        last = {}
        if os.path.isfile(self.run.stats_file):
            with open(self.run.stats_file) as fh:
                for ln in fh:
                    try:
                        r = json.loads(ln)
                    except json.JSONDecodeError:
                        continue
                    for m in self.cfg.eval.metrics:
                        if m in r:
                            n = r.get(f"{m}_num_samples", self.cfg.eval.num_samples)
                            last[m] = {"value": r[m], "num_samples": n, "kimg": r["kimg"]}
        return last

    def on_tick(self, record: dict) -> None:
        if self.accelerator.is_main_process and any(m in record for m in self.cfg.eval.metrics):
            self._plot()

    def _plot(self) -> None:
        """``fd_vs_kimg.png`` (fd_lenet) or ``<metric>_vs_kimg.png``, with the teacher's value as a line."""
        from .metrics import plot_fd_vs_kimg

        for m in self.cfg.eval.metrics:
            ref = self.teacher_ref.get(m)
            value = self.cfg.eval.teacher_value if self.cfg.eval.teacher_value is not None else (
                ref["value"] if ref else None)
            label = f"teacher ({ref['nfe']} NFE, {ref['num_samples']} samples)" if ref else "teacher"
            name = "fd_vs_kimg.png" if m == "fd_lenet" else f"{m}_vs_kimg.png"
            plot_fd_vs_kimg(self.run.stats_file, os.path.join(self.run.path, name), metric=m, teacher_value=value,
                            teacher_label=label)

    def summary(self, export_path: str) -> list[str]:
        lines = [f"samples: {self.run.samples}", f"generator (EMA, {self.steps} NFE): {export_path}  ->  python "
                 f"sample.py --generator {export_path} --seeds 0-63 --outdir out"]
        last, sets = {}, {}
        if os.path.isfile(self.run.stats_file):
            with open(self.run.stats_file) as fh:
                for ln in fh:
                    try:
                        r = json.loads(ln)
                        for m in self.cfg.eval.metrics:
                            if m in r:
                                last[m] = r[m]
                                sets[m] = [r[k] for k in sorted(r) if k.startswith(f"{m}_set")]
                    except (json.JSONDecodeError, AttributeError, TypeError):
                        continue
        n = self.cfg.eval.num_samples
        for m, v in last.items():
            ref = self.teacher_ref.get(m)
            if self.cfg.eval.teacher_value is not None and len(self.cfg.eval.metrics) == 1:
                teacher = f"teacher {self.cfg.eval.teacher_value:.3f} (eval.teacher_value)"
            elif ref:
                teacher = f"teacher {ref['value']:.3f} ({ref['nfe']} NFE, {ref['num_samples']} samples)"
            else:
                teacher = "teacher: not measured"
            count = (f"mean of {len(sets[m])} seed sets of {n} samples: " + ", ".join(f"{x:.3f}" for x in sets[m])
                     if len(sets.get(m, [])) > 1 else f"{n} samples")
            lines.append(f"{m}: generator {v:.3f} ({self.steps} NFE, {count})  |  {teacher}")
        return lines
