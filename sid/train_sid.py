"""SiD distillation (``kind=sid``): alternate fake-score and generator phases (Zhou et al. 2024; docs/design.md
sections 4 and 11).

Roles: ``teacher`` f_phi (frozen, never prepared), ``fake_score`` f_psi and the generator's network D_theta, both
initialised as copies of the teacher. Real images are never used by the losses; the dataset only supplies the
label distribution (and the reference statistics of the metrics). Optional terms: SiD-LSG guidance scales
(``sid.guidance.*``) passed to the losses, and a K-step generator (``sid.generator_steps``).
"""

from __future__ import annotations

import copy
import json
import os

import torch

from . import rng
from .config import Config, UserError
from .data import load_dataset, to_uint8
from .ema import EMA
from .generator import FewStepGenerator, generator_sigmas, seed_step_noise
from .loss import edm_loss, generator_loss, sid_sigma
from .precond import EDMNetworkPrecond
from .sampling import seed_labels, seed_latents
from .teachers import DiffusersVPDenoiser, load_teacher, save_generator
from .training import TrainingLoop, count_nonfinite, sanitize_gradients


def teacher_reference(teacher_path: str, metric: str, num_samples: int) -> dict | None:
    """The teacher's own value of ``metric`` from ``<teacher>/metrics.jsonl`` (written by sample.py), if present;
    prefers a line with the same number of samples."""
    path = os.path.join(teacher_path, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        rows = [json.loads(ln) for ln in fh if ln.strip()]
    rows = [r for r in rows if r.get("metric") == metric and r.get("guidance", 1) == 1]  # SiD distils D, unguided
    if not rows:
        return None
    return min(rows, key=lambda r: abs(int(r.get("num_samples", 0)) - num_samples))


def null_class_problem(teacher) -> str | None:
    """Why ``teacher`` has no null class for classifier-free guidance, or None when it has one."""
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


def launch_command() -> str:
    """The command line of this process as a user would type it again."""
    import shlex
    import sys

    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = os.path.basename(argv[0])
    return shlex.join(["python", *argv])


class SiDLoop(TrainingLoop):
    kind = "sid"

    def __init__(self, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        s = cfg.sid
        self.teacher = load_teacher(cfg.teacher).to(self.device)
        self.shape = (self.teacher.img_channels, self.teacher.img_resolution, self.teacher.img_resolution)
        self.label_dim = self.teacher.label_dim
        cond = f"{self.label_dim} classes" if self.label_dim else "unconditional"
        self.log(f"teacher: {cfg.teacher} ({type(self.teacher).__name__}, {'x'.join(map(str, self.shape))}, {cond})")
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
        # Generator and fake score start as copies of the teacher (of the foreign model for adapters).
        generator_net = copy.deepcopy(self.teacher).train().requires_grad_(True)
        fake_score = copy.deepcopy(self.teacher).train().requires_grad_(True)
        opt_g = torch.optim.Adam(generator_net.parameters(), lr=s.lr_generator, betas=tuple(s.betas), eps=s.eps)
        opt_f = torch.optim.Adam(fake_score.parameters(), lr=s.lr_fake_score, betas=tuple(s.betas), eps=s.eps)
        self.generator_net, self.fake_score, self.opt_g, self.opt_f = accelerator.prepare(
            generator_net, fake_score, opt_g, opt_f)
        unwrap = accelerator.unwrap_model
        # Through DDP: gradients all-reduced.
        self.generator = FewStepGenerator(self.generator_net, s.sigma_init, self.steps)
        self.generator_plain = FewStepGenerator(unwrap(self.generator_net), s.sigma_init, self.steps)
        self.fake_score_plain = unwrap(self.fake_score)
        self.ema = EMA(unwrap(self.generator_net), cfg.ema.halflife_kimg, cfg.ema.rampup)
        self.teacher_ref = {m: teacher_reference(cfg.teacher, m, cfg.eval.num_samples) for m in cfg.eval.metrics}

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

    def _optimizer_step(self, opt, model) -> torch.Tensor:
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients(opt)
        bad = sanitize_gradients(model.parameters())
        opt.step()
        return bad

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, s = self.cfg, self.cfg.sid
        zero = lambda: torch.zeros((), device=self.device)
        stats = {k: zero() for k in ("loss_fake_score", "loss_generator", "nonfinite_samples")}
        # Dropout (e.g. in copies of EDM teachers) draws from the global RNG: seed it per step for exact resume.
        torch.manual_seed(rng.derive_seed(cfg.seed, self.step, self.rank, "dropout"))

        # Update fake score: EDM loss on the generator's samples.
        self._phase(train_fake_score=True)
        self.opt_f.zero_grad(set_to_none=True)
        for micro in range(cfg.accum_steps):
            g, z, labels, chain = self._inputs(micro, "fake_score")
            with torch.no_grad(), self.autocast():
                x_g = self.generator_plain(z, labels, chain)
            stats["nonfinite_samples"] += count_nonfinite(x_g)
            sigma = (torch.randn(x_g.shape[0], 1, 1, 1, generator=g, device=self.device) * s.P_std + s.P_mean).exp()
            noise = torch.randn(x_g.shape, generator=g, device=self.device)
            labels_f = labels
            if self.fake_label_dropout > 0 and labels is not None:
                drop = torch.rand(labels.shape, generator=g, device=self.device) < self.fake_label_dropout
                labels_f = with_null_class(self.fake_score_plain, labels, drop)
            with self.no_sync_unless_last(self.fake_score, micro), self.autocast():
                loss = edm_loss(self.fake_score, x_g, labels_f, sigma=sigma, noise=noise, sigma_data=s.sigma_data,
                                guidance=s.guidance.train_fake)
                self.accelerator.backward(loss.sum() / self.batch_per_process)
            stats["loss_fake_score"] += loss.detach().float().mean() / cfg.accum_steps
        bad_f = self._optimizer_step(self.opt_f, self.fake_score)

        # Update generator: SiD loss through teacher and fake score.
        self._phase(train_fake_score=False)
        self.opt_g.zero_grad(set_to_none=True)
        for micro in range(cfg.accum_steps):
            g, z, labels, chain = self._inputs(micro, "generator")
            t = torch.rand(z.shape[0], 1, 1, 1, generator=g, device=self.device) * (s.tmax / 1000)
            sigma = sid_sigma(t, s.sigma_min, s.sigma_max, s.rho)
            noise = torch.randn(z.shape, generator=g, device=self.device)
            with self.no_sync_unless_last(self.generator_net, micro), self.autocast():
                x_g = self.generator(z, labels, chain)
                loss = generator_loss(self.teacher, self.fake_score_plain, x_g, labels, alpha=s.alpha,
                                      sigma=sigma, noise=noise, guidance_fake=s.guidance.eval_fake,
                                      guidance_real=s.guidance.eval_real)
                self.accelerator.backward(loss.sum() / self.batch_per_process)
            stats["nonfinite_samples"] += count_nonfinite(x_g)
            stats["loss_generator"] += loss.detach().float().mean() / cfg.accum_steps
        bad_g = self._optimizer_step(self.opt_g, self.generator_net)

        # Update EMA.
        self.ema.update(self.accelerator.unwrap_model(self.generator_net), self.cur_nimg, cfg.batch_size)
        stats["nonfinite_grads"] = bad_f + bad_g
        return stats

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

    @torch.no_grad()
    def make_images(self, seeds) -> torch.Tensor:
        """uint8 samples of the EMA generator (K steps) for the given seeds, as sample.py makes them."""
        generator = FewStepGenerator(self.ema.model, self.cfg.sid.sigma_init, self.steps)
        z = seed_latents(seeds, self.shape, self.device)
        chain = seed_step_noise(seeds, self.shape, self.steps, self.device)
        with self.autocast():
            return to_uint8(generator(z, seed_labels(seeds, self.label_dim, self.device), chain))

    def sample_grid(self) -> torch.Tensor:
        return self.make_images(list(range(self.cfg.grid_seeds)))

    def evaluate(self) -> dict[str, float]:
        from .metrics import compute_metrics

        e = self.cfg.eval
        if not e.metrics:
            return {}
        rows = compute_metrics(self.make_images, list(range(e.num_samples)), e.metrics, accelerator=self.accelerator,
                               batch_size=e.batch_size, detector_path=e.detector, lenet_path=e.lenet,
                               ref_path=e.ref, ref_dataset=self.dataset, nfe=self.steps, progress=False,
                               cache_dir=self.run.path)
        # Each value with its sample count: a Frechet distance falls as the count grows (fid10k > fid50k).
        out = {}
        for r in rows:
            out.update({r["metric"]: r["value"], f"{r['metric']}_num_samples": r["num_samples"]})
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
            meta = {"teacher": self.cfg.teacher, "kimg": self.cur_nimg / 1000, "generator_steps": self.steps,
                    "generator_sigmas": generator_sigmas(self.steps, self.cfg.sid.sigma_init),
                    **({"guidance": {k: getattr(self.cfg.sid.guidance, k) for k in ("train_fake", "eval_fake",
                                                                                     "eval_real")}}
                       if self.guided else {})}
            card = model_card({**meta, "sigma_init": self.cfg.sid.sigma_init}, self._last_metrics(),
                              command=launch_command(), config_yaml=to_yaml(self.cfg))
            save_generator(self.ema.model, path, self.cfg.sid.sigma_init, meta, card=card)
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
        last = {}
        if os.path.isfile(self.run.stats_file):
            with open(self.run.stats_file) as fh:
                for ln in fh:
                    try:
                        last.update({k: v for k, v in json.loads(ln).items() if k in self.cfg.eval.metrics})
                    except (json.JSONDecodeError, AttributeError):
                        continue
        for m, v in last.items():
            ref = self.teacher_ref.get(m)
            if self.cfg.eval.teacher_value is not None and len(self.cfg.eval.metrics) == 1:
                teacher = f"teacher {self.cfg.eval.teacher_value:.3f} (eval.teacher_value)"
            elif ref:
                teacher = f"teacher {ref['value']:.3f} ({ref['nfe']} NFE, {ref['num_samples']} samples)"
            else:
                teacher = "teacher: not measured"
            lines.append(f"{m}: generator {v:.3f} ({self.steps} NFE, {self.cfg.eval.num_samples} samples)  |  "
                         f"{teacher}")
        return lines
