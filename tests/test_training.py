"""End to end on CPU: teacher training lowers the loss; exact resume (clean and after SIGKILL); 2 processes agree;
user errors exit 2 with one sentence."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from sid.cli import run
from sid.config import UserError, load_config
from sid.runs import list_checkpoints, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEACHER_ARGS = ["kind=teacher", "data.name=digits", "network.preset=tiny", "batch_size=16", "tick_kimg=0.032",
                "snapshot_kimg=1", "checkpoint_kimg=0.064", "train.sample_steps=2", "grid_seeds=4",
                "mixed_precision=fp32", "train.warmup_kimg=0", "ema.halflife_kimg=0.05"]


def sid_args(teacher, run_dir, *extra):
    return [f"teacher={teacher}", "data.name=digits", f"run_dir={run_dir}", "mixed_precision=fp32", *extra]


def load_final(run_dir):
    return load_checkpoint(list_checkpoints(os.path.join(run_dir, "checkpoints"))[-1])


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------
# Teacher training.


def test_teacher_training_lowers_loss(tmp_path):
    from sid.loss import edm_loss
    from sid.teachers import load_teacher
    from sid.train_teacher import build_denoiser

    cfg = load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path}", "total_kimg=0.64", "train.lr=2e-3"])
    run(cfg)
    from sid.data import digits, to_model_range

    ds = digits()
    x0 = to_model_range(ds.get_batch(range(256))[0])
    g = torch.Generator().manual_seed(0)
    sigma = (torch.randn(256, 1, 1, 1, generator=g) * 1.2 - 1.2).exp()
    noise = torch.randn(x0.shape, generator=g)
    torch.manual_seed(cfg.seed)
    before = build_denoiser(cfg, 16, 1, 10)
    after = load_teacher(str(tmp_path / "denoiser"))
    labels = torch.as_tensor(ds.labels[:256])
    with torch.no_grad():
        l0 = edm_loss(before, x0, labels, sigma=sigma, noise=noise).mean()
        l1 = edm_loss(after, x0, labels, sigma=sigma, noise=noise).mean()
    assert l1 < 0.7 * l0, (float(l0), float(l1))
    assert os.path.isfile(tmp_path / "config.yaml") and os.path.isfile(tmp_path / "stats.jsonl")
    assert os.listdir(tmp_path / "samples")


def test_teacher_resume_equals_uninterrupted(tmp_path):
    full = load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path / 'a'}", "total_kimg=0.192", "accum_steps=2"])
    run(full)
    run(load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path / 'b'}", "total_kimg=0.128", "accum_steps=2"]))
    run(load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path / 'b'}", "total_kimg=0.192", "accum_steps=2",
                           "resume=auto"]))
    a, b = load_final(tmp_path / "a"), load_final(tmp_path / "b")
    assert a["cur_nimg"] == b["cur_nimg"] == 192
    for key in ("net", "ema"):
        assert_same_state(a[key], b[key])


def test_max_minutes_ends_the_run_early_with_its_checkpoint_metrics_and_export(tmp_path, capsys):
    import json

    cfg = load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path}", "total_kimg=0.64", "max_minutes=1e-9"])
    run(cfg)  # the budget is spent after the first step (16 images)
    assert load_final(tmp_path)["cur_nimg"] == 16
    last = json.loads(open(tmp_path / "stats.jsonl").read().splitlines()[-1])
    assert last["kimg"] == 0.016 and last["step"] == 1
    assert os.path.isfile(tmp_path / "denoiser" / "config.json")
    assert "ending the run at 0.016 kimg of 0.64 (rerun exactly with total_kimg=0.016)" in capsys.readouterr().out
    with pytest.raises(UserError, match="config key 'max_minutes' is -1.0, expected a number >= 0"):
        load_config(None, ["max_minutes=-1"])


def test_teacher_init_continues_from_a_denoiser_folder(tmp_path, tiny_teacher, tiny_teacher_32):
    from sid.teachers import load_teacher
    from sid.train_teacher import TeacherLoop

    args = [*TEACHER_ARGS, f"run_dir={tmp_path / 'a'}", "total_kimg=0.032", f"train.init={tiny_teacher}"]
    cfg = load_config(None, args)
    from accelerate import Accelerator

    loop = TeacherLoop(cfg, Accelerator(cpu=True))
    start = load_teacher(tiny_teacher).state_dict()
    assert_same_state(loop.accelerator.unwrap_model(loop.net).state_dict(), start)
    assert_same_state(loop.ema.model.state_dict(), start)
    # A denoiser made for other data is refused with one sentence naming both shapes.
    bad = load_config(None, [*TEACHER_ARGS, f"run_dir={tmp_path / 'b'}", f"train.init={tiny_teacher_32}"])
    with pytest.raises(UserError, match=r"train.init.*\(32, 1, 10\).*\(16, 1, 10\)"):
        TeacherLoop(bad, Accelerator(cpu=True))
    with pytest.raises(UserError, match="train.init.*expected a sid denoiser folder"):
        load_config(None, [*TEACHER_ARGS, f"train.init={tmp_path / 'missing'}"])


def test_teacher_lr_schedule():
    from sid.train_teacher import lr_factor

    assert lr_factor(0, 0, 0) == 1.0 and lr_factor(10_000_000, 0, 0) == 1.0
    assert lr_factor(500, 2, 0) == pytest.approx(0.25) and lr_factor(2000, 2, 0) == 1.0
    # EDM2's inverse square root after lr_decay_kimg, independent of the run length.
    assert lr_factor(40_000, 2, 50) == 1.0
    assert lr_factor(200_000, 2, 50) == pytest.approx(0.5)
    assert lr_factor(450_000, 2, 50) == pytest.approx(1 / 3)
    with pytest.raises(UserError, match="train.lr_decay_kimg"):
        load_config(None, [*TEACHER_ARGS, "train.lr_decay_kimg=-1"])


def test_fresh_run_refuses_to_overwrite(tmp_path):
    args = [*TEACHER_ARGS, f"run_dir={tmp_path}", "total_kimg=0.064"]
    run(load_config(None, args))
    with pytest.raises(UserError, match="resume=auto"):
        run(load_config(None, args))


# ----------------------------------------------------------------------------
# SiD: resume after SIGKILL, checkpoint hygiene, errors.


def cli(*args, env=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sid_sigkill_resume_equals_uninterrupted(tmp_path, tiny_teacher):
    common = ["--config", "configs/sid/smoke.yaml", "total_kimg=0.096", "checkpoint_kimg=0.016"]
    ref = cli("train.py", *common, *sid_args(tiny_teacher, tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    # Kill the second run right after its second checkpoint lands.
    proc = cli("train.py", *common, *sid_args(tiny_teacher, tmp_path / "killed"))
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list_checkpoints(str(ckpts))) < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(str(ckpts))
    assert 2 <= len(done) and load_checkpoint(done[-1])["cur_nimg"] < 96
    # A half-written checkpoint (temporary name) with a later count is never picked.
    (ckpts / ".checkpoint-000000090.pt.tmp").write_bytes(b"half written")
    res = cli("train.py", *common, *sid_args(tiny_teacher, tmp_path / "killed", "resume=auto"))
    out, err = res.communicate(timeout=300)
    assert res.returncode == 0, err
    assert "resumed from" in out + err
    a, b = load_final(tmp_path / "ref"), load_final(tmp_path / "killed")
    for key in ("generator", "fake_score", "generator_ema"):
        assert_same_state(a[key], b[key])
    # The exported generator is the EMA one and loads for sampling.
    from sid.teachers import load_generator

    G = load_generator(str(tmp_path / "killed" / "generator"))
    assert G.init_sigma == 2.5


def test_sid_corrupt_checkpoint(tmp_path, tiny_teacher):
    args = ["--config", "configs/sid/smoke.yaml", *sid_args(tiny_teacher, tmp_path)]
    p = cli("train.py", *args)
    assert p.wait(timeout=300) == 0, p.stderr.read()
    ckpts = list_checkpoints(str(tmp_path / "checkpoints"))
    with open(ckpts[-1], "wb") as fh:
        fh.write(b"corrupt")
    # An explicit path to it: one sentence, exit 2.
    p = cli("train.py", *args, f"resume={ckpts[-1]}")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "corrupt" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # resume=auto skips it and takes the newest complete one.
    p = cli("train.py", *args, "resume=auto")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert os.path.basename(ckpts[-2]) in out + err


@pytest.mark.parametrize("extra, needle", [
    (["teacher=/no/such/teacher"], "/no/such/teacher"),
    (["data.name=mnist5k"], "never resized"),
    (["eval.metrics=[fid]", "eval.detector=/no/inception.pt"], "inception-2015-12-05.pt"),
    (["eval.metrics=[fd_lenet]"], "1x32x32"),
])
def test_sid_user_errors_exit_2(tmp_path, tiny_teacher, extra, needle):
    p = cli("train.py", "--config", "configs/sid/smoke.yaml", *sid_args(tiny_teacher, tmp_path), *extra)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------
# Two processes on CPU.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_sid_ranks_agree(tmp_path, tiny_teacher):
    p = cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), "train.py",
            "--config", "configs/sid/smoke.yaml", *sid_args(tiny_teacher, tmp_path), env={"GLOO_SOCKET_IFNAME": "lo"})
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert out.splitlines()[0].startswith("run: 2 processes x 4 micro-batch x 1 accumulation = 8 global batch")
    state = load_final(tmp_path)
    assert len(state["rank_digests"]) == 2 and state["rank_digests"][0] == state["rank_digests"][1]
    assert os.path.isdir(tmp_path / "generator")


MAX_MINUTES_PROBE = """
import time, types
import torch.distributed
from accelerate import Accelerator
from sid.training import TrainingLoop

