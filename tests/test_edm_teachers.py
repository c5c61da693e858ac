"""EDM teachers: the code-free snapshot reader (never runs embedded source, refuses foreign callables), sid's EDM
networks against an independent float64 evaluation, convert round trip, SiD and sample.py on an EDM-format teacher,
and bad files as one sentence with exit 2."""

import builtins
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from edm_snapshots import TINY, fake_persistence, make_denoiser, write_snapshot

from backbones.edm_unets import EDM_NETWORKS
from sid.config import UserError
from sid.teachers import load_generator, load_teacher
from sid.teachers.edm_pickle import SnapshotUnpickler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMPY_CORE = "numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core.multiarray"


def snapshot(tmp_path, name="ddpmpp_cond_edm", **kw):
    precond, kwargs = TINY[name]
    D = make_denoiser(precond, kwargs)
    flag = tmp_path / f"{name}.executed"
    path = write_snapshot(tmp_path / f"{name}.pkl", D, str(flag), **kw)
    return path, D, flag


def run(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


def one_sentence(r, needle):
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ----------------------------------------------------------------------------
# The writer emits what real snapshots hold; the reader never executes it.


def test_writer_uses_only_the_globals_of_real_snapshots(tmp_path):
    path, _, flag = snapshot(tmp_path, "ncsnpp_uncond_ve")
    names = set()

    class Recorder(SnapshotUnpickler):
        def find_class(self, module, name):
            names.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as fh:
        data = Recorder(fh).load()
    assert names == {("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch.storage", "_load_from_bytes"),
                     ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                     ("collections", "OrderedDict"), ("torch.nn.modules.container", "ModuleDict"),
                     ("numpy", "dtype"), (NUMPY_CORE, "scalar")}
    assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    assert data["augment_pipe"].state["p"] == 0.12 and type(data["augment_pipe"].state["p"]) is float
    assert data["ema"].class_name == "VEPrecond" and data["ema"].source_chars > 0 and not flag.exists()
    assert "torch_utils" not in sys.modules  # the writer's stand-in module is gone after writing
    with open(path, "rb") as fh:
        assert b"SID_EDM_SENTINEL" in fh.read()


@pytest.mark.parametrize("name", list(TINY))
def test_reader_rebuilds_every_network_without_running_its_source(tmp_path, name):
    path, D, flag = snapshot(tmp_path, name)
    teacher = load_teacher(path)
    assert not flag.exists() and not hasattr(builtins, "SID_EDM_SENTINEL")
    assert "torch_utils" not in sys.modules and not any(m.startswith("_imported_module_") for m in sys.modules)
    assert type(teacher) is type(D) and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (D.img_resolution, D.img_channels,
                                                                                 D.label_dim)
    for k, v in D.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k


def reference_D(precond, kwargs, state, x, sigma, labels):
    """D(x, sigma, labels) in float64: a fresh network with the same tensors, EDM Table 1 written out here."""
    kw = dict(kwargs)
    for k in ("img_resolution", "img_channels", "label_dim", "use_fp16", "model_type", "beta_d", "beta_min", "M",
              "epsilon_t", "sigma_min", "sigma_max", "sigma_data", "C_1", "C_2"):
        kw.pop(k, None)
    C, L = kwargs["img_channels"], kwargs["label_dim"]
    out_channels = C * (2 if precond == "iDDPMPrecond" else 1)
    net = EDM_NETWORKS[kwargs["model_type"]](img_resolution=kwargs["img_resolution"], in_channels=C,
                                             out_channels=out_channels, label_dim=L, **kw)
    net.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    net = net.double().eval()
    s = sigma.double().reshape(-1, 1, 1, 1)
    one = torch.ones_like(s)
    if precond == "EDMPrecond":
        sd = 0.5
        c_skip, c_out, c_in, c_noise = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), \
            1 / (s**2 + sd**2).sqrt(), s.log() / 4
    elif precond == "VPPrecond":
        t = ((0.1**2 + 2 * 19.9 * (1 + s**2).log()).sqrt() - 0.1) / 19.9
        c_skip, c_out, c_in, c_noise = one, -s, 1 / (s**2 + 1).sqrt(), 999 * t
    elif precond == "VEPrecond":
        c_skip, c_out, c_in, c_noise = one, s, one, (s / 2).log()
    else:
        u = state["u"].double()
        j = (s.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(1).reshape(s.shape)
        c_skip, c_out, c_in, c_noise = one, -s, 1 / (s**2 + 1).sqrt(), (999 - j).double()
    onehot = F.one_hot(labels, L).double() if L else None
    aug = torch.zeros(len(x), kw["augment_dim"], dtype=torch.float64) if kw.get("augment_dim") else None
    with torch.no_grad():
        F_x = net(c_in * x.double(), c_noise.flatten(), onehot, aug)[:, :C]
    return c_skip * x.double() + c_out * F_x, c_skip * x.double()


@pytest.mark.parametrize("name", list(TINY))
def test_rebuilt_denoiser_matches_float64_reference(tmp_path, name):
    path, D, _ = snapshot(tmp_path, name)
    precond, kwargs = TINY[name]
    teacher = load_teacher(path)
    g = torch.Generator().manual_seed(1)
    B, C, R = 4, kwargs["img_channels"], kwargs["img_resolution"]
    sigma = torch.tensor([0.002, 0.3, 2.5, 80.0])
    x = torch.randn(B, C, R, R, generator=g) * (1 + sigma.reshape(-1, 1, 1, 1))
    labels = torch.randint(max(kwargs["label_dim"], 1), (B,), generator=g) if kwargs["label_dim"] else None
    with torch.no_grad():
        D_x = teacher(x, sigma.reshape(-1, 1, 1, 1), labels)
    ref, skip = reference_D(precond, kwargs, D.state_dict(), x, sigma, labels)
    assert D_x.dtype == torch.float32 and torch.isfinite(D_x).all()
    # The network part is not trivial: D differs from its skip term.
    assert (ref - skip).abs().mean() > 1e-2
    scale = ref.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1)
    torch.testing.assert_close((D_x.double() / scale), ref / scale, rtol=0, atol=2e-5)
    if kwargs["label_dim"]:
        with torch.no_grad():
            other = teacher(x, sigma.reshape(-1, 1, 1, 1), (labels + 1) % kwargs["label_dim"])
        assert not torch.allclose(other, D_x)


