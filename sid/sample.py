"""Sampling and evaluation behind ``sample.py``: generators (K steps) and multi-step teachers, per-seed images."""

from __future__ import annotations

import os
from argparse import Namespace

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import METRICS, DataConfig, UserError, project_path
from .data import load_dataset, to_uint8
from .generator import seed_step_noise
from .runs import save_grid
from .sampling import edm_sampler, guided, nfe, parse_seeds, seed_labels, seed_latents
from .teachers import autoguidance_weight, load_generator, load_teacher
from .teachers.autoguidance import check_weight

GRID_MAX = 100  # images drawn in grid.png (the first seeds)


def trial_summaries(rows: list[dict], metrics: list[str], trials: int) -> list[dict]:
    """Per metric over the trials: mean, sample std (ddof 1; SiD reports mean +- std of 10 x 50k) and minimum (EDM
    reports the minimum of 3)."""
    out = []
    for m in metrics:
        values = np.array([r["value"] for r in rows if r["metric"] == m and "trial" in r], dtype=np.float64)
        first = next(r for r in rows if r["metric"] == m)
        out.append({"metric": m, "trials": trials, "mean": float(values.mean()), "std": float(values.std(ddof=1)),
                    "min": float(values.min()), "values": values.tolist(), "num_samples": first["num_samples"],
                    "nfe": first["nfe"]})
    return out


