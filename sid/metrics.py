"""Frechet distances between generated images and reference statistics (docs/design.md section 8).

- ``fid``: Frechet Inception Distance with NVIDIA's TF-Inception (``inception-2015-12-05.pt``) on uint8 images,
  against reference statistics in EDM's ``.npz`` format (``mu`` (2048,), ``sigma`` (2048, 2048)).
- ``fd_lenet``: the same distance in the feature space of the project's mnist5k LeNet (``sid.detectors``); NOT FID
  and not comparable to published numbers.

Feature statistics are streamed in float64 (count, sum, sum of outer products), reduced across processes, and the
distance is computed in float64 (Heusel et al. 2017, eq. in sec. 3; EDM ``fid.py``).

Command line: ``python -m sid.metrics ref --data NAME [--data-path PATH] --detector-kind lenet|inception
[--detector PATH] --out REF.npz`` writes reference statistics of any dataset; ``python -m sid.metrics fd A.npz
B.npz`` prints the distance between two statistics files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from .config import DataConfig, UserError
from .detectors import (
    DEFAULT_INCEPTION_PATH,
    DEFAULT_LENET_PATH,
    INCEPTION_FILE,
    INCEPTION_URL,
    Detector,
    download_inception,
    load_detector,
)

# Metric name -> detector kind. "is" is the Inception Score (Salimans et al. 2016) from the FID detector file's
# classifier output; "is_lenet" the same score from the fd_lenet detector's 10-class output.
METRIC_DETECTORS = {"fd_lenet": "lenet", "fid": "inception", "is": "inception", "is_lenet": "lenet"}
SCORE_METRICS = ("is", "is_lenet")  # scores of the samples alone: no reference statistics
IS_SPLITS = 10  # the Inception Score is the mean (and std) over this many disjoint splits of the samples
# Sample counts of the published figures: FID and IS over 50,000 samples (EDM, SiD), fd_lenet over 2,000 (this
# project's README). Fewer samples give a higher and noisier FD; such values are not comparable with those figures.
FULL_SAMPLE_COUNTS = {"fd_lenet": 2000, "fid": 50000, "is": 50000, "is_lenet": 2000}
_warned: set[tuple[str, int]] = set()


def small_sample_warning(metric: str, num_samples: int, feature_dim: int | None = None) -> str | None:
    """One line saying that ``metric`` over ``num_samples`` samples is not meaningful (no more samples than the
    detector's ``feature_dim``: the sample covariance has rank at most ``num_samples - 1`` and is singular) or not
    comparable with the published figures; None when the count is the full one."""
    if feature_dim is not None and num_samples <= feature_dim:
        return (f"warning: {metric} over {num_samples:,} samples is not meaningful: the covariance of {feature_dim}-d "
                f"features from {num_samples:,} samples is singular (rank <= {num_samples - 1}); use well over "
                f"{feature_dim:,} samples")
    full = FULL_SAMPLE_COUNTS.get(metric)
    if full is None or num_samples >= full:
        return None
    how = "is noisier" if metric in SCORE_METRICS else "reads higher and noisier"
    return (f"warning: {metric} over {num_samples:,} samples {how} than over {full:,}, the count of the reference "
            f"figures; compare it only with values over {num_samples:,} samples")


def _warn_small_sample(metric: str, num_samples: int, accelerator: Any, feature_dim: int | None = None) -> None:
    msg = small_sample_warning(metric, num_samples, feature_dim)
    if msg is not None and _is_main(accelerator) and (metric, num_samples) not in _warned:
        _warned.add((metric, num_samples))
        print(msg, file=sys.stderr)
EDM_REFS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"

# ----------------------------------------------------------------------------
# Streaming feature statistics.


class FeatureStats:
    """Running float64 count, sum and sum of outer products of feature vectors; mergeable and reducible."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.num = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)  # (D,)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # (D, D)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """Add a batch of features (N, D)."""
        f = torch.as_tensor(features).to(self.sum.device, torch.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (N, {self.dim}), got {tuple(f.shape)}")
        self.num += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set of statistics of the same dimension into this one."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}")
        self.num += other.num
        self.sum += other.sum.to(self.sum.device)
        self.sum_outer += other.sum_outer.to(self.sum.device)
        return self

    def reduce(self, accelerator: Any = None) -> FeatureStats:
        """Sum the statistics of all processes in place (every process ends with the total); no-op for one."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        # One packed float64 tensor, one collective: [num, sum (D), sum_outer (D*D)]; exact for num < 2^53.
        packed = torch.cat([torch.tensor([float(self.num)], dtype=torch.float64), self.sum.cpu(),
                            self.sum_outer.cpu().flatten()]).to(accelerator.device)
        packed = accelerator.reduce(packed, "sum").cpu()
        self.num = int(round(packed[0].item()))
        self.sum = packed[1:1 + self.dim].to(self.sum.device)
        self.sum_outer = packed[1 + self.dim:].reshape(self.dim, self.dim).to(self.sum.device)
        return self

    def mean(self) -> np.ndarray:
        """(D,) float64 mean."""
        if self.num < 1:
            raise ValueError("no features were added")
        return (self.sum / self.num).cpu().numpy()

    def cov(self) -> np.ndarray:
        """(D, D) float64 unbiased covariance (divides by num - 1, like ``np.cov`` and EDM)."""
        if self.num < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.num}")
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        return sigma.cpu().numpy()



