"""HybridDenoiser version 3 (``conv_channels``): conv U-Net levels around the token blocks."""

import pytest
import torch
import torch.nn.functional as F

from backbones.conv_levels import ConvResBlock, group_count
from backbones.denoiser import HybridDenoiser

V3 = dict(conv_channels=(8, 16), patch_size=1, s4_2d=True, layer_pattern="SM", depth=2)


def perturb_(model, std=0.05, seed=0):
    """Move every zero-initialised parameter off zero so that outputs depend on every input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.add_(std * torch.randn(p.shape, generator=g))
    return model


def test_zero_init_shapes_and_gradients():
    torch.manual_seed(0)
    model = HybridDenoiser.from_preset("tiny", 16, 3, label_dim=4, **V3)
    assert model.grid == (4, 4)                                                  # 16 px halved twice, patch 1
    x, c, y = torch.randn(2, 3, 16, 16), torch.randn(2), torch.tensor([1, 4])
    assert torch.equal(model(x, c, y), torch.zeros_like(x))                     # F == 0 at initialisation
    perturb_(model)
    out = model(x, c, y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 1e-3
    out.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_res_block_matches_written_out_reference():
    torch.manual_seed(0)
    block = perturb_(ConvResBlock(8, 12, cond_dim=5))
    x, c = torch.randn(2, 8, 6, 7), torch.randn(2, 5)
    h = F.conv2d(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias, 1e-6)), block.conv1.weight,
                 block.conv1.bias, padding=1)
    scale, shift = (F.silu(c) @ block.affine.weight.T + block.affine.bias).split(12, dim=1)
    h = F.group_norm(h, 2, block.norm2.weight, block.norm2.bias, 1e-6) * (1 + scale[..., None, None]) \
        + shift[..., None, None]
    h = F.conv2d(F.silu(h), block.conv2.weight, block.conv2.bias, padding=1)
    ref = h + F.conv2d(x, block.skip.weight, block.skip.bias)
    torch.testing.assert_close(block(x, c), ref, atol=1e-5, rtol=1e-5)
    assert [group_count(c) for c in (8, 12, 32, 64, 3)] == [2, 2, 8, 8, 1]


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=3, conv_blocks=2, **V3)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    loaded = HybridDenoiser.from_pretrained(tmp_path).eval()
    assert list(loaded.config.conv_channels) == [8, 16] and loaded.config.conv_blocks == 2
    x, c, y = torch.randn(2, 1, 16, 16), torch.randn(2), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, c, y), model(x, c, y))


def test_labels_change_the_conv_levels():
    torch.manual_seed(0)
    model = perturb_(HybridDenoiser.from_preset("tiny", 16, 1, label_dim=3, **V3)).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        skips_a = model.encoder(x, torch.randn(1, 32))[1]
        skips_b = model.encoder(x, torch.randn(1, 32))[1]
    assert not torch.allclose(skips_a[0], skips_b[0])


def test_errors():
    with pytest.raises(ValueError, match="24 halved 3 times.*patch_size 2"):
        HybridDenoiser.from_preset("tiny", 24, 1, conv_channels=(8, 8, 8), patch_size=2)
    with pytest.raises(ValueError, match="conv_channels"):
        HybridDenoiser.from_preset("tiny", 16, 1, conv_channels=(8, 0))
