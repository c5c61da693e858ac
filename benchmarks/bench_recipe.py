"""Evaluate distilled generators next to their teacher on disjoint seed sets: fd_lenet, class agreement, and two
diversity measures, with a side-by-side grid (issue 13/15 recipe measurements).

    python benchmarks/bench_recipe.py --runs runs/sid-mnist5k runs/sida-mnist5k          # ~1 min per run + teacher
    python benchmarks/bench_recipe.py --runs A B --sets 2 --samples 2000 --out benchmarks/results/bench_recipe.json

For every run directory (its exported ``generator/`` folder, sampled with the steps it was trained for) and for the
teacher (EDM Heun, 18 steps = 35 NFE; cached in ``--teacher-cache`` since it costs minutes) on seed set k = seeds
k*N..(k+1)*N-1, with the shipped LeNet's features against all 5,000 mnist5k images:

- ``fd_lenet``: Frechet distance of the 128-d features (not FID);
- ``agreement``: share of samples the shipped classifier assigns to the class they were asked for;
- ``precision`` / ``recall``: the k-nearest-neighbour manifold estimates of Kynkaenniemi et al. (2019), k = 3,
  features of N generated against N real images (seeded): precision = generated samples inside the real manifold
  (fidelity), recall = real images inside the generated manifold (coverage, the diversity a mode-seeking generator
  loses);
- ``spread``: within-class diversity, the mean over classes of trace(cov(features of the samples asked for class
  c)) divided by the same for the real images of class c; 1 = as varied as the data, below 1 = samples of a class
  look more alike than real digits do.

Quote every seed set: fd_lenet on 2,000 samples moves by about 10-15 between disjoint sets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine_info, pick_threads, run_script, run_train_seconds, write_json  # noqa: E402
from sid.config import DataConfig, UserError  # noqa: E402
from sid.data import load_dataset, to_uint8  # noqa: E402
from sid.detectors import LeNetDetector  # noqa: E402
from sid.generator import seed_step_noise  # noqa: E402
from sid.metrics import frechet_distance, metric_curve  # noqa: E402
from sid.runs import save_grid  # noqa: E402
from sid.sampling import LABEL_MODES, edm_sampler, guided, nfe, seed_labels, seed_latents  # noqa: E402
from sid.teachers import load_generator, load_teacher  # noqa: E402
from sid.teachers.autoguidance import (  # noqa: E402
    AUTOGUIDANCE_FILE,
    autoguidance_weight,
    check_weight,
    read_declaration,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = str(ROOT / "assets" / "teachers" / "mnist5k")
DEFAULT_LENET = str(ROOT / "assets" / "detectors" / "lenet_mnist5k.safetensors")
K_NN = 3


class RealFeatures:
    """LeNet features and labels of all mnist5k images, and the per-class feature traces."""

    def __init__(self, detector: LeNetDetector):
        ds = load_dataset(DataConfig(name="mnist5k"))
        images, labels = ds.get_batch(torch.arange(len(ds)))
        feats = torch.cat([detector(images[i:i + 500]) for i in range(0, len(images), 500)]).double()
        self.features, self.labels = feats, torch.as_tensor(labels).long()
        self.mu = feats.mean(0).numpy()
        self.cov = np.cov(feats.numpy(), rowvar=False)
        self.class_trace = {c: class_trace(feats, self.labels, c) for c in range(int(self.labels.max()) + 1)}


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # k + 1: the row itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = K_NN) -> tuple[float, float]:
    """k-NN manifold precision (fake inside real balls) and recall (real inside fake balls)."""
    r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real[None, :]).any(1).double().mean().item()
    recall = (d <= r_fake[:, None]).any(0).double().mean().item()
    return precision, recall


def class_trace(features: torch.Tensor, labels: torch.Tensor, c: int) -> float:
    """trace(cov) of the features of class c: the sum of the per-dimension unbiased variances."""
    return float(torch.var(features[labels == c], dim=0, unbiased=True).sum())


def class_spread(features: torch.Tensor, labels: torch.Tensor, real_traces: dict[int, float]) -> float:
    """Mean over the classes with two samples or more of trace(cov(features of c)) / the real images' trace."""
    return float(np.mean([class_trace(features, labels, c) / tr for c, tr in real_traces.items()
                          if int((labels == c).sum()) > 1]))