class ScoreStats:
    """Per-split running sums for the Inception Score: for split s, n_s, sum_i p_i (K,) and sum_i sum_k p_ik log p_ik.

    Then KL_s = mean_i sum_k p_ik log p_ik - sum_k pbar_k log pbar_k with pbar = mean_i p_i, and IS_s = exp(KL_s):
    exactly the mean over the split of KL(p_i || pbar). Split s holds the samples at positions floor(s n / splits) to
    floor((s + 1) n / splits) - 1 of the seed list (:func:`score_split`), as in the original code, on any number of
    processes.
    """

    def __init__(self, num_classes: int, splits: int = IS_SPLITS, device: torch.device | str = "cpu"):
        self.splits = splits
        self.sums = torch.zeros(splits, num_classes + 2, dtype=torch.float64, device=device)  # [n, plogp, p (K)]

    def update(self, probs: torch.Tensor, split: torch.Tensor) -> ScoreStats:
        """probs (N, K) rows summing to 1; split (N,) integer split of each row."""
        p = probs.to(self.sums.device, torch.float64)
        plogp = torch.special.xlogy(p, p).sum(1)                                   # 0 log 0 = 0
        rows = torch.cat([torch.ones_like(plogp)[:, None], plogp[:, None], p], dim=1)
        self.sums.index_add_(0, split.to(self.sums.device, torch.long), rows)
        return self

    def reduce(self, accelerator: Any = None) -> ScoreStats:
        if accelerator is not None and accelerator.num_processes > 1:
            self.sums = accelerator.reduce(self.sums.to(accelerator.device), "sum").to(self.sums.device)
        return self

    @property
    def num(self) -> int:
        return int(round(self.sums[:, 0].sum().item()))

    def score(self) -> tuple[float, float]:
        """(mean, std) of exp(KL) over the non-empty splits (std with ddof 0, like numpy's default)."""
        n, plogp, psum = self.sums[:, 0], self.sums[:, 1], self.sums[:, 2:]
        keep = n > 0
        n, plogp, pbar = n[keep], plogp[keep], psum[keep] / n[keep, None]
        kl = plogp / n - torch.special.xlogy(pbar, pbar).sum(1)
        scores = kl.exp().cpu().numpy()
        return float(scores.mean()), float(scores.std())


