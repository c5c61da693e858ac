"""Benchmark one S4, one MLA and one MHA layer (forward + backward time, memory) versus sequence length; the S4
kernel by DPLR (Cauchy), diagonal (Vandermonde) and the naive dense matrix powers; whole HybridDenoiser
presets; the MLA latent size per token of each preset; and S4 against torch.nn.MultiheadAttention side by side
(issue 16's setting: d_model 128, d_state 64, bidirectional, batch 2, L = 256, 1024, 4096), with the S4 layer of an
earlier commit (--before-ref, loaded from git) interleaved in the same run.

    python benchmarks/bench_backbones.py --quick                 # CPU, well under 5 minutes on 2 cores
    python benchmarks/bench_backbones.py --sections s4_vs_mha    # only the S4 / MHA ratios (about a minute)
    python benchmarks/bench_backbones.py --device cuda --dtype bf16

Time: median wall time over repeats after warmup, plus the median process CPU time (on a CPU shared with other jobs
the CPU time is the steadier number; the load average before and after is recorded). Memory: on CUDA the peak
allocated bytes during forward + backward (above the inputs and weights); on every device the bytes of activations
saved for backward (unique storages, counted with saved_tensors_hooks). torch's CPU allocator has no peak counter,
so the peak is reported as null on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backbones import s4  # noqa: E402
from backbones.denoiser import PRESETS, HybridDenoiser  # noqa: E402
from backbones.mla import MHA, MLA  # noqa: E402
from backbones.s4 import S4, dplr_kernel_naive  # noqa: E402
from benchmarks.common import (  # noqa: E402
    IMAGES,
    autocast,
    load_average,
    machine_info,
    measure,
    summary,
    sync,
    time_fn,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "654b0d7"  # the last commit before issue 16's S4 work (full-state Cauchy product)
SECTIONS = ("layers", "kernels", "presets", "latents", "s4_vs_mha")

# ----------------------------------------------------------------------------
# Helpers.


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while running fn()."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def fit_exponent(Ls: list[int], ts: list[float]) -> float | None:
    """Slope of log t versus log L by least squares; None with fewer than two lengths."""
    return float(np.polyfit(np.log(Ls), np.log(ts), 1)[0]) if len(Ls) >= 2 else None

# ----------------------------------------------------------------------------
# Benchmarks.


def make_layer(kind: str, d_model: int, n_heads: int, L: int, d_state: int) -> torch.nn.Module:
    if kind == "S4":
        return S4(d_model, d_state, kernel="dplr", bidirectional=True, l_max=L)
    if kind == "MLA":
        head = d_model // n_heads
        return MLA(d_model, n_heads, kv_lora_rank=2 * head, qk_nope_head_dim=head, qk_rope_head_dim=head // 2,
                   v_head_dim=head)
    return MHA(d_model, n_heads)


def bench_layers(args, device: torch.device) -> list[dict]:
    rows = []
    for L in args.lengths:
        side = math.isqrt(L)
        grid = (side, L // side)
        for kind in ("S4", "MLA", "MHA"):
            torch.manual_seed(0)
            layer = make_layer(kind, args.d_model, args.n_heads, L, args.d_state).to(device)
            x = torch.randn(args.batch, L, args.d_model, device=device, requires_grad=True)
            g = torch.randn(args.batch, L, args.d_model, device=device)

            def forward(layer=layer, x=x, grid=grid, kind=kind):
                with autocast(device, args.dtype):
                    return layer(x) if kind == "S4" else layer(x, grid)

            def step(forward=forward, layer=layer, x=x, g=g):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                (forward().float() * g).sum().backward()

            saved = saved_bytes(forward)
            peak = None
            if device.type == "cuda":
                step()
                sync(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step()
                sync(device)
                peak = torch.cuda.max_memory_allocated(device) - base
            wall, cpu, n = time_fn(step, device, args.warmup, args.repeats, args.budget_s)
            row = dict(layer=kind, L=L, grid=list(grid), time_ms=1e3 * wall, cpu_time_ms=1e3 * cpu, repeats=n,
                       saved_activation_mb=saved / 2**20, peak_mem_mb=None if peak is None else peak / 2**20,
                       params=sum(p.numel() for p in layer.parameters()))
            rows.append(row)
            mem = "n/a" if peak is None else f"{row['peak_mem_mb']:.1f} MB"
            print(f"  {kind:>3} L={L:<6d} wall {row['time_ms']:10.2f} ms  cpu {row['cpu_time_ms']:10.2f} ms  "
                  f"saved {row['saved_activation_mb']:8.1f} MB  peak {mem}", flush=True)
            del layer, x, g
    return rows


def bench_kernels(args, device: torch.device) -> list[dict]:
    """Kernel computation of one S4 layer, no grad: DPLR (Cauchy + Woodbury, O(N L)), diagonal (Vandermonde) and
    the naive reference of the same DPLR system (dense bilinear A_bar, K_k = C A_bar^k B_bar by repeated
    matrix-vector products, O(N^2 L)), at the lengths in args.naive_lengths. Then forward + backward of the DPLR
    and diagonal kernels computed in chunks (the default, s4.CHUNK_ELEMENTS) and with the whole (H, N, L) matrix
    materialised at once, side by side."""
    rows = []
    for L in args.kernel_lengths:
        out = dict(L=L)
        layers = {}
        for kernel in ("dplr", "diag"):
            torch.manual_seed(0)
            layers[kernel] = S4(args.d_model, args.d_state, kernel=kernel, bidirectional=True, l_max=L).to(device)
        for kernel in ("dplr", "diag", "naive"):
            if kernel == "naive" and L not in args.naive_lengths:
                out["naive_ms"] = out["naive_cpu_ms"] = None
                continue

            def run(layer=layers["diag" if kernel == "diag" else "dplr"], L=L, naive=kernel == "naive"):
                with torch.no_grad():
                    if not naive:
                        return layer.kernel(L)
                    s = layer._continuous()
                    return dplr_kernel_naive(s["A"], s["P"], s["B"], s["C"], s["dt"], L)

            wall, cpu, _ = time_fn(run, device, 1, args.repeats, args.budget_s)
            out[f"{kernel}_ms"], out[f"{kernel}_cpu_ms"] = 1e3 * wall, 1e3 * cpu
        out["dplr_over_diag"] = out["dplr_ms"] / out["diag_ms"]
        out["naive_over_dplr"] = out["naive_ms"] / out["dplr_ms"] if out["naive_ms"] is not None else None
        for kernel, layer in layers.items():

            def grad_step(layer=layer, L=L):
                layer.zero_grad(set_to_none=True)
                layer.kernel(L).square().sum().backward()

            for mode in ("chunked", "whole"):
                with chunking(device, None if mode == "chunked" else 2**62):
                    wall, _, _ = time_fn(grad_step, device, 1, args.repeats, args.budget_s)
                out[f"{kernel}_grad_{mode}_ms"] = 1e3 * wall
            out[f"{kernel}_chunk_speedup"] = out[f"{kernel}_grad_whole_ms"] / out[f"{kernel}_grad_chunked_ms"]
        rows.append(out)
        naive = (f"naive {out['naive_ms']:9.2f} ms  naive/dplr {out['naive_over_dplr']:6.1f}"
                 if out["naive_ms"] is not None else "naive      (skipped)")
        print(f"  L={L:<6d} dplr {out['dplr_ms']:9.2f} ms  diag {out['diag_ms']:9.2f} ms  "
              f"dplr/diag {out['dplr_over_diag']:.2f}  {naive}  "
              f"(cpu {out['dplr_cpu_ms']:.2f} / {out['diag_cpu_ms']:.2f} ms)", flush=True)
        print(f"  {'':8s} fwd+bwd chunked/whole: dplr {out['dplr_grad_chunked_ms']:9.2f} / "
              f"{out['dplr_grad_whole_ms']:9.2f} ms ({out['dplr_chunk_speedup']:.2f}x)   diag "
              f"{out['diag_grad_chunked_ms']:9.2f} / {out['diag_grad_whole_ms']:9.2f} ms "
              f"({out['diag_chunk_speedup']:.2f}x)", flush=True)
    return rows


@contextlib.contextmanager
def chunking(device: torch.device, elements: int | None):
    """Temporarily set the S4 kernels' chunk size on this device type (None: leave the default)."""
    old = s4.CHUNK_ELEMENTS.get(device.type)
    if elements is not None:
        s4.CHUNK_ELEMENTS[device.type] = elements
    try:
        yield
    finally:
        if old is None:
            s4.CHUNK_ELEMENTS.pop(device.type, None)
        else:
            s4.CHUNK_ELEMENTS[device.type] = old