def measure(images: torch.Tensor, labels: torch.Tensor | None, detector: LeNetDetector, real: RealFeatures,
            set_index: int) -> dict:
    feats = torch.cat([detector(images[i:i + 500]) for i in range(0, len(images), 500)]).double()
    fd = frechet_distance(feats.mean(0).numpy(), np.cov(feats.numpy(), rowvar=False), real.mu, real.cov)
    out = {"fd_lenet": float(fd), "num_samples": len(images)}
    g = torch.Generator().manual_seed(1000 + set_index)
    pick = torch.randperm(len(real.features), generator=g)[:len(images)]
    out["precision"], out["recall"] = precision_recall(real.features[pick], feats)
    if labels is not None:
        logits = torch.cat([detector.logits(images[i:i + 500]) for i in range(0, len(images), 500)])
        out["agreement"] = float((logits.argmax(1) == labels).double().mean())
        out["spread"] = class_spread(feats, labels, real.class_trace)
    return out


@torch.no_grad()
def generator_images(path: str, seeds: list[int], device: str = "cpu", labels: str = "balanced"
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    gen = load_generator(path).to(device)
    den = gen.denoiser
    shape = (den.img_channels, den.img_resolution, den.img_resolution)
    out = []
    for i in range(0, len(seeds), 250):
        s = seeds[i:i + 250]
        chain = seed_step_noise(s, shape, gen.steps, device)
        out.append(to_uint8(gen(seed_latents(s, shape, device), seed_labels(s, den.label_dim, device, labels),
                                chain)).cpu())
    return torch.cat(out), seed_labels(seeds, den.label_dim, mode=labels), gen.steps


@torch.no_grad()
def teacher_images(path: str, seeds: list[int], steps: int, device: str = "cpu", guidance: float = 1.0,
                   autoguidance: float = 1.0, labels: str = "balanced") -> tuple[torch.Tensor, torch.Tensor | None]:
    teacher = load_teacher(path, autoguidance=autoguidance).eval().requires_grad_(False).to(device)
    model = guided(teacher, guidance)  # classifier-free guidance; 1 = the plain conditional teacher
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    out = []
    batch = 100 if device == "cpu" else 500
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        out.append(to_uint8(edm_sampler(model, seed_latents(s, shape, device),
                                        seed_labels(s, teacher.label_dim, device, labels), num_steps=steps)).cpu())
    return torch.cat(out), seed_labels(seeds, teacher.label_dim, mode=labels)


def teacher_nfe(args) -> int:
    return nfe(args.teacher_steps) * (2 if args.teacher_guidance != 1 else 1) * (2 if args.teacher_auto != 1 else 1)


def file_digest(folder: str) -> str:
    """Digest of a network folder's weights and configs (its guide declaration and metrics excluded)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".json")) and name not in ("metrics.jsonl", AUTOGUIDANCE_FILE):
            with open(os.path.join(folder, name), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def teacher_rows(args, detector, real) -> list[dict]:
    """Teacher metrics per seed set, from the cache when the teacher's files and the protocol are unchanged."""
    key = f"{file_digest(args.teacher)}-{args.samples}-{args.teacher_steps}"
    if args.teacher_guidance != 1:
        key += f"-w{args.teacher_guidance:g}"
    if args.teacher_auto != 1:  # the guide's own weights, and its weight
        key += f"-ag{args.teacher_auto:g}-{file_digest(read_declaration(args.teacher)[0])}"
    if args.labels != "random":  # keys without a label mode are from before balanced labels (random ones)
        key += f"-{args.labels}"
    cache = {}
    if os.path.isfile(args.teacher_cache):
        with open(args.teacher_cache) as fh:
            cache = json.load(fh)
    rows = cache.get(key, {}).get("sets", [])
    for k in range(len(rows), args.sets):
        t0 = time.perf_counter()
        seeds = list(range(k * args.samples, (k + 1) * args.samples))
        images, labels = teacher_images(args.teacher, seeds, args.teacher_steps, args.device, args.teacher_guidance,
                                        args.teacher_auto, args.labels)
        row = measure(images, labels, detector, real, k)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"teacher set {k}: " + ", ".join(f"{m} {row[m]:.4g}" for m in ("fd_lenet", "agreement", "precision",
                                                                              "recall", "spread") if m in row),
              flush=True)
        cache[key] = {"teacher": args.teacher, "nfe": teacher_nfe(args), "guidance": args.teacher_guidance,
                      **({"autoguidance": args.teacher_auto} if args.teacher_auto != 1 else {}), "sets": rows}
        os.makedirs(os.path.dirname(args.teacher_cache) or ".", exist_ok=True)
        tmp = args.teacher_cache + ".tmp"  # written whole, then renamed: an interrupted run leaves the old cache
        with open(tmp, "w") as fh:
            json.dump(cache, fh, indent=1)
        os.replace(tmp, args.teacher_cache)
    return rows[:args.sets]