def inception_score(probs: np.ndarray | torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std) of class probabilities (N, K) in their order, over ``splits`` contiguous splits."""
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    n = p.shape[0]
    if p.ndim != 2 or n < splits:
        raise ValueError(f"expected probabilities (N, K) with N >= {splits}, got shape {tuple(p.shape)}")
    return ScoreStats(p.shape[1], splits).update(p, score_split(torch.arange(n), n, splits)).score()


def score_split(position: torch.Tensor, n: int, splits: int = IS_SPLITS) -> torch.Tensor:
    """Split of each sample position in [0, n): s with floor(s n / splits) <= position < floor((s + 1) n / splits)."""
    return torch.div((position + 1) * splits + n - 1, n, rounding_mode="floor") - 1

# ----------------------------------------------------------------------------
# Frechet distance between two Gaussians.


def _sqrtm_real(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """Real part of scipy's matrix square root, and whether it is trustworthy (finite, small imaginary part)."""
    with warnings.catch_warnings():  # scipy warns on singular input; the result is checked below instead
        warnings.simplefilter("ignore")
        s = scipy.linalg.sqrtm(a)
    s = np.asarray(s)
    if not np.all(np.isfinite(s)):
        return s.real, False
    imag = np.abs(s.imag).max() if np.iscomplexobj(s) else 0.0
    return s.real, bool(imag <= 1e-3 * max(1.0, np.abs(s.real).max()))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in float64.

    When the product is numerically not PSD (rank-deficient covariances, e.g. fewer samples than dimensions), the
    square root is retried with ``eps * I`` added to both covariances, eps growing from 1e-6 times their scale.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    covmean, ok = _sqrtm_real(sigma1 @ sigma2)
    scale = max(np.trace(sigma1), np.trace(sigma2)) / d if d else 1.0
    for rel_eps in (1e-6, 1e-4, 1e-2):
        if ok:
            break
        offset = rel_eps * max(scale, 1e-12) * np.eye(d)
        covmean, ok = _sqrtm_real((sigma1 + offset) @ (sigma2 + offset))
    if not ok:
        # Last resort: tr sqrtm(s1 s2) = sum sqrt(eig(sqrt(s1) s2 sqrt(s1))), a symmetric PSD problem.
        w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ sigma2 @ r1), 0, None)).sum()
    else:
        tr_covmean = np.trace(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)

# ----------------------------------------------------------------------------
# Reference statistics files (EDM's format: .npz with mu and sigma).


