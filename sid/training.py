"""The loop shared by every run kind: accelerate setup, kimg schedule, ticks, grids, checkpoints, resume, export.

Subclasses (``sid.train_teacher.TeacherLoop``, ``sid.train_sid.SiDLoop``) supply one optimizer step, their state,
a sample grid, metrics and the export. Only this layer touches accelerate, optimizers, EMA and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Config, UserError, validate
from .runs import RunDir, list_checkpoints, resolve_resume, save_grid

# ----------------------------------------------------------------------------
# Resume: which config changes a checkpoint tolerates.

# Keys that define what the checkpoint's weights and optimizer states are: a resume with another value would mix
# two different runs, so it is refused. Everything else (schedule, intervals, eval, precision) may change and is
# listed. ``run_dir`` and ``resume`` say where to continue, not what.
REFUSED_KEYS = {
    "sid": ("kind", "teacher", "batch_size", "accum_steps", "sid.alpha", "sid.tmax", "sid.sigma_init",
            "sid.sigma_min", "sid.sigma_max", "sid.rho", "sid.P_mean", "sid.P_std", "sid.sigma_data", "sid.labels",
            "sid.generator_steps", "sid.guidance.", "sid.init_generator", "sid.sida.enabled", "sid.sida.lsd",
            "sid.sida.lsg", "sid.sida.lsg_gan", "sid.sida.logit_clamp", "ema.kind", "ema.sigma_rel"),
    "teacher": ("kind", "network.", "batch_size", "accum_steps", "data.name", "data.resolution",
                "data.use_labels", "train.P_mean", "train.P_std", "train.sigma_data", "train.label_dropout"),
}
IGNORED_KEYS = ("run_dir", "resume")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not k == "overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(key: str, a, b) -> bool:
    if key == "teacher" and isinstance(a, str) and isinstance(b, str):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def compare_configs(saved: dict, current: Config, kind: str) -> tuple[list[str], list[str]]:
    """(refused, changed): 'key: old -> new' for every key whose value differs between a checkpoint's resolved
    config and this run's; keys missing from an older checkpoint are not compared."""
    old, new = _flat(saved), _flat(asdict(current))
    refused_keys = REFUSED_KEYS.get(kind, REFUSED_KEYS["sid"])
    refused, changed = [], []
    for key in sorted(set(old) & set(new)):
        if key in IGNORED_KEYS or _same(key, old[key], new[key]):
            continue
        item = f"{key}: {old[key]!r} -> {new[key]!r}"
        is_refused = any(key == k or (k.endswith(".") and key.startswith(k)) for k in refused_keys)
        (refused if is_refused else changed).append(item)
    return refused, changed

# ----------------------------------------------------------------------------
# Accelerate and optimizers.


_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(env=None) -> None:
    """Refuse a multi-process request that accelerate turned into one process.

    ``accelerate launch --num_processes N`` without ``--multi_gpu`` (the form a CPU machine's default accelerate
    config takes) runs its *simple* launcher: one process, with ``MASTER_ADDR``/``MASTER_PORT`` set because N > 1,
    but no world size (torchrun, the multi-GPU launcher and MPI all set one). Training on would silently be one
    process."""
    env = os.environ if env is None else env
    if "ACCELERATE_DYNAMO_BACKEND" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env and \
            not any(v in env for v in _WORLD_SIZE_VARS):
        raise UserError("accelerate launch was asked for several processes but started only one (without --multi_gpu "
                        "it runs a single process); use accelerate launch --multi_gpu --num_processes N train.py ... "
                        "or torchrun --nproc_per_node N train.py ...")


def make_accelerator(cfg: Config):
    """An ``Accelerator`` for the config; DDP over NCCL or gloo when launched with torchrun/accelerate."""
    from accelerate import Accelerator

    check_launch()
    use_cpu = cfg.cpu or not torch.cuda.is_available()
    if cfg.mixed_precision == "fp16" and use_cpu:
        raise UserError("config key 'mixed_precision' is fp16, which needs a CUDA GPU; use bf16 or fp32 on CPU")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.mixed_precision]
    project = None
    if cfg.trackers:
        from accelerate.utils import ProjectConfiguration

        project = ProjectConfiguration(project_dir=cfg.run_dir, logging_dir=os.path.join(cfg.run_dir, "logs"))
    accelerator = Accelerator(mixed_precision=mp, cpu=use_cpu, log_with=list(cfg.trackers) or None,
                              project_config=project)
    validate(cfg, num_processes=accelerator.num_processes)
    return accelerator