acc = Accelerator(cpu=True)
loop = types.SimpleNamespace(accelerator=acc, device=acc.device)
now = time.time()
# Rank 1's clock says late, rank 0's says not: nobody stops. Then the other way round: everybody stops.
a = TrainingLoop._out_of_time(loop, now + 3600 if acc.process_index == 0 else now - 1)
b = TrainingLoop._out_of_time(loop, now - 1 if acc.process_index == 0 else now + 3600)
print(f"rank {acc.process_index}: {a} {b}", flush=True)
# Leave together and close the process group, or gloo's threads can abort the interpreter's exit.
acc.wait_for_everyone()
torch.distributed.destroy_process_group()
"""


def test_max_minutes_follows_the_main_process_clock_in_two_processes(tmp_path):
    """With several processes every rank must stop at the same step (or DDP hangs): rank 0's clock decides."""
    script = tmp_path / "probe.py"
    script.write_text(MAX_MINUTES_PROBE)
    p = cli("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(script),
            env={"GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": ROOT})
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    # The two processes share stdout, so their lines may run together.
    assert sorted(re.findall(r"rank \d: (?:True|False) (?:True|False)", out)) == \
        ["rank 0: False True", "rank 1: False True"]


def test_nonfinite_gradients_are_cleaned_and_counted():
    from sid.training import count_nonfinite, sanitize_gradients

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([1.0, float("nan"), float("inf")])
    b.grad = torch.tensor([2.0, -3.0])
    assert float(sanitize_gradients([a, b])) == 1
    assert a.grad.tolist() == [1.0, 0.0, 1e5] and b.grad.tolist() == [2.0, -3.0]
    x = torch.zeros(4, 1, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("-inf")
    assert float(count_nonfinite(x)) == 2


def test_sid_metrics_during_training(tmp_path):
    """fd_lenet every N kimg (and at kimg 0) lands in stats.jsonl and fd_vs_kimg.png, with the teacher's value."""
    import json

    from backbones import HybridDenoiser
    from sid import EDMPrecond

    torch.manual_seed(0)
    teacher = EDMPrecond(HybridDenoiser.from_preset("tiny", 32, 1, label_dim=10))
    teacher.save_pretrained(str(tmp_path / "teacher"))
    with open(tmp_path / "teacher" / "metrics.jsonl", "w") as fh:
        fh.write(json.dumps({"metric": "fd_lenet", "value": 12.5, "num_samples": 40, "nfe": 35}) + "\n")
    cfg = load_config(None, [f"teacher={tmp_path / 'teacher'}", f"run_dir={tmp_path / 'run'}", "data.name=mnist5k",
                             "total_kimg=0.032", "batch_size=8", "tick_kimg=0.008", "metrics_kimg=0.016",
                             "checkpoint_kimg=1", "snapshot_kimg=1", "grid_seeds=4", "eval.num_samples=40",
                             "eval.batch_size=20", "mixed_precision=fp32"])
    run(cfg)
    with open(tmp_path / "run" / "stats.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    measured = [r["kimg"] for r in rows if "fd_lenet" in r]
    assert measured == [0.0, 0.016, 0.032]
    assert all(r["fd_lenet"] > 0 for r in rows if "fd_lenet" in r)
    assert all(r["fd_lenet_num_samples"] == 40 for r in rows if "fd_lenet" in r)  # each value with its count
    assert os.path.getsize(tmp_path / "run" / "fd_vs_kimg.png") > 1000