def plot_models(models: list[tuple[str, list[dict]]], out: str) -> None:
    """Two panels: fd_lenet of each seed set (dots) and their mean (bar); class agreement and recall (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _ in models]
    x = np.arange(len(models))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(models) + 3), 3.6))
    fd = [[s["fd_lenet"] for s in sets] for _, sets in models]
    a1.bar(x, [np.mean(v) for v in fd], color=["0.6" if n == "teacher" else "C0" for n in names])
    for i, v in enumerate(fd):
        a1.plot([i] * len(v), v, "k.", ms=8)
    a1.set_ylabel("fd_lenet (lower is better)")
    a1.set_title("fd_lenet: bar = mean, dots = seed sets")
    w = 0.38
    for j, (key, label) in enumerate([("agreement", "class agreement"), ("recall", "recall")]):
        vals = [np.mean([s.get(key, np.nan) for s in sets]) for _, sets in models]
        a2.bar(x + (j - 0.5) * w, vals, w, label=label)
    a2.set_ylim(0, 1)
    a2.legend(loc="lower right", fontsize=8)
    a2.set_title("class agreement and recall (higher is better)")
    for a in (a1, a2):
        a.set_xticks(x)
        a.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def run_generators(runs: list[str], names: str | None) -> tuple[list[str], list[str]]:
    """Each run's label (``names``: comma-separated, default the folder names) and exported generator folder (the run
    directory's ``generator/``, or the folder itself); UserError for a label count that does not match or a run
    without a generator."""
    labels = names.split(",") if names else [os.path.basename(os.path.normpath(r)) for r in runs]
    if len(labels) != len(runs):
        raise UserError(f"--names has {len(labels)} labels for {len(runs)} runs; expected one per run")
    gen_dirs = []
    for r in runs:
        g = r if os.path.isfile(os.path.join(r, "sid_generator.json")) else os.path.join(r, "generator")
        if not os.path.isfile(os.path.join(g, "sid_generator.json")):
            raise UserError(f"run '{r}' has no exported generator (expected {g}/sid_generator.json)")
        gen_dirs.append(g)
    return labels, gen_dirs


def run_curve(run_dir: str, metric: str = "fd_lenet") -> list[tuple[float, float]]:
    """(kimg, value) of every evaluation the trainer logged in ``run_dir/stats.jsonl`` (empty when none). With
    ``eval.seed_sets`` > 1 the trainer's ``metric`` is a mean over sets; its first set (``<metric>_set0``, the seeds
    0..N-1) is taken instead, so the curve and the teacher's first-set line measure the same seeds."""
    path = os.path.join(run_dir, "stats.jsonl")
    return metric_curve(path, f"{metric}_set0") or metric_curve(path, metric)


