"""sid's EDM layers against independent references (float64): resampling filters, noise embeddings, attention;
preconditioner conventions (one-hot labels, fp16 only on CUDA); the paper's recipes load with the schema."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from edm_snapshots import TINY, make_denoiser, write_snapshot

from backbones.edm_layers import Conv2d, FourierEmbedding, GroupNorm, PositionalEmbedding, UNetBlock
from sid.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Resampling.


def test_box_filter_is_average_pool_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 1]).double()
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=[1, 1]).double()
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=0, atol=1e-12)


def test_binomial_filter_downsampling_by_explicit_sums():
    """[1,3,3,1] / 8 in each direction, zero padding 1, stride 2, written as loops over numpy arrays."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    out = Conv2d(2, 2, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).double()(x).numpy()
    taps = np.array([1, 3, 3, 1]) / 8
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros((1, 2, 3, 3))
    for c in range(2):
        for i in range(3):
            for j in range(3):
                ref[0, c, i, j] = sum(taps[a] * taps[b] * xp[0, c, 2 * i + a, 2 * j + b] for a in range(4)
                                      for b in range(4))
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_binomial_upsampling_keeps_constants_and_its_adjoint_is_downsampling():
    up = Conv2d(1, 1, kernel=0, up=True, resample_filter=[1, 3, 3, 1]).double()
    down = Conv2d(1, 1, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).double()
    inner = up(torch.ones(1, 1, 8, 8, dtype=torch.float64))[..., 2:-2, 2:-2]
    torch.testing.assert_close(inner, torch.ones_like(inner), rtol=0, atol=1e-12)
    # <up(a), b> = 4 <a, down(b)>: the transposed convolution carries gain 4.
    a, b = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 8, 8, dtype=torch.float64)
    assert float((up(a) * b).sum()) == pytest.approx(4 * float((a * down(b)).sum()), abs=1e-10)


# ----------------------------------------------------------------------------
# Embeddings and attention.


