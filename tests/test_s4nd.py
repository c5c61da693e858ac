"""S4ND 2-D mixer and the v2 denoiser options: FFT path vs direct 2-D convolution, layout, kernel cache under
``.data`` writes, float32 kernel accuracy, unpatchify locality and loading of version 1 checkpoints."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from backbones import s4
from backbones.denoiser import HybridDenoiser
from backbones.s4nd import S4ND, conv2d_separable, conv2d_separable_naive

V2 = dict(s4_2d=True, mlp_conv=True, long_skips=True, final_conv=True)
DATA = Path(__file__).parent / "data"

# ----------------------------------------------------------------------------
# Separable 2-D convolution.


@pytest.mark.parametrize("H,W", [(5, 7), (8, 8), (1, 4)])
def test_separable_fft_conv_matches_direct_convolution(H, W):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    k_row = torch.randn(2, 3, H, generator=g, dtype=torch.float64, requires_grad=True)
    k_col = torch.randn(2, 3, W, generator=g, dtype=torch.float64, requires_grad=True)
    y, y_ref = conv2d_separable(u, k_row, k_col), conv2d_separable_naive(u, k_row, k_col)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * w).sum(), (u, k_row, k_col))
    grads_ref = torch.autograd.grad((y_ref * w).sum(), (u, k_row, k_col))
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


def test_separable_conv_direction_conventions():
    """k0 weighs inputs at or before the output (up / left), k1 those strictly after it (down / right)."""
    u = torch.zeros(1, 1, 4, 5, dtype=torch.float64)
    u[0, 0, 1, 2] = 1.0                                                # one impulse
    k_row = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[10.0, 20.0, 30.0, 40.0]]], dtype=torch.float64)
    k_col = torch.ones(2, 1, 5, dtype=torch.float64)
    y = conv2d_separable(u, k_row, k_col)[0, 0, :, 2]
    # Outputs below the impulse (rows 1, 2, 3) see it through k0[0, 1, 2]; row 0 (above) through k1[0].
    assert y.tolist() == pytest.approx([10.0, 1.0, 2.0, 3.0])

# ----------------------------------------------------------------------------
# The layer.


def test_s4nd_layer_matches_reference_on_a_non_square_grid():
    torch.manual_seed(0)
    H, W, d = 3, 6, 4
    m = S4ND(d, 8, grid=(H, W)).double()
    u = torch.randn(2, H * W, d, dtype=torch.float64)
    k = m.kernel(max(H, W))                                            # (2, 2d, 6): [rows | cols]
    x = u.transpose(1, 2).reshape(2, d, H, W)
    y = conv2d_separable_naive(x, k[:, :d, :H], k[:, d:, :W]) + m.D[:, None, None] * x
    y = y.reshape(2, d, H * W).transpose(1, 2)
    ref = torch.nn.functional.glu(m.out_proj(torch.nn.functional.gelu(y)), dim=-1)
    assert torch.allclose(m(u), ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="token grid"):
        m(u, (W, H))


def test_s4nd_is_translation_equivariant_away_from_borders():
    """Shifting an impulse inside the grid shifts the response: a 2-D convolution, not a raster scan (where the
    impulse's row neighbour and the next row's first token would be lag-1 neighbours)."""
    torch.manual_seed(0)
    H = W = 8
    m = S4ND(2, 8, grid=(H, W)).double()
    m.out_proj.weight.data.zero_()
    m.out_proj.weight.data[:2] = torch.eye(2, dtype=torch.float64)
    m.out_proj.bias.data.zero_()
    m.out_proj.bias.data[2:] = 30.0                                    # GLU gate ~ 1: output ~ GELU(conv)

    def response(r, c):
        u = torch.zeros(1, H, W, 2, dtype=torch.float64)
        u[0, r, c] = 1.0
        return m(u.reshape(1, H * W, 2)).reshape(H, W, 2)

    a, b = response(3, 3), response(4, 5)
    assert torch.allclose(a[1:6, 1:6], b[2:7, 3:8], atol=1e-12)


@pytest.mark.parametrize("cls", ["s4", "s4nd"])
def test_kernel_cache_sees_writes_through_data(cls):
    """diffusers' EMAModel.copy_to / restore write through ``p.data``, which does not bump version counters: the
    cached kernel must still be rebuilt, and equal a fresh one."""
    torch.manual_seed(0)
    m = s4.S4(4, 8, l_max=16) if cls == "s4" else S4ND(4, 8, grid=(4, 4))
    m.requires_grad_(False)
    u = torch.randn(2, 16, 4)
    with torch.no_grad():
        before = m(u)
        m.log_dt.data.copy_(m.log_dt.data + 0.5)                     # no version bump
        m.C.data.mul_(-1.0)
        after = m(u)
        s4.KERNEL_CACHE = False
        try:
            fresh = m(u)
        finally:
            s4.KERNEL_CACHE = True
    assert not torch.allclose(before, after)
    assert torch.equal(after, fresh)


def test_float32_dplr_kernel_accuracy():
    """At L = 16384 with small dt (long kernels), float32 kernels stay within 1e-6 of float64 (relative to the
    largest entry; 2.3e-6 when 1 -+ z were formed in complex64): the roots of unity and 1 -+ z are formed in
    float64 before the cast. At the cifar10 preset's size (256 tokens, d_state 64) within 5e-6."""
    torch.manual_seed(0)
    for H, L, dt in ((4, 16384, (1e-4, 1e-3)), (8, 256, (1e-3, 1e-1))):
        m = s4.S4(H, 64, l_max=L, dt_min=dt[0], dt_max=dt[1])
        with torch.no_grad():
            k32 = m.kernel(L).double()
            k64 = m.double().kernel(L)
        err = float((k32 - k64).abs().amax() / k64.abs().amax())
        assert err < (1e-6 if L == 16384 else 5e-6), (L, err)

