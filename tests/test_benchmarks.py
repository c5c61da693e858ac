"""Smoke checks of the benchmark scripts: each starts from the command line on a tiny configuration (hidden
``--smoke``: tiny preset, batch 2, one repeat) and writes a JSON report with the expected keys and positive
numbers. No timing assertions."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--smoke", "--device",
                           "cpu", "--threads", "1", "--out", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("command", "date", "machine", "config", "summary", "presets"):
        assert key in result, key
    for key in ("torch", "device_name", "cpu", "threads", "loadavg_start", "loadavg_end"):
        assert key in result["machine"], key
    assert "--smoke" in result["command"]
    return result, proc.stdout


def assert_timing(row):
    assert row["time_ms"] > 0 and row["cpu_time_ms"] >= 0 and row["repeats"] >= 1
    assert len(row["wall_ms_samples"]) == row["repeats"] and all(v > 0 for v in row["wall_ms_samples"])
    assert row["images_per_s"] > 0


def test_bench_sid_step_smoke(tmp_path):
    result, stdout = run_script("bench_sid_step", tmp_path, "--profile", "--reuse-samples")
    (preset,) = result["presets"]
    assert preset["preset"] == "tiny" and preset["batch"] == 2
    assert set(preset["steps"]) == {f"{who}/{d}" for who in ("ours", "plain", "ours+reuse") for d in ("fp32", "bf16")}
    for row in preset["steps"].values():
        assert_timing(row)
    for dtype in ("fp32", "bf16"):
        assert preset["ratios"][f"ours_over_plain/{dtype}"] > 0
        assert preset["ratios"][f"plain_over_ours_reuse/{dtype}"] > 0
        parts = preset["parts"][dtype]
        assert len(parts["parts"]) == 7 and parts["sum_ms"] > 0
        assert all(r["time_ms"] > 0 for r in parts["parts"].values())
        profile = preset["profiles"][dtype]
        assert len(profile["top_ops"]) == 15 and profile["top_ops"][0]["cpu_ms_per_step"] > 0
        assert any(r["name"] == "sid::S4.kernel" for r in profile["labelled_ranges"])
    assert [r["dtype"] for r in result["summary"]] == ["fp32", "bf16"]
    assert all(r["ours_images_per_s"] > 0 and r["plain_images_per_s"] > 0 and r["ours_reuse_images_per_s"] > 0
               for r in result["summary"])
    assert "ours/fp32" in stdout and "top ops by self CPU time" in stdout


def test_bench_sampling_smoke(tmp_path):
    result, stdout = run_script("bench_sampling", tmp_path)
    (preset,) = result["presets"]
    assert preset["preset"] == "tiny" and preset["batch"] == 2 and preset["heun_nfe"] == 35
    assert set(preset["samplers"]) == {f"{s}/{d}" for s in ("one-step", "heun", "heun-no-kernel-cache")
                                      for d in ("fp32", "bf16")}
    for row in preset["samplers"].values():
        assert_timing(row)
    for dtype in ("fp32", "bf16"):
        assert preset["ratios"][dtype]["speedup"] > 0 and preset["ratios"][dtype]["kernel_cache_speedup"] > 0
    assert "one-step is" in stdout


@pytest.mark.parametrize("name", ["bench_sid_step", "bench_sampling"])
def test_bad_arguments_exit_2(name):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), "--dtypes", "fp8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "fp8" in proc.stderr


def test_bench_quality_smoke(tmp_path, tiny_teacher_32):
    """bench_quality on a tiny random 32x32 teacher: the teacher's fd_lenet, a curve from kimg 0, the PNGs."""
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_quality.py"), "--smoke",
                           "--threads", "1", "--teacher", tiny_teacher_32, "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["teacher"]["nfe"] == 35 and result["teacher"]["fd_lenet"] > 0
    kimgs = [r["kimg"] for r in result["curve"]]
    assert kimgs[0] == 0 and kimgs[-1] == 0.032 and len(kimgs) == 3
    assert all(r["fd_lenet"] > 0 for r in result["curve"])
    for agreement in (result["teacher"]["class_agreement"], result["summary"]["generator_class_agreement"]):
        assert 0 <= agreement <= 1
    assert result["summary"]["final_fd_lenet"] == result["curve"][-1]["fd_lenet"]
    assert (tmp_path / "q.png").stat().st_size > 0 and (tmp_path / "q_grids.png").stat().st_size > 0


