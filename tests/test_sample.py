"""sample.py end to end: teachers and one-step generators, per-seed determinism, metrics.jsonl, the FID path with a
stand-in TorchScript detector, two processes, and user errors."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sid.teachers import save_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def models(tiny_teacher_32, tmp_path_factory):
    """A tiny class-conditional teacher for 32x32x1 (mnist5k's shape) and a generator folder made from it."""
    from sid.teachers import load_teacher

    generator = str(tmp_path_factory.mktemp("models") / "generator")
    save_generator(load_teacher(tiny_teacher_32), generator, sigma_init=2.5)
    return tiny_teacher_32, generator


def sample(*args, launcher=None, env=None):
    cmd = [sys.executable, *(launcher or []), "sample.py", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_teacher_sampling_with_fd_lenet(models, tmp_path):
    teacher, _ = models
    r = sample("--teacher", teacher, "--steps", "2", "--seeds", "0-19", "--outdir", str(tmp_path), "--npz",
               "--metrics", "fd_lenet", "--batch", "8")
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(tmp_path / "grid.png")
    with np.load(tmp_path / "images.npz") as f:
        assert f["images"].shape == (20, 32, 32, 1) and f["images"].dtype == np.uint8
        assert f["seeds"].tolist() == list(range(20)) and f["labels"].tolist() == [s % 10 for s in range(20)]
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["metric"] == "fd_lenet" and row["num_samples"] == 20 and row["nfe"] == 3 and row["labels"] == "balanced"
    assert row["steps"] == 2 and row["guidance"] == 1
    assert np.isfinite(row["value"]) and row["value"] > 0


def test_teacher_reference_ignores_guided_rows(tmp_path):
    """SiD distils the unguided teacher: its reference value comes from a guidance-1 row of metrics.jsonl."""
    from sid.train_sid import teacher_reference

    rows = [{"metric": "fd_lenet", "value": 5.0, "num_samples": 2000, "nfe": 69, "guidance": 3.0},
            {"metric": "fd_lenet", "value": 9.0, "num_samples": 1000, "nfe": 35, "guidance": 1.0},
            {"metric": "fd_lenet", "value": 8.0, "num_samples": 2000, "nfe": 35, "guidance": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert teacher_reference(str(tmp_path), "fd_lenet", 2000)["value"] == 8.0
    assert teacher_reference(str(tmp_path), "fd_lenet", 900)["value"] == 9.0
    assert teacher_reference(str(tmp_path), "fid", 2000) is None


def test_teacher_reference_prefers_rows_with_the_trainers_labels(tmp_path):
    """Rows with balanced labels (or none: unconditional) win over random ones and rows from before the label mode
    was recorded, even with another sample count; rows of one --class never count."""
    from sid.train_sid import teacher_reference

    rows = [{"metric": "fd_lenet", "value": 1.0, "num_samples": 2000, "nfe": 35, "guidance": 1.0, "class": 3},
            {"metric": "fd_lenet", "trials": 2, "mean": 1.5, "num_samples": 2000, "nfe": 35},  # --trials' summary
            {"metric": "fd_lenet", "value": 2.0, "num_samples": 2000, "nfe": 35, "guidance": 1.0},
            {"metric": "fd_lenet", "value": 3.0, "num_samples": 2000, "nfe": 35, "guidance": 1.0, "labels": "random"},
            {"metric": "fd_lenet", "value": 4.0, "num_samples": 1000, "nfe": 35, "guidance": 1.0,
             "labels": "balanced"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert teacher_reference(str(tmp_path), "fd_lenet", 2000)["value"] == 4.0
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert teacher_reference(str(tmp_path), "fd_lenet", 2000)["value"] in (2.0, 3.0)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({**rows[2], "labels": "none"}) + "\n")
    assert teacher_reference(str(tmp_path), "fd_lenet", 2000)["value"] == 2.0


def test_label_modes_and_class_are_recorded(models, tmp_path):
    from sid.sampling import seed_labels

    _, generator = models
    for name, extra in (("random", ["--labels", "random"]), ("one", ["--class", "7"])):
        r = sample("--generator", generator, "--seeds", "0-11", "--outdir", str(tmp_path / name), "--npz",
                   "--metrics", "fd_lenet", *extra)
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "random" / "images.npz") as f:
        assert f["labels"].tolist() == seed_labels(range(12), 10, mode="random").tolist()
    with np.load(tmp_path / "one" / "images.npz") as f:
        assert f["labels"].tolist() == [7] * 12
    (row,) = read_jsonl(tmp_path / "random" / "metrics.jsonl")
    assert row["labels"] == "random"
    (row,) = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert row["class"] == 7 and "labels" not in row


def test_generator_sampling_is_per_seed(models, tmp_path):
    _, generator = models
    for batch, out in (("3", "a"), ("16", "b")):
        r = sample("--generator", generator, "--seeds", "0-9", "--outdir", str(tmp_path / out), "--npz", "--batch",
                   batch)
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "a" / "images.npz") as a, np.load(tmp_path / "b" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    r = sample("--generator", generator, "--seeds", "5-9", "--outdir", str(tmp_path / "c"), "--npz")
    with np.load(tmp_path / "a" / "images.npz") as a, np.load(tmp_path / "c" / "images.npz") as c:
        assert np.array_equal(a["images"][5:], c["images"])


def test_fid_path_through_sample_py(models, tmp_path):
    from test_metrics import make_standin

    from sid.metrics import save_ref

    _, generator = models
    det = make_standin(tmp_path / "standin.pt")
    save_ref(str(tmp_path / "ref.npz"), np.zeros(16), np.eye(16))
    r = sample("--generator", generator, "--seeds", "0-31", "--outdir", str(tmp_path / "o"), "--metrics", "fid",
               "--detector", det, "--ref", str(tmp_path / "ref.npz"))
    assert r.returncode == 0, r.stderr
    (row,) = read_jsonl(tmp_path / "o" / "metrics.jsonl")
    assert row == {"metric": "fid", "value": row["value"], "num_samples": 32, "nfe": 1, "labels": "balanced"}
    assert row["value"] > 0
    # A missing detector: one sentence naming the file, exit 2, no traceback.
    r = sample("--generator", generator, "--seeds", "0-3", "--outdir", str(tmp_path / "m"), "--metrics", "fid",
               "--detector", str(tmp_path / "missing.pt"), "--ref", str(tmp_path / "ref.npz"))
    assert r.returncode == 2 and "inception-2015-12-05.pt" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_two_processes_write_the_same_images(models, tmp_path):
    _, generator = models
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = sample("--generator", generator, "--seeds", "0-10", "--outdir", str(tmp_path / "two"), "--npz",
               "--metrics", "fd_lenet", "--batch", "4",
               launcher=["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)],
               env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    r1 = sample("--generator", generator, "--seeds", "0-10", "--outdir", str(tmp_path / "one"), "--npz",
                "--metrics", "fd_lenet")
    assert r1.returncode == 0, r1.stderr
    with np.load(tmp_path / "one" / "images.npz") as a, np.load(tmp_path / "two" / "images.npz") as b:
        assert np.array_equal(a["images"], b["images"])
    (one,), (two,) = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert two["num_samples"] == one["num_samples"] == 11
    assert two["value"] == pytest.approx(one["value"], rel=1e-6)


@pytest.mark.parametrize("args, needle", [
    (["--generator", "/no/such/gen", "--seeds", "0-3"], "/no/such/gen"),
    (["--teacher", "TEACHER", "--seeds", "0-3", "--steps", "0"], "--steps"),
    (["--teacher", "TEACHER", "--seeds", "0-3", "--metrics", "fid_maybe"], "fid_maybe"),
    (["--teacher", "TEACHER", "--seeds", "0-3", "--ref", "/no/ref.npz", "--metrics", "fid"], "/no/ref.npz"),
    (["--generator", "TEACHER", "--seeds", "0-3"], "sid_generator.json"),
])
def test_sample_user_errors(models, tmp_path, args, needle):
    teacher, _ = models
    r = sample(*[teacher if a == "TEACHER" else a for a in args], "--outdir", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
