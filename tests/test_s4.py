"""S4 layer: fast paths against naive references (forward and grad, float64), recurrence, causality, dtypes."""

import copy
import math

import pytest
import torch

from backbones import s4

SSM_NAMES = {"log_dt", "log_A_real", "A_imag", "B", "P"}


def make(kernel="dplr", bidirectional=True, d_model=3, d_state=8, l_max=None, seed=0, **kw):
    torch.manual_seed(seed)
    return s4.S4(d_model, d_state, kernel=kernel, bidirectional=bidirectional, l_max=l_max, dt_min=1e-2, **kw).double()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def grads(out, params, seed=1):
    # Gradient of a random projection of out, so every output entry matters.
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), params)


# ----------------------------------------------------------------------------
# HiPPO-LegS and initializations.


def test_hippo_legs_closed_form():
    N = 7
    A, B = s4.hippo_legs(N)
    assert A.dtype == B.dtype == torch.float64 and A.shape == (N, N) and B.shape == (N,)
    for n in range(N):
        assert B[n] == math.sqrt(2 * n + 1)
        for k in range(N):
            expected = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else -(n + 1) if n == k else 0.0
            assert abs(A[n, k].item() - expected) < 1e-12


@pytest.mark.parametrize("N", [8, 16])
def test_dplr_init_is_unitary_change_of_basis_of_hippo(N):
    Lambda, P, B = s4.dplr_init(N)
    assert Lambda.shape == P.shape == B.shape == (N // 2,)
    # Normal part: real parts exactly -1/2, kept half has negative imaginary parts.
    assert torch.allclose(Lambda.real, torch.full_like(Lambda.real, -0.5)) and bool((Lambda.imag < 0).all())
    # Markov parameters v^T A^k B are basis invariant: compare the conjugate-extended DPLR system with HiPPO.
    A_h, B_h = s4.hippo_legs(N)
    P_h = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)
    A, B_e, P_e = (x[0] for x in s4.dplr_dense(Lambda[None], P[None], B[None]))
    for k in range(6):
        Ak_h, Ak = torch.linalg.matrix_power(A_h, k), torch.linalg.matrix_power(A, k)
        for v_h, v in ((B_h, B_e), (P_h, P_e)):
            ref = v_h @ Ak_h @ B_h
            assert abs((v.conj() @ Ak @ B_e - ref).item()) < 1e-9 * abs(ref.item())