def test_bench_backbones_smoke(tmp_path):
    """bench_backbones on tiny layers: every layer and kernel timed, the naive kernel only where asked, ratios and
    latent sizes consistent with the rows they come from."""
    out = tmp_path / "bench_backbones.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_backbones.py"), "--smoke",
                           "--device", "cpu", "--threads", "1", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert "--smoke" in result["command"] and result["config"]["smoke"]
    assert {(r["layer"], r["L"]) for r in result["layers"]} == {(k, L) for k in ("S4", "MLA", "MHA") for L in (64, 256)}
    assert all(r["time_ms"] > 0 and r["saved_activation_mb"] > 0 for r in result["layers"])
    k64, k256 = result["s4_kernels"]
    assert k64["naive_ms"] > 0 and k64["naive_over_dplr"] == pytest.approx(k64["naive_ms"] / k64["dplr_ms"])
    assert k256["naive_ms"] is None and k256["naive_over_dplr"] is None
    assert k256["dplr_over_diag"] == pytest.approx(k256["dplr_ms"] / k256["diag_ms"])
    for row in (k64, k256):
        for kernel in ("dplr", "diag"):
            whole, chunked = row[f"{kernel}_grad_whole_ms"], row[f"{kernel}_grad_chunked_ms"]
            assert row[f"{kernel}_chunk_speedup"] == pytest.approx(whole / chunked)
    exps = result["s4_kernel_exponents"]
    assert exps["naive"] is None and exps["dplr"] is not None and exps["diag"] is not None  # naive: one length
    assert {r["preset"]: r["ratio"] for r in result["latent_sizes"]}["small"] == pytest.approx(80 / 256)
    assert [(r["preset"], r["dtype"]) for r in result["presets"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    assert all(r["chunk_speedup"] > 0 and r["fwd_ms"] > 0 for r in result["presets"])
    assert "naive/dplr" in proc.stdout


def test_bench_teacher_trains_and_measures_candidates_and_a_folder(tmp_path):
    """Two candidates (v1 and the UNet anchor) for one step each, then --eval of a copy of the shipped teacher: the
    JSON, the table, the grids and the appended metrics.jsonl lines (seed set A first, then B, then agreement)."""
    import shutil

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "benchmarks", "bench_teacher.py")
    common = ["--samples", "8", "--steps", "2", "--threads", "1", "--timing-batch", "2", "--val-samples", "64"]
    out = tmp_path / "bt"
    proc = subprocess.run([sys.executable, script, "--candidates", "v1,unet", "--minutes", "0.001", "--batch", "4",
                           "--out", str(out), *common], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "bt.json").read_text())
    rows = {r["candidate"]: r for r in result["results"]}
    assert set(rows) == {"v1", "unet"}
    for r in rows.values():
        assert r["steps"] >= 1 and r["params"] > 1e6 and r["ms_per_image"] > 0 and r["val_loss"] > 0
        assert r["fd_lenet_A"] > 0 and r["fd_lenet_B"] > 0 and 0 <= r["class_agreement"] <= 1
        assert (tmp_path / f"bt_{r['candidate']}.png").is_file()
    assert "| unet |" in (tmp_path / "bt.md").read_text()

    teacher = tmp_path / "teacher"
    shutil.copytree(os.path.join(ROOT, "assets", "teachers", "mnist5k"), teacher)
    before = (teacher / "metrics.jsonl").read_text().splitlines()
    proc = subprocess.run([sys.executable, script, "--eval", str(teacher), "--out", str(out), *common], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    added = [json.loads(x) for x in (teacher / "metrics.jsonl").read_text().splitlines()[len(before):]]
    assert [(r["metric"], r["seeds"]) for r in added] == [("fd_lenet", "0-7"), ("fd_lenet", "8-15"),
                                                          ("class_agreement", "0-15")]
    assert added[0]["num_samples"] == 8 and added[0]["nfe"] == 3 and added[2]["num_samples"] == 16


def test_bench_backbones_s4_vs_mha_section(tmp_path):
    """--sections s4_vs_mha alone: S4, the S4 of the earlier commit (same weights, from git) and
    torch.nn.MultiheadAttention timed interleaved at each length; the ratios are those of the rows' medians."""
    out = tmp_path / "s4_vs_mha.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_backbones.py"), "--smoke",
                           "--device", "cpu", "--threads", "1", "--sections", "s4_vs_mha", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["config"]["sections"] == ["s4_vs_mha"] and "layers" not in result and "presets" not in result
    rows = result["s4_vs_mha"]
    assert [r["L"] for r in rows] == [64, 256] == [r["L"] for r in result["s4_vs_mha_summary"]]
    for r in rows:
        t = {k: v["time_ms"] for k, v in r["layers"].items()}
        assert set(t) == {"S4", "S4_before", "MHA"} and all(v > 0 for v in t.values())
        assert all(v["repeats"] == len(v["wall_ms_samples"]) >= 2 for v in r["layers"].values())
        assert r["s4_over_mha"] == pytest.approx(t["S4"] / t["MHA"])
        assert r["s4_speedup_vs_before"] == pytest.approx(t["S4_before"] / t["S4"])
    assert "S4/MHA" in proc.stdout


