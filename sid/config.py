"""One typed configuration schema for every run kind (teacher training, SiD distillation) and for evaluation.

Precedence, lowest first: the dataclass defaults below < a YAML file (``--config FILE``) < ``key=value`` pairs on
the command line. Every user mistake (unknown key, wrong type, impossible value, missing file) raises
:class:`UserError` with one sentence that names the key and what is expected; entry points turn it into exit code 2.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# ----------------------------------------------------------------------------
# Errors a user can act on.


class UserError(Exception):
    """A mistake in the user's input (config, paths, files). Entry points print it as one line and exit 2."""


# ----------------------------------------------------------------------------
# Schema.


@dataclass
class DataConfig:
    name: str = "mnist5k"  # mnist5k | digits | folder | zip | npz | cifar10 | none (sid: no dataset)
    path: str | None = None  # file or folder for folder / zip / npz / cifar10 (root holding cifar-10-batches-py)
    resolution: int | None = None  # expected image size; None = whatever the data has (digits: upscale target)
    use_labels: bool = True  # condition on class labels when the dataset has them
    download: bool = False  # cifar10 only: let torchvision download into `path`
    workers: int = 0  # DataLoader worker processes for file-backed datasets (folder, zip)


@dataclass
class NetworkConfig:
    preset: str = "small"  # backbones.denoiser.PRESETS name (teacher training only)
    overrides: dict[str, Any] = field(default_factory=dict)  # HybridDenoiser kwargs replacing the preset's


@dataclass
class TeacherConfig:
    lr: float = 5e-4  # Adam learning rate of the denoiser
    ssm_lr: float = 1e-3  # learning rate of S4 parameters (A, B, P, dt); no weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    weight_decay: float = 0.0  # AdamW weight decay (not on SSM parameters)
    warmup_kimg: float = 10.0  # linear learning-rate warm-up
    lr_decay_kimg: float = 0.0  # EDM2 inverse-sqrt decay: lr / sqrt(max(kimg / lr_decay_kimg, 1)); 0 = constant
    init: str | None = None  # start weights and EMA from this sid denoiser folder (continue / fine-tune a teacher)
    grad_clip: float | None = None  # max global gradient norm; None = off
    label_dropout: float = 0.1  # probability of the null label, for classifier-free guidance
    P_mean: float = -1.2  # EDM lognormal sigma distribution
    P_std: float = 1.2  # EDM lognormal sigma: std of ln(sigma)
    sigma_data: float = 0.5  # EDM preconditioning: data standard deviation
    sample_steps: int = 18  # Heun steps of the sample grids (2 * steps - 1 network evaluations)


@dataclass
class GuidanceConfig:
    train_fake: float = 1.0  # kappa1: guidance of the fake score's prediction in its EDM loss (SiD-LSG); 1 = off
    eval_fake: float = 1.0  # kappa2 = kappa3: guidance of the fake score in the generator loss; 1 = off
    eval_real: float = 1.0  # kappa4: guidance of the teacher in the generator loss; 1 = off
    fake_label_dropout: float = 0.1  # null-class rate of fake-score training while train_fake or eval_fake != 1
    autoguidance: float = 1.0  # the teacher guided by the guide network its folder names (autoguidance.json); 1 = off


@dataclass
class SiDAConfig:
    enabled: bool = False  # SiDA: adversarial term with real images, the fake score's encoder as discriminator
    lsd: float = 1.0  # fake-score phase: loss_edm + lsd * loss_discriminator
    lsg: float = 100.0  # generator phase: 0.5 * lsg * loss_sid + 0.5 * lsg_gan * loss_gan
    lsg_gan: float = 0.01  # weight of the GAN term in the generator loss
    gan_start_kimg: float = 200.0  # the GAN term enters the generator loss from this many kimg (SiDA: 200)
    fake_score_grad_clip: float | None = 1.0  # clip the fake score's gradients by value (SiDA: 1); null = off
    logit_clamp: float = 10.0  # generator phase: logits clamped to [-logit_clamp, logit_clamp]


