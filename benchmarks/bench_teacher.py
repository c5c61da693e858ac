"""Teacher backbones side by side: each candidate is trained with the EDM loss on mnist5k for the same wall-clock
budget on this machine, then measured with the same sampler, detector, seeds and sample counts.

    python benchmarks/bench_teacher.py --quick                      # v1, v3, UNet anchor: 1.8 min training each
    python benchmarks/bench_teacher.py --minutes 6 --candidates v1,v2,v2-no-s4nd,v2-no-conv,v2-no-skips,unet
    python benchmarks/bench_teacher.py --eval assets/teachers/mnist5k  # measure a trained teacher, no training

Reported per candidate: parameters, forward + backward milliseconds per image (fp32, batch 64, median of 5),
images seen in the budget, a validation EDM loss on 1,024 fixed draws, ``fd_lenet`` of the EMA network's Heun
samples on two disjoint seed sets (A = 0..N-1, B = N..2N-1) against all of mnist5k, and class agreement (the
shipped classifier predicts the class that was asked for) on both sets together. Candidates run one after another
in one process (same threads), so the budgets are comparable; the JSON, a markdown table and one grid PNG per
candidate (seeds 0-63) are written to ``--out``.

``unet`` is the anchor a user would pick instead: a diffusers ``UNet2DModel`` of about the same parameter count
under the same EDM preconditioning, loss, optimiser and budget. ``fd_lenet`` is not FID (assets/detectors/README.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import machine_info, machine_line, write_json  # noqa: E402
from sid.config import DataConfig  # noqa: E402
from sid.data import load_dataset, to_model_range, to_uint8  # noqa: E402
from sid.detectors import load_lenet  # noqa: E402
from sid.ema import EMA  # noqa: E402
from sid.loss import edm_loss  # noqa: E402
from sid.metrics import compute_metrics  # noqa: E402
from sid.precond import EDMPrecond  # noqa: E402
from sid.runs import save_grid  # noqa: E402
from sid.sampling import edm_sampler, nfe, seed_labels, seed_latents  # noqa: E402
from sid.training import param_groups  # noqa: E402

DEFAULT_LENET = str(ROOT / "assets" / "detectors" / "lenet_mnist5k.safetensors")
V2 = dict(s4_2d=True, mlp_conv=True, long_skips=True, final_conv=True)

# ----------------------------------------------------------------------------
# Candidates: name -> (description, builder(label_dim) -> raw backbone).


class UNetBackbone(nn.Module):
    """diffusers UNet2DModel as a raw EDM backbone F(x_in, c_noise, class_labels); c_noise in about [-2, 2] is
    mapped onto the UNet's timestep range [0, 1000] so its sinusoidal embedding resolves it."""

    def __init__(self, label_dim: int, channels=(32, 64, 128), layers_per_block: int = 1):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = SimpleNamespace(img_resolution=32, img_channels=1, label_dim=label_dim)
        self.unet = UNet2DModel(sample_size=32, in_channels=1, out_channels=1, block_out_channels=channels,
                                layers_per_block=layers_per_block, norm_num_groups=16,
                                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                num_class_embeds=label_dim + 1 if label_dim else None)

    def forward(self, x, c_noise, class_labels=None):
        if class_labels is None and self.config.label_dim:
            class_labels = torch.full((x.shape[0],), self.config.label_dim, dtype=torch.long, device=x.device)
        t = (c_noise + 2.0) * 250.0
        return self.unet(x, t, class_labels=class_labels).sample


def hybrid(preset="small", **overrides):
    def build(label_dim):
        from backbones import HybridDenoiser
        return HybridDenoiser.from_preset(preset, 32, 1, label_dim=label_dim, **overrides)
    return build