@pytest.mark.parametrize("endpoint", [False, True])
def test_positional_embedding_by_formula(endpoint):
    x = torch.tensor([-1.3, 0.0, 0.7, 250.0], dtype=torch.float64)
    n = 8
    out = PositionalEmbedding(n, endpoint=endpoint)(x)
    for b, xb in enumerate(x.tolist()):
        for i in range(n // 2):
            w = 10000 ** (-i / (n // 2 - (1 if endpoint else 0)))
            assert float(out[b, i]) == pytest.approx(math.cos(xb * w), abs=1e-6)
            assert float(out[b, n // 2 + i]) == pytest.approx(math.sin(xb * w), abs=1e-6)


def test_fourier_embedding_by_formula():
    emb = FourierEmbedding(6, scale=16).double()
    x = torch.tensor([0.1, -0.45], dtype=torch.float64)
    out = emb(x)
    for b, xb in enumerate(x.tolist()):
        for i, f in enumerate(emb.freqs.tolist()):
            assert float(out[b, i]) == pytest.approx(math.cos(2 * math.pi * f * xb), abs=1e-9)
            assert float(out[b, 3 + i]) == pytest.approx(math.sin(2 * math.pi * f * xb), abs=1e-9)


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=8, attention=True, num_heads=2).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    qkv = block.qkv(x).reshape(2, 2, 8, 3, 16)  # (B, heads, channels per head, q/k/v, HW)
    q, k, v = (qkv[:, :, :, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, c)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 16, 4, 4)
    torch.testing.assert_close(block.attention(x), ref, rtol=0, atol=1e-12)


def test_group_norm_group_count():
    assert GroupNorm(16).num_groups == 4 and GroupNorm(256).num_groups == 32 and GroupNorm(128).num_groups == 32


# ----------------------------------------------------------------------------
# Preconditioner conventions.


def test_integer_labels_are_one_hot_and_none_is_zeros():
    D = make_denoiser(*TINY["ddpmpp_cond_edm"])
    x, sigma = torch.randn(3, 3, 8, 8), torch.full((3, 1, 1, 1), 1.5)
    labels = torch.tensor([0, 4, 9])
    with torch.no_grad():
        torch.testing.assert_close(D(x, sigma, labels), D(x, sigma, F.one_hot(labels, 10).float()))
        torch.testing.assert_close(D(x, sigma, None), D(x, sigma, torch.zeros(3, 10)))
        # A scalar sigma broadcasts over the batch.
        torch.testing.assert_close(D(x, 1.5, labels), D(x, sigma, labels))


def test_use_fp16_is_fp32_on_cpu():
    a = make_denoiser(*TINY["adm_cond_edm"])
    assert a.use_fp16
    b = make_denoiser(TINY["adm_cond_edm"][0], {**TINY["adm_cond_edm"][1], "use_fp16": False})
    x, sigma, c = torch.randn(2, 3, 8, 8), torch.full((2, 1, 1, 1), 0.5), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(a(x, sigma, c), b(x, sigma, c))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_use_fp16_runs_half_on_cuda():
    a = make_denoiser(*TINY["adm_cond_edm"]).cuda()
    b = make_denoiser(TINY["adm_cond_edm"][0], {**TINY["adm_cond_edm"][1], "use_fp16": False}).cuda()
    x, sigma, c = torch.randn(2, 3, 8, 8).cuda(), torch.full((2, 1, 1, 1), 0.5).cuda(), torch.tensor([1, 2]).cuda()
    with torch.no_grad():
        y16, y32 = a(x, sigma, c), b(x, sigma, c)
    assert y16.dtype == torch.float32 and not torch.equal(y16, y32)
    torch.testing.assert_close(y16, y32, rtol=0, atol=2e-2)


# ----------------------------------------------------------------------------
# The paper's recipes.

RECIPES = {  # file: (teacher file, batch, lr, alpha, precision, ema half-life kimg)
    "edm_cifar10_uncond.yaml": ("edm-cifar10-32x32-uncond-vp.pkl", 256, 1e-5, 1.2, "fp32", 500),
    "edm_cifar10_cond.yaml": ("edm-cifar10-32x32-cond-vp.pkl", 256, 1e-5, 1.2, "fp32", 500),
    "edm_imagenet64_cond.yaml": ("edm-imagenet-64x64-cond-adm.pkl", 8192, 4e-6, 1.2, "fp16", 2000),
    "edm_ffhq64.yaml": ("edm-ffhq-64x64-uncond-vp.pkl", 512, 1e-5, 1.2, "fp16", 500),
    "edm_afhqv2_64.yaml": ("edm-afhqv2-64x64-uncond-vp.pkl", 512, 5e-6, 1.0, "fp16", 500),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_load_with_the_schema(tmp_path, name):
    path = os.path.join(ROOT, "configs", "sid", name)
    teacher_file, batch, lr, alpha, precision, halflife = RECIPES[name]
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    assert os.path.basename(raw["teacher"]) == teacher_file
    pkl = write_snapshot(tmp_path / "t.pkl", make_denoiser(*TINY["ddpmpp_uncond_vp"]), str(tmp_path / "flag"))
    cfg = load_config(path, [f"teacher={pkl}"])
    assert (cfg.kind, cfg.batch_size, cfg.mixed_precision, cfg.ema.halflife_kimg) == ("sid", batch, precision, halflife)
    assert cfg.sid.lr_generator == cfg.sid.lr_fake_score == lr and cfg.sid.alpha == alpha
    assert (cfg.sid.tmax, cfg.sid.sigma_init, cfg.sid.betas) == (800, 2.5, [0.0, 0.999])
    assert cfg.eval.metrics == ["fid"] and cfg.eval.num_samples == 50000
    assert cfg.batch_size % (4 * cfg.accum_steps) == 0