# ----------------------------------------------------------------------------
# Refusals: foreign callables run nothing; the storage-bytes hole stays shut.


class Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def evil_cases(flag):
    import subprocess as sp

    cmd = f"touch {flag}"
    return {
        "os.system": Evil(os.system, cmd),
        "builtins.eval": Evil(builtins.eval, f"open({str(flag)!r}, 'w').write('x')"),
        "subprocess.Popen": Evil(sp.Popen, ["touch", str(flag)]),
        "builtins.exec": Evil(builtins.exec, f"open({str(flag)!r}, 'w').write('x')"),
    }


@pytest.mark.parametrize("where", ["top", "nested"])
@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "subprocess.Popen", "builtins.exec"])
def test_foreign_callables_are_refused_and_run_nothing(tmp_path, case, where):
    flag = tmp_path / "evil.executed"
    evil = evil_cases(flag)[case]
    path = tmp_path / "evil.pkl"
    if where == "top":
        path.write_bytes(pickle.dumps(evil, protocol=4))
    else:  # inside an otherwise valid snapshot, after the network
        write_snapshot(path, make_denoiser(*TINY["ddpmpp_uncond_vp"]), str(tmp_path / "src.executed"),
                       extra={"payload": [1, {"x": evil}]})
    with pytest.raises(UserError, match="refusing") as e:
        load_teacher(str(path))
    assert len(str(e.value).splitlines()) == 1
    assert not flag.exists()


def test_storage_bytes_are_read_with_weights_only(tmp_path):
    """A storage whose torch.save bytes hide a callable: torch's own _load_from_bytes would run it."""
    flag = tmp_path / "evil.executed"
    buf = io.BytesIO()
    torch.save(Evil(os.system, f"touch {flag}"), buf)

    class HiddenStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (buf.getvalue(),)

    path = tmp_path / "hidden.pkl"
    with fake_persistence():
        path.write_bytes(pickle.dumps({"ema": HiddenStorage()}, protocol=4))
    with pytest.raises(UserError, match="plain weights"):
        load_teacher(str(path))
    assert not flag.exists()


def write_bad(tmp_path):
    good, _, _ = snapshot(tmp_path, "ddpmpp_uncond_vp")
    data = open(good, "rb").read()
    bad = {}
    bad["truncated"] = tmp_path / "truncated.pkl"
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["not_a_dict"] = tmp_path / "list.pkl"
    bad["not_a_dict"].write_bytes(pickle.dumps([1, 2, 3]))
    bad["no_ema"] = tmp_path / "noema.pkl"
    bad["no_ema"].write_bytes(pickle.dumps({"loss_fn": None, "dataset_kwargs": {}}))
    bad["unknown_class"] = tmp_path / "unknown.pkl"
    write_snapshot(bad["unknown_class"], make_denoiser(*TINY["ddpmpp_uncond_vp"]), str(tmp_path / "x"),
                   ema_class_name="StyleGAN2Generator")
    bad["garbage"] = tmp_path / "garbage.pkl"
    bad["garbage"].write_bytes(b"not a pickle at all")
    return bad