CANDIDATES = {
    "v1": ("HybridDenoiser v1: small preset (1-D S4 raster/column scans, plain MLP)", hybrid()),
    "v2": ("v2 (small_v2 preset): S4ND 2-D mixers + conv MLP + U-ViT long skips + output conv", hybrid(**V2)),
    "v2-no-s4nd": ("v2 with 1-D S4 scans instead of S4ND", hybrid(**{**V2, "s4_2d": False})),
    "v2-no-conv": ("v2 without the depthwise conv in the MLP", hybrid(**{**V2, "mlp_conv": False})),
    "v2-no-skips": ("v2 without the U-ViT long skips", hybrid(**{**V2, "long_skips": False})),
    "v2-no-outconv": ("v2 without the output conv", hybrid(**{**V2, "final_conv": False})),
    "v3": ("v3 (small_v3 preset): conv U-Net levels at 32/16 px around S4ND + MLA blocks on the 8x8 grid",
           hybrid("small_v3")),
    "v3-narrow": ("v3 with conv levels of 16 and 32 channels", hybrid("small_v3", conv_channels=(16, 32))),
    "v3-1d": ("v3 with 1-D S4 scans instead of S4ND", hybrid("small_v3", s4_2d=False)),
    "v3-mha": ("v3 with MHA instead of MLA", hybrid("small_v3", layer_pattern="SSA")),
    "unet": ("anchor: diffusers UNet2DModel (32-64-128, attention at 16 and 8 px)", lambda ld: UNetBackbone(ld)),
}

# ----------------------------------------------------------------------------
# Train one candidate for a wall-clock budget.


