"""Trackers through accelerate: a smoke run with trackers=[tensorboard] writes event files holding the stats lines,
the sample grids and the metrics; unknown or missing trackers are one sentence."""

import glob
import os

import pytest

from sid.cli import run
from sid.config import UserError, load_config

pytest.importorskip("tensorboard")


def test_tensorboard_smoke_run_writes_events(tmp_path, tiny_teacher_32):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, [f"teacher={tiny_teacher_32}", f"run_dir={tmp_path / 'run'}", "data.name=mnist5k",
                             "total_kimg=0.016", "batch_size=8", "tick_kimg=0.008", "metrics_kimg=0.016",
                             "checkpoint_kimg=1", "snapshot_kimg=0.008", "grid_seeds=4", "eval.num_samples=20",
                             "eval.batch_size=20", "mixed_precision=fp32", "trackers=[tensorboard]"])
    run(cfg)
    events = glob.glob(str(tmp_path / "run" / "logs" / "run" / "events.out.tfevents.*"))
    assert events, os.listdir(tmp_path / "run")
    acc = EventAccumulator(os.path.dirname(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for key in ("loss_fake_score", "loss_generator", "nonfinite_samples", "sec_per_kimg", "fd_lenet",
                "fd_lenet_num_samples"):
        assert key in tags["scalars"], tags["scalars"]
    assert [e.step for e in acc.Scalars("loss_generator")] == [8, 16]
    assert [e.step for e in acc.Scalars("fd_lenet")] == [0, 16]  # at kimg 0 and at the end
    assert [e.value for e in acc.Scalars("fd_lenet_num_samples")] == [20, 20]
    assert "samples" in tags["images"] and [e.step for e in acc.Images("samples")] == [0, 8, 16]


def test_tracker_names_are_checked():
    with pytest.raises(UserError, match="'trackers' has 'mlflow'"):
        load_config(None, ["kind=teacher", "trackers=[mlflow]"])


def test_missing_tracker_package_is_one_sentence(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match="pip install wandb"):
        load_config(None, ["kind=teacher", "trackers=[wandb]"])