def param_groups(model: nn.Module, lr: float, ssm_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Two optimizer groups: S4's SSM parameters (A, B, P, dt) with their own lr and no weight decay, and the rest."""
    from backbones.s4 import ssm_parameters

    ssm_ids = {id(p) for p in ssm_parameters(model)}
    ssm = [p for p in model.parameters() if p.requires_grad and id(p) in ssm_ids]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ssm_ids]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay, "base_lr": lr}]
    if ssm:
        groups.append({"params": ssm, "lr": ssm_lr, "weight_decay": 0.0, "base_lr": ssm_lr})
    return groups


def sanitize_gradients(params) -> torch.Tensor:
    """``nan_to_num`` every gradient in place (docs/design.md section 4). Returns, as a device tensor, how many
    gradient tensors held non-finite values; no host sync except on CPU, where a sync costs nothing."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # CPU: a gradient with a NaN or Inf has a non-finite norm, and one fused norm pass is ~10x cheaper than
    # isfinite + all per tensor; when every norm is finite, nan_to_num would change no bit and is skipped. A
    # non-finite norm (or a finite gradient whose norm overflows) takes the exact path below.
    if grads[0].device.type == "cpu" and bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return torch.zeros(())
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).sum().float()
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    return bad


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.stack(grads).norm() if grads else torch.zeros(())


def count_nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Samples (along dim 0) that hold a NaN or Inf, as a float device tensor."""
    return (~torch.isfinite(x.detach()).flatten(1).all(1)).sum().float()


# ----------------------------------------------------------------------------
# The loop.


