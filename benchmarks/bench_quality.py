"""Quality while distilling: ``fd_lenet`` of the one-step generator against kimg, next to the teacher's 35-NFE value.

    python benchmarks/bench_quality.py --quick                        # 4 kimg, 500 samples: about 4 minutes, 2 cores
    python benchmarks/bench_quality.py                                # the main job's settings: 20 kimg, 2000 samples
    python benchmarks/bench_quality.py --from-run runs/sid-mnist5k    # analyse a finished run, no training

It measures the teacher (``assets/teachers/mnist5k``, EDM Heun, 18 steps = 35 network evaluations) on seeds
0..N-1, distils it with ``configs/sid/mnist5k.yaml`` (overridable: ``--kimg``, ``--metrics-kimg``, extra
``key=value`` after ``--``), with ``fd_lenet`` of the EMA generator on the same seeds every ``--metrics-kimg``, and
writes: the curve with the teacher as a dashed line (``bench_quality.png``), the sample grids (teacher, generator at
the start, generator at the end) side by side (``bench_quality_grids.png``), and the JSON report. Same detector, same
reference statistics (all of mnist5k), same seeds and number of samples for teacher and generator. ``fd_lenet`` is
not FID: see assets/detectors/README.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import (  # noqa: E402
    load_average,
    machine_info,
    machine_line,
    pick_threads,
    run_script,
    run_train_seconds,
    write_json,
)
from sid.config import DataConfig, load_config  # noqa: E402
from sid.data import load_dataset, to_uint8  # noqa: E402
from sid.detectors import load_lenet  # noqa: E402
from sid.metrics import compute_metrics, plot_fd_vs_kimg  # noqa: E402
from sid.runs import save_grid  # noqa: E402
from sid.sampling import edm_sampler, nfe, seed_labels, seed_latents  # noqa: E402
from sid.teachers import load_generator, load_teacher  # noqa: E402

MAIN_CONFIG = str(ROOT / "configs" / "sid" / "mnist5k.yaml")
DEFAULT_TEACHER = str(ROOT / "assets" / "teachers" / "mnist5k")
DEFAULT_LENET = str(ROOT / "assets" / "detectors" / "lenet_mnist5k.safetensors")

# ----------------------------------------------------------------------------
# Teacher.


class ClassAgreement:
    """Share of generated images that the shipped MNIST classifier assigns to the class they were asked for."""

    def __init__(self, lenet: str):
        self.net = load_lenet(lenet)[0].eval()
        self.hits, self.total = 0, 0

    @torch.no_grad()
    def update(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        if labels is not None:
            self.hits += int((self.net(images).argmax(1) == labels.to(images.device)).sum())
            self.total += len(labels)

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None


def teacher_fd(teacher_path: str, num_samples: int, steps: int, bf16: bool, lenet: str, cache_dir: str,
               grid_seeds: int) -> tuple[dict, torch.Tensor, float, float | None]:
    """fd_lenet of the teacher's Heun samples on seeds 0..num_samples-1, its grid of the first seeds, seconds, and
    the class agreement of those samples."""
    teacher = load_teacher(teacher_path).eval().requires_grad_(False)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    dataset = load_dataset(DataConfig(name="mnist5k"))
    agreement = ClassAgreement(lenet)

    @torch.no_grad()
    def make_images(seeds, count=True):
        z, labels = seed_latents(seeds, shape), seed_labels(seeds, teacher.label_dim)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            images = to_uint8(edm_sampler(teacher, z, labels, num_steps=steps))
        if count:
            agreement.update(images, labels)
        return images

    t0 = time.perf_counter()
    (row,) = compute_metrics(make_images, list(range(num_samples)), ["fd_lenet"], batch_size=100,
                             lenet_path=lenet, ref_dataset=dataset, nfe=nfe(steps), cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    return row, make_images(list(range(grid_seeds)), count=False), seconds, agreement.value


@torch.no_grad()
def generator_agreement(generator_dir: str, num_samples: int, bf16: bool, lenet: str) -> float | None:
    """Class agreement of the exported (EMA) generator on seeds 0..num_samples-1."""
    generator = load_generator(generator_dir)
    denoiser = generator.denoiser
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    agreement = ClassAgreement(lenet)
    for start in range(0, num_samples, 250):
        seeds = list(range(start, min(start + 250, num_samples)))
        labels = seed_labels(seeds, denoiser.label_dim)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            agreement.update(to_uint8(generator(seed_latents(seeds, shape), labels)), labels)
    return agreement.value

# ----------------------------------------------------------------------------
# The distillation run and its curve.


def read_curve(run_dir: str, metric: str = "fd_lenet") -> list[tuple[float, float]]:
    curve = []
    with open(os.path.join(run_dir, "stats.jsonl")) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if metric in rec:
                curve.append((float(rec["kimg"]), float(rec[metric])))
    return sorted(curve)


def grids_side_by_side(panels: list[tuple[str, str | torch.Tensor]], out: str) -> None:
    """Grid PNGs (or uint8 tensors) next to each other with a caption strip above each."""
    from PIL import ImageDraw

    images = []
    for caption, src in panels:
        if isinstance(src, torch.Tensor):
            tmp = out + ".panel.png"
            save_grid(src, tmp)
            img = Image.open(tmp).convert("L")
            os.remove(tmp)
        else:
            img = Image.open(src).convert("L")
        images.append((caption, img.resize((img.width * 2, img.height * 2), Image.NEAREST)))
    pad, top = 12, 22
    width = sum(im.width for _, im in images) + pad * (len(images) + 1)
    height = max(im.height for _, im in images) + top + pad
    canvas = Image.new("L", (width, height), 255)
    draw, x = ImageDraw.Draw(canvas), pad
    for caption, im in images:
        draw.text((x, 5), caption, fill=0)
        canvas.paste(im, (x, top))
        x += im.width + pad
    canvas.save(out)


def first_at_or_below(curve: list[tuple[float, float]], value: float) -> float | None:
    return next((k for k, v in curve if v <= value), None)

# ----------------------------------------------------------------------------
# Main.


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4 kimg, fd_lenet every kimg on 500 samples")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: a given tiny teacher, seconds
    p.add_argument("--from-run", dest="from_run", help="analyse this finished sid run directory instead of training")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="teacher folder (default: the embedded MNIST teacher)")
    p.add_argument("--kimg", type=float, default=None, help="distillation length (default 20; quick 4)")
    p.add_argument("--metrics-kimg", dest="metrics_kimg", type=float, default=None, help="default 2; quick 1")
    p.add_argument("--num-samples", dest="num_samples", type=int, default=None, help="default 2000; quick 500")
    p.add_argument("--teacher-steps", dest="teacher_steps", type=int, default=18, help="Heun steps (2n-1 NFE)")
    p.add_argument("--teacher-value", dest="teacher_value", type=float, default=None,
                   help="use this teacher fd_lenet instead of measuring it (it must be for the same seeds)")
    p.add_argument("--run-dir", dest="run_dir", default=None, help="where the distillation runs (default: a "
                   "temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="benchmarks/results/bench_quality.json")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for the distillation")
    args = p.parse_args(argv)
    quick = args.quick or args.smoke
    kimg = args.kimg or (0.032 if args.smoke else 4.0 if quick else 20.0)
    metrics_kimg = args.metrics_kimg or (0.016 if args.smoke else 1.0 if quick else 2.0)
    num_samples = args.num_samples or (64 if args.smoke else 500 if quick else 2000)
    if num_samples < 2 or kimg <= 0 or metrics_kimg <= 0 or args.teacher_steps < 1:
        p.error("--num-samples must be at least 2, and --kimg, --metrics-kimg and --teacher-steps positive")
    if not os.path.isdir(args.teacher):
        p.error(f"--teacher '{args.teacher}' is not a folder")
    if args.from_run and not os.path.isfile(os.path.join(args.from_run, "stats.jsonl")):
        p.error(f"--from-run '{args.from_run}' has no stats.jsonl")
    device = torch.device("cpu")
    threads_reason = pick_threads(device, args.threads)
    info = dict(machine_info(device), threads_reason=threads_reason)
    print(machine_line(info), flush=True)
    out = Path(args.out)
    png, grids_png = out.with_suffix(".png"), out.with_name(out.stem + "_grids.png")
    t_start = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        run_dir = args.from_run or args.run_dir or os.path.join(tmp, "run")
        if args.from_run:
            with open(os.path.join(run_dir, "config.yaml")) as fh:
                import yaml

                run_cfg = yaml.safe_load(fh)
            num_samples = int(args.num_samples or run_cfg["eval"]["num_samples"])
            bf16 = run_cfg.get("mixed_precision") == "bf16"
            grid_seeds = int(run_cfg.get("grid_seeds", 64))
        else:
            cfg = load_config(MAIN_CONFIG, [f"teacher={args.teacher}", f"run_dir={run_dir}", f"total_kimg={kimg}",
                                            f"metrics_kimg={metrics_kimg}", f"eval.num_samples={num_samples}",
                                            f"eval.lenet={DEFAULT_LENET}", f"snapshot_kimg={kimg}",
                                            f"checkpoint_kimg={kimg}", f"tick_kimg={metrics_kimg}",
                                            *(["batch_size=8", "grid_seeds=16"] if args.smoke else []),
                                            *args.overrides])
            bf16 = cfg.mixed_precision == "bf16"
            grid_seeds = cfg.grid_seeds

        # Measure the teacher on the same seeds.
        print(f"teacher: {args.teacher}, {nfe(args.teacher_steps)} NFE, fd_lenet on {num_samples} samples ...",
              flush=True)
        row, teacher_grid, teacher_s, teacher_agree = teacher_fd(args.teacher, num_samples, args.teacher_steps, bf16,
                                                                 DEFAULT_LENET, tmp, grid_seeds)
        teacher_value = args.teacher_value if args.teacher_value is not None else row["value"]
        print(f"teacher fd_lenet {row['value']:.3f} ({row['num_samples']} samples, {row['nfe']} NFE, "
              f"{teacher_s:.0f} s)", flush=True)

        # Distil (or read a finished run).
        train_s = None
        if not args.from_run:
            from sid.cli import run

            cfg.eval.teacher_value = teacher_value
            t0 = time.perf_counter()
            run(cfg)
            train_s = time.perf_counter() - t0
        curve = read_curve(run_dir)
        if not curve:
            raise SystemExit(f"error: {run_dir}/stats.jsonl holds no fd_lenet values; was eval.metrics empty?")
        plot_fd_vs_kimg(os.path.join(run_dir, "stats.jsonl"), str(png), teacher_value=teacher_value,
                        teacher_label=f"teacher ({row['nfe']} NFE, {num_samples} samples)")
        grids = sorted(glob.glob(os.path.join(run_dir, "samples", "grid-*.png")))
        panels = [(f"teacher, {row['nfe']} NFE", teacher_grid)]
        if grids:
            kimg_of = lambda path: int(Path(path).stem.split("-")[1]) / 1000
            panels += [(f"generator, 1 NFE, {kimg_of(grids[0]):g} kimg", grids[0]),
                       (f"generator, 1 NFE, {kimg_of(grids[-1]):g} kimg", grids[-1])]
        grids_side_by_side(panels, str(grids_png))
        run_wall = run_train_seconds(run_dir)
        generator_dir = os.path.join(run_dir, "generator")
        generator_agree = generator_agreement(generator_dir, num_samples, bf16, DEFAULT_LENET) \
            if os.path.isdir(generator_dir) else None

    reached = first_at_or_below(curve, teacher_value)
    best = min(curve, key=lambda kv: kv[1])
    print(f"\n{'kimg':>8} {'fd_lenet':>10}   (teacher {teacher_value:.3f}, {row['nfe']} NFE)")
    for k, v in curve:
        print(f"{k:8.3f} {v:10.3f}   {v / teacher_value:6.2f}x teacher")
    print(f"best {best[1]:.3f} at {best[0]:g} kimg; final {curve[-1][1]:.3f} at {curve[-1][0]:g} kimg = "
          f"{curve[-1][1] / teacher_value:.2f}x the teacher; "
          + (f"reaches the teacher at {reached:g} kimg" if reached is not None else "does not reach the teacher"))
    if teacher_agree is not None and generator_agree is not None:
        print(f"class agreement (the shipped classifier predicts the requested label) on {num_samples} samples: "
              f"teacher {100 * teacher_agree:.1f} %, generator {100 * generator_agree:.1f} %")
    info["loadavg_end"] = load_average()
    result = dict(machine=info, config=dict(quick=args.quick, smoke=args.smoke, from_run=args.from_run,
                                            teacher=args.teacher, kimg=curve[-1][0], metrics_kimg=metrics_kimg,
                                            num_samples=num_samples, teacher_steps=args.teacher_steps, bf16=bf16,
                                            overrides=args.overrides),
                  teacher=dict(fd_lenet=row["value"], used_value=teacher_value, num_samples=row["num_samples"],
                               nfe=row["nfe"], seconds=teacher_s, class_agreement=teacher_agree),
                  curve=[dict(kimg=k, fd_lenet=v, over_teacher=v / teacher_value) for k, v in curve],
                  summary=dict(final_fd_lenet=curve[-1][1], final_over_teacher=curve[-1][1] / teacher_value,
                               best_fd_lenet=best[1], best_kimg=best[0], kimg_to_reach_teacher=reached,
                               generator_class_agreement=generator_agree,
                               train_seconds=train_s, run_wall_seconds_from_stats=run_wall,
                               total_seconds=time.perf_counter() - t_start),
                  files=dict(curve_png=str(png), grids_png=str(grids_png)),
                  notes="fd_lenet: Frechet distance in the features of the shipped MNIST classifier, not FID. "
                        "Reference statistics: all 5,000 mnist5k images. Seeds 0..num_samples-1 for both models.")
    write_json(out, result)
    print(f"wrote {out}, {png}, {grids_png}")
    return result


if __name__ == "__main__":
    run_script(main)