def test_s4d_init_and_dt_range():
    N = 16
    n = torch.arange(N // 2, dtype=torch.float64)
    lin, inv = s4.s4d_init(N, "lin"), s4.s4d_init(N, "inv")
    assert torch.allclose(lin, torch.complex(-0.5 * torch.ones_like(n), math.pi * n))
    assert torch.allclose(inv, torch.complex(-0.5 * torch.ones_like(n), N / math.pi * (N / (2 * n + 1) - 1)))
    m = s4.S4(256, N, kernel="diag", diag_init="inv", dt_min=1e-3, dt_max=1e-1)
    A = torch.complex(-m.log_A_real.exp(), m.A_imag).to(torch.complex128)
    assert torch.allclose(A, inv.expand(256, -1).to(A.dtype), rtol=1e-6)
    assert torch.allclose(torch.view_as_complex(m.B), torch.ones(256, N // 2, dtype=torch.complex64))
    assert m.log_dt.min() >= math.log(1e-3) and m.log_dt.max() <= math.log(1e-1)
    assert m.log_dt.max() - m.log_dt.min() > 0.8 * (math.log(1e-1) - math.log(1e-3))


# ----------------------------------------------------------------------------
# Fast kernels against naive references.


@pytest.fixture(params=["one chunk", "many chunks"])
def chunking(request, monkeypatch):
    """Run a kernel test with the default chunk size (one chunk at these sizes) and with 120-element chunks, which
    for d_model 3 split the products into chunks of 5 (Cauchy, N = 8) or 10 (Vandermonde, M = 4) with a ragged
    last chunk."""
    if request.param == "many chunks":
        monkeypatch.setitem(s4.CHUNK_ELEMENTS, "cpu", 120)
    return request.param


def cauchy_pairs_naive(Y, q, x, alpha, beta, gamma):
    # out[h, r, k] = sum_n Y[h, r, n] / D[h, n, k], D = beta q - alpha - i gamma x, materialised, plain autograd.
    D = beta[:, None, :] * q[:, :, None] - alpha[:, None, :] - 1j * gamma[:, None, :] * x[:, :, None]  # (H, M, K)
    return torch.einsum("hrn,hnk->hrk", Y.to(D.dtype), 1 / D)


def test_cauchy_pairs_matches_materialised_product_and_its_gradients(monkeypatch):
    monkeypatch.setitem(s4.CHUNK_ELEMENTS, "cpu", 2 * 2 * 3 * 7)  # 2 H M = 12: chunks of 7 over K = 23
    g = torch.Generator().manual_seed(0)
    H, R, M, K = 2, 5, 3, 23

    def r(*shape, lo=-1.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).requires_grad_()

    inputs = (r(H, R, M), r(H, M, lo=0.5, hi=2.0), r(H, M, lo=-1.0, hi=-0.1), r(H, K), r(H, K), r(H, K))
    out, ref = s4.cauchy_pairs(*inputs), cauchy_pairs_naive(*inputs)
    assert out.shape == (H, R, K) and out.is_complex() and rel_err(out, ref) < 1e-14
    w = torch.randn(H, R, K, generator=g, dtype=torch.complex128)

    def loss_grads(o):
        return torch.autograd.grad((o * w.conj()).real.sum(), inputs)

    for grad, grad_ref in zip(loss_grads(out), loss_grads(ref), strict=True):
        assert grad.abs().max() > 0 and rel_err(grad, grad_ref) < 1e-13
    assert torch.autograd.gradcheck(s4.cauchy_pairs, inputs)
    # Only the inputs that need a gradient get one; second derivatives are refused, not silently wrong.
    (g_beta,) = torch.autograd.grad(s4.cauchy_pairs(*(t.detach() for t in inputs[:4]), inputs[4], inputs[5].detach())
                                    .abs().sum(), [inputs[4]])
    assert torch.allclose(g_beta, torch.autograd.grad(cauchy_pairs_naive(*inputs).abs().sum(), [inputs[4]])[0])
    (g_Y,) = torch.autograd.grad(s4.cauchy_pairs(*inputs).abs().sum(), [inputs[0]], create_graph=True)
    with pytest.raises(RuntimeError):
        g_Y.abs().sum().backward()


@pytest.mark.parametrize("L", [16, 17, 2])
def test_conjugate_pairs_equal_the_full_cauchy_product(L):
    """One member per conjugate pair (real numerators, scaled real-affine denominators) gives the Cauchy product
    over the whole conjugate-extended state at every rfft frequency, including z = -1 (even L, where s = 0)."""
    g = torch.Generator().manual_seed(0)
    H, R, M = 3, 4, 5
    v = torch.randn(R, H, M, generator=g, dtype=torch.complex128)
    lam = torch.complex(-torch.rand(H, M, generator=g, dtype=torch.float64) - 0.1,
                        30 * torch.randn(H, M, generator=g, dtype=torch.float64))
    dt = torch.tensor([1e-3, 3e-2, 0.7], dtype=torch.float64)
    j = torch.arange(L // 2 + 1, dtype=torch.float64)
    z = torch.polar(torch.ones_like(j), -2 * math.pi * j / L)
    full = s4.cauchy_naive(s4._ext(v), s4._ext(lam), (1 + z) * dt[:, None] / 2, 1 - z)  # (R, H, K)
    alpha, beta, gamma, u, w, s = s4.pair_coefficients(dt, L)
    assert torch.allclose(s, (1 + z) * dt[:, None] / 2, rtol=0, atol=1e-15)
    assert torch.allclose(alpha + beta, torch.ones_like(alpha))  # alpha = phi^2 / (1 + phi^2), beta = 1 / (1 + phi^2)
    Y = torch.cat([2 * v.real, 2 * (v * lam.conj()).real]).transpose(0, 1)  # (H, 2R, M)
    out = s4.cauchy_pairs(Y, lam.abs().square(), lam.real, alpha, beta, gamma)
    pairs = 1j * u[:, None] * out[:, :R] - w[:, None] * out[:, R:]  # (H, R, K)
    assert torch.isfinite(pairs).all() and rel_err(pairs.transpose(0, 1), full) < 1e-13
    # The first half of the frequencies by its own coefficients (as a chunked caller would ask for them).
    half = s4.pair_coefficients(dt, L, 0, L // 4 + 1)
    assert all(torch.equal(a[:, : L // 4 + 1], b) for a, b in zip((alpha, beta, gamma, u, w, s), half, strict=True))


@pytest.mark.parametrize("L", [16, 33])
def test_dplr_kernel_matches_full_state_kernel(L, chunking):
    m = make("dplr", True, d_model=4, l_max=L)
    params = [m.C, m.log_dt, m.log_A_real, m.A_imag, m.B, m.P]
    s = m._continuous()
    k, k_ref = m.kernel(L), s4.dplr_kernel_full(s["A"], s["P"], s["B"], s["C"], s["dt"], L)
    assert rel_err(k, k_ref) < 1e-13
    for g, g_ref in zip(grads(k, params), grads(k_ref, params), strict=True):
        assert rel_err(g, g_ref) < 1e-11


@pytest.mark.parametrize("L, l_max, bidirectional", [(32, 32, False), (33, 33, True), (20, 48, True), (16, None, True)])
def test_dplr_kernel_matches_matrix_powers(L, l_max, bidirectional, chunking):
    m = make("dplr", bidirectional, l_max=l_max)
    params = [m.C, m.log_dt, m.log_A_real, m.A_imag, m.B, m.P]
    k = m.kernel(L)
    s = m._continuous()
    k_ref = s4.dplr_kernel_naive(s["A"], s["P"], s["B"], s["C"], s["dt"], l_max or L)[..., :L]
    assert k.shape == k_ref.shape == (2 if bidirectional else 1, 3, L)
    assert rel_err(k, k_ref) < 1e-11
    for g, g_ref in zip(grads(k, params), grads(k_ref, params), strict=True):
        assert rel_err(g, g_ref) < 1e-9


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_diag_kernel_matches_recurrence(init, chunking):
    m = make("diag", True, diag_init=init)
    params = [m.C, m.log_dt, m.log_A_real, m.A_imag, m.B]
    L = 43  # ragged last chunk with 120-element chunks
    k = m.kernel(L)
    s = m._continuous()
    k_ref = s4.diag_kernel_naive(s["A"], s["B"], s["C"], s["dt"], L)
    assert rel_err(k, k_ref) < 1e-12
    for g, g_ref in zip(grads(k, params), grads(k_ref, params), strict=True):
        assert rel_err(g, g_ref) < 1e-10


@pytest.mark.parametrize("dirs", [1, 2])
def test_fft_conv_matches_direct_conv(dirs):
    torch.manual_seed(0)
    u, k = torch.randn(2, 3, 37, dtype=torch.float64), torch.randn(dirs, 3, 37, dtype=torch.float64)
    assert rel_err(s4.fft_conv(u, k), s4.direct_conv(u, k)) < 1e-12


def test_bidirectional_conv_formula():
    # y_i = sum_{j<=i} k0[i-j] u_j + sum_{j>i} k1[j-i-1] u_j, written out with loops.
    torch.manual_seed(0)
    L = 9
    u, k = torch.randn(1, 2, L, dtype=torch.float64), torch.randn(2, 2, L, dtype=torch.float64)
    y = torch.zeros_like(u)
    for i in range(L):
        for j in range(L):
            y[..., i] += (k[0, :, i - j] if j <= i else k[1, :, j - i - 1]) * u[..., j]
    assert rel_err(s4.fft_conv(u, k), y) < 1e-12
    assert rel_err(s4.direct_conv(u, k), y) < 1e-12


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_bidirectional_layer_is_two_causal_passes(kernel):
    m = make(kernel, True, l_max=24).eval()
    u = torch.randn(2, 24, 3, dtype=torch.float64)
    k0, k1 = m.kernel(24)  # (H, L) each
    x = u.transpose(1, 2)  # (B, H, L)
    # Backward direction: a causal pass over the reversed sequence with the kernel delayed by one step.
    k1_delayed = torch.nn.functional.pad(k1, (1, 0))[:, :24]
    y = s4.direct_conv(x, k0[None]) + s4.direct_conv(x.flip(-1), k1_delayed[None]).flip(-1) + m.D[:, None] * x
    assert rel_err(m(u), m._output(y.transpose(1, 2))) < 1e-12


# ----------------------------------------------------------------------------
# Layer: recurrence, causality, shapes, dtypes, parameters, errors.


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_causal_forward_matches_step(kernel):
    m = make(kernel, False, l_max=32).eval()
    u = torch.randn(2, 29, 3, dtype=torch.float64)
    state, ys = m.initial_state(2), []
    for t in range(u.shape[1]):
        y_t, state = m.step(u[:, t], state)
        ys.append(y_t)
    assert state.shape == (2, 3, 4)
    assert rel_err(torch.stack(ys, dim=1), m(u)) < 1e-11


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_causal_no_leakage_from_future(kernel):
    m = make(kernel, False, l_max=32).eval()
    u = torch.randn(2, 32, 3, dtype=torch.float64)
    v = u.clone()
    v[:, 10] += 1.0
    y, y_v = m(u), m(v)
    assert (y[:, :10] - y_v[:, :10]).abs().max() < 1e-13
    assert (y[:, 10:] - y_v[:, 10:]).abs().max() > 1e-3


def test_kernel_shape_and_dtype():
    for bidirectional, dirs in ((True, 2), (False, 1)):
        m = s4.S4(5, 16, bidirectional=bidirectional, l_max=64)
        k = m.kernel(50)
        assert k.shape == (dirs, 5, 50) and k.dtype == torch.float32 and not k.is_complex()
        assert torch.allclose(k, m.kernel(64)[..., :50])
        assert m.double().kernel(50).dtype == torch.float64
    k = s4.S4(5, 16, kernel="diag").kernel(17)
    assert k.shape == (2, 5, 17) and k.dtype == torch.float32


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_bf16_autocast_keeps_kernel_path_fp32(kernel, monkeypatch):
    torch.manual_seed(0)
    m = s4.S4(16, 16, kernel=kernel).eval()
    u = torch.randn(2, 32, 16)
    seen = []
    fft_conv = s4.fft_conv

    def spy(x, k):
        seen.append((x.dtype, k.dtype, torch.is_autocast_enabled("cpu")))
        return fft_conv(x, k)

    monkeypatch.setattr(s4, "fft_conv", spy)
    y32 = m(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(u)
        y_bf = m(u.bfloat16())
        assert m.kernel(32).dtype == torch.float32
    assert seen == [(torch.float32, torch.float32, False)] * 3
    assert y.dtype == torch.float32 and y_bf.dtype == torch.bfloat16
    assert rel_err(y, y32) < 3e-2 and rel_err(y_bf.float(), y32) < 5e-2


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_ssm_parameters_marked_and_real(kernel, tmp_path):
    m = s4.S4(4, 8, kernel=kernel)
    expected = SSM_NAMES - ({"P"} if kernel == "diag" else set())
    for copy_of in (m, m.double(), copy.deepcopy(m)):
        assert {n for n, p in copy_of.named_parameters() if s4.is_ssm_parameter(p)} == expected
    assert not any(t.is_complex() for t in m.state_dict().values())
    # safetensors round trip.
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(m.state_dict(), tmp_path / "s4.safetensors")
    loaded = safetensors.load_file(tmp_path / "s4.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in m.state_dict().items())


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_forward_shape_and_backward(kernel):
    torch.manual_seed(0)
    m = s4.S4(8, 16, kernel=kernel, l_max=64, dropout=0.1)
    u = torch.randn(3, 40, 8, requires_grad=True)
    y = m(u)
    assert y.shape == u.shape and y.dtype == u.dtype
    y.square().mean().backward()
    for name, p in [*m.named_parameters(), ("u", u)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_errors():
    bi = s4.S4(4, 8, l_max=16)
    with pytest.raises(ValueError, match="causal"):
        bi.initial_state(1)
    with pytest.raises(ValueError, match="causal"):
        bi.step(torch.zeros(1, 4), torch.zeros(1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="l_max"):
        bi.kernel(17)
    with pytest.raises(ValueError, match="l_max"):
        bi(torch.zeros(1, 17, 4))
    with pytest.raises(ValueError, match="l_max"):
        s4.S4(4, 8, bidirectional=False).initial_state(1)
    with pytest.raises(ValueError, match="kernel"):
        s4.S4(4, 8, kernel="full")


def test_ssm_parameters_found_by_name_after_any_reload():
    from sid.training import param_groups

    layer = s4.S4(8, 8, kernel="dplr", l_max=16)
    marked = {id(p) for p in layer.parameters() if s4.is_ssm_parameter(p)}
    assert {id(p) for p in s4.ssm_parameters(layer)} == marked and len(marked) == 5
    fresh = s4.S4(8, 8, kernel="dplr", l_max=16)
    fresh.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    assert len(s4.ssm_parameters(fresh)) == 5
    groups = param_groups(torch.nn.Sequential(fresh), lr=1e-4, ssm_lr=1e-3)
    assert len(groups[1]["params"]) == 5 and groups[1]["lr"] == 1e-3 and groups[1]["weight_decay"] == 0
    assert s4.dplr_init(8)[0] is not s4.dplr_init(8)[0]  # cached, but callers get their own copies


@pytest.mark.parametrize("kernel", ["dplr", "diag"])
def test_kernel_cache_is_reused_only_while_parameters_are_unchanged(kernel, monkeypatch):
    """The cached kernel equals a fresh one; it is rebuilt after an optimizer step, load_state_dict and .to(), and
    never used when gradients must reach the SSM parameters."""
    m = make(kernel, d_model=4, d_state=8)
    u = torch.randn(2, 16, 4, dtype=torch.float64)
    calls = []
    build = s4.S4.kernel
    monkeypatch.setattr(s4.S4, "kernel", lambda self, L: calls.append(L) or build(self, L))

    def fresh(x):
        monkeypatch.setattr(s4, "KERNEL_CACHE", False)
        try:
            return m(x)
        finally:
            monkeypatch.setattr(s4, "KERNEL_CACHE", True)

    # Frozen parameters: one kernel for many calls, with or without grad to the input.
    m.requires_grad_(False)
    with torch.no_grad():
        y1, y2 = m(u), m(u)
    x = u.clone().requires_grad_(True)
    y3 = m(x)
    (gx,) = torch.autograd.grad(y3.sum(), x)
    assert len(calls) == 1 and torch.equal(y1, y2) and torch.equal(y1, y3.detach())
    assert torch.allclose(y1, fresh(u), rtol=0, atol=0)
    (gx_ref,) = torch.autograd.grad(fresh(x).sum(), x)
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)

    # Trainable parameters with grad enabled: rebuilt every call, and gradients reach the SSM parameters.
    m.requires_grad_(True)
    calls.clear()
    m(u).sum().backward()
    m(u)
    assert len(calls) == 2 and m.log_dt.grad is not None and m.C.grad.abs().sum() > 0

    # An optimizer step, load_state_dict and .to() invalidate the cache.
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.no_grad():
        before = m(u)
        opt.step()
        after = m(u)
    assert not torch.allclose(before, after) and torch.equal(after, fresh(u))
    state = {k: v.clone() for k, v in make(kernel, d_model=4, d_state=8, seed=3).state_dict().items()}
    with torch.no_grad():
        m.load_state_dict(state)
        assert torch.equal(m(u), fresh(u))
        assert torch.allclose(m.float()(u.float()), fresh(u.float()), rtol=0, atol=0)


@pytest.mark.parametrize("cls", ["s4", "s4nd"])
def test_compiled_frozen_layer_uses_the_kernel_cache(cls, monkeypatch):
    """Kernel generation stays out of torch.compile graphs: a compiled frozen layer builds its kernel once over many
    calls (as eager does), gives the eager outputs, and a compiled trainable layer still trains the SSM parameters."""
    from backbones.s4nd import S4ND

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = s4.S4(8, 8, l_max=16) if cls == "s4" else S4ND(8, 8, grid=(4, 4))
    u = torch.randn(2, 16, 8)
    calls = []
    build = s4.S4.kernel
    monkeypatch.setattr(s4.S4, "kernel", lambda self, L: calls.append(L) or build(self, L))
    m.requires_grad_(False)
    with torch.no_grad():
        eager = m(u)
    assert len(calls) == 1
    compiled = torch.compile(m, backend="eager", fullgraph=False)
    with torch.no_grad():
        outs = [compiled(u) for _ in range(3)]
    assert len(calls) == 1, "the compiled layer rebuilt a cached kernel"
    assert all(torch.allclose(o, eager, rtol=1e-6, atol=1e-6) for o in outs)
    m.requires_grad_(True)
    compiled(u).square().sum().backward()
    assert len(calls) == 2 and m.log_dt.grad is not None and m.log_dt.grad.abs().sum() > 0
    torch._dynamo.reset()
