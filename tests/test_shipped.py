"""The shipped embedded default: the MNIST teacher denoises real mnist5k images, carries its measured fd_lenet, fits
the size budget, and the smoke config distils it end to end."""

import json
import os
import subprocess
import sys

import torch

from sid.config import DataConfig
from sid.data import load_dataset, to_model_range
from sid.teachers import AutoGuidedDenoiser, load_generator, load_teacher
from sid.train_sid import teacher_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "assets", "teachers", "mnist5k")


def test_shipped_teacher_files_and_metrics():
    teacher = load_teacher(TEACHER)
    assert (teacher.img_channels, teacher.img_resolution, teacher.label_dim) == (1, 32, 10)
    # The folder samples with autoguidance: its main network guided by guide/ (its own first training stage).
    assert isinstance(teacher, AutoGuidedDenoiser) and teacher.weight == 2.0
    assert not isinstance(load_teacher(TEACHER, autoguidance=1), AutoGuidedDenoiser)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(TEACHER) for f in files)
    assert size <= 16 * 2**20
    ref = teacher_reference(TEACHER, "fd_lenet", 2000)  # what the main job (SiD of the main network) compares with
    assert ref is not None and ref["nfe"] == 35 and ref["num_samples"] == 2000 and ref["value"] > 0
    guided = teacher_reference(TEACHER, "fd_lenet", 2000, autoguidance=2.0)
    assert guided is not None and guided["nfe"] == 70 and guided["num_samples"] == 2000 and guided["value"] > 0
    # Measured as the trainer measures its generator: class-balanced labels, seeds 0-1999.
    assert ref["labels"] == guided["labels"] == "balanced" and ref["seeds"] == guided["seeds"] == "0-1999"
    for name in ("README.md", "grid.png"):
        assert os.path.isfile(os.path.join(TEACHER, name)), name


@torch.no_grad()
def test_shipped_teacher_denoises_real_digits():
    """On held-in mnist5k images the teacher's D(x0 + sigma n, sigma, label) is much closer to x0 than the noisy
    input at every noise level, and the true label helps at high noise."""
    teacher = load_teacher(TEACHER)
    images, labels = load_dataset(DataConfig(name="mnist5k")).get_batch(torch.arange(0, 5000, 50))
    x0 = to_model_range(images)
    g = torch.Generator().manual_seed(0)
    for s in (0.1, 0.5, 2.0, 10.0):
        sigma = torch.full((len(x0), 1, 1, 1), s)
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        mse = ((teacher(x, sigma, labels) - x0) ** 2).mean()
        assert mse < 0.5 * ((x - x0) ** 2).mean(), s
        if s >= 2.0:
            wrong = ((teacher(x, sigma, (labels + 5) % 10) - x0) ** 2).mean()
            assert mse < wrong, s


def test_smoke_config_distils_the_shipped_teacher(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/sid/smoke.yaml", f"run_dir={run_dir}"],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoints = os.listdir(run_dir / "checkpoints")
    assert len([c for c in checkpoints if c.endswith(".pt")]) >= 2
    with open(run_dir / "stats.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[-1]["kimg"] >= 0.048 and rows[-1]["nonfinite_samples"] == 0
    generator = load_generator(str(run_dir / "generator"))
    x = generator(torch.randn(2, 1, 32, 32), torch.tensor([3, 7]))
    assert x.shape == (2, 1, 32, 32) and torch.isfinite(x).all()
