"""Opt-in check of the real FID pipeline against EDM's published CIFAR-10 statistics.

Skipped unless three local files are named (nothing is downloaded):

    SID_INCEPTION=/models/inception-2015-12-05.pt \\
    SID_CIFAR10=/data/cifar10 \\
    SID_CIFAR10_REF=/refs/cifar10-32x32.npz \\
    python -m pytest -q tests/test_inception_opt_in.py

SID_CIFAR10 is a folder holding ``cifar-10-batches-py`` (the torchvision layout); SID_CIFAR10_REF is EDM's
``cifar10-32x32.npz`` from https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/. The test rebuilds the training-set
statistics with sid's detector path (uint8 images, 2048-d pool features, float64 sums, n - 1 covariance) and
requires the Frechet distance to EDM's file to be about 0: a wrong resize, channel order, dtype or covariance
convention moves it far above the bound. It takes about 10 minutes on a CPU, under a minute on a GPU.
"""

import os

import pytest
import torch

from sid.data import cifar10
from sid.detectors import load_detector
from sid.metrics import dataset_stats, frechet_distance, load_ref

FILES = {k: os.environ.get(k) for k in ("SID_INCEPTION", "SID_CIFAR10", "SID_CIFAR10_REF")}

pytestmark = pytest.mark.skipif(not all(FILES.values()), reason="opt-in: set SID_INCEPTION, SID_CIFAR10 and "
                                "SID_CIFAR10_REF to local files (see the module docstring)")


def test_cifar10_training_statistics_match_edm():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    detector = load_detector("inception", FILES["SID_INCEPTION"], device)
    assert detector.feature_dim == 2048
    stats = dataset_stats(cifar10(FILES["SID_CIFAR10"]), detector, batch_size=250)
    assert stats.num == 50000
    fd = frechet_distance(stats.mean(), stats.cov(), *load_ref(FILES["SID_CIFAR10_REF"]))
    assert fd < 0.01, f"FID of sid's CIFAR-10 statistics to EDM's is {fd:.4f}, expected about 0"
