"""How much fd_lenet on a few thousand samples moves between disjoint seed sets, with class labels drawn at random per
seed or balanced (``seed % classes``, sid.sampling.seed_labels' default).

    python benchmarks/bench_eval_noise.py --runs runs/sid-mnist5k                     # ~3 min per run on 2 cores
    python benchmarks/bench_eval_noise.py --runs A B --sets 8 --samples 2000 --out benchmarks/results/F.json

For every one-step (or few-step) generator: fd_lenet of seed sets k = seeds k*N..(k+1)*N-1, k < --sets, once with
each label mode, and the mean, median and standard deviation over the sets. With random labels a set of 2,000 holds
each digit 200 +- 13 times; the LeNet's features cluster by class, so those chance counts move the feature mean and
covariance, and with them the distance. The images are the generator's: the same latents in both modes, only the
labels differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_recipe import DEFAULT_LENET, RealFeatures, generator_images, run_generators  # noqa: E402
from benchmarks.common import machine_info, pick_threads, run_script, write_json  # noqa: E402
from sid.config import UserError  # noqa: E402
from sid.detectors import LeNetDetector  # noqa: E402
from sid.metrics import frechet_distance  # noqa: E402
from sid.sampling import LABEL_MODES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def set_fds(gen_dir: str, mode: str, sets: int, samples: int, detector: LeNetDetector, real: RealFeatures
            ) -> tuple[list[float], list[list[int]]]:
    """fd_lenet of each seed set and its class counts."""
    fds, counts = [], []
    for k in range(sets):
        images, labels, _ = generator_images(gen_dir, list(range(k * samples, (k + 1) * samples)), labels=mode)
        feats = torch.cat([detector(images[i:i + 500]) for i in range(0, len(images), 500)]).double().numpy()
        fds.append(float(frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), real.mu, real.cov)))
        counts.append(np.bincount(labels.numpy(), minlength=10).tolist() if labels is not None else [])
    return fds, counts


def summary(values: list[float]) -> dict:
    v = np.asarray(values)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std(ddof=1)),
            "min": float(v.min()), "max": float(v.max())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="sid run directories (or generator folders)")
    p.add_argument("--names", default=None, help="comma-separated labels of the runs (default: folder names)")
    p.add_argument("--sets", type=int, default=8, help="disjoint seed sets per label mode (default 8)")
    p.add_argument("--samples", type=int, default=2000, help="samples per seed set (default 2000)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_eval_noise.json"))
    args = p.parse_args(argv)
    if args.sets < 2 or args.samples < 2:
        raise UserError(f"--sets {args.sets} and --samples {args.samples}: expected at least 2 of each (a standard "
                        "deviation needs two sets)")
    names, gen_dirs = run_generators(args.runs, args.names)
    reason = pick_threads(torch.device("cpu"), args.threads)
    detector = LeNetDetector(DEFAULT_LENET)
    real = RealFeatures(detector)
    result = {"machine": machine_info(torch.device("cpu")), "threads": reason, "sets": args.sets,
              "samples": args.samples, "runs": []}
    print(f"| generator | labels | fd_lenet per seed set of {args.samples} | mean | median | std |")
    print("|---|---|---|---|---|---|")
    for name, g in zip(names, gen_dirs):
        row = {"name": name, "generator": g}
        for mode in LABEL_MODES:
            fds, counts = set_fds(g, mode, args.sets, args.samples, detector, real)
            row[mode] = {"fd_lenet": fds, "class_counts": counts, **summary(fds)}
            s = row[mode]
            print(f"| {name} | {mode} | {' / '.join(f'{v:.1f}' for v in fds)} | {s['mean']:.1f} | "
                  f"{s['median']:.1f} | {s['std']:.2f} |", flush=True)
        row["std_ratio_random_over_balanced"] = row["random"]["std"] / row["balanced"]["std"]
        result["runs"].append(row)
    for row in result["runs"]:
        print(f"{row['name']}: std random / balanced = {row['std_ratio_random_over_balanced']:.2f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    run_script(main)
