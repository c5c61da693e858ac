"""benchmarks/bench_recipe.py: the k-NN precision/recall and the within-class spread on cases with known answers,
and the script end to end on a tiny generator folder (JSON keys, the teacher cache, the error for a run with no
generator)."""

import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.bench_recipe import class_spread, knn_radii, precision_recall, run_curve  # noqa: E402


def test_knn_radius_is_distance_to_kth_other_point():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    # Neighbours of 0: 1 (d 1), 3 (d 3), 7; of 7: 3 (d 4), 1 (d 6).
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_identical_disjoint_and_collapsed():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 8, generator=g, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # A collapsed generator (every sample near one real point): all precise, covers almost nothing.
    collapsed = real[:1] + 1e-3 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.05


def test_class_spread_is_one_for_the_data_and_zero_for_one_sample_per_class():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(400, 6, generator=g, dtype=torch.float64)
    labels = torch.arange(400) % 4
    traces = {c: float(feats[labels == c].var(0, unbiased=True).sum()) for c in range(4)}
    assert class_spread(feats, labels, traces) == 1.0
    # Twice the spread in every dimension: variances x4; all of a class identical: 0.
    assert abs(class_spread(2 * feats, labels, traces) - 4.0) < 1e-12
    assert class_spread(labels[:, None].double().expand(-1, 6), labels, traces) == 0.0
    # Classes with fewer than two samples are left out: of labels 0, 1, 2, 3, 0 only class 0 counts.
    only0 = float(feats[[0, 4]].var(0, unbiased=True).sum()) / traces[0]
    assert abs(class_spread(feats[:5], labels[:5], traces) - only0) < 1e-12


def test_script_end_to_end_and_teacher_cache(tmp_path, tiny_teacher_32):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # A "run" whose exported generator is the tiny teacher itself (a generator folder = a denoiser folder plus
    # sid_generator.json), with a stats.jsonl of two ticks.
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_teacher_32, run_dir / "generator")
    (run_dir / "generator" / "sid_generator.json").write_text(json.dumps({"sigma_init": 2.5, "generator_steps": 1}))
    # The last line was cut off mid-write, as a killed run leaves it.
    (run_dir / "stats.jsonl").write_text('{"kimg": 1.0, "sec_per_kimg": 30.0}\n'
                                        '{"kimg": 3.0, "sec_per_kimg": 60.0, "fd_lenet": 50.0}\n{"kimg": 4.0, "fd_')
    cache, out = tmp_path / "teacher.json", tmp_path / "recipe.json"
    cmd = [sys.executable, "benchmarks/bench_recipe.py", "--runs", str(run_dir), "--names", "tiny", "--teacher",
           str(tiny_teacher_32), "--teacher-steps", "2", "--samples", "40", "--sets", "2", "--teacher-cache",
           str(cache), "--out", str(out), "--threads", "1", "--grid", str(tmp_path / "grid.png"), "--plot",
           str(tmp_path / "plot.png"), "--curves", str(tmp_path / "curves.png")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["name"] == "tiny" and run["nfe"] == 1 and len(run["sets"]) == 2
    assert run["train_s"] == 30.0 + 2 * 60.0
    for row in run["sets"] + result["teacher"]["sets"]:
        assert row["num_samples"] == 40 and row["fd_lenet"] > 0
        assert 0 <= row["agreement"] <= 1 and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert row["spread"] > 0
    assert result["teacher"]["nfe"] == 3 and result["labels"] == "balanced"
    for name in ("grid.png", "plot.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert run_curve(str(run_dir)) == [(3.0, 50.0)] and run_curve(str(tmp_path)) == []
    # With several seed sets the trainer's first set is the curve (the seeds of the teacher's first-set line).
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "stats.jsonl").write_text('{"kimg": 2.0, "fd_lenet": 40.0, "fd_lenet_set0": 35.0, "fd_lenet_set1": 45.0}\n')
    assert run_curve(str(sets)) == [(2.0, 35.0)]
    assert "| tiny | 1 |" in proc.stdout
    # The second call reads the teacher's rows from the cache (no "teacher set" lines printed).
    cached = json.loads(cache.read_text())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "teacher set" not in proc.stdout
    assert json.loads(cache.read_text()) == cached
    # A folder without a generator: one sentence, exit 2.
    proc = subprocess.run(cmd[:3] + [str(tmp_path)] + cmd[4:], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "has no exported generator" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd + ["--sets", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--sets is 0" in proc.stderr and "Traceback" not in proc.stderr
    # A guided teacher alone: its own cache entry, twice the NFE, labelled in the table.
    proc = subprocess.run(cmd[:2] + cmd[6:-6] + ["--teacher-guidance", "2", "--sets", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["teacher"]["nfe"] == 6 and result["teacher"]["guidance"] == 2 and result["runs"] == []
    assert "| teacher (guidance 2) | 6 |" in proc.stdout
    guided_sets = json.loads(cache.read_text())
    assert len(guided_sets) == 2 and all(len(v["sets"]) for v in guided_sets.values())
    assert result["teacher"]["sets"][0]["fd_lenet"] != cached[next(iter(cached))]["sets"][0]["fd_lenet"]


def test_eval_noise_script_measures_both_label_modes(tmp_path, tiny_teacher_32):
    """bench_eval_noise.py: the same generator's fd_lenet per seed set under balanced and random labels; balanced
    sets hold every class equally often, and the summary is that of the listed values."""
    import numpy as np

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    gen = tmp_path / "generator"
    shutil.copytree(tiny_teacher_32, gen)
    (gen / "sid_generator.json").write_text(json.dumps({"sigma_init": 2.5, "generator_steps": 1}))
    out = tmp_path / "noise.json"
    cmd = [sys.executable, "benchmarks/bench_eval_noise.py", "--runs", str(gen), "--names", "tiny", "--sets", "3",
           "--samples", "30", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    bal, rnd = run["balanced"], run["random"]
    assert bal["class_counts"] == [[3] * 10] * 3 and all(sum(c) == 30 for c in rnd["class_counts"])
    assert rnd["class_counts"] != bal["class_counts"]
    for mode in (bal, rnd):
        v = np.array(mode["fd_lenet"])
        assert len(v) == 3 and (v > 0).all()
        assert mode["std"] == np.std(v, ddof=1) and mode["median"] == np.median(v)
    assert bal["fd_lenet"] != rnd["fd_lenet"]
    assert run["std_ratio_random_over_balanced"] == rnd["std"] / bal["std"]
    proc = subprocess.run(cmd[:-4] + ["--sets", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "--sets 1" in proc.stderr and "Traceback" not in proc.stderr