def train(net: EDMPrecond, data, labels, seconds: float, args) -> tuple[EMA, int, int, float]:
    """EDM loss, AdamW (S4 parameters in their own group), lr warm-up, label dropout, EMA; stops after
    ``seconds`` of wall time. Returns the EMA, images seen, optimizer steps and the last loss."""
    opt = torch.optim.AdamW(param_groups(net, args.lr, args.ssm_lr), betas=(0.9, 0.999))
    ema = EMA(net, args.ema_halflife_kimg, args.ema_rampup)
    g = torch.Generator().manual_seed(args.seed)
    label_dim = int(labels.max()) + 1
    nimg, steps, loss_value, t0 = 0, 0, float("nan"), time.perf_counter()
    net.train()
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(len(data), (args.batch,), generator=g)
        x0, y = data[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=g) < 0.1] = label_dim                       # null class for guidance
        sigma = (torch.randn(len(x0), 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
        noise = torch.randn(x0.shape, generator=g)
        warm = min(nimg / (args.warmup_kimg * 1000), 1.0) if args.warmup_kimg > 0 else 1.0
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * warm
        loss = edm_loss(net, x0, y, sigma=sigma, noise=noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net, nimg, args.batch)
        nimg, steps, loss_value = nimg + args.batch, steps + 1, float(loss.detach())
    return ema, nimg, steps, loss_value


@torch.no_grad()
def validation_loss(denoiser, data, labels, n: int = 1024, seed: int = 12345, batch: int = 64) -> float:
    """Mean EDM loss on n fixed (image, label, sigma, noise) draws, the same for every candidate: a less noisy
    signal than a small-sample FD after short budgets. The images are training images with unseen noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(data), (n,), generator=g)
    sigma = (torch.randn(n, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn((n, *data.shape[1:]), generator=g)
    total = 0.0
    for i in range(0, n, batch):
        j = slice(i, i + batch)
        total += float(edm_loss(denoiser, data[idx[j]], labels[idx[j]], sigma=sigma[j], noise=noise[j]).sum())
    return total / n


def fwd_bwd_ms_per_image(net: nn.Module, label_dim: int, batch: int = 64, repeats: int = 5) -> float:
    x, c = torch.randn(batch, 1, 32, 32), torch.randn(batch)
    y = torch.randint(label_dim, (batch,))
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        net(x, c, y).square().mean().backward()
        times.append(time.perf_counter() - t)
    net.zero_grad(set_to_none=True)
    return 1000 * statistics.median(times[1:]) / batch

# ----------------------------------------------------------------------------
# Evaluate.


def evaluate_folder(args, dataset, data, labels, cache_dir: str) -> None:
    """``--eval DIR``: the same measurements for a trained teacher folder; appends its fd_lenet lines (seed set A
    first: the line the main job compares with) and the class agreement to DIR/metrics.jsonl, grid to DIR."""
    from sid.metrics import append_jsonl
    from sid.teachers import load_teacher

    teacher = load_teacher(args.eval).eval().requires_grad_(False)
    t0 = time.perf_counter()
    res = evaluate(teacher, dataset, args, cache_dir)
    res["val_loss"] = validation_loss(teacher, data, labels, n=args.val_samples)
    n, k = args.samples, nfe(args.steps)
    labels = "balanced" if teacher.label_dim else "none"  # sid.sampling.seed_labels' default mode
    rows = [dict(metric="fd_lenet", value=res["fd_lenet_A"], num_samples=n, nfe=k, steps=args.steps, guidance=1.0,
                 seeds=f"0-{n - 1}", labels=labels),
            dict(metric="fd_lenet", value=res["fd_lenet_B"], num_samples=n, nfe=k, steps=args.steps, guidance=1.0,
                 seeds=f"{n}-{2 * n - 1}", labels=labels),
            dict(metric="class_agreement", value=res["class_agreement"], num_samples=2 * n, nfe=k, steps=args.steps,
                 guidance=1.0, seeds=f"0-{2 * n - 1}", classifier=Path(args.lenet).name)]
    append_jsonl(str(Path(args.eval) / "metrics.jsonl"), rows)
    save_grid(res["grid"], str(Path(args.eval) / "grid.png"), ncols=8)
    print(f"{args.eval}: fd_lenet A (seeds 0-{n - 1}) {res['fd_lenet_A']:.2f}, B ({n}-{2 * n - 1}) "
          f"{res['fd_lenet_B']:.2f}, class agreement {100 * res['class_agreement']:.1f} % ({2 * n} samples), "
          f"val loss {res['val_loss']:.4f}, {k} NFE, {time.perf_counter() - t0:.0f} s; appended to metrics.jsonl")


@torch.no_grad()
def evaluate(denoiser, dataset, args, cache_dir: str) -> dict:
    lenet = load_lenet(args.lenet)[0].eval()
    hits = total = 0

    def make_images(seeds):
        nonlocal hits, total
        z, y = seed_latents(seeds, (1, 32, 32)), seed_labels(seeds, denoiser.label_dim)
        images = to_uint8(edm_sampler(denoiser, z, y, num_steps=args.steps))
        hits += int((lenet(images).argmax(1) == y).sum())
        total += len(seeds)
        return images

    n = args.samples
    out = {}
    for name, seeds in (("A", range(0, n)), ("B", range(n, 2 * n))):
        # Batches of 64: on 2 cores larger batches fall out of cache (v2 forward: 5 ms/image at 64, 16 at 250).
        (row,) = compute_metrics(make_images, list(seeds), ["fd_lenet"], batch_size=64, lenet_path=args.lenet,
                                 ref_dataset=dataset, nfe=nfe(args.steps), cache_dir=cache_dir, progress=False)
        out[f"fd_lenet_{name}"] = row["value"]
    out["class_agreement"] = hits / total
    out["grid"] = make_images(list(range(64)))
    return out

# ----------------------------------------------------------------------------
# Main.


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="v1, v2, unet; 1.8 min each at batch 32, 2 x 250 samples, 10 steps (about 9 minutes)")
    p.add_argument("--candidates", default="v1,v2,v2-no-s4nd,v2-no-conv,v2-no-skips,unet",
                   help="comma-separated names from: " + ", ".join(CANDIDATES))
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget per candidate")
    p.add_argument("--samples", type=int, default=2000, help="samples per seed set (two disjoint sets)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (2 * steps - 1 network evaluations)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ssm-lr", type=float, default=1e-3)
    p.add_argument("--warmup-kimg", type=float, default=5.0)
    p.add_argument("--ema-halflife-kimg", type=float, default=50.0)
    p.add_argument("--ema-rampup", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-batch", type=int, default=64, help="batch of the fwd+bwd time per image")
    p.add_argument("--val-samples", type=int, default=1024, help="fixed draws of the validation EDM loss")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lenet", default=DEFAULT_LENET)
    p.add_argument("--eval", metavar="DIR", default=None,
                   help="measure a trained teacher folder, no training (appends to DIR/metrics.jsonl)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_teacher"),
                   help="output prefix: PREFIX.json, PREFIX.md, PREFIX_<candidate>.png")
    args = p.parse_args(argv)
    if args.quick:
        args.candidates, args.minutes, args.samples, args.steps = "v1,v3,unet", 1.8, 250, 10
        args.batch, args.warmup_kimg = 32, 0.5
        if args.out == p.get_default("out"):
            args.out += "_quick"
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidate(s) {', '.join(unknown)}; expected names from {', '.join(CANDIDATES)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info(torch.device("cpu"))
    print(machine_line(info), flush=True)
    dataset = load_dataset(DataConfig(name="mnist5k"))
    data = to_model_range(dataset.images).float()
    labels = torch.as_tensor(dataset.labels, dtype=torch.long)
    cache_dir = str(Path(args.out).parent / ".cache")
    if args.eval:
        evaluate_folder(args, dataset, data, labels, cache_dir)
        return
    rows = []
    for name in names:
        desc, build = CANDIDATES[name]
        torch.manual_seed(args.seed)
        net = EDMPrecond(build(dataset.num_classes))
        params = sum(q.numel() for q in net.parameters())
        ms = fwd_bwd_ms_per_image(net.backbone, dataset.num_classes, args.timing_batch)
        print(f"[{name}] {desc}: {params / 1e6:.2f} M params, {ms:.1f} ms/image fwd+bwd; training "
              f"{args.minutes:g} min", flush=True)
        ema, nimg, steps, loss = train(net, data, labels, args.minutes * 60, args)
        t0 = time.perf_counter()
        res = evaluate(ema.model, dataset, args, cache_dir)
        res["val_loss"] = validation_loss(ema.model, data, labels, n=args.val_samples)
        save_grid(res.pop("grid"), f"{args.out}_{name}.png", ncols=8)
        row = dict(candidate=name, description=desc, params=params, ms_per_image=ms, kimg=nimg / 1000,
                   steps=steps, last_loss=loss, eval_seconds=time.perf_counter() - t0, **res)
        rows.append(row)
        print(f"[{name}] {nimg / 1000:.1f} kimg in {steps} steps: val loss {res['val_loss']:.4f}, "
              f"fd_lenet A {res['fd_lenet_A']:.1f}, "
              f"B {res['fd_lenet_B']:.1f}, class agreement {100 * res['class_agreement']:.1f} %", flush=True)

    # Table.
    lines = [f"`{' '.join(sys.argv)}`  ({machine_line(info)})", "",
             f"{args.minutes:g} min of training each, batch {args.batch}, lr {args.lr:g}, fp32; fd_lenet on "
             f"{args.samples} samples per seed set, Heun {args.steps} steps ({nfe(args.steps)} NFE).", "",
             "| candidate | params (M) | ms/image fwd+bwd | kimg | val loss | fd_lenet A | fd_lenet B | "
             "class agreement |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['candidate']} | {r['params'] / 1e6:.2f} | {r['ms_per_image']:.1f} | {r['kimg']:.1f} | "
                     f"{r['val_loss']:.4f} | "
                     f"{r['fd_lenet_A']:.1f} | {r['fd_lenet_B']:.1f} | {100 * r['class_agreement']:.1f} % |")
    table = "\n".join(lines)
    print("\n" + table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table + "\n")
    path = write_json(f"{args.out}.json", dict(machine=info, settings={k: v for k, v in vars(args).items()},
                                               results=rows))
    print(f"wrote {path}, {args.out}.md and one grid per candidate")
    if any(not math.isfinite(r["fd_lenet_A"]) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