NEEDLES = {"truncated": "truncated", "not_a_dict": "holds a list", "no_ema": "no 'ema'",
           "unknown_class": "StyleGAN2Generator", "garbage": "not a pickle"}


def test_bad_files_are_one_sentence(tmp_path):
    for kind, path in write_bad(tmp_path).items():
        with pytest.raises(UserError, match=NEEDLES[kind]) as e:
            load_teacher(str(path))
        assert str(path) in str(e.value) and len(str(e.value).splitlines()) == 1, kind


def test_bad_files_exit_2_from_the_command_lines(tmp_path):
    bad = write_bad(tmp_path)  # every kind is one sentence in-process (above); two through the converter here
    for kind in ("truncated", "no_ema"):
        one_sentence(run("-m", "sid.teachers", "convert", str(bad[kind]), str(tmp_path / "out")), NEEDLES[kind])
    r = run("sample.py", "--teacher", str(bad["unknown_class"]), "--seeds", "0-1", "--outdir", str(tmp_path / "s"))
    one_sentence(r, "StyleGAN2Generator")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# convert, sample.py, train.py.


@pytest.mark.parametrize("name", ["ddpmpp_cond_edm", "adm_uncond_iddpm"])
def test_convert_round_trips(tmp_path, name):
    path, _, flag = snapshot(tmp_path, name)
    out = tmp_path / "converted"
    r = run("-m", "sid.teachers", "convert", path, str(out))
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and not flag.exists()
    with open(out / "config.json") as fh:
        assert json.load(fh)["_class_name"] == "EDMNetwork"
    a, b = load_teacher(path), load_teacher(str(out))
    assert type(a) is type(b) and a.init_kwargs == b.init_kwargs
    x, sigma = torch.randn(3, a.img_channels, 8, 8), torch.tensor([0.1, 1.0, 10.0]).reshape(-1, 1, 1, 1)
    labels = torch.tensor([0, 1, 2]) if a.label_dim else None
    with torch.no_grad():
        assert torch.equal(a(x, sigma, labels), b(x, sigma, labels))


def test_sample_py_takes_the_pkl(tmp_path):
    path, _, flag = snapshot(tmp_path, "ddpmpp_cond_edm")
    r = run("sample.py", "--teacher", path, "--steps", "2", "--seeds", "0-5", "--outdir", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert os.path.getsize(tmp_path / "o" / "grid.png") > 100 and not flag.exists()


def test_sid_smoke_run_distils_an_edm_format_teacher(tmp_path):
    path, D, flag = snapshot(tmp_path, "ddpmpp_cond_edm")
    run_dir = tmp_path / "run"
    r = run("train.py", "--config", "configs/sid/smoke.yaml", f"teacher={path}", f"run_dir={run_dir}",
            "data.name=none", "sid.labels=uniform", "mixed_precision=fp32", "grid_seeds=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not flag.exists()
    with open(run_dir / "stats.jsonl") as fh:
        rows = [json.loads(line) for line in fh]
    assert rows[-1]["kimg"] >= 0.048 and rows[-1]["nonfinite_samples"] == 0
    assert all(abs(row["loss_generator"]) > 0 for row in rows)
    G = load_generator(str(run_dir / "generator"))
    assert type(G.denoiser) is type(D)
    # The generator trained: its weights moved away from the teacher's.
    moved = [k for k, v in G.denoiser.state_dict().items() if not torch.equal(v, D.state_dict()[k])]
    assert moved
    with torch.no_grad():
        x = G(torch.randn(2, 3, 8, 8), torch.tensor([3, 7]))
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()


def test_sid_resume_is_exact_with_dropout_in_the_copies(tmp_path):
    """The EDM teacher's copies train with dropout 0.13; seeded per step, a resumed run equals an uninterrupted one."""
    from sid.cli import run as train
    from sid.config import load_config
    from sid.runs import list_checkpoints, load_checkpoint

    path, _, _ = snapshot(tmp_path, "ddpmpp_cond_edm")
    common = ["configs/sid/smoke.yaml"], [f"teacher={path}", "data.name=none", "sid.labels=uniform",
                                          "mixed_precision=fp32", "grid_seeds=4", "checkpoint_kimg=0.016"]
    cfg = lambda run_dir, kimg, *extra: load_config(common[0][0], [*common[1], f"run_dir={run_dir}",
                                                                   f"total_kimg={kimg}", *extra])
    train(cfg(tmp_path / "a", 0.032))
    train(cfg(tmp_path / "b", 0.016))
    train(cfg(tmp_path / "b", 0.032, "resume=auto"))
    a, b = (load_checkpoint(list_checkpoints(str(tmp_path / d / "checkpoints"))[-1]) for d in ("a", "b"))
    assert a["cur_nimg"] == b["cur_nimg"] == 32
    for key in ("generator", "fake_score", "generator_ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