def plot_curves(curves: list[tuple[str, list[tuple[float, float]]]], teacher: float | None, out: str) -> None:
    """fd_lenet against kimg for each run (runs whose labels share the part before '/' or ' seed' share a colour),
    with the teacher's value as a dashed line; log scale, since the first evaluations are far off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    groups: dict[str, str] = {}
    for name, pts in curves:
        if not pts:
            continue
        group = re.split(r"/| seed", name)[0]
        color = groups.setdefault(group, f"C{len(groups)}")
        ax.plot([k for k, _ in pts], [v for _, v in pts], "-o", ms=3, color=color, label=name)
    if teacher is not None:
        ax.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher, 35 NFE, first seed set ({teacher:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("kimg")
    ax.set_ylabel("fd_lenet (trainer's evaluations)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="sid run directories (or generator folders); none: only the "
                   "teacher is measured")
    p.add_argument("--names", default=None, help="comma-separated labels of the runs (default: folder names)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--no-teacher", dest="no_teacher", action="store_true", help="measure only the runs (the "
                   "teacher's 35-NFE sampling costs minutes on a CPU)")
    p.add_argument("--teacher-steps", dest="teacher_steps", type=int, default=18, help="Heun steps (2n-1 NFE)")
    p.add_argument("--teacher-guidance", dest="teacher_guidance", type=float, default=1.0,
                   help="classifier-free guidance scale of the teacher (1 = none; other values cost 2x NFE)")
    p.add_argument("--teacher-autoguidance", dest="teacher_autoguidance", type=float, default=None,
                   help="weight of the guide network the teacher folder names in autoguidance.json (default: the "
                   "weight it names; 1 = the main network alone; other values cost 2x NFE)")
    p.add_argument("--teacher-cache", dest="teacher_cache",
                   default=str(ROOT / "benchmarks" / "results" / "bench_recipe_teacher.json"))
    p.add_argument("--samples", type=int, default=2000, help="samples per seed set")
    p.add_argument("--sets", type=int, default=2, help="disjoint seed sets")
    p.add_argument("--labels", choices=LABEL_MODES, default="balanced", help="class label of seed s: s "
                   "mod the class count (default: every seed set of a multiple of 10 is exactly balanced) or a "
                   "uniform draw per seed (sid before 2026-12-07)")
    p.add_argument("--grid", default=None, help="PNG: samples of seeds 0..G-1 of the teacher and each run, a row each")
    p.add_argument("--grid-seeds", dest="grid_seeds", type=int, default=10, help="G (default 10)")
    p.add_argument("--plot", default=None, help="PNG: fd_lenet per seed set and class agreement of every model")
    p.add_argument("--curves", default=None, help="PNG: the fd_lenet the trainer logged against kimg, one line per "
                   "run, with the teacher's value on the first seed set (the trainer's seeds) as a dashed line")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="where the networks sample (cpu | cuda); features on the CPU")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_recipe.json"))
    args = p.parse_args(argv)
    reason = pick_threads(torch.device("cpu"), args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} was asked for, but torch sees no CUDA device; use --device cpu")
    for flag, value in (("--samples", args.samples), ("--sets", args.sets), ("--grid-seeds", args.grid_seeds),
                        ("--teacher-steps", args.teacher_steps)):
        if value < 1:
            raise UserError(f"{flag} is {value}, expected a positive integer")
    names, gen_dirs = run_generators(args.runs, args.names)
    if args.teacher_autoguidance is not None:
        check_weight(args.teacher_autoguidance, "--teacher-autoguidance")
    # The weight the teacher samples with: its folder's autoguidance.json unless --teacher-autoguidance says.
    teacher = load_teacher(args.teacher, autoguidance=args.teacher_autoguidance) \
        if (not args.no_teacher or args.grid) else None
    args.teacher_auto = autoguidance_weight(teacher) if teacher is not None else 1.0
    if args.teacher_guidance != 1 and teacher is not None and teacher.label_dim == 0:
        raise UserError(f"--teacher-guidance is {args.teacher_guidance:g}, but the teacher is unconditional "
                        "(guidance needs class labels); leave it at 1")
    detector = LeNetDetector(DEFAULT_LENET)
    real = RealFeatures(detector)
    if args.no_teacher and not args.runs:
        raise UserError("--no-teacher with no --runs leaves nothing to measure; give run directories")
    results = {"teacher": None if args.no_teacher else {"path": args.teacher, "nfe": teacher_nfe(args),
                                                        "guidance": args.teacher_guidance,
                                                        "autoguidance": args.teacher_auto,
                                                        "sets": teacher_rows(args, detector, real)}, "runs": [],
               "labels": args.labels}
    grid_rows = []
    if args.grid:  # the teacher row costs only G Heun samples, so it is drawn even with --no-teacher
        grid_rows.append(teacher_images(args.teacher, list(range(args.grid_seeds)), args.teacher_steps,
                                        args.device, args.teacher_guidance, args.teacher_auto, args.labels)[0])
    for name, run, g in zip(names, args.runs, gen_dirs):
        sets = []
        for k in range(args.sets):
            images, labels, steps = generator_images(g, list(range(k * args.samples, (k + 1) * args.samples)),
                                                    args.device, args.labels)
            sets.append(measure(images, labels, detector, real, k))
        if args.grid:
            grid_rows.append(generator_images(g, list(range(args.grid_seeds)), args.device, args.labels)[0])
        results["runs"].append({"name": name, "run": run, "nfe": steps, "train_s": run_train_seconds(run),
                                "sets": sets})
    # The table, one row per model, each seed set and the mean.
    metrics = ["fd_lenet", "agreement", "precision", "recall", "spread"]
    print("\n| model | NFE | train min | " + " | ".join(f"fd_lenet set {k}" for k in range(args.sets)) +
          " | fd mean | agreement | precision | recall | spread |")
    print("|---|---|---|" + "---|" * (args.sets + 5))
    label = "teacher" + "".join(f" ({what} {w:g})" for what, w in (("guidance", args.teacher_guidance),
                                                                    ("autoguidance", args.teacher_auto)) if w != 1)
    teacher_row = [] if args.no_teacher else [(label, teacher_nfe(args), None, results["teacher"]["sets"])]
    for label, nfe_, train_s, sets in teacher_row + [(r["name"], r["nfe"], r["train_s"], r["sets"])
                                                     for r in results["runs"]]:
        mean = {m: float(np.mean([s[m] for s in sets])) for m in metrics if m in sets[0]}
        fds = " | ".join(f"{s['fd_lenet']:.1f}" for s in sets)
        minutes = "" if train_s is None else f"{train_s / 60:.1f}"
        print(f"| {label} | {nfe_} | {minutes} | {fds} | {mean['fd_lenet']:.1f} | "
              f"{mean.get('agreement', float('nan')):.3f} | {mean['precision']:.3f} | {mean['recall']:.3f} | "
              f"{mean.get('spread', float('nan')):.3f} |")
    if args.grid:
        save_grid(torch.cat(grid_rows), args.grid, ncols=args.grid_seeds)
        print(f"grid: {args.grid} (rows: {', '.join(['teacher'] + names)})")
    if args.plot:
        plot_models(([] if args.no_teacher else [("teacher", results["teacher"]["sets"])]) +
                    [(r["name"], r["sets"]) for r in results["runs"]], args.plot)
        print(f"plot: {args.plot}")
    if args.curves:
        # The trainer evaluates seeds 0..N-1, so the teacher's line is its first seed set.
        teacher_fd = None if args.no_teacher else results["teacher"]["sets"][0]["fd_lenet"]
        plot_curves([(r["name"], run_curve(r["run"])) for r in results["runs"]], teacher_fd, args.curves)
        print(f"curves: {args.curves}")
    results["machine"] = {**machine_info(torch.device("cpu")), "threads_reason": reason}
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    run_script(main)
