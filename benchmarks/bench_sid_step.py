"""Benchmark one full SiD iteration (fake-score phase + generator phase + EMA; docs/design.md section 4): images/s
of the real ``SiDLoop.train_step`` (OURS) against a plain loop written out inline the way the paper's code does it
(PLAIN), the time of each part of the iteration, fp32 versus bf16 autocast, optionally torch.compile and a
torch.profiler table.

    python benchmarks/bench_sid_step.py --quick --profile         # CPU: about 3 minutes next to a training job
    python benchmarks/bench_sid_step.py --device cuda --presets small,cifar10 --batch 64 --compile

OURS: ``SiDLoop(cfg, accelerator)`` built from ``sid.config.load_config`` overrides (``data.name=none``,
``sid.labels=uniform``, so no dataset is read) and ``sid.training.make_accelerator`` (``Accelerator(cpu=True)`` on
CPU, ``mixed_precision`` = the dtype), on a teacher folder written to a temporary directory: a randomly initialised
EDMPrecond(HybridDenoiser) whose weights are perturbed so that F != 0 (adaLN-Zero starts at F = 0). PLAIN: the same
networks and batch, two Adam optimizers, the EDM and SiD losses inline, ``torch.randn`` noise, a plain EMA lerp,
no non-finite checks. ``--reuse-samples`` adds OURS with ``sid.reuse_samples=true`` (the generator update first,
the fake score on its samples: one generator forward less, a different order of updates, so not the same
iteration). All compared variants run interleaved (A, B, A, B, ...) in one block and are reported as
ratios of medians; process CPU time is recorded next to wall time, with the load average.

Parts are timed by running each part on its own in a loop (no profiler hooks), interleaved: generator forward
without grad (phase 1), fake-score forward + backward (phase 1), generator forward with grad, teacher + fake-score
forward with grad to the input (phase 2), the phase-2 backward (through teacher and fake score into the
generator), and the two optimizer steps + EMA. "other" = PLAIN step - sum of parts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import math
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    IMAGES,
    autocast,
    load_average,
    machine_info,
    machine_line,
    measure,
    pick_threads,
    random_denoiser,
    summary,
    tune_malloc,
    write_json,
)

DTYPES = ("fp32", "bf16")  # OURS loops are built in this order (see build_ours)

# ----------------------------------------------------------------------------
# Networks and the two loops.


def save_teacher(preset: str, folder: str, seed: int = 0) -> None:
    """A random teacher (``common.random_denoiser``) written with save_pretrained."""
    random_denoiser(preset, seed).save_pretrained(folder)


def build_ours(teacher: str, run_dir: str, batch: int, dtype: str, device: torch.device,
               compile_backend: str | None = None, extra: tuple[str, ...] = ()):
    """The real SiDLoop through a real Accelerator (with ``compile=true`` and that backend when ``compile_backend``
    is given). accelerate keeps one global state, so it is reset before each Accelerator; an fp32 Accelerator (no
    native AMP) ignores the state afterwards, a bf16 one reads it at every ``autocast()``, hence fp32 loops are built
    before bf16 ones (checked by check_autocast)."""
    from accelerate.state import AcceleratorState

    from sid.config import load_config
    from sid.train_sid import SiDLoop
    from sid.training import make_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = load_config(None, [f"teacher={teacher}", "data.name=none", "sid.labels=uniform", f"run_dir={run_dir}",
                             f"batch_size={batch}", f"mixed_precision={dtype}", f"cpu={device.type == 'cpu'}",
                             "eval.metrics=[]",
                             *(["compile=true", f"compile_backend={compile_backend}"] if compile_backend else []),
                             *extra])
    return SiDLoop(cfg, make_accelerator(cfg))


def check_autocast(loop, dtype: str) -> None:
    with loop.autocast():
        on = torch.is_autocast_enabled(loop.device.type)
        got = torch.get_autocast_dtype(loop.device.type) if on else None
    if on != (dtype == "bf16") or (on and got != torch.bfloat16):
        raise RuntimeError(f"the {dtype} SiDLoop autocasts to {got}; the accelerate state was mixed up")


def ours_step(loop):
    """One iteration as TrainingLoop.train does it: train_step, accumulate stats, advance the counters."""
    sums: dict[str, torch.Tensor] = {}

    def step():
        for k, v in loop.train_step().items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        loop.cur_nimg += loop.cfg.batch_size
        loop.step += 1

    return step


class PlainSiD:
    """SiD as the paper's code writes it: same roles and hyper-parameters as docs/design.md section 4, everything
    inline."""

    def __init__(self, teacher: torch.nn.Module, batch: int, device: torch.device, compile: bool = False):
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
        self.generator = copy.deepcopy(teacher).train().requires_grad_(True)
        self.generator_ema = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.opt_f = torch.optim.Adam(self.fake_score.parameters(), lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=1e-5, betas=(0.0, 0.999), eps=1e-8)
        # Called networks: compiled wrappers share the parameters of the modules above.
        wrap = torch.compile if compile else (lambda m: m)
        self.D_phi, self.D_psi, self.D_theta = wrap(self.teacher), wrap(self.fake_score), wrap(self.generator)
        self.batch, self.device = batch, device
        self.shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
        self.label_dim = teacher.label_dim
        self.cur_nimg = 0

    def inputs(self):
        z = torch.randn(self.batch, *self.shape, device=self.device)
        labels = torch.randint(self.label_dim, (self.batch,), device=self.device) if self.label_dim else None
        return z, labels

    def G(self, z, labels):
        sigma = torch.full((z.shape[0], 1, 1, 1), 2.5, device=z.device)
        return self.D_theta(2.5 * z, sigma, labels)

    def fake_score_loss(self, x_g, labels):
        # EDM loss, lognormal sigma (P_mean -1.2, P_std 1.2), weight lambda(sigma).
        sigma = (torch.randn(x_g.shape[0], 1, 1, 1, device=x_g.device) * 1.2 - 1.2).exp()
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
        D_x = self.D_psi(x_g + sigma * torch.randn_like(x_g), sigma, labels)
        return (weight * (D_x - x_g) ** 2).sum() / x_g.shape[0]

    def generator_loss(self, x_g, labels):
        # SiD loss, alpha 1.2, t ~ U(0, 0.8), EDM sigma(t), normaliser w without gradient.
        t = torch.rand(x_g.shape[0], 1, 1, 1, device=x_g.device) * 0.8
        sigma = (80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        x_t = x_g + sigma * torch.randn_like(x_g)
        f_phi = self.D_phi(x_t, sigma, labels)
        f_psi = self.D_psi(x_t, sigma, labels)
        w = (x_g - f_phi).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5).detach()
        diff = f_phi - f_psi
        return (diff * ((f_phi - x_g) - 1.2 * diff) / w).sum() / x_g.shape[0]

    def phase(self, fake_score: bool) -> None:
        self.fake_score.requires_grad_(fake_score)
        self.generator.requires_grad_(not fake_score)

    def ema(self) -> None:
        beta = 0.5 ** (self.batch / max(min(500e3, 0.05 * self.cur_nimg), 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
                p_ema.lerp_(p, 1 - beta)

    def step(self, dtype: str) -> None:
        device = self.device
        # Update fake score.
        self.phase(fake_score=True)
        z, labels = self.inputs()
        with torch.no_grad(), autocast(device, dtype):
            x_g = self.G(z, labels)
        with autocast(device, dtype):
            loss = self.fake_score_loss(x_g, labels)
        self.opt_f.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_f.step()
        # Update generator.
        self.phase(fake_score=False)
        z, labels = self.inputs()
        with autocast(device, dtype):
            loss = self.generator_loss(self.G(z, labels), labels)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        # Update EMA.
        self.ema()
        self.cur_nimg += self.batch


def part_variants(plain: PlainSiD, dtype: str) -> dict:
    """The parts of one PLAIN iteration as separately timed (setup, fn) pairs on fixed inputs."""
    device = plain.device
    z, labels = plain.inputs()
    with torch.no_grad():
        x_fixed = plain.G(z, labels)
    held = {}

    def gen_nograd():
        with torch.no_grad(), autocast(device, dtype):
            plain.G(z, labels)

    def fake_fwd_bwd():
        plain.phase(fake_score=True)
        with autocast(device, dtype):
            loss = plain.fake_score_loss(x_fixed, labels)
        plain.opt_f.zero_grad(set_to_none=True)
        loss.backward()

    def gen_grad():
        plain.phase(fake_score=False)
        with autocast(device, dtype):
            plain.G(z, labels)

    def teacher_fake_fwd():
        plain.phase(fake_score=False)
        with autocast(device, dtype):
            plain.generator_loss(x_fixed.detach().requires_grad_(True), labels)

    def phase2_forward():
        plain.phase(fake_score=False)
        with autocast(device, dtype):
            held["loss"] = plain.generator_loss(plain.G(z, labels), labels)

    def phase2_backward():
        plain.opt_g.zero_grad(set_to_none=True)
        held.pop("loss").backward()

    def ensure_grads():
        for p in [*plain.fake_score.parameters(), *plain.generator.parameters()]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def opt_ema():
        plain.opt_f.step()
        plain.opt_g.step()
        plain.ema()

    return {"generator forward (no grad)": gen_nograd, "fake-score fwd+bwd": fake_fwd_bwd,
            "generator forward (grad)": gen_grad, "teacher + fake-score fwd": teacher_fake_fwd,
            "phase-2 backward": (phase2_forward, phase2_backward), "optimizer steps + EMA": (ensure_grads, opt_ema),
            KERNELS: s4_kernels(plain)}


KERNELS = "of which: S4 kernels"  # a subset of the parts above, not added to their sum


def s4_kernels(plain: PlainSiD):
    """S4 kernel generation as one iteration does it: every S4 layer 5 times (teacher, fake score twice, generator
    twice), twice with backward (fake score in phase 1, generator in phase 2)."""
    from backbones.s4 import S4

    layers = [m for m in plain.fake_score.modules() if isinstance(m, S4)]

    def run():
        plain.phase(fake_score=True)
        for layer in layers:
            L = layer.l_max
            with torch.no_grad():
                for _ in range(3):
                    layer.kernel(L)
            for _ in range(2):
                k = layer.kernel(L)
                k.backward(torch.ones_like(k))

    return run

# ----------------------------------------------------------------------------
# torch.compile (guarded) and torch.profiler.


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM; no limit where that is unavailable)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def handler(signum, frame):
        raise TimeoutError(f"took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(int(math.ceil(seconds)), 1))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def try_compile(teacher, batch: int, device: torch.device, dtypes: list[str], limit_s: float):
    """A PLAIN loop on torch.compile'd networks, warmed up in every phase and dtype; (loop or None, info)."""
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            plain = PlainSiD(teacher, batch, device, compile=True)
            for dtype in dtypes:
                plain.step(dtype)
        info = dict(ok=True, compile_s=time.perf_counter() - t0)
        print(f"  torch.compile: compiled and warmed up in {info['compile_s']:.1f} s", flush=True)
        return plain, info
    except Exception as e:  # anything from dynamo / inductor / the C++ compiler: record it and go on
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        print(f"  torch.compile failed after {time.perf_counter() - t0:.1f} s: {msg}", flush=True)
        torch._dynamo.reset()
        return None, dict(ok=False, error=msg, after_s=time.perf_counter() - t0)