def sample(args: Namespace) -> list[dict]:
    from accelerate import Accelerator

    # Check arguments before any heavy work.
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        raise UserError(f"--seeds {e}") from e
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for m in metrics:
        if m not in METRICS:
            raise UserError(f"--metrics has {m!r}, expected names from {', '.join(METRICS)}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps is {args.steps}, expected a positive integer")
    if args.batch < 1:
        raise UserError(f"--batch is {args.batch}, expected a positive integer")
    trials = getattr(args, "trials", 1)
    if trials < 1:
        raise UserError(f"--trials is {trials}, expected a positive integer")
    if trials > 1 and not metrics:
        raise UserError(f"--trials is {trials}, but no --metrics were asked for; trials repeat the metrics")
    if args.ref is not None and not os.path.isfile(args.ref):
        raise UserError(f"--ref '{args.ref}' does not exist")

    auto = getattr(args, "autoguidance", None)
    if auto is not None and args.generator:
        raise UserError("--autoguidance is for teachers (a guide network steers their sampler); leave it out for "
                        "--generator")
    if auto is not None:
        check_weight(auto, "--autoguidance")

    args.lenet = project_path(args.lenet)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available(),
                              mixed_precision="bf16" if args.bf16 else "no")
    device = accelerator.device
    if args.generator:
        model = load_generator(args.generator).to(device)
        denoiser = model.denoiser
        steps = model.steps if args.steps is None else args.steps  # default: the steps it was trained for
        num_nfe = steps
    else:
        denoiser = load_teacher(args.teacher, autoguidance=auto).to(device)
        auto = autoguidance_weight(denoiser)
        model = guided(denoiser, args.guidance)
        steps = 18 if args.steps is None else args.steps
        # Each network evaluation: x2 for classifier-free guidance, x2 for a guide network.
        num_nfe = nfe(steps) * (2 if args.guidance != 1 else 1) * (2 if auto != 1 else 1)
    shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    label_dim = denoiser.label_dim
    if args.teacher and args.guidance != 1 and label_dim == 0:
        raise UserError(f"--guidance is {args.guidance}, but the teacher is unconditional (guidance needs class "
                        "labels and would only double the cost); expected 1")
    class_label = getattr(args, "class_label", None)
    if class_label is not None and label_dim == 0:
        raise UserError(f"--class is {class_label}, but the model is unconditional; leave --class out")
    if class_label is not None and not 0 <= class_label < label_dim:
        raise UserError(f"--class is {class_label}, expected a class in 0..{label_dim - 1}")

    label_mode = getattr(args, "labels", "balanced")
    # How the metrics lines record the labels (train_sid.teacher_reference matches the trainer's on it).
    labels_note = "none" if label_dim == 0 else (label_mode if class_label is None else None)

    def labels_for(batch_seeds, where="cpu"):
        """Each seed's own label (sid.sampling.seed_labels, --labels mode), or --class for all."""
        if class_label is not None:
            return torch.full((len(batch_seeds),), class_label, dtype=torch.long, device=where)
        return seed_labels(batch_seeds, label_dim, where, mode=label_mode)
    if metrics:
        from .detectors import DEFAULT_INCEPTION_PATH, download_inception
        from .metrics import check_metrics

        wants_inception = "fid" in metrics or "is" in metrics
        if wants_inception and args.download_detector and not os.path.isfile(args.detector or DEFAULT_INCEPTION_PATH):
            args.detector = download_inception(args.detector)
        check_metrics(metrics, shape, detector_path=args.detector, lenet_path=args.lenet, ref_path=args.ref,
                      has_ref_dataset=True)

    @torch.no_grad()
    def make_images(batch_seeds) -> torch.Tensor:
        z = seed_latents(batch_seeds, shape, device)
        labels = labels_for(batch_seeds, device)
        with accelerator.autocast():
            if args.generator:
                x = model(z, labels, seed_step_noise(batch_seeds, shape, steps, device), steps=steps)
            else:
                x = edm_sampler(model, z, labels, num_steps=steps)
        return to_uint8(x).cpu()

    if accelerator.is_main_process:
        os.makedirs(args.outdir, exist_ok=True)
    what = f"{steps}-step generator {args.generator}" if args.generator else f"teacher {args.teacher}, " + \
        (f"autoguidance {auto:g}, " if args.teacher and auto != 1 else "") + f"{num_nfe} NFE"

    # Images: grid of the first seeds, optionally all of them as images.npz.
    todo = seeds if args.npz else seeds[:GRID_MAX]
    with accelerator.split_between_processes(todo) as mine:
        chunks = [make_images(mine[i:i + args.batch]) for i in tqdm(
            range(0, len(mine), args.batch), desc=f"sampling ({what})", disable=not accelerator.is_main_process)]
    local = torch.cat(chunks).numpy() if chunks else np.zeros((0, *shape), np.uint8)
    parts = accelerator.gather_for_metrics([local], use_gather_object=True) if accelerator.num_processes > 1 \
        else [local]
    if accelerator.is_main_process:
        images = np.concatenate(parts)
        save_grid(torch.from_numpy(images[:GRID_MAX]), os.path.join(args.outdir, "grid.png"))
        print(f"grid: {os.path.join(args.outdir, 'grid.png')} ({min(len(images), GRID_MAX)} images, {what})")
        if args.npz:
            labels = labels_for(todo)
            np.savez(os.path.join(args.outdir, "images.npz"), images=images.transpose(0, 2, 3, 1),
                     seeds=np.array(todo), **({"labels": labels.numpy()} if labels is not None else {}))
            print(f"images: {os.path.join(args.outdir, 'images.npz')} ({len(images)} images)")

    # Metrics.
    rows: list[dict] = []
    if metrics:
        from .metrics import append_jsonl, compute_metrics

        ref_dataset = None
        if args.ref is None:
            ref_dataset = load_dataset(DataConfig(name=args.data, path=args.data_path))
            if (ref_dataset.channels, ref_dataset.resolution) != shape[:2]:
                raise UserError(f"the model makes {shape[0]}x{shape[1]}x{shape[2]} images but the reference dataset "
                                f"{ref_dataset.name} holds {ref_dataset.channels}x{ref_dataset.resolution}x"
                                f"{ref_dataset.resolution}; pass --data/--data-path or --ref")
        # Trial t measures the seeds shifted by t * (max seed + 1): disjoint seed sets of the same size.
        span = max(seeds) + 1
        for t in range(trials):
            trial_seeds = [seed + t * span for seed in seeds]
            trial = compute_metrics(make_images, trial_seeds, metrics, accelerator=accelerator,
                                    batch_size=args.batch, detector_path=args.detector, lenet_path=args.lenet,
                                    ref_path=args.ref, ref_dataset=ref_dataset, nfe=num_nfe)
            for r in trial:
                r.update({"labels": labels_note} if labels_note else {"class": class_label})
                if trials > 1:
                    r.update(trial=t, seeds=f"{min(trial_seeds)}-{max(trial_seeds)}")
                if args.teacher:
                    r.update(steps=steps, guidance=args.guidance, **({"autoguidance": auto} if auto != 1 else {}))
            rows += trial
        if trials > 1:
            rows += trial_summaries(rows, metrics, trials)
        if accelerator.is_main_process:
            append_jsonl(os.path.join(args.outdir, "metrics.jsonl"), rows)
            for r in rows:
                if "mean" in r:
                    print(f"{r['metric']} over {trials} trials of {r['num_samples']} samples: mean {r['mean']:.4f} "
                          f"std {r['std']:.4f} min {r['min']:.4f} ({r['nfe']} NFE)")
                else:
                    spread = f" +- {r['std']:.4f} over {r['splits']} splits" if "splits" in r else ""
                    print(f"{r['metric']}: {r['value']:.4f}{spread} ({r['num_samples']} samples, {r['nfe']} NFE"
                          + (f", trial {r['trial']}" if "trial" in r else "") + ")")
    return rows
