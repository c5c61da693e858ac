"""HybridDenoiser: shapes, adaLN-Zero init, save/load round trip, conditioning, scan order, presets, errors."""

import functools

import pytest
import torch
from torch import nn

from backbones import s4
from backbones.blocks import AdaLNBlock
from backbones.denoiser import PRESETS, HybridDenoiser


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def perturb_(model, std=0.05, seed=0):
    """Move the zero-initialised adaLN and final layers off zero so that outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.add_(std * torch.randn(p.shape, generator=g))
    return model

# ----------------------------------------------------------------------------
# Shapes and initialisation.


@pytest.mark.parametrize("res", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_zero_init(res, channels):
    torch.manual_seed(0)
    model = HybridDenoiser.from_preset("tiny", res, channels, label_dim=10, layer_pattern="SMA", depth=3)
    assert model.layers == "SMA"
    x = torch.randn(2, channels, res, res)
    F_x = model(x, torch.randn(2), torch.tensor([3, 10]))
    assert F_x.shape == x.shape
    # adaLN-Zero: F == 0 exactly at initialisation.
    assert torch.equal(F_x, torch.zeros_like(x))
    # Off zero, every output pixel is finite and the output is not trivial.
    F_x = perturb_(model)(x, torch.randn(2), torch.tensor([3, 10]))
    assert torch.isfinite(F_x).all() and F_x.abs().mean() > 1e-3


def test_float64_and_bf16_autocast():
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=2, layer_pattern="SMA", depth=3))
    x, c, y = torch.randn(2, 1, 16, 16), torch.randn(2), torch.tensor([0, 2])
    ref = model(x, c, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, c, y)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    high = model.double()(x.double(), c.double(), y)
    assert high.dtype == torch.float64
    torch.testing.assert_close(high.float(), ref, atol=1e-4, rtol=1e-4)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 3, label_dim=2, layer_pattern="SMA", depth=3))
    model(torch.randn(3, 3, 16, 16), torch.randn(3), torch.tensor([0, 1, 2])).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_pattern_is_tiled_and_s4_scans_alternate():
    model = HybridDenoiser.from_preset("tiny", 16, 1, layer_pattern="SSM", depth=7)
    assert model.layers == "SSMSSMS"
    flags = [b.column_major for b in model.blocks]
    # S layers are blocks 0, 1, 3, 4, 6 -> S4 counts 0..4 -> row, col, row, col, row.
    assert flags == [False, True, False, False, True, False, False]
    assert all(b.uses_grid == (k == "M") for b, k in zip(model.blocks, model.layers, strict=True))


class CumSum(nn.Module):
    """A causal stand-in for S4 that reveals the scan order."""

    def forward(self, x):
        return x.cumsum(dim=1)


def test_column_major_scan_order():
    H, W = 3, 5
    x = torch.arange(H * W, dtype=torch.float64).view(1, H * W, 1)                   # token index
    row = AdaLNBlock(1, CumSum(), mlp_ratio=1.0).mix(x, (H, W))
    col = AdaLNBlock(1, CumSum(), mlp_ratio=1.0, column_major=True).mix(x, (H, W))
    grid = x.view(H, W)
    torch.testing.assert_close(row.view(H, W), grid.reshape(-1).cumsum(0).view(H, W))
    torch.testing.assert_close(col.view(H, W), grid.T.reshape(-1).cumsum(0).view(W, H).T)

# ----------------------------------------------------------------------------
# Save / load.


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 3, label_dim=4, layer_pattern="SMA", depth=3))
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "config.json").exists() and (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = HybridDenoiser.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}
    assert public(loaded.config) == public(model.config)
    assert loaded.config.layer_pattern == "SMA" and loaded.config.q_lora_rank is None
    model.eval()
    x, c = torch.randn(3, 3, 16, 16), torch.randn(3)
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, c, labels), model(x, c, labels))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # The S4 parameters keep their mark for the SSM optimizer group.
    ssm = lambda m: [n for n, p in m.named_parameters() if s4.is_ssm_parameter(p)]
    assert ssm(loaded) == ssm(model) and len(ssm(model)) == 5

# ----------------------------------------------------------------------------
# Conditioning.


def test_labels_matter_after_training():
    torch.manual_seed(0)
    model = HybridDenoiser.from_preset("tiny", 16, 1, label_dim=3, layer_pattern="SM")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(6, 1, 16, 16)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    target = labels.float().view(-1, 1, 1, 1).expand_as(x) - 1                          # depends on the label
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss = (model(x, torch.zeros(6), labels) - target).square().mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        c = torch.zeros(1)
        outs = [model(x[:1], c, torch.tensor([k])) for k in range(3)] + [model(x[:1], c, None)]
    for i in range(4):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-4, (i, j)
    # None means the null class (index label_dim).
    with torch.no_grad():
        assert torch.equal(outs[3], model(x[:1], c, torch.tensor([3])))


def test_c_noise_shapes():
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 1, layer_pattern="MA")).eval()
    x = torch.randn(3, 1, 16, 16)
    c = torch.tensor([0.3, -1.2, 1.7])
    with torch.no_grad():
        ref = model(x, c)
        torch.testing.assert_close(model(x, c.view(3, 1, 1, 1)), ref, atol=0, rtol=0)
        torch.testing.assert_close(model(x, torch.full((3,), 0.5)), model(x, 0.5), atol=0, rtol=0)
        torch.testing.assert_close(model(x, torch.tensor(0.5)), model(x, 0.5), atol=0, rtol=0)
        assert (model(x, c + 0.01) - ref).abs().max() > 1e-5                           # the noise level matters
    with pytest.raises(ValueError, match="c_noise"):
        model(x, torch.zeros(2))

# ----------------------------------------------------------------------------
# Errors.


def test_errors():
    with pytest.raises(ValueError, match="'X'"):
        HybridDenoiser(16, 1, layer_pattern="SXM")
    with pytest.raises(ValueError, match="30.*4"):
        HybridDenoiser(30, 1, patch_size=4)
    model = HybridDenoiser.from_preset("tiny", 16, 3, layer_pattern="M")
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.randn(1, 1, 16, 16), 0.0)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.randn(1, 3, 32, 32), 0.0)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 16, 16), 0.0, torch.tensor([0]))
    with pytest.raises(ValueError, match="tiny"):
        HybridDenoiser.from_preset("huge", 32, 3)

# ----------------------------------------------------------------------------
# Presets.


def test_presets_construct():
    assert set(PRESETS) >= {"tiny", "small", "cifar10", "imagenet64"}
    small = HybridDenoiser.from_preset("small", 32, 1, label_dim=10)
    assert 0.5e6 <= n_params(small) <= 4e6
    assert "S" in small.layers and "M" in small.layers
    F_x = small(torch.randn(2, 1, 32, 32), torch.zeros(2), torch.tensor([1, 2]))
    assert torch.equal(F_x, torch.zeros_like(F_x))


@pytest.mark.parametrize("name, res, labels, lo, hi", [("cifar10", 32, 10, 30e6, 60e6),
                                                       ("imagenet64", 64, 1000, 100e6, 300e6)])
def test_large_presets_parameter_count(name, res, labels, lo, hi, monkeypatch):
    # Build on the meta device (no memory, no init); the HiPPO eigendecomposition needs real values, so it runs on
    # the CPU once per state size.
    dplr_init = functools.cache(s4.dplr_init)

    def dplr_init_on_cpu(N):
        with torch.device("cpu"):
            return dplr_init(N)

    monkeypatch.setattr(s4, "dplr_init", dplr_init_on_cpu)
    with torch.device("meta"):
        model = HybridDenoiser.from_preset(name, res, 3, label_dim=labels)
    assert next(model.blocks[-1].mlp.parameters()).is_meta
    assert lo <= n_params(model) <= hi
