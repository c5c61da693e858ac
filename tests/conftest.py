"""Shared fixtures: offline hub, tiny sid teachers for 16x16 digits and 32x32 mnist5k."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_tiny_teacher(path: str, resolution: int) -> str:
    """A class-conditional tiny HybridDenoiser (1 channel, 10 classes) with small random (non-zero) weights."""
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    torch.manual_seed(0)
    net = EDMPrecond(HybridDenoiser.from_preset("tiny", resolution, 1, label_dim=10))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """The tiny teacher for 16x16 digits."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher") / "tiny"), 16)


@pytest.fixture(scope="session")
def tiny_teacher_32(tmp_path_factory):
    """The tiny teacher for mnist5k's 32x32x1 images."""
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher32") / "tiny"), 32)
