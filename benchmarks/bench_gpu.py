"""GPU measurements in one run, prepared so a lent GPU's few minutes are spent measuring (benchmarks/gpu.sh runs
it): images/s and peak memory of a SiD step (bf16) on the cifar10 preset and on an EDM DDPM++-sized teacher, MFU of
those steps against the GPU's dense bf16 peak, S4 vs MHA vs SDPA-flash at L = 256, 1024, 4096, teacher training
images/s, and last, issue 16's step target: our SiD step (eager and with ``compile: true``) against the plain loop
on the small preset at the main job's batch, fp32 and bf16.

    python benchmarks/bench_gpu.py --device cuda --out benchmarks/results/gpu.json
    python benchmarks/bench_gpu.py --device cpu --quick            # tiny sizes, end to end on a CPU

SiD step: the real ``SiDLoop.train_step`` (benchmarks/bench_sid_step.py's ``build_ours`` / ``ours_step``) on a
random teacher folder: ``common.random_denoiser`` of the preset, or an EDM network folder (``sid.teachers.edm``)
holding a SongUNet with EDM's CIFAR-10 DDPM++ settings (model_channels 128, channel_mult [2, 2, 2], 4 blocks,
attention at 16x16; augment_dim 0). FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one whole step
(matmuls, convolutions, SDPA; S4 FFTs and elementwise work are not counted, so MFU is a lower bound for S4
networks). MFU = FLOPs per step x steps per s / peak. Peak memory: ``torch.cuda.max_memory_allocated`` over the
timed steps (CPU: the process's maximum resident set size, which includes everything loaded). Teacher training: the
real ``TeacherLoop.train_step`` on an ``.npz`` of random images written to a temporary folder (data loading is
in-memory and not what is measured). Times: medians of repeats after warmup (common.measure). OURS vs PLAIN:
benchmarks/bench_sid_step.py's ``bench_preset`` (the same interleaved comparison as on the CPU; the compiled
PLAIN loop is left out to save compile time). The JSON is rewritten after every section, so a run stopped by
gpu.sh's time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_backbones import s4_vs_attention  # noqa: E402
from benchmarks.bench_sid_step import (  # noqa: E402
    bench_preset,
    build_ours,
    check_autocast,
    ours_step,
    print_preset,
    save_teacher,
)
from benchmarks.common import IMAGES, load_average, machine_info, machine_line, measure, summary, write_json  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s; matched by substring of
# torch.cuda.get_device_name, most specific first. --peak-tflops overrides.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0), ("A10G", 125.0))

# EDM's CIFAR-10 DDPM++ (Karras et al. 2022, Appendix F) and a tiny stand-in for --quick.
DDPMPP = dict(model_type="SongUNet", model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
              dropout=0.13, embedding_type="positional", encoder_type="standard", decoder_type="standard",
              resample_filter=[1, 1], channel_mult_noise=1, augment_dim=0)
DDPMPP_TINY = dict(DDPMPP, model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8])


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no bf16 peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"datasheet dense bf16 of {key}"
    return None, f"{name} is not in PEAK_BF16_TFLOPS: pass --peak-tflops"


def edm_teacher(folder: str, tiny: bool, label_dim: int = 10) -> int:
    """A random EDMPrecond(SongUNet) folder with DDPM++ settings; returns its parameter count."""
    from sid.teachers.edm import build_denoiser, save_folder

    torch.manual_seed(0)
    res = 16 if tiny else 32
    net = build_denoiser("EDMPrecond", dict(img_resolution=res, img_channels=3, label_dim=label_dim,
                                            **(DDPMPP_TINY if tiny else DDPMPP)))
    save_folder(net, folder)
    return sum(p.numel() for p in net.parameters())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def time_loop_step(name: str, step, batch: int, device: torch.device, args, peak: float | None) -> dict:
    """Warm up, count the FLOPs of one step (also a warm-up step), then time ``args.repeats`` steps (peak memory
    over those)."""
    from torch.utils.flop_counter import FlopCounterMode

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    row = summary(measure({name: step}, device, warmup=0, repeats=args.repeats, budget_s=args.budget_s)[name])
    steps_per_s = 1e3 / row["time_ms"]
    row.update(name=name, batch=batch, images_per_s=batch * steps_per_s, peak_mem_mb=peak_memory_mb(device),
               flops_per_step=flops, achieved_tflops=flops * steps_per_s / 1e12,
               mfu=flops * steps_per_s / (peak * 1e12) if peak else None,
               seconds_incl_warmup=time.perf_counter() - t0)
    mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
    print(f"  {name:<28} batch {batch:<4d} {row['time_ms']:9.1f} ms/step  {row['images_per_s']:9.1f} img/s  "
          f"peak {row['peak_mem_mb']:9.1f} MB  {flops / 1e9:9.2f} GFLOP/step  MFU {mfu}  "
          f"[{row['repeats']} repeats]", flush=True)
    return row


def sid_steps(args, device: torch.device, tmp: str, peak: float | None) -> list[dict]:
    rows = []
    teachers = {f"sid/{args.preset}": str(Path(tmp) / "teacher-preset"),
                "sid/edm_ddpmpp": str(Path(tmp) / "teacher-edm")}
    save_teacher(args.preset, teachers[f"sid/{args.preset}"])
    params_edm = edm_teacher(teachers["sid/edm_ddpmpp"], tiny=args.quick)
    for name, folder in teachers.items():
        loop = build_ours(folder, str(Path(tmp) / f"run-{name.replace('/', '-')}"), args.batch, "bf16", device)
        check_autocast(loop, "bf16")
        row = time_loop_step(name, ours_step(loop), args.batch, device, args, peak)
        row["teacher_params"] = sum(p.numel() for p in loop.teacher.parameters())
        if name == "sid/edm_ddpmpp":
            assert row["teacher_params"] == params_edm
        rows.append(row)
        del loop
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def teacher_training(args, device: torch.device, tmp: str, peak: float | None) -> dict:
    from accelerate.state import AcceleratorState

    from sid.config import load_config
    from sid.train_teacher import TeacherLoop
    from sid.training import make_accelerator

    res, channels, label_dim = IMAGES[args.preset]
    rng = np.random.default_rng(0)
    data = str(Path(tmp) / "images.npz")
    n = max(8 * args.batch, 64)
    np.savez(data, images=rng.integers(0, 256, (n, res, res, channels), dtype=np.uint8),
             labels=rng.integers(0, label_dim, n))
    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = load_config(None, ["kind=teacher", "data.name=npz", f"data.path={data}", f"network.preset={args.preset}",
                             f"batch_size={args.batch}", "mixed_precision=bf16", f"cpu={device.type == 'cpu'}",
                             f"run_dir={Path(tmp) / 'run-teacher'}", "eval.metrics=[]"])
    loop = TeacherLoop(cfg, make_accelerator(cfg))
    row = time_loop_step(f"teacher/{args.preset}", ours_step(loop), args.batch, device, args, peak)
    del loop
    gc.collect()
    return row


def sid_step_vs_plain(args, device: torch.device, tmp: str) -> dict:
    """Issue 16's step target (OURS at least 1.3x faster than PLAIN, same network and batch, fp32 and bf16): the
    real SiDLoop step eager and with ``compile: true`` against the inline PLAIN loop, interleaved, on the small
    preset at the main job's batch 32 (``--quick``: the tiny preset at batch 2, compiled with the ``eager`` backend,
    which runs the same path without code generation), and the step with ``sid.reuse_samples`` (one generator
    forward less, a different order of updates). Returns bench_sid_step's per-preset result."""
    q = dict(batch=args.vs_batch, warmup=args.warmup, repeats=args.repeats, parts_warmup=0, parts_repeats=0,
             profile_steps=0, budget_s=args.budget_s)
    ns = SimpleNamespace(plan={args.vs_preset: q}, dtypes=["fp32", "bf16"], compile=True,
                         compile_backend=args.vs_backend, plain_compile=False, compile_limit_s=args.compile_limit_s,
                         profile=False, reuse_samples=True)
    result = bench_preset(ns, args.vs_preset, device, tmp)
    print_preset(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny networks, batch 2, L 64/256 (a CPU smoke run)")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None, help="dense bf16 peak for MFU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile-limit", dest="compile_limit_s", type=float, default=150.0,
                   help="seconds allowed for compiling OURS in the step comparison, per dtype")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.preset, args.batch, args.warmup, args.repeats, args.budget_s = "tiny", 2, 0, 2, 5.0  # + 1 counted
        args.vs_preset, args.vs_batch, args.vs_backend = "tiny", 2, "eager"
        attn = dict(lengths=[64, 256], d_model=32, d_state=8, n_heads=2, batch=1, warmup=0, repeats=2, budget_s=2.0)
    else:
        args.preset, args.batch, args.warmup, args.repeats, args.budget_s = "cifar10", 64, 3, 10, 30.0
        args.vs_preset, args.vs_batch, args.vs_backend = "small", 32, "inductor"
        attn = dict(lengths=[256, 1024, 4096], d_model=128, d_state=64, n_heads=4, batch=2, warmup=2, repeats=10,
                    budget_s=20.0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    info = dict(machine_info(device), peak_bf16_tflops=peak, peak_source=peak_source)
    print(f"{machine_line(info)} | bf16 peak {peak} TFLOP/s ({peak_source})", flush=True)
    t0 = time.perf_counter()
    result = dict(machine=info)
    result["config"] = dict(device=args.device, quick=args.quick, preset=args.preset, batch=args.batch,
                            warmup=args.warmup, repeats=args.repeats, attention=attn, ddpmpp=DDPMPP_TINY if args.quick
                            else DDPMPP, step_vs_plain=dict(preset=args.vs_preset, batch=args.vs_batch,
                                                            compile_backend=args.vs_backend,
                                                            compile_limit_s=args.compile_limit_s))

    def save() -> Path:                 # after every section: a run stopped by a time limit keeps what it measured
        result["seconds"] = time.perf_counter() - t0
        return write_json(args.out, result)

    with tempfile.TemporaryDirectory(prefix="bench_gpu-") as tmp:
        print(f"\nSiD step (bf16, batch {args.batch}):", flush=True)
        result["sid_steps"] = sid_steps(args, device, tmp, peak)
        save()
        print(f"\nS4 vs torch.nn.MultiheadAttention vs SDPA-flash (bf16 autocast, fwd+bwd, "
              f"d_model {attn['d_model']}, batch {attn['batch']}):", flush=True)
        try:
            result["s4_vs_attention"] = s4_vs_attention(device, dtype="bf16", flash=True, before_ref=None, **attn)
        except RuntimeError as e:  # no flash kernel for these inputs: keep S4 vs MHA, say why
            result["flash_error"] = str(e).splitlines()[0]
            print(f"  SDPA-flash failed ({result['flash_error']}); S4 vs MHA only", flush=True)
            result["s4_vs_attention"] = s4_vs_attention(device, dtype="bf16", flash=False, before_ref=None, **attn)
        save()
        print(f"\nTeacher training (bf16, batch {args.batch}):", flush=True)
        result["teacher_training"] = teacher_training(args, device, tmp, peak)
        save()
        print(f"\nOur SiD step against the plain loop ({args.vs_preset} preset, batch {args.vs_batch}, fp32 and "
              f"bf16; compile backend {args.vs_backend}):", flush=True)
        result["step_vs_plain"] = sid_step_vs_plain(args, device, tmp)
    info["loadavg_end"] = load_average()
    out = save()
    print(f"\n{result['seconds']:.0f} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
