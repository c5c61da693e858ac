"""Shared fixtures: offline hub, a tiny sid teacher on 16x16 digits."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A class-conditional tiny HybridDenoiser for 16x16x1 digits with small random (non-zero) weights."""
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=10))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("teacher") / "tiny")
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_32(tmp_path_factory):
    """A class-conditional tiny HybridDenoiser for mnist5k's 32x32x1 images with small random weights."""
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(HybridDenoiser.from_preset("tiny", 32, 1, label_dim=10))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("teacher32") / "tiny")
    net.save_pretrained(path)
    return path
