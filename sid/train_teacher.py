"""Teacher training (``kind=teacher``): a HybridDenoiser + EDMPrecond trained with the EDM loss (docs/design.md
section 3)."""

from __future__ import annotations

import os

import torch

from . import rng
from .config import Config, UserError
from .data import StepBatches, load_dataset, to_model_range, to_uint8
from .ema import EMA
from .loss import edm_loss
from .precond import EDMPrecond
from .runs import save_pretrained_atomic
from .sampling import edm_sampler, nfe, seed_labels, seed_latents
from .training import TrainingLoop, grad_norm, lr_factor, param_groups, sanitize_gradients


def build_denoiser(cfg: Config, resolution: int, channels: int, label_dim: int) -> EDMPrecond:
    """HybridDenoiser from ``network.preset`` with ``network.overrides``, wrapped in EDM preconditioning."""
    from backbones import PRESETS, HybridDenoiser

    if cfg.network.preset not in PRESETS:
        raise UserError(f"config key 'network.preset' is {cfg.network.preset!r}, expected one of "
                        f"{', '.join(PRESETS)}")
    try:
        backbone = HybridDenoiser.from_preset(cfg.network.preset, resolution, channels, label_dim=label_dim,
                                              **cfg.network.overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"config key 'network.overrides' is invalid: {str(e).splitlines()[0]}") from e
    return EDMPrecond(backbone, sigma_data=cfg.train.sigma_data)


def init_denoiser(path: str, dataset, sigma_data: float) -> EDMPrecond:
    """The denoiser saved in ``path`` (``train.init``), checked against the dataset it will be trained on."""
    from .teachers.sid_folder import load_sid

    net = load_sid(path)
    got = (net.img_resolution, net.img_channels, net.label_dim)
    want = (dataset.resolution, dataset.channels, dataset.num_classes)
    if got != want:
        raise UserError(f"config key 'train.init' is '{path}', a denoiser for (resolution, channels, classes) = "
                        f"{got}, but the data has {want}")
    if net.sigma_data != sigma_data:
        raise UserError(f"config key 'train.sigma_data' is {sigma_data}, but '{path}' was trained with "
                        f"sigma_data {net.sigma_data}; set train.sigma_data={net.sigma_data}")
    return net


class TeacherLoop(TrainingLoop):
    kind = "teacher"

    def __init__(self, cfg: Config, accelerator):
        super().__init__(cfg, accelerator)
        self.dataset = load_dataset(cfg.data)
        self.log(f"data: {self.dataset.describe()}")
        self.label_dim = self.dataset.num_classes
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        if cfg.train.init is None:
            net = build_denoiser(cfg, self.dataset.resolution, self.dataset.channels, self.label_dim)
            n_params = sum(p.numel() for p in net.parameters())
            self.log(f"network: {cfg.network.preset} preset, {n_params / 1e6:.2f} M parameters")
        else:
            net = init_denoiser(cfg.train.init, self.dataset, cfg.train.sigma_data)
            n_params = sum(p.numel() for p in net.parameters())
            self.log(f"network: from {cfg.train.init} (its config.json; network.preset is not used), "
                     f"{n_params / 1e6:.2f} M parameters")
        t = cfg.train
        opt = torch.optim.AdamW(param_groups(net, t.lr, t.ssm_lr, t.weight_decay), betas=tuple(t.betas))
        self.net, self.opt = accelerator.prepare(net, opt)
        self.ema = EMA(accelerator.unwrap_model(self.net), cfg.ema.halflife_kimg, cfg.ema.rampup)
        self.batches = None

    def _batch_iter(self):
        sampler = StepBatches(len(self.dataset), self.cfg.batch_size, self.cfg.seed, self.step, self.rank,
                              self.world, self.cfg.accum_steps)
        if self.cfg.data.workers > 0:
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler,
                                                 num_workers=self.cfg.data.workers)
            for images, labels in loader:
                yield images, (labels if self.dataset.labels is not None else None)
        else:
            for idx in sampler:
                yield self.dataset.get_batch(idx)

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, t = self.cfg, self.cfg.train
        if self.batches is None:
            self.batches = self._batch_iter()
        factor = lr_factor(self.cur_nimg, t.warmup_kimg, t.lr_decay_kimg)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.accum_steps):
            images, labels = next(self.batches)
            x0 = to_model_range(images).to(self.device)
            g = rng.generator(cfg.seed, self.step, self.rank, micro, "teacher", device=self.device)
            sigma = (torch.randn(x0.shape[0], 1, 1, 1, generator=g, device=self.device) * t.P_std + t.P_mean).exp()
            noise = torch.randn(x0.shape, generator=g, device=self.device)
            if labels is not None:
                labels = labels.to(self.device)
                # Label dropout: the null class (index label_dim) for classifier-free guidance.
                drop = torch.rand(labels.shape, generator=g, device=self.device) < t.label_dropout
                labels = torch.where(drop, torch.full_like(labels, self.label_dim), labels)
            with self.no_sync_unless_last(self.net, micro), self.autocast():
                loss = edm_loss(self.net, x0, labels, sigma=sigma, noise=noise, sigma_data=t.sigma_data)
                self.accelerator.backward(loss.sum() / self.batch_per_process)
            total += loss.detach().mean() / cfg.accum_steps
        params = [p for p in self.net.parameters()]
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients(self.opt)
        bad = sanitize_gradients(params)
        if t.grad_clip is not None:
            norm = self.accelerator.clip_grad_norm_(params, t.grad_clip)
        else:
            norm = grad_norm(params)
        self.opt.step()
        self.ema.update(self.accelerator.unwrap_model(self.net), self.cur_nimg, cfg.batch_size)
        return {"loss": total, "grad_norm": torch.as_tensor(norm, dtype=torch.float32), "nonfinite_grads": bad}

    def state_dict(self) -> dict:
        return {"net": self.accelerator.unwrap_model(self.net).state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accelerator.unwrap_model(self.net).load_state_dict(state["net"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.batches = None

    @torch.no_grad()
    def sample_grid(self) -> torch.Tensor:
        seeds = list(range(self.cfg.grid_seeds))
        ds = self.dataset
        latents = seed_latents(seeds, (ds.channels, ds.resolution, ds.resolution), self.device)
        labels = seed_labels(seeds, self.label_dim, self.device)
        with self.autocast():
            x = edm_sampler(self.ema.model, latents, labels, num_steps=self.cfg.train.sample_steps)
        return to_uint8(x)

    def export(self) -> str:
        path = os.path.join(self.cfg.run_dir, "denoiser")
        if self.accelerator.is_main_process:
            save_pretrained_atomic(self.ema.model, path)
        return path

    def summary(self, export_path: str) -> list[str]:
        return [f"samples: {self.run.samples} ({self.cfg.train.sample_steps} Heun steps = "
                f"{nfe(self.cfg.train.sample_steps)} NFE)",
                f"denoiser (EMA): {export_path}  ->  python sample.py --teacher {export_path} --seeds 0-63 "
                "--outdir out"]