def test_gpu_sh_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu.sh --cpu --quick: the prepared GPU run on tiny sizes, through the shell script (dependency
    check, no install needed here), writing one JSON with every measurement."""
    out = tmp_path / "gpu.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SID_WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--cpu", "--quick", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["config"]["quick"] and result["config"]["device"] == "cpu"
    assert result["machine"]["peak_bf16_tflops"] is None
    assert [r["name"] for r in result["sid_steps"]] == ["sid/tiny", "sid/edm_ddpmpp"]
    for row in [*result["sid_steps"], result["teacher_training"]]:
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["time_ms"] / 1e3))
        assert row["flops_per_step"] > 0 and row["peak_mem_mb"] > 0 and row["mfu"] is None
    assert result["sid_steps"][1]["teacher_params"] > result["sid_steps"][0]["teacher_params"] > 0
    assert [r["L"] for r in result["s4_vs_attention"]] == [64, 256]
    for r in result["s4_vs_attention"]:
        assert set(r["layers"]) == {"S4", "MHA", "SDPA_flash"} and r["s4_over_mha"] > 0
    vs = result["step_vs_plain"]                      # issue 16's step target: OURS eager and compiled vs PLAIN
    assert vs["preset"] == "tiny" and vs["batch"] == 2 and vs["compile"] is None
    for dtype in ("fp32", "bf16"):
        assert vs["ours_compile"][dtype]["ok"], vs["ours_compile"][dtype]
        steps = {k: vs["steps"][f"{k}/{dtype}"]["time_ms"] for k in ("ours", "plain", "ours+compile", "ours+reuse")}
        assert vs["ratios"][f"plain_over_ours_compile/{dtype}"] == pytest.approx(steps["plain"] / steps["ours+compile"])
        assert vs["ratios"][f"plain_over_ours_reuse/{dtype}"] == pytest.approx(steps["plain"] / steps["ours+reuse"])
        assert vs["ratios"][f"ours_over_plain/{dtype}"] == pytest.approx(steps["ours"] / steps["plain"])
    assert "gpu.sh: done" in proc.stdout
    bad = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--cpu", "--bogus"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--bogus" in bad.stderr


def test_bench_gpu_keeps_the_finished_sections_when_a_later_one_fails(tmp_path):
    """bench_gpu rewrites its JSON after every section: when the last section (our step against the plain loop)
    dies, the file still holds the sections before it. Run in a subprocess: the loops set accelerate's global
    state, which must not leak into other tests."""
    out = tmp_path / "gpu.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks import bench_gpu\n"
            "def boom(*args, **kwargs):\n    raise RuntimeError('stopped in the last section')\n"
            "bench_gpu.sid_step_vs_plain = boom\n"
            "bench_gpu.main(['--device', 'cpu', '--quick', '--threads', '1', '--out', sys.argv[2]])\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, ROOT, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "stopped in the last section" in proc.stderr, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {"sid_steps", "s4_vs_attention", "teacher_training", "config"} <= set(result)
    assert "step_vs_plain" not in result and not (tmp_path / "gpu.json.tmp").exists()


def test_gpu_sh_refuses_missing_packages_without_wheels(tmp_path):
    """An interpreter that lacks the run's packages and no wheel directory: one sentence naming them, exit 3, and
    nothing is installed (pip is never reached)."""
    bare = "/usr/bin/python3"
    probe = subprocess.run([bare, "-c", "import torch"], capture_output=True) if os.path.exists(bare) else None
    if probe is None or probe.returncode == 0:
        pytest.skip("needs a python3 without torch at /usr/bin/python3")
    env = {k: v for k, v in os.environ.items() if k != "SID_WHEELS"}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--cpu", "--quick", "--out",
                           str(tmp_path / "x.json")], cwd=ROOT, env=dict(env, PYTHON=bare), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3 and "lacks" in proc.stderr and "torch" in proc.stderr and "--wheels" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_teacher_sh_trains_exports_and_measures_on_cpu(tmp_path):
    """benchmarks/gpu_teacher.sh --cpu --quick: train for a fixed time, stop, export the EMA exactly from the newest
    checkpoint, then measure it on two seed sets, all through the shell script; bad options exit 2."""
    out = tmp_path / "t"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", SID_WHEELS=str(tmp_path / "no-wheels"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_teacher.sh"), "--cpu", "--quick",
                           "--minutes", "1", "--samples", "8", "--outdir", str(out), "--", "network.preset=tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_teacher.sh: done" in proc.stdout
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "metrics.jsonl", "grid.png"):
        assert (out / "denoiser" / name).is_file(), name
    (line,) = [json.loads(x) for x in (out / "denoiser" / "metrics.jsonl").read_text().splitlines()]
    assert line["metric"] == "fd_lenet" and line["num_samples"] == 8 and line["nfe"] == 3
    result = json.loads((out / "teacher_eval.json").read_text())
    assert [s["num_samples"] for s in result["teacher"]["sets"]] == [8, 8]
    # The same seeds and sampler: sample.py's fd_lenet on seeds 0-7 is the first set's.
    assert result["teacher"]["sets"][0]["fd_lenet"] == pytest.approx(line["value"], rel=1e-6)
    # The export is the EMA of the newest checkpoint's length.
    ckpts = sorted((out / "run" / "checkpoints").glob("checkpoint-*.pt"))
    assert ckpts and f"{int(ckpts[-1].stem.split('-')[1]) / 1000:.3f} kimg" in proc.stdout
    for bad in (["--minutes", "x"], ["--samples", "0"], ["--config", str(tmp_path / "none.yaml")], ["--bogus"]):
        p = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_teacher.sh"), "--cpu", *bad], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and bad[0] in p.stderr, (bad, p.stderr)