class TrainingLoop:
    """Runs ``train_step`` until ``total_kimg`` with ticks, grids, metrics, checkpoints, exact resume and export."""

    kind = "base"

    def __init__(self, cfg: Config, accelerator):
        self.start_time = time.time()  # max_minutes counts from here: loading, evaluations and grids included
        self.cfg = cfg
        self.accelerator = accelerator
        self.device = accelerator.device
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.run = RunDir(cfg.run_dir, accelerator.is_main_process)
        self.cur_nimg = 0
        self.step = 0
        self.total_nimg = int(round(cfg.total_kimg * 1000))
        self.batch_per_process = cfg.batch_size // self.world
        self.micro_batch = self.batch_per_process // cfg.accum_steps
        self.log(self.describe_run())

    def describe_run(self) -> str:
        """The first line of every run: what actually runs (processes, batch split, device, precision)."""
        device = self.device.type
        if device == "cuda":
            device = f"cuda ({torch.cuda.get_device_name(self.device)})"
        return (f"run: {self.world} process{'es' if self.world > 1 else ''} x {self.micro_batch} micro-batch x "
                f"{self.cfg.accum_steps} accumulation = {self.cfg.batch_size} global batch | device {device} | "
                f"precision {self.cfg.mixed_precision}")

    # Hooks for subclasses.

    def train_step(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def sample_grid(self) -> torch.Tensor:  # uint8 (N, C, H, W)
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def export(self) -> str:
        raise NotImplementedError

    def summary(self, export_path: str) -> list[str]:
        return [f"exported: {export_path}"]

    # Helpers.

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(msg)

    def autocast(self):
        return self.accelerator.autocast()

    def no_sync_unless_last(self, model: nn.Module, micro: int):
        """Skip the DDP all-reduce on all but the last micro-batch (hand-made gradient accumulation)."""
        if micro < self.cfg.accum_steps - 1 and self.world > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    def _out_of_time(self, deadline: float) -> bool:
        """Whether the wall-time budget is spent; every process follows the main process's clock (one broadcast per
        step with several processes; a plain clock read, no device tensor or host sync, with one)."""
        late = time.time() >= deadline
        if self.accelerator.num_processes == 1:
            return late
        from accelerate.utils import broadcast

        return bool(broadcast(torch.tensor([float(late)], device=self.device), from_process=0).item())

    def _crossed(self, prev_nimg: int, interval_kimg: float) -> bool:
        every = max(int(round(interval_kimg * 1000)), 1)
        return self.cur_nimg // every > prev_nimg // every or self.cur_nimg >= self.total_nimg

    def _rank_digests(self) -> list[str]:
        """SHA-256 of every process's networks; DDP keeps them bit-identical, and a checkpoint records the proof."""
        from accelerate.utils import gather_object

        h = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            if name.startswith("opt"):
                continue
            for key, t in sorted(value.items()):
                h.update(key.encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests = gather_object([h.hexdigest()]) if self.world > 1 else [h.hexdigest()]
        if len(set(digests)) != 1:
            raise RuntimeError(f"processes hold different weights at {self.cur_nimg} images: {digests}")
        return digests

    def _save_checkpoint(self) -> None:
        state = {"kind": self.kind, "cur_nimg": self.cur_nimg, "step": self.step, "config": asdict(self.cfg),
                 "rank_digests": self._rank_digests(), **self.state_dict()}
        if self.accelerator.scaler is not None:  # fp16: the loss scale and its growth tracker, for an exact resume
            state["scaler"] = self.accelerator.scaler.state_dict()
        path = self.run.save_checkpoint(state, self.cur_nimg, keep=self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        if path:
            self.log(f"checkpoint: {path}")

    def _grid(self) -> None:
        images = self.sample_grid()
        if self.accelerator.is_main_process:
            save_grid(images, self.run.grid_path(self.cur_nimg))
            self._track_images(images)

    # Trackers (TensorBoard, W&B) through accelerate: the stats lines, the grids, the metrics.

    def _start_trackers(self) -> None:
        if not self.cfg.trackers:
            return
        name = os.path.basename(os.path.normpath(self.cfg.run_dir)) or "sid"
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                   for k, v in _flat(asdict(self.cfg)).items()}
        self.accelerator.init_trackers(name, config=hparams)
        if self.accelerator.is_main_process:
            self.log(f"trackers: {', '.join(self.cfg.trackers)} -> {os.path.join(self.cfg.run_dir, 'logs', name)}")

    def log_record(self, record: dict) -> None:
        """One stats line: stats.jsonl and every tracker (step = images seen)."""
        self.run.log_stats(record)
        if self.cfg.trackers:
            values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(values, step=int(round(record["kimg"] * 1000)))

    def _track_images(self, images: torch.Tensor) -> None:
        for tracker in self.accelerator.trackers if self.cfg.trackers else []:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": images.cpu().numpy()}, step=self.cur_nimg, dataformats="NCHW")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": list(images.permute(0, 2, 3, 1).cpu().numpy())}, step=self.cur_nimg)

    # Main.

    def resume(self) -> bool:
        """Load the checkpoint ``cfg.resume`` names, if any. Every process checks and raises the same errors."""
        if self.accelerator.is_main_process:
            for tmp in self.run.remove_stale_temporaries():
                self.log(f"removed a stale temporary checkpoint: {tmp}")
        found = resolve_resume(self.cfg.resume, self.cfg.run_dir)
        if found is None:
            if self.cfg.resume == "none" and list_checkpoints(self.run.checkpoints):
                raise UserError(f"run_dir '{self.cfg.run_dir}' already holds checkpoints; pass resume=auto to continue "
                                "that run or choose a new run_dir")
            return False
        path, state = found
        if state.get("kind") != self.kind:
            raise UserError(f"checkpoint '{path}' is from a {state.get('kind')} run, expected a {self.kind} run")
        refused, changed = compare_configs(state.get("config") or {}, self.cfg, self.kind)
        if refused:
            raise UserError(f"checkpoint '{path}' was made with other settings ({'; '.join(refused)}), which would mix "
                            "two runs; restore them or start a new run_dir")
        if changed:
            self.log(f"resume: changed since the checkpoint: {'; '.join(changed)}")
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"checkpoint '{path}' does not match this run's networks ({str(e).splitlines()[0]})") from e
        if self.accelerator.scaler is not None and "scaler" in state:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.cur_nimg, self.step = int(state["cur_nimg"]), int(state["step"])
        self.log(f"resumed from {path} at {self.cur_nimg / 1000:.3f} kimg ({self.cur_nimg} images)")
        return True

    def train(self) -> str:
        """Run to ``total_kimg``; returns the export path."""
        resumed = self.resume()
        self.accelerator.wait_for_everyone()
        self.run.truncate_stats(self.cur_nimg if resumed else -1)
        self.run.write_config(self.cfg)
        self._start_trackers()
        if not resumed:
            self._grid()
            self.on_start()
        steps_total = -(-self.total_nimg // self.cfg.batch_size)
        bar = tqdm(total=steps_total * self.cfg.batch_size, initial=self.cur_nimg, unit="img", unit_scale=True,
                   disable=not self.accelerator.is_main_process, dynamic_ncols=True, desc=self.kind)
        tick_start, tick_nimg, sums, counts = time.time(), self.cur_nimg, {}, {}
        deadline = self.start_time + self.cfg.max_minutes * 60 if self.cfg.max_minutes > 0 else None
        while self.cur_nimg < self.total_nimg:
            prev = self.cur_nimg
            stats = self.train_step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float().to(self.device)
                counts[k] = counts.get(k, 0) + 1
            self.cur_nimg += self.cfg.batch_size
            self.step += 1
            bar.update(self.cur_nimg - prev)
            if deadline is not None and self.cur_nimg < self.total_nimg and self._out_of_time(deadline):
                # The run ends here as if total_kimg were this point: the last stats line with its metrics, the
                # grid, the checkpoint and the export all follow below.
                self.log(f"max_minutes: {self.cfg.max_minutes:g} min of wall time used; ending the run at "
                         f"{self.cur_nimg / 1000:.3f} kimg of {self.cfg.total_kimg:g} (rerun exactly with "
                         f"total_kimg={self.cur_nimg / 1000:g})")
                self.total_nimg = self.cur_nimg
            # Tick: averaged stats, status line.
            if self._crossed(prev, self.cfg.tick_kimg):
                # Losses: mean over the steps of the tick that reported them (a phase may be skipped, e.g. the
                # generator's during a fake-score warm-up); nonfinite_* counts: sums.
                record = {"kimg": self.cur_nimg / 1000, "step": self.step}
                for k, v in sums.items():
                    v = self.accelerator.reduce(v.to(self.device), "sum" if k.startswith("nonfinite") else "mean")
                    record[k] = float(v) if k.startswith("nonfinite") else float(v) / max(counts[k], 1)
                elapsed = time.time() - tick_start
                record["sec_per_kimg"] = elapsed / max((self.cur_nimg - tick_nimg) / 1000, 1e-9)
                if self.cfg.metrics_kimg > 0 and self._crossed(prev, self.cfg.metrics_kimg) or \
                        self.cur_nimg >= self.total_nimg:
                    record.update(self.evaluate())
                self.log_record(record)
                self.log(self.status_line(record))
                self.on_tick(record)
                tick_start, tick_nimg, sums, counts = time.time(), self.cur_nimg, {}, {}
            if self._crossed(prev, self.cfg.snapshot_kimg):
                self._grid()
            if self._crossed(prev, self.cfg.checkpoint_kimg):
                self._save_checkpoint()
        bar.close()
        path = self.export()
        self.accelerator.wait_for_everyone()
        if self.cfg.trackers:
            self.accelerator.end_training()
        for line in self.summary(path):
            self.log(line)
        return path

    def on_start(self) -> None:
        """Called once before the first step of a fresh (not resumed) run."""

    def on_tick(self, record: dict) -> None:
        """Called after each stats line is written."""

    def status_line(self, r: dict) -> str:
        parts = [f"kimg {r['kimg']:9.3f}", f"step {r['step']:7d}"]
        for k, v in r.items():
            if k not in ("kimg", "step", "sec_per_kimg"):
                parts.append(f"{k} {v:10.4g}" if isinstance(v, float) else f"{k} {v}")
        parts.append(f"sec/kimg {r['sec_per_kimg']:7.2f}")
        return " | ".join(parts)


def cooldown_factor(cur_nimg: int, total_kimg: float, cooldown_kimg: float) -> float:
    """Learning-rate multiplier of a cool-down: 1 until ``cooldown_kimg`` before ``total_kimg``, then falling
    linearly to 0 at ``total_kimg`` (the last phase of a warm-up-stable-decay schedule); 1 when ``cooldown_kimg`` is
    0. A pure function of ``cur_nimg`` and the run length, so a stopped-and-resumed run follows it exactly."""
    if cooldown_kimg <= 0:
        return 1.0
    return min(max((total_kimg - cur_nimg / 1000) / cooldown_kimg, 0.0), 1.0)


def lr_factor(cur_nimg: int, warmup_kimg: float, decay_kimg: float) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_kimg``, then EDM2's inverse-square-root decay
    ``1 / sqrt(max(kimg / decay_kimg, 1))`` when ``decay_kimg > 0``. Depends only on ``cur_nimg`` (not on the run
    length), so a stopped-and-resumed run and a longer run follow the same schedule."""
    kimg = cur_nimg / 1000
    factor = min(kimg / warmup_kimg, 1.0) if warmup_kimg > 0 else 1.0
    if decay_kimg > 0:
        factor /= max(kimg / decay_kimg, 1.0) ** 0.5
    return factor
