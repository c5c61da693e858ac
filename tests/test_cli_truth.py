"""The command lines tell the truth: what runs (processes x micro-batch x accumulation, device, precision), a
multi-process request that accelerate turned into one process is refused, error messages suggest what train.py
accepts, small-sample metric warnings, reversed seed ranges, mismatched statistics, YAML positions, Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sid.config import UserError, load_config
from sid.runs import list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_sigint():
    # A shell that starts a job in the background (CI without a terminal) leaves SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: give the child the default disposition, as in a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def smoke(teacher, run_dir, *extra):
    return ["train.py", "--config", "configs/sid/smoke.yaml", f"teacher={teacher}", "data.name=digits",
            f"run_dir={run_dir}", "mixed_precision=fp32", *extra]


def test_first_line_states_what_runs(tmp_path, tiny_teacher):
    p = cli(*smoke(tiny_teacher, tmp_path, "accum_steps=2", "total_kimg=0.016"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    first = out.splitlines()[0]
    assert first == "run: 1 process x 4 micro-batch x 2 accumulation = 8 global batch | device cpu | precision fp32"


def test_check_launch_refuses_accelerates_single_process():
    from sid.training import check_launch

    simple = {"ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": "29500"}
    with pytest.raises(UserError, match="--multi_gpu"):
        check_launch(simple)
    check_launch({**simple, "WORLD_SIZE": "2", "RANK": "0"})  # torchrun / accelerate launch --multi_gpu
    check_launch({k: v for k, v in simple.items() if not k.startswith("MASTER")})  # accelerate launch, 1 process
    check_launch({"MASTER_ADDR": "h", "MASTER_PORT": "1"})  # not launched by accelerate


def test_accelerate_launch_two_processes_without_multi_gpu_is_refused(tmp_path, tiny_teacher):
    p = cli("-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *smoke(tiny_teacher, tmp_path))
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--multi_gpu" in lines[0], err
    assert not list_checkpoints(str(tmp_path / "checkpoints"))  # nothing trained


def test_missing_detector_suggests_what_train_py_accepts(tmp_path, tiny_teacher_32):
    from sid.cli import run

    args = [f"teacher={tiny_teacher_32}", "data.name=mnist5k", f"run_dir={tmp_path}", "total_kimg=0.008",
            "batch_size=8", "eval.metrics=[fid]", f"eval.detector={tmp_path / 'missing.pt'}"]
    with pytest.raises(UserError) as e:
        run(load_config(None, args))
    msg = str(e.value)
    assert "eval.detector=PATH" in msg and "'eval.metrics=[]'" in msg and "--detector" not in msg
    # ... and train.py takes both suggestions.
    assert load_config(None, [*args, "eval.metrics=[]"]).eval.metrics == []
    assert load_config(None, [*args, f"eval.detector={tmp_path}"]).eval.detector == str(tmp_path)


def test_small_sample_warnings(capsys):
    from sid.metrics import _warn_small_sample, small_sample_warning

    assert "100 samples" in small_sample_warning("fd_lenet", 100) and "2,000" in small_sample_warning("fd_lenet", 100)
    assert small_sample_warning("fd_lenet", 2000) is None
    assert "10,000 samples" in small_sample_warning("fid", 10000) and "50,000" in small_sample_warning("fid", 10000)
    assert small_sample_warning("fid", 50000) is None
    _warn_small_sample("fid", 123, None)
    _warn_small_sample("fid", 123, None)  # once per count
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: fid over 123 samples")


def test_sample_py_warns_on_small_samples(tiny_teacher_32, tmp_path):
    from sid.teachers import load_teacher, save_generator

    save_generator(load_teacher(tiny_teacher_32), str(tmp_path / "g"), 2.5)
    p = cli("sample.py", "--generator", str(tmp_path / "g"), "--seeds", "0-9", "--outdir", str(tmp_path / "o"),
            "--metrics", "fd_lenet")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "fd_lenet over 10 samples" in warnings[0]


def test_reversed_seed_range():
    from sid.sampling import parse_seeds

    with pytest.raises(ValueError, match="range 5-1 reversed.*1-5"):
        parse_seeds("5-1")
    with pytest.raises(ValueError, match="non-negative"):
        parse_seeds("-3")
    assert parse_seeds("3-3,7") == [3, 7]


def test_metrics_fd_mismatched_dimensions_exit_2(tmp_path):
    from sid.metrics import save_ref

    save_ref(str(tmp_path / "a.npz"), np.zeros(4), np.eye(4))
    save_ref(str(tmp_path / "b.npz"), np.zeros(8), np.eye(8))
    p = cli("-m", "sid.metrics", "fd", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "4-d" in err and "8-d" in err


@pytest.mark.parametrize("text, position", [("kind: [teacher\n", "line 2, column 1"),
                                            ("kind: teacher\n  bad: : x\n", "line 2, column 6")])
def test_yaml_syntax_errors_name_line_and_column(tmp_path, text, position):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(UserError, match=position):
        load_config(str(tmp_path / "c.yaml"))


def test_guidance_on_unconditional_teacher_exit_2(tmp_path):
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    EDMPrecond(HybridDenoiser.from_preset("tiny", 16, 1)).save_pretrained(str(tmp_path / "uncond"))
    p = cli("sample.py", "--teacher", str(tmp_path / "uncond"), "--guidance", "2", "--seeds", "0-1", "--outdir",
            str(tmp_path / "o"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--guidance" in err and "unconditional" in err and "Traceback" not in err


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_teacher):
    p = cli(*smoke(tiny_teacher, tmp_path, "total_kimg=100", "checkpoint_kimg=0.008"))
    deadline = time.time() + 300
    while time.time() < deadline and not list_checkpoints(str(tmp_path / "checkpoints")):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    line = [ln[ln.index("interrupted"):] for ln in err.replace("\r", "\n").splitlines() if "interrupted" in ln]
    assert line and "resume=auto" in line[0] and f"run_dir={tmp_path}" in line[0] and "Traceback" not in err


def test_help_describes_keys_with_the_default_runs_values():
    p = cli("train.py", "--help")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    keys = out.split("keys (key=value")[1].splitlines()[1:]
    rows = {ln.split()[0]: ln for ln in keys if ln.strip()}
    assert "kind" in rows and "sid.alpha" in rows and "trackers" in rows and "keep_checkpoints" in rows
    # configs/sid/mnist5k.yaml sets these; the schema's defaults differ (1e-05, halflife, false).
    lr = rows["sid.lr_generator"]
    assert lr.split()[1] == "0.0001" and "learning rate of the generator" in lr
    assert rows["ema.kind"].split()[1] == "power" and rows["sid.sida.enabled"].split()[1] == "true"
    assert "'eval.metrics=[]'" in out and "--multi_gpu" in out
    undocumented = [k for k, ln in rows.items() if len(ln.split()) < 3]
    assert not undocumented, undocumented


def test_keep_checkpoints(tmp_path, tiny_teacher):
    p = cli(*smoke(tiny_teacher, tmp_path, "keep_checkpoints=1"))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert len(list_checkpoints(str(tmp_path / "checkpoints"))) == 1


def test_sample_py_trials_report_mean_std_min(tiny_teacher_32, tmp_path):
    import json

    from sid.teachers import load_teacher, save_generator

    save_generator(load_teacher(tiny_teacher_32), str(tmp_path / "g"), 2.5)

    def measure(seeds, out, *extra):
        p = cli("sample.py", "--generator", str(tmp_path / "g"), "--seeds", seeds, "--outdir", str(tmp_path / out),
                "--metrics", "fd_lenet", *extra)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        return [json.loads(ln) for ln in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    rows = measure("0-4", "t", "--trials", "3")
    trials, (summary,) = rows[:3], rows[3:]
    assert [r["seeds"] for r in trials] == ["0-4", "5-9", "10-14"] and all(r["num_samples"] == 5 for r in trials)
    # Each trial is the plain measurement of its seed set.
    (second,) = measure("5-9", "s")
    assert trials[1]["value"] == pytest.approx(second["value"], rel=1e-9)
    values = np.array([r["value"] for r in trials])
    assert summary["trials"] == 3 and summary["num_samples"] == 5
    assert summary["mean"] == pytest.approx(values.mean()) and summary["min"] == pytest.approx(values.min())
    assert summary["std"] == pytest.approx(values.std(ddof=1))
    p = cli("sample.py", "--generator", str(tmp_path / "g"), "--seeds", "0-4", "--outdir", str(tmp_path / "x"),
            "--trials", "2")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--trials" in err and "Traceback" not in err