@dataclass
class SiDConfig:
    alpha: float = 1.2  # SiD loss weight alpha (docs/design.md section 4)
    score_grad: bool = True  # generator loss differentiated through f_phi, f_psi; false = DMD's gradient (worse here)
    tmax: float = 800.0  # t ~ U(0, tmax / 1000)
    sigma_init: float = 2.5  # generator: G(z) = D(sigma_init * z, sigma_init)
    lr_generator: float = 1e-5  # Adam learning rate of the generator
    lr_fake_score: float = 1e-5  # Adam learning rate of the fake score
    lr_decay_kimg: float = 0.0  # both lrs / sqrt(max(kimg / lr_decay_kimg, 1)) (EDM2's decay); 0 = constant
    lr_cooldown_kimg: float = 0.0  # > 0: the generator's lr falls linearly to 0 over the run's last this many kimg
    lr_cooldown_fake_score: bool = False  # the fake score's lr cools down with the generator's
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam betas of both networks
    betas_generator: list[float] | None = None  # Adam betas of the generator; null = sid.betas
    betas_fake_score: list[float] | None = None  # Adam betas of the fake score; null = sid.betas
    eps: float = 1e-8  # Adam eps of both networks
    fake_score_steps: int = 1  # fake-score updates per generator update
    reuse_samples: bool = False  # generator update first; the fake score then trains on its samples (detached)
    fake_score_warmup_kimg: float = 0.0  # no generator update (fake score only) for this many kimg
    init_generator: str | None = None  # SiD2A: start the generator from this generator/ folder; null = teacher
    sigma_min: float = 0.002  # generator loss: noise level at t = 0
    sigma_max: float = 80.0  # generator loss: noise level at t = 1
    rho: float = 7.0  # generator loss: EDM time-step exponent
    P_mean: float = -1.2  # fake-score EDM loss: mean of ln(sigma)
    P_std: float = 1.2  # fake-score EDM loss: std of ln(sigma)
    fake_score_sigma: str = "lognormal"  # lognormal (sid.P_mean, sid.P_std) | generator (the generator loss's sigmas)
    stratified_sigma: bool = False  # both losses' noise levels drawn one per 1/B-wide stratum of their quantiles
    sigma_data: float = 0.5  # fake-score EDM loss weight
    labels: str = "data"  # data (the dataset's label distribution) | uniform
    generator_steps: int = 1  # K: the generator applied K times, shared weights, trained end to end
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    sida: SiDAConfig = field(default_factory=SiDAConfig)


@dataclass
class EMAConfig:
    kind: str = "halflife"  # halflife (EDM: half-life + ramp-up) | power (EDM2: one average per sigma_rel)
    halflife_kimg: float = 500.0  # halflife: EMA half-life of the exported network
    rampup: float | None = 0.05  # halflife: effective half-life <= rampup * cur_nimg; None = no ramp-up
    sigma_rel: list[float] = field(default_factory=lambda: [0.05, 0.10])  # power: widths relative to the run
    export: str = "0"  # power: index in sigma_rel of the exported average, or best (by the first metric)


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["fd_lenet"])  # fd_lenet | fid | is | is_lenet
    num_samples: int = 2000  # samples per evaluation during training (per seed set)
    seed_sets: int = 1  # disjoint seed sets per evaluation (set k: seeds k*N..(k+1)*N-1); value = their mean
    batch_size: int = 250  # per-process evaluation batch
    detector: str | None = None  # fid: path of the Inception TorchScript file
    lenet: str = "assets/detectors/lenet_mnist5k.safetensors"  # fd_lenet detector
    ref: str | None = None  # reference statistics .npz; None = computed from the training data
    teacher_value: float | None = None  # drawn as a line in fd_vs_kimg.png (sid runs)