def save_ref(path: str, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as float64 to ``path`` (.npz), atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object keeps np.savez from appending '.npz' to the name
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    os.replace(tmp, path)


def load_ref(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a reference ``.npz`` (EDM's published files load unchanged)."""
    expected = "an .npz with 'mu' (D,) and 'sigma' (D, D), as EDM publishes or `python -m sid.metrics ref` writes"
    if not os.path.isfile(path):
        raise UserError(f"reference statistics file '{path}' does not exist; expected {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = sorted(f.files)
            if "mu" not in keys or "sigma" not in keys:
                raise UserError(f"reference statistics file '{path}' has arrays {keys}; expected {expected}")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"reference statistics file '{path}' is not a readable .npz ({type(e).__name__}); "
                        f"expected {expected}") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"reference statistics file '{path}' has mu {mu.shape} and sigma {sigma.shape}; expected "
                        f"{expected}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise UserError(f"reference statistics file '{path}' holds non-finite values; expected {expected}")
    return mu, sigma

# ----------------------------------------------------------------------------
# Statistics of a dataset and of a generator, split between processes.


def _rank_world(accelerator: Any) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def dataset_stats(dataset, detector: Detector, batch_size: int = 250, accelerator: Any = None,
                  max_items: int | None = None, progress: bool = True) -> FeatureStats:
    """Feature statistics of the first ``max_items`` images (default: all) of any sid dataset.

    The items are split between processes in contiguous, possibly uneven slices; the result is reduced, so every
    process returns the statistics of the whole set.
    """
    detector.check_shape(dataset.channels, dataset.resolution)
    rank, world = _rank_world(accelerator)
    n = len(dataset) if max_items is None else min(len(dataset), max_items)
    bounds = np.linspace(0, n, world + 1).round().astype(np.int64)
    mine = np.arange(bounds[rank], bounds[rank + 1])
    stats = FeatureStats(detector.feature_dim, detector.device)
    with _progress(n, f"{detector.name} reference", progress and _is_main(accelerator)) as bar:
        for i in range(0, len(mine), batch_size):
            images, _ = dataset.get_batch(mine[i:i + batch_size])
            stats.update(detector(images))
            bar.update(len(images) * world)
    return stats.reduce(accelerator)


def _seed_batches(seeds: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches: the same number on every process, balanced in size (EDM ``generate.py``)."""
    num_batches = max(math.ceil(len(seeds) / (batch_size * world)), 1) * world
    return [b.tolist() for b in np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)[rank::world]]


def _all_true(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (so that all take the same collective path)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, "sum").item() == 0


def _cache_name(kind: str, detector: Detector, dataset) -> str:
    """A cache file name that changes with the detector file and the dataset's identity and size."""
    det_path = getattr(detector, "path", "")
    size = os.path.getsize(det_path) if det_path and os.path.isfile(det_path) else 0
    key = repr((kind, os.path.basename(det_path), size, detector.feature_dim, getattr(dataset, "name", "dataset"),
                len(dataset), dataset.channels, dataset.resolution))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(getattr(dataset, "name", "dataset"))).strip("-")[:40]
    return f"ref-{kind}-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"


def _reference(metric: str, detector: Detector, ref: tuple[np.ndarray, np.ndarray] | None, ref_path: str | None,
               ref_dataset, accelerator: Any, batch_size: int, cache_dir: str | None,
               progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Reference (mu, sigma) for one metric: the .npz when its dimension fits the detector, else the dataset's."""
    if ref is not None and ref[0].shape[0] == detector.feature_dim:
        return ref
    if ref_dataset is None:
        if ref is not None:
            raise UserError(f"reference statistics file '{ref_path}' has {ref[0].shape[0]}-d features but metric "
                            f"'{metric}' uses the {detector.name} detector with {detector.feature_dim}-d features; "
                            f"pass a reference .npz made with that detector (python -m sid.metrics ref)")
        raise UserError(f"metric '{metric}' needs reference statistics: pass a reference .npz (--ref / eval.ref; EDM "
                        f"publishes them at {EDM_REFS_URL}) or build one with `python -m sid.metrics ref --data NAME "
                        f"--detector-kind {detector.name} --out REF.npz`")
    cache = os.path.join(cache_dir, _cache_name(detector.name, detector, ref_dataset)) if cache_dir else None
    if cache is not None and _all_true(accelerator, os.path.isfile(cache)):
        return load_ref(cache)
    stats = dataset_stats(ref_dataset, detector, batch_size, accelerator, progress=progress)
    mu, sigma = stats.mean(), stats.cov()
    if cache is not None and _is_main(accelerator):
        save_ref(cache, mu, sigma)
    return mu, sigma


def check_metrics(metrics: Sequence[str], shape: tuple[int, int, int], *, detector_path: str | None = None,
                  lenet_path: str = DEFAULT_LENET_PATH, ref_path: str | None = None, has_ref_dataset: bool = False,
                  training: bool = False) -> None:
    """Fail fast, before any sampling or training: unknown metric, missing or unreadable detector, an image shape
    the detector cannot measure, or no source of reference statistics. ``training``: word the way out in
    ``train.py``'s own syntax (config keys), not ``sample.py``'s options."""
    paths = {"lenet": lenet_path, "inception": detector_path}
    for m in metrics:
        if m not in METRIC_DETECTORS:
            raise UserError(f"metric {m!r} is not known, expected names from {', '.join(METRIC_DETECTORS)}")
        path = paths[METRIC_DETECTORS[m]] or (DEFAULT_INCEPTION_PATH if METRIC_DETECTORS[m] == "inception" else None)
        if training and METRIC_DETECTORS[m] == "inception" and not os.path.isfile(path):
            raise UserError(f"FID detector file '{path}' does not exist: download {INCEPTION_FILE} from "
                            f"{INCEPTION_URL} and pass eval.detector=PATH, or train without metrics with "
                            "'eval.metrics=[]'")
        load_detector(METRIC_DETECTORS[m], paths[METRIC_DETECTORS[m]]).check_shape(shape[0], shape[1])
        if m not in SCORE_METRICS and ref_path is None and not has_ref_dataset:
            raise UserError(f"metric '{m}' needs reference statistics: pass a reference .npz (--ref / eval.ref) or a "
                            "dataset to compute them from")


def compute_metrics(make_images: Callable[[list[int]], torch.Tensor], seeds: Sequence[int], metrics: Sequence[str],
                    *, accelerator: Any = None, batch_size: int = 250, detector_path: str | None = None,
                    lenet_path: str = DEFAULT_LENET_PATH, ref_path: str | None = None, ref_dataset=None,
                    nfe: int | None = None, progress: bool = True, cache_dir: str | None = None) -> list[dict]:
    """Frechet distances of generated images to reference statistics; the same result on every process.

    make_images(seed_list) -> uint8 tensor (len(seed_list), C, H, W) for those seeds. It must not run collective
    operations (pass unwrapped networks): every process calls it the same number of times, but possibly with
    one seed more or less.
    seeds: list[int] (all processes pass the same list; split between processes here in balanced batches;
    features reduced across processes). Every sample is counted; nothing is dropped.
    metrics: names among "fd_lenet" (detector at ``lenet_path``), "fid" (Inception TorchScript at ``detector_path``),
    "is" (Inception Score from the same TorchScript file) and "is_lenet" (the same score from the LeNet's classes).
    Reference statistics: ``ref_path`` (.npz) for every metric whose detector has its feature dimension; otherwise
    computed from ``ref_dataset`` (a sid dataset) with the same detector (and cached as .npz in ``cache_dir`` when
    given); neither -> UserError saying a reference .npz is needed.
    Returns one dict per metric: {"metric": name, "value": float, "num_samples": int, "nfe": nfe}; the scores add
    "std" (over their splits) and "splits".
    """
    metrics = list(metrics)
    for m in metrics:
        if m not in METRIC_DETECTORS:
            raise UserError(f"metric {m!r} is not known, expected names from {', '.join(METRIC_DETECTORS)}")
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise UserError(f"metrics need at least 2 samples, got {len(seeds)} seeds")
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    rank, world = _rank_world(accelerator)

    # Detectors and reference statistics (before sampling, so that a missing file fails fast).
    paths = {"lenet": lenet_path, "inception": detector_path}
    detectors = {m: load_detector(METRIC_DETECTORS[m], paths[METRIC_DETECTORS[m]], device) for m in metrics}
    ref = load_ref(ref_path) if ref_path is not None else None
    fds = [m for m in metrics if m not in SCORE_METRICS]
    scores = [m for m in metrics if m in SCORE_METRICS]
    refs = {m: _reference(m, detectors[m], ref, ref_path, ref_dataset, accelerator, batch_size, cache_dir, progress)
            for m in fds}
    if len(seeds) < IS_SPLITS and scores:
        raise UserError(f"the Inception Score needs at least {IS_SPLITS} samples (one per split), got {len(seeds)}")
    position = {s: i for i, s in enumerate(seeds)}
    n_seeds = len(seeds)

    # Features (and class probabilities) of generated images, streamed per process, then reduced.
    stats = {m: FeatureStats(detectors[m].feature_dim, device) for m in fds}
    for m in scores:
        probe = detectors[m].probabilities(torch.zeros(1, *_probe_shape(detectors[m]), dtype=torch.uint8))
        stats[m] = ScoreStats(probe.shape[1], IS_SPLITS, device)
    batches = _seed_batches(seeds, batch_size, rank, world)
    desc = ",".join(metrics) + (f" (rank 0 of {world})" if world > 1 else "")
    with _progress(sum(len(b) for b in batches), desc, progress and _is_main(accelerator)) as bar:
        for batch in batches:
            if not batch:
                continue
            images = make_images(batch)
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[0] != len(batch):
                raise ValueError(f"make_images must return a uint8 tensor ({len(batch)}, C, H, W), got "
                                 f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
            for m in fds:
                stats[m].update(detectors[m](images))
            if scores:
                split = score_split(torch.tensor([position[s] for s in batch]), n_seeds)
                for m in scores:
                    stats[m].update(detectors[m].probabilities(images), split)
            bar.update(len(batch))
    results = []
    for m in metrics:
        s = stats[m].reduce(accelerator)
        if m in SCORE_METRICS:
            mean, std = s.score()
            _warn_small_sample(m, s.num, accelerator)
            results.append({"metric": m, "value": mean, "std": std, "splits": IS_SPLITS, "num_samples": s.num,
                            "nfe": nfe})
            continue
        value = frechet_distance(s.mean(), s.cov(), *refs[m])
        _warn_small_sample(m, s.num, accelerator, detectors[m].feature_dim)
        results.append({"metric": m, "value": value, "num_samples": s.num, "nfe": nfe})
    return results


def _probe_shape(detector: Detector) -> tuple[int, int, int]:
    """An image shape the detector accepts, for a one-image probe of its class count."""
    return (1, 32, 32) if detector.name == "lenet" else (3, 32, 32)

# ----------------------------------------------------------------------------
# Outputs: metrics.jsonl and the FD-vs-kimg plot.


def append_jsonl(path: str, records: Sequence[dict], accelerator: Any = None) -> None:
    """Append one JSON line per record to ``path`` (e.g. DIR/metrics.jsonl); main process only."""
    if not _is_main(accelerator):
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()


def metric_curve(stats_jsonl_path: str, metric: str = "fd_lenet") -> list[tuple[float, float]]:
    """(kimg, value) of every line of a ``stats.jsonl`` that carries ``metric``, sorted by kimg. Lines without both
    keys, with non-finite values, or not valid JSON (a run killed mid-write) are skipped; no file: empty."""
    points = []
    if os.path.isfile(stats_jsonl_path):
        with open(stats_jsonl_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    k, v = float(rec["kimg"]), float(rec[metric])
                except (ValueError, KeyError, TypeError):
                    continue
                if math.isfinite(k) and math.isfinite(v):
                    points.append((k, v))
    return sorted(points, key=lambda p: p[0])


def plot_fd_vs_kimg(stats_jsonl_path: str, out_png: str, metric: str = "fd_lenet", teacher_value: float | None = None,
                    teacher_label: str = "teacher (35 NFE)") -> str | None:
    """Plot ``metric`` against ``kimg`` from a ``stats.jsonl`` (read by :func:`metric_curve`); the teacher's value as
    a dashed line. Returns ``out_png``, or None when there is nothing to draw. Written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = metric_curve(stats_jsonl_path, metric)
    kimg, values = [k for k, _ in points], [v for _, v in points]
    if not values and teacher_value is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if len(values):
        ax.plot(kimg, values, "o-", ms=3, label=f"one-step generator ({metric})")
    if teacher_value is not None:
        ax.axhline(teacher_value, ls="--", color="k", label=f"{teacher_label}: {teacher_value:.3g}")
    positive = [v for v in [*values, teacher_value] if v is not None and v > 0]
    if positive and max(positive) > 10 * min(positive):
        ax.set_yscale("log")
    ax.set_xlabel("kimg")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    tmp = f"{out_png}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png

# ----------------------------------------------------------------------------
# Command line.


def _cmd_ref(args: argparse.Namespace) -> None:
    from .data import load_dataset

    if args.batch < 1:
        raise UserError(f"--batch is {args.batch}, expected a positive integer")
    if args.data_path is not None and not os.path.exists(args.data_path):
        raise UserError(f"--data-path '{args.data_path}' does not exist")
    detector_path = args.detector
    if args.detector_kind == "inception" and args.download_detector:
        detector_path = download_inception(detector_path)
    detector = load_detector(args.detector_kind, detector_path, "cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_dataset(DataConfig(name=args.data, path=args.data_path, download=False))
    stats = dataset_stats(dataset, detector, args.batch, max_items=args.max_items, progress=True)
    save_ref(args.out, stats.mean(), stats.cov())
    print(json.dumps({"out": args.out, "dataset": dataset.name, "num_images": stats.num,
                      "detector": detector.name, "feature_dim": detector.feature_dim}))


def _cmd_fd(args: argparse.Namespace) -> None:
    (mu1, sigma1), (mu2, sigma2) = load_ref(args.a), load_ref(args.b)
    if mu1.shape != mu2.shape:
        raise UserError(f"'{args.a}' holds {mu1.shape[0]}-d statistics but '{args.b}' {mu2.shape[0]}-d; expected two "
                        "files made with the same detector")
    print(f"{frechet_distance(mu1, sigma1, mu2, sigma2):.6f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sid.metrics", description="Reference statistics and Frechet "
                                     "distances (fid with Inception, fd_lenet with the mnist5k LeNet).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ref", help="write reference statistics (.npz with mu, sigma) of a dataset")
    p.add_argument("--data", required=True, help="dataset kind: mnist5k | digits | folder | zip | npz | cifar10")
    p.add_argument("--data-path", default=None, help="file or folder of the dataset (folder, zip, npz, cifar10)")
    p.add_argument("--detector-kind", choices=["lenet", "inception"], required=True)
    p.add_argument("--detector", default=None, help=f"detector file (default lenet: {DEFAULT_LENET_PATH})")
    p.add_argument("--download-detector", action="store_true", help="download the Inception file if it is missing")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--max-items", type=int, default=None, help="use only the first N images")
    p.set_defaults(func=_cmd_ref)
    p = sub.add_parser("fd", help="Frechet distance between two statistics files")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(func=_cmd_fd)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
