"""Benchmark sampling speed: the one-step generator (OneStepGenerator, 1 network evaluation) against the teacher's
EDM Heun sampler (``sid.sampling.edm_sampler``, 18 steps = 35 network evaluations) on the same backbone and batch.

    python benchmarks/bench_sampling.py --quick                  # small preset, CPU, about a minute
    python benchmarks/bench_sampling.py --device cuda --batch 256

Both samplers run interleaved (one-step, Heun, one-step, Heun, ...) for each dtype (fp32, bf16 autocast); a one-step
sample is the mean over several consecutive calls, so that its sample takes a comparable time. Reported: images/s
of each, the speed ratio (ideally about the NFE ratio, 35), the Heun time per network evaluation relative to
one generator call (the sampler's own overhead), and Heun with the S4 kernel cache switched off (every network
evaluation rebuilding every layer's kernel, as before ``S4.cached_kernel``), interleaved with the rest. The
networks are random EDMPrecond(HybridDenoiser) presets with perturbed weights (F != 0); sampling speed does not
depend on what the weights are.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import s4  # noqa: E402
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
from sid.generator import OneStepGenerator  # noqa: E402
from sid.precond import EDMPrecond  # noqa: E402
from sid.sampling import edm_sampler, nfe  # noqa: E402

# ----------------------------------------------------------------------------
# One preset.


def make_denoiser(preset: str, device: torch.device, seed: int = 0) -> EDMPrecond:
    return random_denoiser(preset, seed).to(device).eval().requires_grad_(False)


def bench_preset(args, preset: str, device: torch.device) -> dict:
    q = args.plan[preset]
    batch = q["batch"]
    res, channels, label_dim = IMAGES[preset]
    n_heun = nfe(args.steps)
    inner = max(1, n_heun // 5) if q["repeats"] > 1 else 1
    print(f"\n== {preset} ({res}x{res}x{channels}, {label_dim} classes), batch {batch}, Heun {args.steps} steps = "
          f"{n_heun} NFE, dtypes {args.dtypes}, warmup {q['warmup']}, repeats {q['repeats']}", flush=True)
    denoiser = make_denoiser(preset, device)
    generator = OneStepGenerator(denoiser, 2.5)  # the same network as a one-step generator
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, channels, res, res, generator=g).to(device)
    labels = torch.randint(label_dim, (batch,), generator=g).to(device) if label_dim else None

    variants, inners = {}, {}
    for dtype in args.dtypes:

        def one_step(dtype=dtype):
            with torch.no_grad(), autocast(device, dtype):
                return generator(latents, labels)

        def heun(dtype=dtype):
            with autocast(device, dtype):
                return edm_sampler(denoiser, latents, labels, num_steps=args.steps)

        def heun_no_cache(dtype=dtype):
            s4.KERNEL_CACHE = False  # every network evaluation rebuilds every S4 kernel (before the cache existed)
            try:
                return heun(dtype)
            finally:
                s4.KERNEL_CACHE = True

        variants[f"one-step/{dtype}"], variants[f"heun/{dtype}"] = one_step, heun
        variants[f"heun-no-kernel-cache/{dtype}"] = heun_no_cache
        inners[f"one-step/{dtype}"] = inner
    t0 = time.perf_counter()
    raw = measure(variants, device, warmup=q["warmup"], repeats=q["repeats"], budget_s=q["budget_s"], inner=inners)
    print(f"  measured in {time.perf_counter() - t0:.0f} s, load {load_average()}", flush=True)
    rows = {k: summary(v) for k, v in raw.items()}
    for k, r in rows.items():
        r["images_per_s"] = batch / (r["time_ms"] / 1e3)
        r["nfe"] = 1 if k.startswith("one-step") else n_heun
        r["calls_per_sample"] = inners.get(k, 1)
    ratios = {}
    for dtype in args.dtypes:
        one, h = rows[f"one-step/{dtype}"], rows[f"heun/{dtype}"]
        ratios[dtype] = dict(speedup=h["time_ms"] / one["time_ms"], speedup_cpu=h["cpu_time_ms"] / one["cpu_time_ms"],
                             nfe_ratio=n_heun, heun_per_nfe_over_one_step=h["time_ms"] / n_heun / one["time_ms"],
                             kernel_cache_speedup=rows[f"heun-no-kernel-cache/{dtype}"]["time_ms"] / h["time_ms"])
    if "fp32" in args.dtypes and "bf16" in args.dtypes:
        for who in ("one-step", "heun"):
            ratios[f"{who}_bf16_speedup"] = rows[f"{who}/fp32"]["time_ms"] / rows[f"{who}/bf16"]["time_ms"]
    return dict(preset=preset, image_shape=[channels, res, res], label_dim=label_dim, batch=batch,
                params=sum(p.numel() for p in denoiser.parameters()), heun_steps=args.steps, heun_nfe=n_heun,
                warmup=q["warmup"], samplers=rows, ratios=ratios)


def print_preset(r: dict) -> None:
    print(f"\n{r['preset']}: batch {r['batch']}, {r['params']:,} params (median of interleaved repeats)")
    print(f"  {'sampler':<16} {'NFE':>4} {'ms/batch':>10} {'cpu ms':>10} {'images/s':>10} {'n':>3}")
    for name, s in r["samplers"].items():
        print(f"  {name:<16} {s['nfe']:4d} {s['time_ms']:10.1f} {s['cpu_time_ms']:10.1f} {s['images_per_s']:10.1f} "
              f"{s['repeats']:3d}")
    for k, v in r["ratios"].items():
        if isinstance(v, dict):
            print(f"  {k}: one-step is {v['speedup']:.1f}x faster (cpu {v['speedup_cpu']:.1f}x; NFE ratio "
                  f"{v['nfe_ratio']}); Heun time per NFE / one-step time = {v['heun_per_nfe_over_one_step']:.3f}; "
                  f"S4 kernel cache makes Heun {v['kernel_cache_speedup']:.2f}x faster")
        else:
            print(f"  {k}: {v:.3f}")

# ----------------------------------------------------------------------------
# Main.


def plan(args) -> dict:
    plans = {}
    for preset in args.presets:
        big = preset in ("cifar10", "imagenet64")
        if args.smoke:
            q = dict(batch=2, warmup=0, repeats=1, budget_s=10.0)
        elif args.quick:
            q = dict(batch=2 if big else 16, warmup=1, repeats=3, budget_s=30.0)
        else:
            q = dict(batch=4 if big else 64, warmup=1, repeats=7, budget_s=300.0)
        if args.batch:
            q["batch"] = args.batch
        plans[preset] = q
    return plans


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small preset only, batch 16, 3 repeats")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny preset, batch 2, 1 repeat
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default=None, help="comma-separated (default: small,cifar10; --quick: small)")
    p.add_argument("--batch", type=int, default=None, help="default: 16 (quick), 64 (small) / 4 (cifar10)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (2 * steps - 1 network evaluations)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (= autocast)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, fewer when other processes keep the CPU busy)")
    p.add_argument("--mallopt", action="store_true", help="keep freed memory in glibc's heap (see common.tune_malloc)")
    p.add_argument("--out", default="benchmarks/results/bench_sampling.json")
    args = p.parse_args(argv)
    if args.smoke:
        args.quick, args.presets = True, "tiny"
    args.presets = [s.strip() for s in (args.presets or ("small" if args.quick else "small,cifar10")).split(",")]
    args.dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    for name in args.presets:
        if name not in IMAGES:
            p.error(f"unknown preset {name!r}; expected some of {', '.join(IMAGES)}")
    for name in args.dtypes:
        if name not in ("fp32", "bf16"):
            p.error(f"unknown dtype {name!r}; expected fp32 or bf16")
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    args.plan = plan(args)
    device = torch.device(args.device)
    threads_reason = pick_threads(device, args.threads)
    malloc = tune_malloc() if args.mallopt else "glibc default"

    info = dict(machine_info(device), threads_reason=threads_reason, malloc=malloc)
    print(f"{machine_line(info)} | threads: {threads_reason} | malloc: {malloc}", flush=True)
    t0 = time.perf_counter()
    presets = [bench_preset(args, preset, device) for preset in args.presets]
    for r in presets:
        print_preset(r)
    info["loadavg_end"] = load_average()
    print(f"\nload average: start {info['loadavg_start']}, end {info['loadavg_end']}; total "
          f"{time.perf_counter() - t0:.0f} s")
    config = dict(quick=args.quick, smoke=args.smoke, device=args.device, dtypes=args.dtypes, steps=args.steps,
                  plan=args.plan)
    summary_rows = [dict(preset=r["preset"], batch=r["batch"], dtype=d,
                         one_step_images_per_s=r["samplers"][f"one-step/{d}"]["images_per_s"],
                         heun_images_per_s=r["samplers"][f"heun/{d}"]["images_per_s"],
                         speedup=r["ratios"][d]["speedup"], nfe_ratio=r["heun_nfe"])
                    for r in presets for d in args.dtypes]
    result = dict(machine=info, config=config, summary=summary_rows, presets=presets,
                  notes=("time_ms / cpu_time_ms: medians of interleaved repeats per batch (wall; process CPU time "
                         "of all threads); *_samples: raw values; one-step samples are means over "
                         "calls_per_sample consecutive calls."))
    out = write_json(args.out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