def bench_presets(args, device: torch.device) -> list[dict]:
    """Whole denoisers: forward + backward (S4 kernels chunked, the default, and materialised whole, side by side)
    and forward-only times of each preset in args.presets at its batch in args.preset_batches."""
    rows = []
    for preset in args.presets:
        res, channels, label_dim = IMAGES[preset]
        torch.manual_seed(0)
        model = HybridDenoiser.from_preset(preset, res, channels, label_dim=label_dim).to(device)
        B = args.preset_batches[preset]
        x, c = torch.randn(B, channels, res, res, device=device), torch.randn(B, device=device)
        labels = torch.randint(0, label_dim, (B,), device=device)
        for dtype in ("fp32", "bf16"):

            def step(dtype=dtype, model=model, x=x, c=c, labels=labels):
                model.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    F_x = model(x, c, labels)
                F_x.float().square().mean().backward()

            def forward(dtype=dtype, model=model, x=x, c=c, labels=labels):
                with torch.no_grad(), autocast(device, dtype):
                    return model(x, c, labels)

            wall, cpu, n = time_fn(step, device, 1, args.repeats, args.budget_s)
            with chunking(device, 2**62):  # the same step with each S4 kernel's (H, N, L) matrix materialised whole
                whole, _, _ = time_fn(step, device, 1, args.repeats, args.budget_s)
            fwall, fcpu, _ = time_fn(forward, device, 1, args.repeats, args.budget_s)
            rows.append(dict(preset=preset, batch=B, dtype=dtype, fwd_bwd_ms=1e3 * wall, fwd_bwd_cpu_ms=1e3 * cpu,
                             fwd_bwd_whole_kernel_ms=1e3 * whole, chunk_speedup=whole / wall, fwd_ms=1e3 * fwall,
                             fwd_cpu_ms=1e3 * fcpu, repeats=n, params=sum(p.numel() for p in model.parameters())))
            print(f"  {preset:<10s} B={B:<4d} {dtype}: fwd+bwd {1e3 * wall:9.1f} ms (cpu {1e3 * cpu:9.1f}; whole S4 "
                  f"kernels {1e3 * whole:9.1f} ms, chunked {whole / wall:.2f}x faster)  fwd {1e3 * fwall:8.1f} ms "
                  f"(cpu {1e3 * fcpu:8.1f})", flush=True)
        del model
    return rows


