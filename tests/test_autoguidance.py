"""Autoguidance (sid.teachers.autoguidance): the guided denoiser against its formula on analytic Gaussian
denoisers, the teacher folder's autoguidance.json round trip and its errors, sample.py's NFE count and metrics
record, and SiD with an autoguided teacher (generator and fake score copy the main network)."""

import json
import os
import shutil

import pytest
import torch
from conftest import save_tiny_teacher

from sid.cli import sample_main
from sid.config import UserError, load_config
from sid.teachers import AUTOGUIDANCE_FILE, AutoGuidedDenoiser, load_teacher, main_network
from sid.training import make_accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GaussianDenoiser(torch.nn.Module):
    """The exact denoiser of data ~ N(mean_c, s^2 I) for class c: D = mean_c + s^2 / (s^2 + sigma^2) (x - mean_c)."""

    img_resolution, img_channels, label_dim, sigma_data = 4, 1, 3, 0.5

    def __init__(self, s, means):
        super().__init__()
        self.s, self.means = s, torch.as_tensor(means, dtype=torch.float64)

    def forward(self, x, sigma, class_labels=None):
        m = self.means[class_labels].view(-1, 1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return m + self.s**2 / (self.s**2 + sigma**2) * (x - m)


def test_autoguided_denoiser_is_guide_plus_w_times_the_difference():
    main, guide = GaussianDenoiser(0.3, [-0.5, 0.0, 0.5]), GaussianDenoiser(0.6, [-0.4, 0.1, 0.4])
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64).view(-1, 1, 1, 1)
    c = torch.tensor([0, 1, 2, 1, 0])
    for w in (1.0, 2.0, 3.5):
        d = AutoGuidedDenoiser(main, guide, w)(x, sigma, c)
        s2m, s2g = 0.3**2, 0.6**2
        mm, mg = main.means[c].view(-1, 1, 1, 1), guide.means[c].view(-1, 1, 1, 1)
        want_main = mm + s2m / (s2m + sigma**2) * (x - mm)
        want_guide = mg + s2g / (s2g + sigma**2) * (x - mg)
        torch.testing.assert_close(d, want_guide + w * (want_main - want_guide), rtol=0, atol=1e-12)
    torch.testing.assert_close(AutoGuidedDenoiser(main, guide, 1.0)(x, sigma, c), main(x, sigma, c), rtol=0, atol=1e-15)
    guided = AutoGuidedDenoiser(main, guide, 2.0)
    assert (guided.img_resolution, guided.img_channels, guided.label_dim) == (4, 1, 3)
    assert main_network(guided) is main and main_network(main) is main


def guided_folder(tmp_path, weight=2.0, guide_seed_scale=0.1) -> str:
    """A tiny 16x16 teacher folder whose guide/ is a perturbed copy of it, declared with ``weight``."""
    folder = save_tiny_teacher(str(tmp_path / "teacher"), 16)
    guide = save_tiny_teacher(str(tmp_path / "teacher" / "guide"), 16)
    g = load_teacher(guide)
    with torch.no_grad():
        for p in g.parameters():
            p.mul_(1 + guide_seed_scale)
    g.save_pretrained(guide)
    with open(os.path.join(folder, AUTOGUIDANCE_FILE), "w") as fh:
        json.dump({"guide": "guide", "weight": weight}, fh)
    return folder


def test_teacher_folder_with_a_guide_round_trips(tmp_path):
    folder = guided_folder(tmp_path, weight=2.0)
    t = load_teacher(folder)
    assert isinstance(t, AutoGuidedDenoiser) and t.weight == 2.0 and not t.training
    assert not any(p.requires_grad for p in t.parameters())
    main, guide = load_teacher(folder, autoguidance=1), load_teacher(os.path.join(folder, "guide"))
    assert not isinstance(main, AutoGuidedDenoiser)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sigma, c = torch.tensor([0.2, 1.0, 5.0]).view(-1, 1, 1, 1), torch.tensor([1, 7, 3])
    with torch.no_grad():
        dm, dg = main(x, sigma, c), guide(x, sigma, c)
        assert (dm - dg).abs().max() > 1e-4  # the guide differs from the main network
        torch.testing.assert_close(t(x, sigma, c), dg + 2.0 * (dm - dg), rtol=1e-5, atol=1e-6)
        t3 = load_teacher(folder, autoguidance=3.0)
        assert t3.weight == 3.0
        torch.testing.assert_close(t3(x, sigma, c), dg + 3.0 * (dm - dg), rtol=1e-5, atol=1e-6)


