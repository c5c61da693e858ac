"""Resume that cannot be fooled: a checkpoint's config against the current one, the GradScaler state, stale
temporaries, a partial stats line, and errors on every process."""

import json
import os
from types import SimpleNamespace

import pytest

from sid.cli import run
from sid.config import UserError, load_config
from sid.runs import RunDir, list_checkpoints, load_checkpoint
from sid.training import TrainingLoop, compare_configs, make_accelerator

TEACHER_ARGS = ["kind=teacher", "data.name=digits", "network.preset=tiny", "batch_size=16", "tick_kimg=0.032",
                "snapshot_kimg=1", "checkpoint_kimg=0.032", "train.sample_steps=2", "grid_seeds=4",
                "mixed_precision=fp32", "train.warmup_kimg=0", "ema.halflife_kimg=0.05"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sid_cfg(teacher, run_dir, *extra):
    return load_config(os.path.join(ROOT, "configs", "sid", "smoke.yaml"),
                       [f"teacher={teacher}", "data.name=digits", f"run_dir={run_dir}", "mixed_precision=fp32",
                        "total_kimg=0.016", *extra])


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    run(load_config(None, [*TEACHER_ARGS, f"run_dir={run_dir}", "total_kimg=0.064"]))
    return run_dir


def test_compare_configs_sorts_refused_and_listed():
    base = load_config(None, [*TEACHER_ARGS, "total_kimg=1"])
    from dataclasses import asdict

    saved = asdict(base)
    for args, refused_key in ((["batch_size=32"], "batch_size"), (["accum_steps=2"], "accum_steps"),
                              (["network.overrides.d_model=64"], "network.overrides"),
                              (["train.P_mean=-1.0"], "train.P_mean")):
        refused, _ = compare_configs(saved, load_config(None, [*TEACHER_ARGS, "total_kimg=1", *args]), "teacher")
        assert len(refused) == 1 and refused[0].startswith(refused_key + ":"), refused
    refused, changed = compare_configs(saved, load_config(None, [*TEACHER_ARGS, "total_kimg=2", "tick_kimg=0.5",
                                                                 "eval.num_samples=100", "run_dir=elsewhere"]),
                                       "teacher")
    assert refused == [] and changed == ["eval.num_samples: 2000 -> 100", "tick_kimg: 0.032 -> 0.5",
                                         "total_kimg: 1.0 -> 2.0"]
    # SiD: the teacher and the loss settings are refused (a path to the same folder is the same teacher).
    sid_saved = dict(saved, kind="sid", teacher="/a/teacher", sid={**saved["sid"]})
    current = load_config(None, [*TEACHER_ARGS, "total_kimg=1", "sid.alpha=1.0"])
    current.kind, current.teacher = "sid", "/a/../a/teacher"
    refused, _ = compare_configs(sid_saved, current, "sid")
    assert refused == ["sid.alpha: 1.2 -> 1.0"]
    current.teacher = "/b/teacher"
    assert compare_configs(sid_saved, current, "sid")[0][0] == "sid.alpha: 1.2 -> 1.0"
    assert "teacher: '/a/teacher' -> '/b/teacher'" in compare_configs(sid_saved, current, "sid")[0]


def test_changed_batch_is_refused_and_config_kept(teacher_run):
    before = (teacher_run / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"batch_size: 16 -> 32") as e:
        run(load_config(None, [*TEACHER_ARGS, f"run_dir={teacher_run}", "total_kimg=0.128", "batch_size=32",
                               "resume=auto"]))
    assert "\n" not in str(e.value)
    assert (teacher_run / "config.yaml").read_text() == before  # not overwritten


def test_changed_schedule_is_listed_in_one_line(teacher_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(teacher_run, run_dir)
    # A killed run's leftovers: a temporary checkpoint and a stats line cut short.
    (run_dir / "checkpoints" / ".checkpoint-000000080.pt.tmp").write_bytes(b"half")
    with open(run_dir / "stats.jsonl", "a") as fh:
        fh.write('{"kimg": 0.0')
    run(load_config(None, [*TEACHER_ARGS, f"run_dir={run_dir}", "total_kimg=0.096", "tick_kimg=0.016",
                           "resume=auto"]))
    out = capsys.readouterr().out
    listed = [ln for ln in out.splitlines() if ln.startswith("resume: changed since the checkpoint:")]
    assert listed == ["resume: changed since the checkpoint: tick_kimg: 0.032 -> 0.016; total_kimg: 0.064 -> 0.096"]
    assert "removed a stale temporary checkpoint" in out
    assert not [f for f in os.listdir(run_dir / "checkpoints") if f.endswith(".tmp")]
    rows = [json.loads(ln) for ln in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [r["kimg"] for r in rows] == [0.032, 0.064, 0.08, 0.096]
    assert load_checkpoint(list_checkpoints(str(run_dir / "checkpoints"))[-1])["cur_nimg"] == 96


def test_ctrl_c_during_a_checkpoint_write_completes_it_first(tmp_path, monkeypatch):
    import signal

    import torch

    import sid.runs

    real_save = torch.save

    def save_interrupted(obj, fh):  # Ctrl-C arrives in the middle of the write
        os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, fh)

    monkeypatch.setattr(sid.runs.torch, "save", save_interrupted)
    rd = RunDir(str(tmp_path))
    # A shell that starts pytest in the background leaves SIGINT ignored; give this test Python's default handler,
    # as in a terminal, and put back whatever was there.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            rd.save_checkpoint({"w": torch.arange(3.0)}, 64)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    (path,) = list_checkpoints(rd.checkpoints)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))
    assert not [f for f in os.listdir(rd.checkpoints) if f.endswith(".tmp")]


def test_partial_stats_line_is_dropped(tmp_path):
    rd = RunDir(str(tmp_path))
    rd.log_stats({"kimg": 0.016, "loss": 1.0})
    rd.log_stats({"kimg": 0.032, "loss": 0.5})
    with open(rd.stats_file, "a") as fh:
        fh.write('{"kimg": 0.048, "lo')
    rd.truncate_stats(32)
    assert [json.loads(ln)["kimg"] for ln in open(rd.stats_file)] == [0.016, 0.032]


def test_existing_checkpoints_refused_on_every_process(teacher_run):
    """A process other than the main one raises the same error (it would otherwise train on alone)."""
    cfg = load_config(None, [*TEACHER_ARGS, f"run_dir={teacher_run}", "total_kimg=0.064"])
    other_rank = SimpleNamespace(cfg=cfg, kind="teacher", accelerator=SimpleNamespace(is_main_process=False),
                                 run=RunDir(str(teacher_run), is_main=False), log=lambda msg: None)
    with pytest.raises(UserError, match="already holds checkpoints"):
        TrainingLoop.resume(other_rank)


class FakeScaler:
    """Stands in for fp16's GradScaler (which needs a GPU here): identity scaling, a state to save and restore."""

    def __init__(self, scale):
        self.state = {"scale": scale, "_growth_tracker": 7}

    def scale(self, loss):
        return loss

    def state_dict(self):
        return dict(self.state)

    def load_state_dict(self, state):
        self.state = dict(state)


def test_grad_scaler_state_is_saved_and_restored(tmp_path, tiny_teacher):
    from sid.train_sid import SiDLoop

    cfg = sid_cfg(tiny_teacher, tmp_path, "checkpoint_kimg=0.016")
    acc = make_accelerator(cfg)
    loop = SiDLoop(cfg, acc)
    acc.scaler = FakeScaler(1024.0)
    loop.train()
    state = load_checkpoint(list_checkpoints(str(tmp_path / "checkpoints"))[-1])
    assert state["scaler"] == {"scale": 1024.0, "_growth_tracker": 7}
    cfg2 = sid_cfg(tiny_teacher, tmp_path, "checkpoint_kimg=0.016", "total_kimg=0.032", "resume=auto")
    acc2 = make_accelerator(cfg2)
    loop2 = SiDLoop(cfg2, acc2)
    acc2.scaler = FakeScaler(1.0)
    assert loop2.resume()
    assert acc2.scaler.state == {"scale": 1024.0, "_growth_tracker": 7}