def warm_compiled_ours(loop, limit_s: float) -> dict:
    """Run ``warm`` steps of a compiled OURS loop (the first compiles every phase's graphs); the time of each, and
    ``compile_s`` = first step - the last warm step (the compile time proper)."""
    step, times = ours_step(loop), []
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            for _ in range(3):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
    except Exception as e:  # anything from dynamo / inductor / the C++ compiler: record it and go on
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
        print(f"  OURS compile failed after {time.perf_counter() - t0:.0f} s: {msg}", flush=True)
        return dict(ok=False, error=msg, seconds=time.perf_counter() - t0)
    info = dict(ok=True, first_steps_s=times, compile_s=times[0] - times[-1])
    print(f"  OURS compile ({loop.cfg.mixed_precision}, backend {loop.cfg.compile_backend}): first steps "
          f"{', '.join(f'{t:.1f}' for t in times)} s", flush=True)
    return info


@contextlib.contextmanager
def labelled_ranges():
    """Label the forward passes of the main pieces with record_function (during profiling only): S4 kernel
    generation, the S4 FFT convolution, whole S4 / MLA / MLP forwards, gradient sanitizing and the EMA."""
    import backbones.s4 as s4
    import sid.train_sid as train_sid
    from backbones.blocks import Mlp
    from backbones.mla import MLA
    from sid.ema import EMA

    def label(name, fn):
        def wrapped(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return wrapped

    patches = [(s4.S4, "kernel"), (s4.S4, "forward"), (s4, "fft_conv"), (MLA, "forward"), (Mlp, "forward"),
               (train_sid, "sanitize_gradients"), (EMA, "update")]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in patches]
    for obj, name, _ in saved:
        qual = f"{obj.__name__}.{name}" if isinstance(obj, type) else name
        setattr(obj, name, label(f"sid::{qual}", getattr(obj, name)))
    try:
        yield
    finally:
        for obj, name, own in saved:
            if own is None:
                delattr(obj, name)  # inherited (nn.Sequential.forward)
            else:
                setattr(obj, name, own)


