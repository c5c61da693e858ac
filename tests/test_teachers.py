"""Teachers: the diffusers adapter against the scheduler's own x0 prediction; sid folders; bad layouts."""

import json
import os

import pytest
import torch

from sid.config import UserError
from sid.teachers import DiffusersVPDenoiser, load_generator, load_teacher, save_generator


def make_pipeline(folder, prediction_type="epsilon", num_class_embeds=None):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_class_embeds)
    # Random non-zero output weights so the prediction is not trivial.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type,
                              clip_sample=False)
    unet.save_pretrained(os.path.join(folder, "unet"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as fh:
        json.dump({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                   "scheduler": ["diffusers", "DDPMScheduler"]}, fh)
    return unet, scheduler


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_adapter_matches_scheduler_x0(tmp_path, prediction_type):
    unet, scheduler = make_pipeline(str(tmp_path), prediction_type)
    D = load_teacher(str(tmp_path))
    assert isinstance(D, DiffusersVPDenoiser) and not any(p.requires_grad for p in D.parameters())
    abar = scheduler.alphas_cumprod
    torch.manual_seed(1)
    for t in (0, 10, 250, 999):
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        x = torch.randn(2, 1, 8, 8) * (1 + sigma**2) ** 0.5
        x_vp = x / (1 + sigma**2) ** 0.5
        with torch.no_grad():
            out = unet(x_vp, t).sample
            x0 = scheduler.step(out, t, x_vp).pred_original_sample
            D_x = D(x, torch.full((2, 1, 1, 1), sigma))
        torch.testing.assert_close(D_x, x0, rtol=1e-4, atol=1e-4)
        assert float(D.timestep(torch.tensor([sigma]))) == pytest.approx(t, abs=1e-3)


def test_diffusers_adapter_interpolates_and_clamps(tmp_path):
    make_pipeline(str(tmp_path))
    D = load_teacher(str(tmp_path))
    sig = D.log_sigmas.exp()
    # Between table entries: t is linear in log-sigma.
    mid = (sig[100].log() * 0.25 + sig[101].log() * 0.75).exp()
    assert float(D.timestep(mid.view(1))) == pytest.approx(100.75, abs=1e-3)
    # SiD's sigma range (0.002 .. 80) and beyond stays finite; t is clamped into [0, 999].
    for s in (1e-4, 0.002, 80.0, 500.0):
        x = torch.randn(2, 1, 8, 8) * s
        with torch.no_grad():
            assert torch.isfinite(D(x, torch.full((2, 1, 1, 1), s))).all()
        assert 0 <= float(D.timestep(torch.tensor([s]))) <= 999


def test_diffusers_round_trip_and_labels(tmp_path):
    make_pipeline(str(tmp_path / "a"), num_class_embeds=3)
    D = load_teacher(str(tmp_path / "a"))
    assert D.label_dim == 3 and D.img_resolution == 8 and D.img_channels == 1
    x, s, c = torch.randn(2, 1, 8, 8), torch.full((2, 1, 1, 1), 1.0), torch.tensor([0, 2])
    save_generator(D, str(tmp_path / "g"), sigma_init=2.5)
    G = load_generator(str(tmp_path / "g"))
    with torch.no_grad():
        torch.testing.assert_close(G.denoiser(x, s, c), D(x, s, c))
        assert not torch.allclose(D(x, s, torch.tensor([1, 1])), D(x, s, c))
    assert G.init_sigma == 2.5


def test_sid_denoiser_folder(tmp_path):
    from backbones import HybridDenoiser
    from sid import EDMPrecond

    net = EDMPrecond(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=4))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    net.save_pretrained(str(tmp_path / "d"))
    D = load_teacher(str(tmp_path / "d"))
    x, s = torch.randn(2, 1, 16, 16), torch.full((2, 1, 1, 1), 0.7)
    with torch.no_grad():
        torch.testing.assert_close(D(x, s, torch.tensor([1, 3])), net(x, s, torch.tensor([1, 3])))
    assert D.label_dim == 4 and D.img_resolution == 16


def test_bad_teacher_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        load_teacher(str(tmp_path / "file.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(UserError, match="VQModel"):
        load_teacher(str(tmp_path / "other"))
    (tmp_path / "nosched" / "unet").mkdir(parents=True)
    with pytest.raises(UserError, match="scheduler"):
        load_teacher(str(tmp_path / "nosched"))
    # A sid folder whose weights are corrupt.
    (tmp_path / "corrupt").mkdir()
    from backbones import HybridDenoiser

    HybridDenoiser.from_preset("tiny", 16, 1).save_pretrained(str(tmp_path / "corrupt"))
    (tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load"):
        load_teacher(str(tmp_path / "corrupt"))
    with pytest.raises(UserError, match="sid_generator.json"):
        load_generator(str(tmp_path / "corrupt"))