@dataclass
class Config:
    kind: str = "sid"  # teacher | sid
    run_dir: str = "runs/sid-mnist5k"  # where config, stats, samples, checkpoints and the export go
    resume: str = "none"  # none | auto | PATH of a checkpoint file or run directory
    seed: int = 0  # every random draw is a function of (seed, step, process)
    total_kimg: float = 20.0  # run length in thousands of images
    max_minutes: float = 0.0  # > 0: end the run early (evaluate, checkpoint, export) after this much wall time
    batch_size: int = 32  # global batch over all processes and accumulation steps
    accum_steps: int = 1  # gradient accumulation steps per optimizer step
    checkpoint_kimg: float = 5.0  # checkpoint every this many kimg (and at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept in run_dir/checkpoints
    snapshot_kimg: float = 5.0  # sample grid every this many kimg
    tick_kimg: float = 1.0  # status line + stats.jsonl every this many kimg
    metrics_kimg: float = 0.0  # evaluate metrics every this many kimg; 0 = only at the end
    mixed_precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs a GPU)
    cpu: bool = False  # force CPU even when CUDA is available
    compile: bool = False  # sid: torch.compile the generator, fake score and teacher (same weights, keys, resume)
    compile_backend: str = "inductor"  # torch.compile backend when compile is true: inductor | aot_eager | eager
    teacher: str | None = None  # sid: a sid denoiser folder, a diffusers pipeline folder or an EDM snapshot .pkl
    grid_seeds: int = 64  # fixed seeds 0..grid_seeds-1 drawn in every sample grid
    trackers: list[str] = field(default_factory=list)  # tensorboard | wandb: stats, grids, metrics via accelerate
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TeacherConfig = field(default_factory=TeacherConfig)
    sid: SiDConfig = field(default_factory=SiDConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


RUN_KINDS = ("teacher", "sid")
DATASETS = ("mnist5k", "digits", "folder", "zip", "npz", "cifar10", "none")
MIXED_PRECISION = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager / eager: no code generation (tests, debugging)
METRICS = ("fd_lenet", "fid", "is", "is_lenet")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs

# ----------------------------------------------------------------------------
# Loading: schema < YAML < command line.


def _schema_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Flat map 'a.b' -> field type for every leaf of the schema; dict fields accept any sub-key."""
    keys = {}
    for f in fields(cls):
        name = prefix + f.name
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.update(_schema_keys(type(default), name + "."))
        else:
            keys[name] = f.type
    return keys


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_key(key: str, where: str) -> None:
    keys = _schema_keys(Config)
    if key in keys:
        return
    # Sub-keys of dict-typed fields (network.overrides.d_model) are free-form.
    for k, t in keys.items():
        if key.startswith(k + ".") and "dict" in str(t):
            return
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = sorted({k[len(parent):].split(".")[0] for k in keys if k.startswith(parent)})
    if not siblings:
        siblings = sorted({k.split(".")[0] for k in keys})
    raise UserError(f"unknown config key '{key}' {where}; expected one of: {', '.join(siblings)}")


def _merge(base: DictConfig, flat: dict[str, Any], where: str) -> DictConfig:
    for key, value in flat.items():
        _check_key(key, where)
        try:
            OmegaConf.update(base, key, value, merge=True)
        except OmegaConfBaseException as e:
            expected = str(_schema_keys(Config).get(key, "a value")).replace("typing.", "")
            raise UserError(f"config key '{key}' {where} got {value!r}, expected {expected}") from e
    return base


def load_config(config_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve the configuration: schema defaults < YAML file < ``key=value`` overrides; then validate."""
    cfg = OmegaConf.structured(Config)
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise UserError(f"config file '{config_file}' does not exist")
        try:
            data = OmegaConf.to_container(OmegaConf.load(config_file))
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise UserError(f"config file '{config_file}' is not valid YAML ({yaml_problem(e)})") from e
        if not isinstance(data, dict):
            raise UserError(f"config file '{config_file}' must hold a mapping of keys, got {type(data).__name__}")
        cfg = _merge(cfg, _flatten(data), f"in '{config_file}'")
    flat = {}
    for item in overrides or []:
        if "=" not in item or item.startswith("="):
            raise UserError(f"command-line argument '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            flat[key.strip()] = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        except (yaml.YAMLError, OmegaConfBaseException) as e:
            raise UserError(f"command-line value of '{key}' cannot be parsed: {value!r}") from e
    cfg = _merge(cfg, flat, "on the command line")
    obj = OmegaConf.to_object(cfg)
    obj.teacher = project_path(obj.teacher)
    obj.sid.init_generator = project_path(obj.sid.init_generator)
    obj.train.init = project_path(obj.train.init)
    obj.eval.lenet = project_path(obj.eval.lenet)
    validate(obj)
    return obj


def yaml_problem(e: Exception) -> str:
    """'line L, column C: problem' (1-based) for a YAML syntax error, else its first line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if mark is None:
        return str(problem)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_path(path: str | None) -> str | None:
    """A relative path that does not exist from the working directory but does inside the project (the shipped
    ``assets/...``) resolves to the project's copy, so the embedded default also runs from another directory."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _dump(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


# ----------------------------------------------------------------------------
# Validation: impossible values fail fast, naming the key.


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


def validate(cfg: Config, num_processes: int = 1) -> None:
    """Check values that the types cannot express. ``num_processes`` is checked again once it is known."""
    _require(cfg.kind in RUN_KINDS, f"config key 'kind' is {cfg.kind!r}, expected one of {', '.join(RUN_KINDS)}")
    _require(cfg.total_kimg > 0, f"config key 'total_kimg' is {cfg.total_kimg}, expected a positive number")
    _require(cfg.max_minutes >= 0 and math.isfinite(cfg.max_minutes), f"config key 'max_minutes' is "
             f"{cfg.max_minutes}, expected a number >= 0 (0 = no time limit)")
    _require(cfg.batch_size > 0, f"config key 'batch_size' is {cfg.batch_size}, expected a positive integer")
    _require(cfg.accum_steps > 0, f"config key 'accum_steps' is {cfg.accum_steps}, expected a positive integer")
    _require(
        cfg.batch_size % (num_processes * cfg.accum_steps) == 0,
        f"config key 'batch_size' is {cfg.batch_size}, expected a multiple of processes x accum_steps = "
        f"{num_processes} x {cfg.accum_steps}",
    )
    for key in ("checkpoint_kimg", "snapshot_kimg", "tick_kimg"):
        _require(getattr(cfg, key) > 0, f"config key '{key}' is {getattr(cfg, key)}, expected a positive number")
    _require(cfg.keep_checkpoints >= 1, f"config key 'keep_checkpoints' is {cfg.keep_checkpoints}, expected >= 1")
    _require(cfg.metrics_kimg >= 0, f"config key 'metrics_kimg' is {cfg.metrics_kimg}, expected >= 0")
    _require(cfg.grid_seeds > 0, f"config key 'grid_seeds' is {cfg.grid_seeds}, expected a positive integer")
    _require(
        cfg.mixed_precision in MIXED_PRECISION,
        f"config key 'mixed_precision' is {cfg.mixed_precision!r}, expected one of {', '.join(MIXED_PRECISION)}",
    )
    _require(cfg.compile_backend in COMPILE_BACKENDS, f"config key 'compile_backend' is {cfg.compile_backend!r}, "
             f"expected one of {', '.join(COMPILE_BACKENDS)}")
    _require(not (cfg.compile and cfg.kind == "teacher"), "config key 'compile' is true, but only kind=sid compiles "
             "its networks; expected false for teacher training")
    _require(cfg.data.name in DATASETS, f"config key 'data.name' is {cfg.data.name!r}, expected one of "
             f"{', '.join(DATASETS)}")
    _require(not (cfg.kind == "teacher" and cfg.data.name == "none"), "config key 'data.name' is none, but teacher "
             "training needs a dataset")
    if cfg.data.name in ("folder", "zip", "npz", "cifar10"):
        _require(cfg.data.path is not None, f"config key 'data.path' is required for data.name={cfg.data.name}")
    if cfg.data.path is not None and not (cfg.data.name == "cifar10" and cfg.data.download):
        _require(os.path.exists(cfg.data.path), f"config key 'data.path' is '{cfg.data.path}', which does not exist")
    _require(cfg.data.workers >= 0, f"config key 'data.workers' is {cfg.data.workers}, expected >= 0")
    if cfg.resume not in ("none", "auto"):
        _require(os.path.exists(cfg.resume), f"config key 'resume' is '{cfg.resume}', which does not exist "
                 "(expected none, auto, or the path of a checkpoint)")
    for name in cfg.trackers:
        _require(name in TRACKERS, f"config key 'trackers' has {name!r}, expected names from {', '.join(TRACKERS)}")
        import importlib.util

        _require(importlib.util.find_spec(TRACKERS[name]) is not None, f"config key 'trackers' has {name}, which "
                 f"is not installed; pip install {TRACKERS[name]} or remove it from trackers")
    # Teacher training.
    t = cfg.train
    _require(t.lr > 0, f"config key 'train.lr' is {t.lr}, expected a positive number")
    _require(t.ssm_lr > 0, f"config key 'train.ssm_lr' is {t.ssm_lr}, expected a positive number")
    _require(0 <= t.label_dropout < 1, f"config key 'train.label_dropout' is {t.label_dropout}, expected in [0, 1)")
    _require(t.P_std > 0, f"config key 'train.P_std' is {t.P_std}, expected a positive number")
    _require(t.sample_steps >= 1, f"config key 'train.sample_steps' is {t.sample_steps}, expected >= 1")
    _require(t.grad_clip is None or t.grad_clip > 0, f"config key 'train.grad_clip' is {t.grad_clip}, "
             "expected a positive number or null")
    _check_betas("train.betas", t.betas)
    _require(t.warmup_kimg >= 0 and math.isfinite(t.warmup_kimg), f"config key 'train.warmup_kimg' is "
             f"{t.warmup_kimg}, expected a number >= 0")
    _require(t.lr_decay_kimg >= 0 and math.isfinite(t.lr_decay_kimg), f"config key 'train.lr_decay_kimg' is "
             f"{t.lr_decay_kimg}, expected a number >= 0 (0 = constant learning rate)")
    if t.init is not None:
        _require(os.path.isfile(os.path.join(t.init, "config.json")), f"config key 'train.init' is '{t.init}', "
                 "expected a sid denoiser folder (with config.json and the weights)")
    # Distillation.
    s = cfg.sid
    _require(0 < s.tmax <= 1000, f"config key 'sid.tmax' is {s.tmax}, expected a value in (0, 1000]")
    _require(s.lr_generator > 0, f"config key 'sid.lr_generator' is {s.lr_generator}, expected a positive number")
    _require(s.lr_fake_score > 0, f"config key 'sid.lr_fake_score' is {s.lr_fake_score}, expected a positive number")
    _require(s.lr_decay_kimg >= 0 and math.isfinite(s.lr_decay_kimg), f"config key 'sid.lr_decay_kimg' is "
             f"{s.lr_decay_kimg}, expected a number >= 0 (0 = constant learning rates)")
    _require(s.lr_cooldown_kimg >= 0 and math.isfinite(s.lr_cooldown_kimg), f"config key 'sid.lr_cooldown_kimg' "
             f"is {s.lr_cooldown_kimg}, expected a number >= 0 (0 = no cool-down)")
    _require(not s.lr_cooldown_fake_score or s.lr_cooldown_kimg > 0, "config key 'sid.lr_cooldown_fake_score' is "
             "true but sid.lr_cooldown_kimg is 0; set sid.lr_cooldown_kimg to the cool-down's length in kimg")
    _require(s.sigma_init > 0, f"config key 'sid.sigma_init' is {s.sigma_init}, expected a positive number")
    _require(s.P_std > 0 and math.isfinite(s.P_std), f"config key 'sid.P_std' is {s.P_std}, expected a positive "
             "number (the std of ln sigma in the fake score's EDM loss)")
    _require(math.isfinite(s.P_mean), f"config key 'sid.P_mean' is {s.P_mean}, expected a finite number (the mean "
             "of ln sigma in the fake score's EDM loss)")
    _require(0 < s.sigma_min < s.sigma_max, f"config keys 'sid.sigma_min' ({s.sigma_min}) and 'sid.sigma_max' "
             f"({s.sigma_max}) must satisfy 0 < sigma_min < sigma_max")
    _require(s.fake_score_sigma in ("lognormal", "generator"), f"config key 'sid.fake_score_sigma' is "
             f"{s.fake_score_sigma!r}, expected lognormal or generator")
    _require(s.labels in ("data", "uniform"), f"config key 'sid.labels' is {s.labels!r}, expected data or uniform")
    _require(s.generator_steps >= 1, f"config key 'sid.generator_steps' is {s.generator_steps}, expected a positive "
             "integer")
    for key in ("train_fake", "eval_fake", "eval_real"):
        value = getattr(s.guidance, key)
        _require(math.isfinite(value), f"config key 'sid.guidance.{key}' is {value}, expected a finite number")
    _require(math.isfinite(s.guidance.autoguidance) and s.guidance.autoguidance > 0, f"config key "
             f"'sid.guidance.autoguidance' is {s.guidance.autoguidance}, expected a number > 0 (1 = off)")
    _require(0 <= s.guidance.fake_label_dropout < 1, f"config key 'sid.guidance.fake_label_dropout' is "
             f"{s.guidance.fake_label_dropout}, expected in [0, 1)")
    _check_betas("sid.betas", s.betas)
    for key in ("betas_generator", "betas_fake_score"):
        if getattr(s, key) is not None:
            _check_betas(f"sid.{key}", getattr(s, key))
    _require(s.eps > 0, f"config key 'sid.eps' is {s.eps}, expected a positive number")
    _require(s.fake_score_steps >= 1, f"config key 'sid.fake_score_steps' is {s.fake_score_steps}, expected a "
             "positive integer")
    _require(s.fake_score_warmup_kimg >= 0 and math.isfinite(s.fake_score_warmup_kimg), "config key "
             f"'sid.fake_score_warmup_kimg' is {s.fake_score_warmup_kimg}, expected a number >= 0")
    if s.init_generator is not None:
        _require(os.path.isdir(s.init_generator), f"config key 'sid.init_generator' is '{s.init_generator}', which "
                 "is not a folder (expected the generator/ folder of a sid run)")
    a = s.sida
    for key in ("lsd", "lsg", "lsg_gan", "gan_start_kimg"):
        value = getattr(a, key)
        _require(value >= 0 and math.isfinite(value), f"config key 'sid.sida.{key}' is {value}, expected a number "
                 ">= 0")
    _require(a.lsg > 0, f"config key 'sid.sida.lsg' is {a.lsg}, expected a positive number")
    _require(a.fake_score_grad_clip is None or a.fake_score_grad_clip > 0, "config key "
             f"'sid.sida.fake_score_grad_clip' is {a.fake_score_grad_clip}, expected a positive number or null")
    _require(a.logit_clamp > 0, f"config key 'sid.sida.logit_clamp' is {a.logit_clamp}, expected a positive number")
    if a.enabled and cfg.kind == "sid":
        _require(cfg.data.name != "none", "config key 'sid.sida.enabled' is true, but SiDA needs real images and "
                 "data.name is none; expected a dataset")
    # EMA.
    m = cfg.ema
    _require(m.kind in ("halflife", "power"), f"config key 'ema.kind' is {m.kind!r}, expected halflife or power")
    _require(not (cfg.kind == "teacher" and m.kind != "halflife"), f"config key 'ema.kind' is {m.kind}, but "
             "teacher training has the half-life EMA only; expected halflife")
    _require(m.halflife_kimg > 0, f"config key 'ema.halflife_kimg' is {m.halflife_kimg}, expected > 0")
    _require(m.rampup is None or m.rampup > 0, f"config key 'ema.rampup' is {m.rampup}, "
             "expected a positive number or null")
    from .ema import SIGMA_REL_MAX

    _require(len(m.sigma_rel) >= 1 and all(0 < v <= SIGMA_REL_MAX for v in m.sigma_rel), f"config key "
             f"'ema.sigma_rel' is {list(m.sigma_rel)}, expected one or more numbers in (0, {SIGMA_REL_MAX:.4f}]")
    _require(m.export == "best" or (m.export.isdigit() and int(m.export) < len(m.sigma_rel)), f"config key "
             f"'ema.export' is {m.export!r}, expected best or an index into ema.sigma_rel (0..{len(m.sigma_rel) - 1})")
    if cfg.kind == "sid":
        _require(cfg.teacher is not None, "config key 'teacher' is required for kind=sid (a sid denoiser folder, "
                 "a diffusers pipeline folder or an EDM snapshot .pkl)")
        _require(os.path.exists(cfg.teacher), f"config key 'teacher' is '{cfg.teacher}', which does not exist")
    # Evaluation.
    e = cfg.eval
    for m in e.metrics:
        _require(m in METRICS, f"config key 'eval.metrics' has {m!r}, expected names from {', '.join(METRICS)}")
    _require(e.num_samples > 1, f"config key 'eval.num_samples' is {e.num_samples}, expected at least 2")
    _require(e.seed_sets >= 1, f"config key 'eval.seed_sets' is {e.seed_sets}, expected a positive integer")
    _require(e.batch_size > 0, f"config key 'eval.batch_size' is {e.batch_size}, expected a positive integer")
    if e.ref is not None:
        _require(os.path.isfile(e.ref), f"config key 'eval.ref' is '{e.ref}', which does not exist")


def _check_betas(key: str, betas: list[float]) -> None:
    _require(len(betas) == 2 and all(0 <= b < 1 for b in betas),
             f"config key '{key}' is {list(betas)}, expected two numbers in [0, 1)")


def key_comments() -> dict[str, str]:
    """'a.b' -> the trailing comment of that field in this file's schema (its description)."""
    import inspect

    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if m:
                out[prefix + m.group(1)] = m.group(2).strip()
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
            if is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")

    walk(Config, "")
    return out


def describe_keys(cfg: Config | None = None) -> str:
    """Every configuration key with its value in ``cfg`` (default: the schema's) and its description, for
    ``--help``."""
    values = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg if cfg is not None else Config)))
    comments = key_comments()
    width = max(len(k) for k in values)
    shown = {k: _dump(v) for k, v in values.items()}
    vwidth = min(max(len(v) for v in shown.values()), 28)
    return "\n".join(f"  {k:<{width}}  {shown[k]:<{vwidth}}  {comments.get(k, '')}".rstrip() for k in values)
