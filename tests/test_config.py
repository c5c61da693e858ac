"""Config precedence (schema < YAML < command line) and every error path; the entry points' exit codes."""

import os
import subprocess
import sys

import pytest

from sid.config import Config, UserError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_precedence_schema_yaml_cli(tmp_path):
    base = load_config(None, ["kind=teacher"])
    assert base.batch_size == Config().batch_size and base.sid.alpha == 1.2
    f = write(tmp_path, "kind: teacher\nbatch_size: 64\nsid:\n  alpha: 1.0\n  lr_generator: 1e-4\n")
    from_yaml = load_config(f)
    assert from_yaml.batch_size == 64 and from_yaml.sid.alpha == 1.0 and from_yaml.sid.lr_generator == 1e-4
    assert from_yaml.seed == Config().seed  # untouched keys keep the schema default
    both = load_config(f, ["batch_size=16", "sid.betas=[0.5,0.9]", "network.overrides.d_model=48"])
    assert both.batch_size == 16 and both.sid.alpha == 1.0 and both.sid.betas == [0.5, 0.9]
    assert both.network.overrides == {"d_model": 48}
    assert isinstance(both.sid.lr_generator, float)


def test_top_level_keys_exist():
    cfg = Config()
    for key in ("kind", "run_dir", "resume", "seed", "total_kimg", "batch_size", "checkpoint_kimg", "teacher"):
        assert hasattr(cfg, key)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["no_such.key=1"], "'no_such.key'"),
        (["sid.nope=1"], "'sid.nope'"),
        (["batch_size=abc"], "'batch_size'"),
        (["batch_size=0"], "'batch_size' is 0"),
        (["batch_size=-4"], "'batch_size' is -4"),
        (["train.lr=0"], "'train.lr' is 0"),
        (["sid.lr_generator=-1e-5"], "'sid.lr_generator'"),
        (["sid.lr_fake_score=0"], "'sid.lr_fake_score'"),
        (["sid.tmax=0"], "'sid.tmax' is 0"),
        (["sid.tmax=1001"], "(0, 1000]"),
        (["sid.P_std=0"], "'sid.P_std' is 0"),
        (["sid.P_mean=nan"], "'sid.P_mean' is nan"),
        (["sid.fake_score_sigma=uniform"], "'sid.fake_score_sigma' is 'uniform', expected lognormal or generator"),
        (["sid.score_grad=maybe"], "'sid.score_grad' on the command line got 'maybe', expected bool"),
        (["batch_size=30", "accum_steps=4"], "multiple of processes x accum_steps"),
        (["kind=distill"], "'kind' is 'distill'"),
        (["mixed_precision=no"], "'mixed_precision'"),
        (["data.name=imagenet"], "'data.name'"),
        (["data.name=npz"], "'data.path' is required"),
        (["data.name=npz", "data.path=/no/such/file.npz"], "/no/such/file.npz"),
        (["resume=/no/such/ckpt.pt"], "/no/such/ckpt.pt"),
        (["eval.metrics=[fid,nope]"], "'nope'"),
        (["justaword"], "key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(UserError) as e:
        load_config(None, ["kind=teacher", *overrides])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_sid_requires_existing_teacher():
    with pytest.raises(UserError, match="'teacher' is required"):
        load_config(None, ["kind=sid"])
    with pytest.raises(UserError, match="/missing/teacher"):
        load_config(None, ["kind=sid", "teacher=/missing/teacher"])


def test_batch_divisible_by_processes():
    cfg = load_config(None, ["kind=teacher", "batch_size=9", "accum_steps=3"])
    validate(cfg, num_processes=1)
    with pytest.raises(UserError, match="2 x 3"):
        validate(cfg, num_processes=2)


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="unknown config key 'bogus'"):
        load_config(write(tmp_path, "kind: teacher\nbogus: 3\n"))
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "kind: [teacher\n"))
    with pytest.raises(UserError, match="mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_shipped_configs_load():
    for sub in ("teacher", "sid"):
        folder = os.path.join(ROOT, "configs", sub)
        for name in sorted(os.listdir(folder)):
            try:
                cfg = load_config(os.path.join(folder, name))
            except UserError as e:  # configs for GPU runs may point at data that is not on this machine
                assert "does not exist" in str(e) or "required" in str(e), (name, e)
                continue
            assert cfg.kind == sub


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)


def test_help_exits_zero():
    for script in ("train.py", "sample.py"):
        r = run_cli(script, "--help")
        assert r.returncode == 0, r.stderr
        assert "usage" in r.stdout
    assert "sid.tmax" in run_cli("train.py", "--help").stdout


def test_cli_bad_key_exit_2_one_line():
    r = run_cli("train.py", "no_such.key=1")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no_such.key" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_sample_cli_bad_seeds_exit_2():
    r = run_cli("sample.py", "--teacher", "/no/such/teacher", "--seeds", "9-1", "--outdir", "/tmp/x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "9-1" in r.stderr and "reversed" in r.stderr
    r = run_cli("sample.py", "--teacher", "/no/such/teacher", "--seeds", "0-3", "--outdir", "/tmp/x")
    assert r.returncode == 2 and "/no/such/teacher" in r.stderr and "Traceback" not in r.stderr


def test_torchvision_ops_imports():
    import diffusers  # noqa: F401
    import torchvision.ops  # noqa: F401

    import backbones  # noqa: F401
    import sid  # noqa: F401


def test_shipped_assets_resolve_from_another_directory(tmp_path, monkeypatch):
    """Relative asset paths of the defaults (eval.lenet, teacher) fall back to the project's copy."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["kind=teacher", "data.name=digits"])
    assert os.path.isabs(cfg.eval.lenet) and os.path.isfile(cfg.eval.lenet)
    (tmp_path / "assets" / "detectors").mkdir(parents=True)
    (tmp_path / "assets" / "detectors" / "lenet_mnist5k.safetensors").write_bytes(b"local")
    local = load_config(None, ["kind=teacher", "data.name=digits"])
    assert local.eval.lenet == "assets/detectors/lenet_mnist5k.safetensors"  # the working directory wins