def s4_at(ref: str):
    """The S4 class of backbones/s4.py at git revision ``ref`` (self-contained module), or None without git."""
    try:
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:backbones/s4.py"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="s4-before-")) / "s4_before.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"s4_at_{ref}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.S4


def s4_vs_attention(device: torch.device, *, lengths: list[int], d_model: int = 128, d_state: int = 64,
                    n_heads: int = 4, batch: int = 2, dtype: str = "fp32", warmup: int = 1, repeats: int = 5,
                    budget_s: float = 60.0, before_ref: str | None = BEFORE_REF, flash: bool = False) -> list[dict]:
    """Forward + backward of one bidirectional S4 layer and of torch.nn.MultiheadAttention (batch_first, no
    weights returned) on the same input, interleaved per length; optionally the S4 layer of ``before_ref`` (same
    weights, loaded from git) and, with ``flash``, backbones.mla.MHA (fused qkv, RoPE, SDPA) forced to the flash
    SDPA backend. Rows: medians and samples per variant, and the ratios S4 / MHA (wall and CPU time)."""
    from backbones.mla import MHA

    S4_before = s4_at(before_ref) if before_ref else None
    rows = []
    for L in lengths:
        torch.manual_seed(0)
        layers = {"S4": S4(d_model, d_state, kernel="dplr", bidirectional=True, l_max=L)}
        if S4_before is not None:
            layers["S4_before"] = S4_before(d_model, d_state, kernel="dplr", bidirectional=True, l_max=L)
            layers["S4_before"].load_state_dict(layers["S4"].state_dict())  # same names, shapes and values
        layers["MHA"] = torch.nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        if flash:
            layers["SDPA_flash"] = MHA(d_model, n_heads)
        side = math.isqrt(L)
        grid = (side, L // side)
        x = torch.randn(batch, L, d_model, device=device, requires_grad=True)
        g = torch.randn(batch, L, d_model, device=device)
        variants = {}
        for name, layer in layers.items():
            layer.to(device)

            def step(name=name, layer=layer, x=x, g=g, grid=grid):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                ctx = contextlib.nullcontext()
                if name == "SDPA_flash":
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
                with ctx, autocast(device, dtype):
                    y = (layer(x, x, x, need_weights=False)[0] if name == "MHA" else
                         layer(x, grid) if name == "SDPA_flash" else layer(x))
                (y.float() * g).sum().backward()

            variants[name] = step
        raw = measure(variants, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
        row = dict(L=L, d_model=d_model, d_state=d_state, n_heads=n_heads, batch=batch, dtype=dtype,
                   layers={k: summary(v) for k, v in raw.items()})
        t = {k: v["time_ms"] for k, v in row["layers"].items()}
        c = {k: v["cpu_time_ms"] for k, v in row["layers"].items()}
        row["s4_over_mha"], row["s4_over_mha_cpu"] = t["S4"] / t["MHA"], c["S4"] / c["MHA"]
        if "S4_before" in t:
            row["s4_before_over_mha"], row["s4_before_over_mha_cpu"] = t["S4_before"] / t["MHA"], c["S4_before"] / c[
                "MHA"]
            row["s4_speedup_vs_before"] = t["S4_before"] / t["S4"]
        if "SDPA_flash" in t:
            row["s4_over_sdpa_flash"] = t["S4"] / t["SDPA_flash"]
        rows.append(row)
        before = (f"  S4@{before_ref} {t['S4_before']:9.2f} ms ({row['s4_before_over_mha']:.3f} x MHA; now "
                  f"{row['s4_speedup_vs_before']:.2f}x faster)" if "S4_before" in t else "")
        flash_s = f"  SDPA-flash {t['SDPA_flash']:9.2f} ms" if "SDPA_flash" in t else ""
        print(f"  L={L:<6d} S4 {t['S4']:9.2f} ms  MHA {t['MHA']:9.2f} ms  S4/MHA {row['s4_over_mha']:.3f} (cpu "
              f"{row['s4_over_mha_cpu']:.3f}){before}{flash_s}  [{row['layers']['S4']['repeats']} repeats]",
              flush=True)
        del layers, variants, x, g
    return rows


def latent_sizes() -> list[dict]:
    rows = []
    for name, kw in PRESETS.items():
        with torch.device("meta"):
            mla = MLA(kw["d_model"], kw["n_heads"], kv_lora_rank=kw["kv_lora_rank"], q_lora_rank=kw.get("q_lora_rank"),
                      qk_nope_head_dim=kw["qk_nope_head_dim"], qk_rope_head_dim=kw["qk_rope_head_dim"],
                      v_head_dim=kw["v_head_dim"])
        mha = 2 * kw["d_model"]                                    # K + V of all heads, = MHA.latent_size_per_token
        rows.append(dict(preset=name, mla=mla.latent_size_per_token, mha=mha, ratio=mla.latent_size_per_token / mha))
    return rows

# ----------------------------------------------------------------------------
# Main.


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="L up to 4096, fewer repeats (CPU: well under 5 minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    p.add_argument("--out", default="benchmarks/results/bench_backbones.json")
    p.add_argument("--d-model", dest="d_model", type=int, default=256)
    p.add_argument("--n-heads", dest="n_heads", type=int, default=4)
    p.add_argument("--d-state", dest="d_state", type=int, default=64)
    p.add_argument("--batch", type=int, default=None, help="default: 2 (quick) or 4")
    p.add_argument("--presets", default="small,cifar10", help="comma-separated denoiser presets to time whole")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--before-ref", dest="before_ref", default=BEFORE_REF,
                   help="git revision whose S4 layer s4_vs_mha times side by side ('none': skip)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny layers, L 64/256, 1 repeat
    args = p.parse_args(argv)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    if any(name not in SECTIONS for name in args.sections):
        p.error(f"unknown section in --sections {','.join(args.sections)}; expected some of {', '.join(SECTIONS)}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lengths = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    args.kernel_lengths = [256, 1024, 4096] if args.quick else [256, 1024, 4096, 16384]
    args.naive_lengths = [256, 1024, 4096]  # the naive kernel is an O(N^2 L) loop of L steps: not at 16384
    args.batch = args.batch or (2 if args.quick else 4)
    args.warmup, args.repeats = (1, 5) if args.quick else (2, 15)
    args.budget_s = 4.0 if args.quick else 30.0
    args.preset_batches = dict(tiny=2, small=128, cifar10=2 if args.quick else 8, imagenet64=2)
    args.s4_vs_mha = dict(lengths=[256, 1024, 4096], d_model=128, d_state=64, n_heads=4, batch=2,
                          warmup=1, repeats=5 if args.quick else 9, budget_s=60.0,
                          before_ref=None if args.before_ref == "none" else args.before_ref)
    if args.smoke:
        args.lengths = args.kernel_lengths = [64, 256]
        args.naive_lengths = [64]
        args.d_model, args.n_heads, args.d_state, args.batch = 32, 2, 8, 1
        args.presets = "tiny"
        args.warmup, args.repeats, args.budget_s = 0, 1, 1.0
        args.s4_vs_mha.update(lengths=[64, 256], d_model=32, d_state=8, n_heads=2, batch=1, warmup=0, repeats=2,
                              budget_s=1.0)

    args.presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in args.presets if name not in IMAGES]
    if unknown:
        p.error(f"unknown preset {unknown[0]!r} in --presets; expected names from {sorted(IMAGES)}")
    info = machine_info(device)
    print(f"torch {info['torch']} | {info['device_name']} ({info['device']}) | threads {info['threads']} | "
          f"load {info['loadavg_start']} | dtype {args.dtype} | d_model {args.d_model}, heads {args.n_heads}, "
          f"d_state {args.d_state}, batch {args.batch}", flush=True)

    result = dict(machine=info)
    if "layers" in args.sections:
        print("Forward + backward of one layer (median):", flush=True)
        layers = bench_layers(args, device)
        t = {(r["layer"], r["L"]): r["time_ms"] for r in layers}
        c = {(r["layer"], r["L"]): r["cpu_time_ms"] for r in layers}
        ratios = [dict(L=L, s4_over_mha=t["S4", L] / t["MHA", L], mla_over_mha=t["MLA", L] / t["MHA", L],
                       s4_over_mha_cpu=c["S4", L] / c["MHA", L], mla_over_mha_cpu=c["MLA", L] / c["MHA", L])
                  for L in args.lengths]
        kinds = ("S4", "MLA", "MHA")
        exponents = {k: fit_exponent(args.lengths, [t[k, L] for L in args.lengths]) for k in kinds}
        exponents_cpu = {k: fit_exponent(args.lengths, [c[k, L] for L in args.lengths]) for k in kinds}

        print("\n" + f"{'L':>6} {'S4 ms':>10} {'MLA ms':>10} {'MHA ms':>10} {'S4/MHA':>8} {'MLA/MHA':>8}   "
              "(wall; cpu)")
        for r in ratios:
            L = r["L"]
            print(f"{L:>6} {t['S4', L]:10.2f} {t['MLA', L]:10.2f} {t['MHA', L]:10.2f} {r['s4_over_mha']:8.3f} "
                  f"{r['mla_over_mha']:8.3f}   ({r['s4_over_mha_cpu']:.3f}, {r['mla_over_mha_cpu']:.3f})")
        print("time ~ L^k fit (wall): " + ", ".join(f"{k} k={v:.2f}" for k, v in exponents.items()))
        print("time ~ L^k fit (cpu):  " + ", ".join(f"{k} k={v:.2f}" for k, v in exponents_cpu.items()))
        result.update(layers=layers, ratios=ratios, time_exponents=exponents, time_exponents_cpu=exponents_cpu)

    if "kernels" in args.sections:
        print(f"\nS4 kernel computation of one layer (d_model {args.d_model}, d_state {args.d_state}, bidirectional), "
              "no grad: DPLR (Cauchy), diagonal (Vandermonde), naive DPLR (dense matrix powers):", flush=True)
        kernels = bench_kernels(args, device)
        kernel_exponents = {k: fit_exponent([r["L"] for r in kernels if r[f"{k}_ms"]],
                                            [r[f"{k}_ms"] for r in kernels if r[f"{k}_ms"]])
                            for k in ("dplr", "diag", "naive")}
        print("kernel time ~ L^k fit (wall): " + ", ".join(f"{k} k={v:.2f}" for k, v in kernel_exponents.items()
                                                           if v is not None))
        result.update(s4_kernels=kernels, s4_kernel_exponents=kernel_exponents)

    if "presets" in args.sections:
        print("\nWhole HybridDenoiser presets (small: the MNIST teacher), bf16 = autocast:", flush=True)
        result.update(presets=bench_presets(args, device))

    if "latents" in args.sections:
        print("\nPer-token latent size (MLA: kv_lora_rank + qk_rope_head_dim; MHA: K + V = 2 d_model):")
        latents = latent_sizes()
        for r in latents:
            print(f"  {r['preset']:<11} MLA {r['mla']:5d}  MHA {r['mha']:5d}  ratio {r['ratio']:.3f}")
        result.update(latent_sizes=latents)

    if "s4_vs_mha" in args.sections:
        sv = args.s4_vs_mha
        print(f"\nS4 (d_model {sv['d_model']}, d_state {sv['d_state']}, bidirectional) vs torch.nn.MultiheadAttention "
              f"({sv['n_heads']} heads), batch {sv['batch']}, forward + backward, interleaved, medians:", flush=True)
        rows = s4_vs_attention(device, dtype=args.dtype, flash=device.type == "cuda", **sv)
        result.update(s4_vs_mha=rows, s4_vs_mha_summary=[
            {k: r.get(k) for k in ("L", "s4_over_mha", "s4_over_mha_cpu", "s4_before_over_mha",
                                   "s4_before_over_mha_cpu", "s4_speedup_vs_before")} for r in rows])

    info["loadavg_end"] = load_average()
    result["config"] = dict(quick=args.quick, smoke=args.smoke, dtype=args.dtype, threads=info["threads"],
                            d_model=args.d_model, n_heads=args.n_heads, d_state=args.d_state, batch=args.batch,
                            sections=args.sections, before_ref=args.before_ref, s4_vs_mha=args.s4_vs_mha)
    result["memory_note"] = ("peak_mem_mb: CUDA max_memory_allocated above inputs and weights; null on CPU (no peak "
                             "counter). saved_activation_mb: unique storages saved for backward.")
    out = write_json(args.out, result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