# ----------------------------------------------------------------------------
# v2 denoiser.


def test_v2_output_of_a_patch_depends_only_on_that_patch():
    """With the blocks at their zero (identity) initialisation the network maps each token independently, so
    output patch (r, c) depends only on input patch (r, c): a transposed or shuffled unpatchify would move the
    dependence. Checked at a patch with r != c."""
    torch.manual_seed(0)
    net = HybridDenoiser.from_preset("tiny", 16, 1, **{**V2, "final_conv": False})
    with torch.no_grad():
        for p in net.final_layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    p = net.config.patch_size
    out = net(x, 0.1)
    (g,) = torch.autograd.grad(out[0, 0, 0:p, 2 * p:3 * p].sum(), x)  # output patch (row 0, column 2)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[0:p, 2 * p:3 * p] = True
    assert g[0, 0][mask].abs().sum() > 0 and g[0, 0][~mask].abs().max() == 0


def test_v2_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = HybridDenoiser.from_preset("tiny", 16, 1, label_dim=3, **V2)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.add_(0.05 * torch.randn_like(p))
    net(torch.randn(2, 1, 16, 16), torch.randn(2), torch.tensor([0, 3])).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    assert len(s4.ssm_parameters(net)) == 5                           # the S4ND core is found by name


def test_v2_zero_init_and_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = HybridDenoiser.from_preset("tiny", 16, 1, label_dim=3, **V2)
    x = torch.randn(2, 1, 16, 16)
    assert net(x, 0.3, torch.tensor([1, 3])).abs().max() == 0         # adaLN-Zero: F == 0 at initialisation
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    net.save_pretrained(tmp_path)
    back = HybridDenoiser.from_pretrained(tmp_path)
    assert back.config.s4_2d and back.config.long_skips
    assert torch.equal(net(x, 0.3, torch.tensor([1, 3])), back(x, 0.3, torch.tensor([1, 3])))


def test_version1_checkpoint_loads_and_gives_the_same_outputs():
    """tests/data/hybrid_v1_tiny was written by the version 1 code (no v2 keys in its config.json)."""
    folder = DATA / "hybrid_v1_tiny"
    assert "s4_2d" not in (folder / "config.json").read_text()
    net = HybridDenoiser.from_pretrained(folder)
    assert not net.config.s4_2d and net.skip_linears is None and net.out_conv is None
    io = load_file(folder / "io.safetensors")
    out = net(io["x"], io["c_noise"], io["class_labels"])
    assert torch.allclose(out, io["out"], rtol=0, atol=2e-5)