def test_autoguidance_errors_name_the_bad_value(tmp_path, tiny_teacher):
    with pytest.raises(UserError, match="names no guide network .* expected 1"):
        load_teacher(tiny_teacher, autoguidance=2.0)
    assert not isinstance(load_teacher(tiny_teacher, autoguidance=1.0), AutoGuidedDenoiser)
    with pytest.raises(UserError, match="the autoguidance weight is -1.0, expected a number > 0"):
        load_teacher(tiny_teacher, autoguidance=-1.0)
    folder = tmp_path / "t"
    shutil.copytree(tiny_teacher, folder)
    decl = folder / AUTOGUIDANCE_FILE
    decl.write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        load_teacher(str(folder))
    decl.write_text(json.dumps({"guide": "guide"}))
    with pytest.raises(UserError, match='must be a JSON object with "guide"'):
        load_teacher(str(folder))
    decl.write_text(json.dumps({"guide": "guide", "weight": "two"}))
    with pytest.raises(UserError, match="\"weight\" in .* is 'two', expected a number > 0"):
        load_teacher(str(folder))
    decl.write_text(json.dumps({"guide": "nowhere", "weight": 2}))
    with pytest.raises(UserError, match="names the guide folder 'nowhere', which does not exist"):
        load_teacher(str(folder))
    save_tiny_teacher(str(folder / "guide32"), 32)  # another resolution
    decl.write_text(json.dumps({"guide": "guide32", "weight": 2}))
    with pytest.raises(UserError, match="guide has img_resolution 32 but the main network 16"):
        load_teacher(str(folder))


def test_sample_py_counts_both_networks_and_records_the_weight(tmp_path, capsys):
    folder = guided_folder(tmp_path)
    sample_main(["--teacher", folder, "--steps", "2", "--seeds", "0-3", "--outdir", str(tmp_path / "a")])
    assert "autoguidance 2, 6 NFE" in capsys.readouterr().out  # (2 * 2 - 1) Heun evaluations x 2 networks
    sample_main(["--teacher", folder, "--steps", "2", "--seeds", "0-3", "--outdir", str(tmp_path / "b"),
                 "--autoguidance", "1"])
    out = capsys.readouterr().out
    assert "3 NFE" in out and "autoguidance" not in out
    with pytest.raises(SystemExit) as e:
        sample_main(["--teacher", folder, "--seeds", "0-3", "--outdir", str(tmp_path / "c"), "--autoguidance", "0"])
    assert e.value.code == 2 and "--autoguidance is 0.0, expected a number > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample_main(["--generator", folder, "--seeds", "0-3", "--outdir", str(tmp_path / "d"), "--autoguidance", "2"])
    assert e.value.code == 2 and "--autoguidance is for teachers" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c") and not os.path.exists(tmp_path / "d")  # refused before writing


def test_sid_distils_the_autoguided_teacher_from_copies_of_its_main_network(tmp_path, tiny_teacher):
    from sid.train_sid import SiDLoop

    folder = guided_folder(tmp_path)
    smoke = os.path.join(ROOT, "configs", "sid", "smoke.yaml")
    common = [f"teacher={folder}", "data.name=digits", "mixed_precision=fp32", "total_kimg=0.016"]
    cfg = load_config(smoke, [*common, f"run_dir={tmp_path / 'run'}", "sid.guidance.autoguidance=2"])
    loop = SiDLoop(cfg, make_accelerator(cfg))
    assert isinstance(loop.teacher, AutoGuidedDenoiser) and loop.teacher.weight == 2
    main_state = loop.teacher.main.state_dict()
    for net in (loop.generator_net, loop.fake_score):
        state = net.state_dict()
        assert state.keys() == main_state.keys()
        for k in state:
            torch.testing.assert_close(state[k], main_state[k], rtol=0, atol=0)
    loop.train()
    assert os.path.isdir(tmp_path / "run" / "generator")
    # Default: the main network alone, even when the folder names a guide.
    cfg = load_config(smoke, [*common, f"run_dir={tmp_path / 'plain'}"])
    assert not isinstance(SiDLoop(cfg, make_accelerator(cfg)).teacher, AutoGuidedDenoiser)
    cfg = load_config(smoke, [f"teacher={tiny_teacher}", *common[1:], f"run_dir={tmp_path / 'x'}",
                              "sid.guidance.autoguidance=2"])
    with pytest.raises(UserError, match="names no guide network"):
        SiDLoop(cfg, make_accelerator(cfg))
    with pytest.raises(UserError, match="'sid.guidance.autoguidance' is 0.0, expected a number > 0"):
        load_config(smoke, [*common, "sid.guidance.autoguidance=0"])