def profile_steps(step, device: torch.device, n_steps: int, top: int = 15, labels: bool = True) -> dict:
    """torch.profiler over n_steps OURS iterations: top ops by self CPU time, labelled forward ranges (inclusive;
    not for compiled networks, where patching their methods would recompile them), and the autograd backward nodes
    by inclusive CPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with labelled_ranges() if labels else contextlib.nullcontext(), profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    events = prof.key_averages()
    ops = [e for e in events if not e.key.startswith(("sid::", "autograd::engine", "Optimizer."))]
    total_self = sum(e.self_cpu_time_total for e in ops)

    def row(e, inclusive=False):
        t = e.cpu_time_total if inclusive else e.self_cpu_time_total
        return dict(name=e.key, calls=e.count // n_steps, cpu_ms_per_step=t / 1e3 / n_steps, share=t / total_self)

    top_ops = [row(e) for e in sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]]
    ranges = [row(e, True) for e in sorted(events, key=lambda e: e.cpu_time_total, reverse=True)
              if e.key.startswith(("sid::", "Optimizer.step"))]
    backward = [row(e, True) for e in sorted(events, key=lambda e: e.cpu_time_total, reverse=True)
                if e.key.startswith("autograd::engine::evaluate_function")][:top]
    return dict(steps=n_steps, wall_ms_per_step=1e3 * wall / n_steps,
                user_ms_per_step=1e3 * (r1.ru_utime - r0.ru_utime) / n_steps,
                sys_ms_per_step=1e3 * (r1.ru_stime - r0.ru_stime) / n_steps,
                page_faults_per_step=(r1.ru_minflt - r0.ru_minflt) / n_steps,
                ops_self_cpu_ms_per_step=total_self / 1e3 / n_steps, top_ops=top_ops,
                labelled_ranges=ranges, backward_nodes=backward)


def print_profile(p: dict, title: str) -> None:
    print(f"\nProfile of {title}: {p['steps']} OURS steps; per step under the profiler: wall "
          f"{p['wall_ms_per_step']:.0f} ms, user {p['user_ms_per_step']:.0f} ms, system {p['sys_ms_per_step']:.0f} ms, "
          f"{p['page_faults_per_step']:.0f} page faults; ops' self CPU {p['ops_self_cpu_ms_per_step']:.0f} ms (= 100%)")
    print(f"  {'top ops by self CPU time':<58} {'calls':>6} {'ms/step':>9} {'share':>7}")
    for r in p["top_ops"]:
        print(f"  {r['name'][:58]:<58} {r['calls']:6d} {r['cpu_ms_per_step']:9.1f} {100 * r['share']:6.1f}%")
    print(f"  {'labelled ranges (forward only, inclusive)':<58} {'calls':>6} {'ms/step':>9} {'share':>7}")
    for r in p["labelled_ranges"]:
        print(f"  {r['name'][:58]:<58} {r['calls']:6d} {r['cpu_ms_per_step']:9.1f} {100 * r['share']:6.1f}%")
    print(f"  {'backward nodes (inclusive), top 8':<58} {'calls':>6} {'ms/step':>9} {'share':>7}")
    for r in p["backward_nodes"][:8]:
        name = r["name"].removeprefix("autograd::engine::evaluate_function: ")
        print(f"  {name[:58]:<58} {r['calls']:6d} {r['cpu_ms_per_step']:9.1f} {100 * r['share']:6.1f}%")

# ----------------------------------------------------------------------------
# One preset.


def bench_preset(args, preset: str, device: torch.device, tmp: str) -> dict:
    q = args.plan[preset]
    batch = q["batch"]
    res, channels, label_dim = IMAGES[preset]
    print(f"\n== {preset} ({res}x{res}x{channels}, {label_dim} classes), batch {batch}, dtypes {args.dtypes}, "
          f"warmup {q['warmup']}, repeats {q['repeats']}", flush=True)
    teacher_dir = str(Path(tmp) / f"teacher-{preset}")
    save_teacher(preset, teacher_dir)
    loops, compiled_loops, reuse_loops = {}, {}, {}
    for dtype in [d for d in DTYPES if d in args.dtypes]:
        loops[dtype] = build_ours(teacher_dir, str(Path(tmp) / f"run-{preset}-{dtype}"), batch, dtype, device)
        if args.reuse_samples:
            reuse_loops[dtype] = build_ours(teacher_dir, str(Path(tmp) / f"run-{preset}-{dtype}-reuse"), batch, dtype,
                                            device, extra=("sid.reuse_samples=true",))
        if args.compile:
            compiled_loops[dtype] = build_ours(teacher_dir, str(Path(tmp) / f"run-{preset}-{dtype}-compile"), batch,
                                               dtype, device, compile_backend=args.compile_backend)
    for dtype, loop in [*loops.items(), *compiled_loops.items(), *reuse_loops.items()]:
        check_autocast(loop, dtype)
    ours_compile_info = {dtype: warm_compiled_ours(loop, args.compile_limit_s) for dtype, loop in
                         compiled_loops.items()}
    teacher = next(iter(loops.values())).teacher
    params = sum(p.numel() for p in teacher.parameters())
    plain = PlainSiD(teacher, batch, device)
    compiled, compile_info = None, None
    if args.compile and args.plain_compile:
        compiled, compile_info = try_compile(teacher, batch, device, args.dtypes, args.compile_limit_s)

    # OURS vs PLAIN (and compiled PLAIN), every dtype, interleaved.
    variants = {}
    for dtype, loop in loops.items():
        variants[f"ours/{dtype}"] = ours_step(loop)
        variants[f"plain/{dtype}"] = functools.partial(plain.step, dtype)
        if dtype in reuse_loops:
            variants[f"ours+reuse/{dtype}"] = ours_step(reuse_loops[dtype])
        if ours_compile_info.get(dtype, {}).get("ok"):
            variants[f"ours+compile/{dtype}"] = ours_step(compiled_loops[dtype])
        if compiled is not None:
            variants[f"plain+compile/{dtype}"] = functools.partial(compiled.step, dtype)
    t0 = time.perf_counter()
    raw = measure(variants, device, warmup=q["warmup"], repeats=q["repeats"], budget_s=q["budget_s"])
    steps = {k: summary(v) for k, v in raw.items()}
    for v in steps.values():
        v["images_per_s"] = batch / (v["time_ms"] / 1e3)
    print(f"  measured {len(variants)} variants in {time.perf_counter() - t0:.0f} s, load {load_average()}", flush=True)
    ratios = {}
    for dtype in loops:
        o, p = steps[f"ours/{dtype}"], steps[f"plain/{dtype}"]
        ratios[f"ours_over_plain/{dtype}"] = o["time_ms"] / p["time_ms"]
        ratios[f"ours_over_plain_cpu/{dtype}"] = o["cpu_time_ms"] / p["cpu_time_ms"]
        if f"ours+reuse/{dtype}" in steps:  # sid.reuse_samples: a different order of updates, not the same step
            ratios[f"plain_over_ours_reuse/{dtype}"] = p["time_ms"] / steps[f"ours+reuse/{dtype}"]["time_ms"]
            ratios[f"ours_over_ours_reuse/{dtype}"] = o["time_ms"] / steps[f"ours+reuse/{dtype}"]["time_ms"]
        if f"ours+compile/{dtype}" in steps:
            oc = steps[f"ours+compile/{dtype}"]
            ratios[f"ours_compile_over_plain/{dtype}"] = oc["time_ms"] / p["time_ms"]
            ratios[f"plain_over_ours_compile/{dtype}"] = p["time_ms"] / oc["time_ms"]  # the speedup (target 1.3)
            ratios[f"ours_compile_over_ours/{dtype}"] = oc["time_ms"] / o["time_ms"]
        if compiled is not None:
            ratios[f"plain_compile_over_plain/{dtype}"] = steps[f"plain+compile/{dtype}"]["time_ms"] / p["time_ms"]
            if f"ours+compile/{dtype}" in steps:
                ratios[f"ours_compile_over_plain_compile/{dtype}"] = (steps[f"ours+compile/{dtype}"]["time_ms"] /
                                                                      steps[f"plain+compile/{dtype}"]["time_ms"])
    if "fp32" in loops and "bf16" in loops:
        for who in ("ours", "plain"):
            ratios[f"{who}_bf16_speedup"] = steps[f"{who}/fp32"]["time_ms"] / steps[f"{who}/bf16"]["time_ms"]
    variants = compiled = None

    # Parts, every dtype, interleaved.
    parts = {}
    if q["parts_repeats"] > 0:
        part_fns = {f"{name}/{dtype}": fn for dtype in loops for name, fn in part_variants(plain, dtype).items()}
        t0 = time.perf_counter()
        raw_parts = measure(part_fns, device, warmup=q["parts_warmup"], repeats=q["parts_repeats"],
                            budget_s=q["budget_s"])
        print(f"  measured {len(part_fns)} parts in {time.perf_counter() - t0:.0f} s, load {load_average()}",
              flush=True)
        for dtype in loops:
            rows = {k.rsplit("/", 1)[0]: summary(v) for k, v in raw_parts.items() if k.endswith(f"/{dtype}")}
            total = sum(r["time_ms"] for k, r in rows.items() if k != KERNELS)
            plain_ms = steps[f"plain/{dtype}"]["time_ms"]
            for r in rows.values():
                r["share_of_parts"] = r["time_ms"] / total
            parts[dtype] = dict(parts=rows, sum_ms=total, plain_step_ms=plain_ms, other_ms=plain_ms - total)

    # Profile of OURS.
    profiles = {}
    if args.profile and q["profile_steps"] > 0:
        for dtype, loop in loops.items():
            profiles[dtype] = profile_steps(ours_step(loop), device, q["profile_steps"])
        for dtype, loop in compiled_loops.items():
            if ours_compile_info[dtype]["ok"]:
                profiles[f"{dtype}+compile"] = profile_steps(ours_step(loop), device, q["profile_steps"],
                                                              labels=False)
    compiled_loops.clear()
    reuse_loops.clear()

    result = dict(preset=preset, image_shape=[channels, res, res], label_dim=label_dim, batch=batch, params=params,
                  warmup=q["warmup"], steps=steps, ratios=ratios, parts=parts, profiles=profiles,
                  compile=compile_info, ours_compile=ours_compile_info or None)
    del loops, plain
    gc.collect()
    return result


def print_preset(r: dict) -> None:
    print(f"\n{r['preset']}: batch {r['batch']}, {r['params']:,} params per network; one SiD iteration (median of "
          f"interleaved repeats)")
    print(f"  {'variant':<22} {'ms/iter':>10} {'cpu ms':>10} {'sys ms':>9} {'faults':>9} {'images/s':>10} {'n':>3}")
    for name, s in r["steps"].items():
        print(f"  {name:<22} {s['time_ms']:10.1f} {s['cpu_time_ms']:10.1f} {s['sys_time_ms']:9.1f} "
              f"{s['page_faults']:9.0f} {s['images_per_s']:10.2f} {s['repeats']:3d}")
    for k, v in r["ratios"].items():
        print(f"  {k:<34} {v:6.3f}")
    if r["compile"] and not r["compile"]["ok"]:
        print(f"  torch.compile: {r['compile']['error']}")
    if r["compile"] and r["compile"]["ok"]:
        print(f"  PLAIN compile + warm-up (all dtypes): {r['compile']['compile_s']:.1f} s")
    for dtype, c in (r.get("ours_compile") or {}).items():
        print(f"  OURS compile ({dtype}): " + (f"{c['compile_s']:.1f} s (first steps "
              f"{', '.join(f'{t:.1f}' for t in c['first_steps_s'])} s)" if c["ok"] else c["error"]))
    for dtype, p in r["parts"].items():
        print(f"  parts ({dtype}, PLAIN networks, each timed alone):")
        print(f"    {'part':<30} {'ms':>9} {'cpu ms':>9} {'sys ms':>9} {'faults':>9} {'share':>7}")
        for name, s in p["parts"].items():
            print(f"    {name:<30} {s['time_ms']:9.1f} {s['cpu_time_ms']:9.1f} {s['sys_time_ms']:9.1f} "
                  f"{s['page_faults']:9.0f} {100 * s['share_of_parts']:6.1f}%")
        print(f"    {'sum of parts':<30} {p['sum_ms']:9.1f}   (PLAIN step {p['plain_step_ms']:.1f} ms, other "
              f"{p['other_ms']:+.1f} ms)")
    if not r["parts"]:
        print("  parts: not measured in this run (--quick measures them for the small presets only)")
    for dtype, p in r["profiles"].items():
        print_profile(p, f"{r['preset']} {dtype}")

# ----------------------------------------------------------------------------
# Main.


def plan(args) -> dict:
    """Batch, repeats and budgets per preset."""
    plans = {}
    for preset in args.presets:
        big = preset in ("cifar10", "imagenet64")
        if args.smoke:
            q = dict(batch=2, warmup=0, repeats=1, parts_warmup=0, parts_repeats=1, profile_steps=1, budget_s=10.0)
        elif args.quick:
            q = dict(batch=2, warmup=1, repeats=2, parts_warmup=0, parts_repeats=0, profile_steps=0, budget_s=60.0) \
                if big else dict(batch=16, warmup=1, repeats=5, parts_warmup=1, parts_repeats=5, profile_steps=2,
                                 budget_s=30.0)
        else:
            q = dict(batch=8 if big else 32, warmup=2, repeats=10, parts_warmup=1, parts_repeats=7,
                     profile_steps=0 if big else 3, budget_s=300.0)
        if args.batch:
            q["batch"] = args.batch
        if args.repeats is not None:
            q["repeats"] = args.repeats
        if args.parts_repeats is not None:
            q["parts_repeats"] = args.parts_repeats
        if args.budget is not None:
            q["budget_s"] = args.budget
        plans[preset] = q
    return plans


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small at batch 16 and cifar10 at batch 2, few repeats")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny preset, batch 2, 1 repeat
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default="small,cifar10", help="comma-separated: tiny, small, cifar10, imagenet64")
    p.add_argument("--batch", type=int, default=None, help="default: 16 / 2 (quick), 32 / 8")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (= autocast)")
    p.add_argument("--compile", action="store_true",
                   help="also time OURS with compile=true (config) and PLAIN on torch.compile'd networks")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="compile_backend of OURS with --compile (PLAIN always uses inductor)")
    p.add_argument("--no-plain-compile", dest="plain_compile", action="store_false",
                   help="with --compile: time OURS+compile only, not the compiled PLAIN loop")
    p.add_argument("--reuse-samples", action="store_true",
                   help="also time OURS with sid.reuse_samples=true (the generator update first, the fake score on "
                        "its samples: one generator forward less per step, a different order of updates)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds of the step comparison (default: plan)")
    p.add_argument("--parts-repeats", type=int, default=None, help="timed rounds of the parts (0 = skip them)")
    p.add_argument("--budget", type=float, default=None, help="seconds after which timed rounds stop (default: plan)")
    p.add_argument("--compile-limit", dest="compile_limit_s", type=float, default=600.0,
                   help="seconds allowed for compiling and warming up")
    p.add_argument("--profile", action="store_true", help="torch.profiler on a few OURS steps of the first preset")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, fewer when other processes keep the CPU busy)")
    p.add_argument("--mallopt", action="store_true", help="keep freed memory in glibc's heap (see common.tune_malloc)")
    p.add_argument("--out", default="benchmarks/results/bench_sid_step.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick, args.presets = True, "tiny"
    args.presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    for name in args.presets:
        if name not in IMAGES:
            p.error(f"unknown preset {name!r}; expected some of {', '.join(IMAGES)}")
    for name in args.dtypes:
        if name not in DTYPES:
            p.error(f"unknown dtype {name!r}; expected some of {', '.join(DTYPES)}")
    args.plan = plan(args)
    device = torch.device(args.device)
    for preset in args.presets[1:]:  # the profile is of the first preset only
        args.plan[preset]["profile_steps"] = 0
    threads_reason = pick_threads(device, args.threads)
    malloc = tune_malloc() if args.mallopt else "glibc default"

    info = dict(machine_info(device), threads_reason=threads_reason, malloc=malloc)
    print(f"{machine_line(info)} | threads: {threads_reason} | malloc: {malloc}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_sid_step-") as tmp:
        presets = [bench_preset(args, preset, device, tmp) for preset in args.presets]
    for r in presets:
        print_preset(r)
    info["loadavg_end"] = load_average()
    print(f"\nload average: start {info['loadavg_start']}, end {info['loadavg_end']}; total "
          f"{time.perf_counter() - t0:.0f} s")
    config = dict(quick=args.quick, smoke=args.smoke, device=args.device, dtypes=args.dtypes, compile=args.compile,
                  reuse_samples=args.reuse_samples, compile_backend=args.compile_backend,
                  plain_compile=args.compile and args.plain_compile,
                  profile=args.profile, plan=args.plan, argv=sys.argv[1:] if argv is None else argv)
    summary_rows = [dict(preset=r["preset"], batch=r["batch"], dtype=d,
                         ours_images_per_s=r["steps"][f"ours/{d}"]["images_per_s"],
                         plain_images_per_s=r["steps"][f"plain/{d}"]["images_per_s"],
                         ours_over_plain=r["ratios"][f"ours_over_plain/{d}"],
                         **({"ours_compile_images_per_s": r["steps"][f"ours+compile/{d}"]["images_per_s"],
                             "plain_over_ours_compile": r["ratios"][f"plain_over_ours_compile/{d}"]}
                            if f"ours+compile/{d}" in r["steps"] else {}),
                         **({"ours_reuse_images_per_s": r["steps"][f"ours+reuse/{d}"]["images_per_s"],
                             "plain_over_ours_reuse": r["ratios"][f"plain_over_ours_reuse/{d}"]}
                            if f"ours+reuse/{d}" in r["steps"] else {}))
                    for r in presets for d in args.dtypes]
    result = dict(machine=info, config=config, summary=summary_rows, presets=presets,
                  notes=("time_ms / cpu_time_ms: medians of interleaved repeats (wall; process CPU time of all "
                         "threads); *_samples: raw values. Parts use the PLAIN networks, each part timed alone."))
    out = write_json(args.out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
