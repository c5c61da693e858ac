"""S4 state-space layer: DPLR (S4, arXiv 2111.00396) and diagonal (S4D, arXiv 2206.11893) kernels.

Convention: C is a row vector, y = C x. A state of d_state real dimensions is held as M = d_state / 2 complex
numbers (one per conjugate pair); the full system is the conjugate extension [x; conj(x)], so outputs are
C_ext x_ext = 2 Re(C x) and kernels are real.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------
# HiPPO-LegS and initializations.


def hippo_legs(N: int) -> tuple[Tensor, Tensor]:
    """HiPPO-LegS matrices (S4 paper, eq. 2) in float64: A (N, N), B (N,)."""
    r = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)  # (N,)
    A = -torch.tril(r[:, None] * r[None, :], diagonal=-1) - torch.diag(torch.arange(1, N + 1, dtype=torch.float64))
    return A, r.clone()


def dplr_init(N: int) -> tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS as Lambda - P P* in the eigenbasis of its normal part; returns the M = N/2 conjugate-pair
    halves (Lambda, P, B), complex128 (M,)."""
    return tuple(t.clone() for t in _dplr_init(N))


@functools.cache
def _dplr_init(N: int) -> tuple[Tensor, Tensor, Tensor]:
    # The same for every layer of a network: computed once per N (eigh is slow on a busy machine).
    A, B = hippo_legs(N)
    P = torch.sqrt(torch.arange(N, dtype=torch.float64) + 0.5)  # (N,)
    # A + P P^T = -I/2 + S with S skew; -iS is Hermitian, so eigh is stable (never diagonalize A itself).
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)
    mu, V = torch.linalg.eigh(-1j * S.to(torch.complex128))  # eig(S) = i mu, ascending mu
    # Keep the half with Im(lambda) < 0; the other half is its conjugate ([V, conj V] is unitary).
    if not bool(mu[N // 2 - 1] < 0):
        raise ValueError(f"d_state={N} does not give N/2 eigenvalues with negative imaginary part")
    V = V[:, : N // 2]  # (N, M)
    Lambda = torch.complex(torch.full_like(mu[: N // 2], -0.5), mu[: N // 2])  # (M,)
    return Lambda, V.mH @ P.to(torch.complex128), V.mH @ B.to(torch.complex128)


def s4d_init(N: int, init: str = "lin") -> Tensor:
    """S4D diagonal A, complex128 (N/2,): S4D-Lin -1/2 + i pi n, S4D-Inv -1/2 + i (N/pi)(N/(2n+1) - 1)."""
    n = torch.arange(N // 2, dtype=torch.float64)
    imag = math.pi * n if init == "lin" else N / math.pi * (N / (2 * n + 1) - 1)
    return torch.complex(torch.full_like(n, -0.5), imag)


def _ext(x: Tensor) -> Tensor:
    # Conjugate extension along the state dimension: (..., M) -> (..., 2M).
    return torch.cat([x, x.conj()], dim=-1)


# ----------------------------------------------------------------------------
# Fast kernels.

# Elements (channel x state x frequency) per chunk of the Cauchy and Vandermonde products. Materialising the whole
# (H, N, L) matrix is memory-bound; on a CPU a chunk that stays in cache makes the DPLR kernel ~3-4x faster forward
# + backward (bench_backbones.py; 2**17 and 2**20 were slower than 2**19 for the pair product at L = 256 and 4096).
# Accelerators get large chunks (few launches); that value is not tuned.
CHUNK_ELEMENTS = {"cpu": 2**19}
DEFAULT_CHUNK_ELEMENTS = 2**24


def _chunk(rows: int, device: torch.device) -> int:
    return max(1, CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS) // max(rows, 1))


def cauchy_naive(v: Tensor, lam: Tensor, s: Tensor, a: Tensor) -> Tensor:
    """Reference Cauchy product over explicit states: r[r, h, k] = sum_n v[r, h, n] / (a[k] - s[h, k] lam[h, n]),
    the whole (H, N, K) matrix materialised. v (R, H, N), lam (H, N), s (H, K), a (K,), all complex."""
    return torch.einsum("rhn,hnk->rhk", v, 1 / (a - s[:, None, :] * lam[:, :, None]))


# Conjugate pairs (S4 paper, Appendix C.3: only N/2 states are kept). At z_k = exp(-i theta_k), theta_k = 2 pi k / L,
# the bilinear resolvent is 1 / (a - s lambda) with a = 1 - z and s = (1 + z) dt / 2, so a = i phi s with the real
# phi = (2 / dt) tan(theta / 2). With Y1 = 2 Re v, Y2 = 2 Re(v conj lam), x = Re lam, q = |lam|^2, one pair
# (v, lam), (conj v, conj lam) contributes
#     v / (a - s lam) + conj v / (a - s conj lam) = (i phi Y1 - Y2) / (s (q - phi^2 - 2 i phi x))
#         = (i (gamma / 2) Y1 - beta Y2) / (s D),  D = beta q - alpha - i gamma x,
# dividing by 1 + phi^2: alpha = phi^2 / (1 + phi^2), beta = 1 / (1 + phi^2), gamma = 2 phi / (1 + phi^2) are real and
# bounded, and gamma / s, beta / s stay finite at z = -1 (s = 0, phi = inf). So the product runs over M = N/2 pairs
# with real numerators and a denominator real-affine in (q, x): real times complex, no complex division.


def pair_coefficients(dt: Tensor, L: int, k0: int = 0, k1: int | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per channel and rfft frequency (H, K): real alpha, beta, gamma of the scaled pair denominator
    D = beta q - alpha - i gamma x, and complex gamma / (2 s), beta / s and s (see the comment above). With the half
    angle t = theta / 2 and E = (dt cos t)^2 + 4 sin^2 t: alpha = 4 sin^2 t / E, beta = (dt cos t)^2 / E,
    gamma = 4 dt sin t cos t / E, gamma / (2 s) = 2 sin t e^{it} / E, beta / s = dt cos t e^{it} / E and
    s = dt cos t e^{-it}. dt: real (H,); frequencies k0 <= k < k1 (default all, K = L // 2 + 1)."""
    j = torch.arange(k0, L // 2 + 1 if k1 is None else k1, dtype=torch.float64, device=dt.device)
    # Trigonometry of the roots of unity in float64; cos t = sin(pi (L - 2j) / (2L)) is exactly 0 at Nyquist.
    sin, cos = torch.sin(math.pi * j / L), torch.sin(math.pi * (L - 2 * j) / (2 * L))  # (K,)
    e = torch.polar(torch.ones_like(j), math.pi * j / L).to(_complex(dt.dtype))  # e^{it}, (K,)
    sin, cos = sin.to(dt.dtype), cos.to(dt.dtype)
    dc = dt[:, None] * cos  # (H, K)
    E = dc * dc + 4 * sin * sin  # > 0 for every k
    alpha, beta, gamma = 4 * sin * sin / E, dc * dc / E, 4 * sin * dc / E
    return alpha, beta, gamma, 2 * sin / E * e, dc / E * e, dc * e.conj()


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


class _Buffers(dict):
    """Chunk-sized scratch tensors reused across the chunks of one call: a fresh large tensor per operation costs
    page faults on a CPU (glibc hands large blocks back to the system), which halved the speed at L = 256."""

    def __init__(self, like: Tensor):
        super().__init__()
        self.like = like

    def get(self, name: str, *shape: int) -> Tensor:
        t = super().get(name)
        if t is None or t.shape != shape:
            t = self[name] = self.like.new_empty(shape)
        return t


def _pair_resolvent(q: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, buf: _Buffers) -> Tensor:
    """W = 1 / D, D = beta q - alpha - i gamma x, as real (H, M, 2, k): [Re W | Im W]. q, x (H, M); alpha, beta,
    gamma (H, k). Computed in place in ``buf``; valid until the next call with the same buffers."""
    (H, M), k = q.shape, alpha.shape[-1]
    W, inv = buf.get("W", H, M, 2, k), buf.get("inv", H, M, k)
    Dr, Di = W[:, :, 0], W[:, :, 1]  # Re D, -Im D
    torch.addcmul(-alpha[:, None], q[:, :, None], beta[:, None], out=Dr)
    torch.mul(x[:, :, None], gamma[:, None], out=Di)
    torch.mul(Dr, Dr, out=inv).addcmul_(Di, Di).reciprocal_()  # 1 / |D|^2
    return W.mul_(inv[:, :, None])  # 1 / D = conj(D) / |D|^2


class _CauchyPairs(torch.autograd.Function):
    """out[h, r, k] = sum_n Y[h, r, n] W[h, n, k], W = 1 / D, D = beta q - alpha - i gamma x, all inputs real,
    computed over chunks of k; backward recomputes each chunk. In torch's convention for complex outputs (conjugate
    Wirtinger) with g the output gradient and G = sum_r g Y: grad_Y = Re sum_k g conj(W); the gradient reaching D is
    Z = -G conj(W)^2, so (Re D, -Im D) get (Re Z, -Im Z) and the real inputs get their sums over k or n."""

    @staticmethod
    def forward(ctx, Y: Tensor, q: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor,
                chunk: int) -> Tensor:
        ctx.save_for_backward(Y, q, x, alpha, beta, gamma)
        ctx.chunk = chunk
        H, R, K = Y.shape[0], Y.shape[1], alpha.shape[-1]
        out, buf = Y.new_empty(H, R, 2, K), _Buffers(Y)
        for i in range(0, K, chunk):
            j = slice(i, i + chunk)
            W = _pair_resolvent(q, x, alpha[:, j], beta[:, j], gamma[:, j], buf)  # (H, M, 2, k)
            out[..., j] = torch.bmm(Y, W.flatten(2)).view(H, R, 2, -1)
        return torch.complex(out[:, :, 0], out[:, :, 1])  # (H, R, K)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        Y, q, x, alpha, beta, gamma = ctx.saved_tensors
        need = ctx.needs_input_grad[:6]
        H, R, M = Y.shape
        K = alpha.shape[-1]
        g = torch.stack([g.real, g.imag], dim=2)  # (H, R, 2, K)
        grad_Y, grad_q, grad_x = (torch.zeros_like(t) if n else None for t, n in zip((Y, q, x), need[:3]))
        grad_alpha, grad_beta, grad_gamma = (torch.empty_like(alpha) if n else None for n in need[3:])
        Y_t, buf = Y.mT.contiguous(), _Buffers(Y)  # (H, M, R)
        for i in range(0, K, ctx.chunk):
            j = slice(i, i + ctx.chunk)
            W = _pair_resolvent(q, x, alpha[:, j], beta[:, j], gamma[:, j], buf)  # (H, M, 2, k)
            k = W.shape[-1]
            g_j = g[..., j].reshape(H, R, 2 * k)
            if need[0]:
                grad_Y.baddbmm_(g_j, W.view(H, M, 2 * k).mT)
            if not any(need[1:]):
                continue
            G = torch.bmm(Y_t, g_j, out=buf.get("G", H, M, 2 * k)).view(H, M, 2, k)  # sum_r g Y: Re, Im
            Wr, Wi, Gr, Gi = W[:, :, 0], W[:, :, 1], G[:, :, 0], G[:, :, 1]
            A, Bq, tmp = buf.get("A", H, M, k), buf.get("Bq", H, M, k), buf.get("tmp", H, M, k)
            torch.mul(Wr, Wr, out=A).addcmul_(Wi, Wi, value=-1)  # conj(W)^2 = A - 2i Bq
            torch.mul(Wr, Wi, out=Bq)
            # Z = -G conj(W)^2: Re D gets Re Z = -gDr, -Im D gets -Im Z = gDi.
            gDr = torch.mul(Gr, A, out=buf.get("gDr", H, M, k)).addcmul_(Gi, Bq, value=2)  # minus grad of Re D
            gDi = torch.mul(Gi, A, out=buf.get("gDi", H, M, k)).addcmul_(Gr, Bq, value=-2)  # grad of -Im D
            # Re D = beta q - alpha, -Im D = gamma x.
            if need[1]:
                grad_q.sub_(torch.mul(gDr, beta[:, None, j], out=tmp).sum(-1))
            if need[2]:
                grad_x.add_(torch.mul(gDi, gamma[:, None, j], out=tmp).sum(-1))
            if need[3]:
                grad_alpha[:, j] = gDr.sum(1)
            if need[4]:
                grad_beta[:, j] = torch.mul(gDr, q[:, :, None], out=tmp).sum(1).neg_()
            if need[5]:
                grad_gamma[:, j] = torch.mul(gDi, x[:, :, None], out=tmp).sum(1)
        return grad_Y, grad_q, grad_x, grad_alpha, grad_beta, grad_gamma, None


def cauchy_pairs(Y: Tensor, q: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """out[h, r, k] = sum_n Y[h, r, n] / (beta[h, k] q[h, n] - alpha[h, k] - i gamma[h, k] x[h, n]), chunked over k
    (see CHUNK_ELEMENTS), all inputs real: Y (H, R, M); q, x (H, M); alpha, beta, gamma (H, K). Complex (H, R, K)."""
    return _CauchyPairs.apply(Y, q, x, alpha, beta, gamma, _chunk(2 * q.numel(), q.device))


def dplr_kernel(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """S4 kernel (Algorithm 1) of A = Lambda - P P*, bilinear, from C = C_tilde = C (I - A_bar^L).

    Lambda, P, B: complex (H, M); C: complex (dirs, H, M); dt: real (H,). Returns real (dirs, H, L), O(N L).
    """
    # K_hat(z) = C~ (I - A_bar z)^-1 B_bar = dt C~ [(1 - z) I - s A]^-1 B with s = (1 + z) dt / 2, i.e. the
    # 2/(1+z) (g(z) - A)^-1 form multiplied through by (1 + z) dt / 2, which stays finite at z = -1.
    # Four Cauchy products over the conjugate-extended state: C~B, C~P, P*B, P*P, each summed over one member of
    # every conjugate pair (cauchy_pairs).
    dirs = C.shape[0]
    v = torch.cat([C * B, C * P, (P.conj() * B)[None], (P.conj() * P)[None]]).transpose(0, 1)  # (H, R, M)
    Y = torch.cat([v.real, (v * Lambda.conj()[:, None]).real], dim=1) * 2  # (H, 2R, M): 2 Re v, 2 Re(v conj lam)
    q, x = Lambda.real.square() + Lambda.imag.square(), Lambda.real  # (H, M)
    alpha, beta, gamma, u, w, s = pair_coefficients(dt, L)  # (H, K) each
    # Split, not sliced: a slice's backward zero-fills the whole (H, 2R, K) gradient.
    out1, out2 = cauchy_pairs(Y, q, x, alpha, beta, gamma).chunk(2, dim=1)  # (H, R, K) each
    r = (1j * u[:, None]) * out1 - w[:, None] * out2  # (H, R, K): C~B, C~P (per direction), P*B, P*P
    k00, k01, k10, k11 = r.split([dirs, dirs, 1, 1], dim=1)
    # Woodbury identity for the rank-1 term.
    K_hat = dt[:, None, None] * (k00 - s[:, None] * k10 / (1 + s[:, None] * k11) * k01)  # (H, dirs, K)
    return torch.fft.irfft(K_hat, n=L).transpose(0, 1)  # (dirs, H, L)


def dplr_kernel_full(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """Reference for dplr_kernel: the same generating function with the Cauchy products taken over the whole
    conjugate-extended state (cauchy_naive), O(N L) with a materialised (H, N, K) matrix."""
    j = torch.arange(L // 2 + 1, dtype=torch.float64, device=dt.device)
    z = torch.polar(torch.ones_like(j), -2 * math.pi * j / L)  # (K,) complex128
    one_minus_z, one_plus_z = (1 - z).to(Lambda.dtype), (1 + z).to(Lambda.dtype)
    s = one_plus_z * dt[:, None] / 2  # (H, K)
    dirs = C.shape[0]
    v = torch.cat([C * B, C * P, (P.conj() * B)[None], (P.conj() * P)[None]])  # (2 dirs + 2, H, M)
    r = cauchy_naive(_ext(v), _ext(Lambda), s, one_minus_z)  # (2 dirs + 2, H, K)
    k00, k01, k10, k11 = r[:dirs], r[dirs : 2 * dirs], r[-2], r[-1]
    K_hat = dt[:, None] * (k00 - s * k01 * k10 / (1 + s * k11))  # (dirs, H, K)
    return torch.fft.irfft(K_hat, n=L)  # (dirs, H, L)


def diag_kernel(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """S4D kernel, ZOH, Vandermonde product: K_l = 2 Re sum_n C_n B_n (exp(dt A_n) - 1) / A_n exp(dt A_n l).

    A, B: complex (H, M); C: complex (dirs, H, M); dt: real (H,). Returns real (dirs, H, L).
    """
    dtA = A * dt[:, None]  # (H, M)
    W = C * B * (dtA.exp() - 1) / A  # (dirs, H, M)
    # Vandermonde matrix exp(dtA l) (H, M, L) in cache-sized chunks of l; chunk i is exp(dtA i) times the first
    # chunk, so the exponentials are computed once per chunk size, not once per l.
    c = min(L, _chunk(dtA.numel(), A.device))
    V0 = torch.exp(dtA[:, :, None] * torch.arange(c, device=A.device))  # (H, M, c)
    K = [torch.einsum("dhm,hml->dhl", W, V0 if i == 0 else torch.exp(dtA * i)[:, :, None] * V0[..., : L - i])
         for i in range(0, L, c)]
    return 2 * torch.cat(K, dim=-1).real


def fft_conv(u: Tensor, k: Tensor) -> Tensor:
    """Linear convolution by FFT of length 2L (no wrap-around). u (B, H, L), k (dirs, H, L) -> (B, H, L).

    dirs = 2: y_i = sum_{j<=i} k0[i-j] u_j + sum_{j>i} k1[j-i-1] u_j (k1 sits reversed in the upper half).
    """
    L = u.shape[-1]
    k = torch.cat([k[0], k[1].flip(-1)], dim=-1) if k.shape[0] == 2 else k[0]  # (H, L or 2L)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)  # (B, H, 2L)
    return y[..., :L]


# ----------------------------------------------------------------------------
# Naive references: dense matrices, recurrences, direct convolution.


def dplr_dense(Lambda: Tensor, P: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense conjugate-extended continuous system: A = diag(Lambda) - P P* (H, N, N), B (H, N), P (H, N)."""
    P, B = _ext(P), _ext(B)
    A = torch.diag_embed(_ext(Lambda)) - P[:, :, None] * P.conj()[:, None, :]
    return A, B, P


def bilinear(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """A_bar = (I - dt/2 A)^-1 (I + dt/2 A), B_bar = (I - dt/2 A)^-1 dt B, dense. A (H, N, N), B (H, N)."""
    I = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    h = dt[:, None, None] / 2
    dA = torch.linalg.solve(I - h * A, I + h * A)
    dB = torch.linalg.solve(I - h * A, (2 * h[..., 0] * B)[..., None])[..., 0]
    return dA, dB


def c_from_c_tilde(C_tilde: Tensor, dA: Tensor, L: int) -> Tensor:
    """Solve C (I - A_bar^L) = C_tilde for row vectors C. C_tilde (dirs, H, N), dA (H, N, N)."""
    I = torch.eye(dA.shape[-1], dtype=dA.dtype, device=dA.device)
    return torch.linalg.solve(I - torch.linalg.matrix_power(dA, L), C_tilde[..., None, :], left=False)[..., 0, :]


def dplr_kernel_naive(Lambda: Tensor, P: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """Reference for dplr_kernel: K_k = C A_bar^k B_bar, k < L, by explicit dense matrix powers, O(N^2 L)."""
    A, B, _ = dplr_dense(Lambda, P, B)
    dA, dB = bilinear(A, B, dt)  # (H, N, N), (H, N)
    C = c_from_c_tilde(_ext(C), dA, L)  # (dirs, H, N)
    K, x = [], dB
    for _ in range(L):
        K.append(torch.einsum("dhn,hn->dh", C, x))
        x = torch.einsum("hnm,hm->hn", dA, x)
    return torch.stack(K, dim=-1).real  # (dirs, H, L)


def zoh(A: Tensor, B: Tensor, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Diagonal ZOH: A_bar = exp(dt A), B_bar = A^-1 (exp(dt A) - 1) B. A, B (H, M)."""
    dA = torch.exp(A * dt[:, None])
    return dA, (dA - 1) / A * B


def diag_kernel_naive(A: Tensor, B: Tensor, C: Tensor, dt: Tensor, L: int) -> Tensor:
    """Reference for diag_kernel: impulse response of x <- A_bar x + B_bar u, y = 2 Re(C x)."""
    dA, x = zoh(A, B, dt)
    K = []
    for _ in range(L):
        K.append(2 * (C * x).sum(-1).real)  # (dirs, H)
        x = dA * x
    return torch.stack(K, dim=-1)  # (dirs, H, L)


def direct_conv(u: Tensor, k: Tensor) -> Tensor:
    """Reference for fft_conv: O(L^2) Toeplitz product. u (B, H, L), k (dirs, H, L) -> (B, H, L)."""
    L = u.shape[-1]
    i = torch.arange(L, device=u.device)
    lag = i[:, None] - i[None, :]  # (L, L), i - j
    T = torch.where(lag >= 0, k[0][:, lag.clamp(min=0)], 0)  # (H, L, L)
    if k.shape[0] == 2:
        T = torch.where(lag < 0, k[1][:, (-lag - 1).clamp(min=0)], T)
    return torch.einsum("hij,bhj->bhi", T, u)


# ----------------------------------------------------------------------------
# The layer.


SSM_PARAMETERS = ("log_dt", "log_A_real", "A_imag", "B", "P")
SSM_KERNEL_PARAMETERS = (*SSM_PARAMETERS, "C")  # everything the convolution kernel depends on
KERNEL_CACHE = True  # S4.cached_kernel reuses kernels of unchanged, gradient-free parameters (benchmarks toggle it)


def is_ssm_parameter(p: Tensor) -> bool:
    """True for SSM parameters (A, B, P, log_dt) that belong in their own optimizer group (lr ~1e-3, no decay).

    Relies on a mark set at construction; after loading that replaces Parameter objects use :func:`ssm_parameters`.
    """
    return bool(getattr(p, "_ssm", False))


def ssm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The SSM parameters of every S4 layer inside ``model``, found by name (robust to any way of loading)."""
    return [m._parameters[n] for m in model.modules() if isinstance(m, S4) for n in SSM_PARAMETERS
            if m._parameters.get(n) is not None]


class S4(nn.Module):
    """S4 layer: u (B, L, d_model) -> SSM convolution + D skip -> GELU -> dropout -> Linear(d, 2d) -> GLU.

    Parameters (all real; complex values as trailing dim 2): log_dt (H,), log_A_real and A_imag (H, M) with
    A = -exp(log_A_real) + i A_imag, B (H, M, 2), P (H, M, 2) for "dplr", C (dirs, H, M, 2), D (H,), where
    H = d_model, M = d_state / 2. For "dplr", C holds C_tilde = C (I - A_bar^l_max) (l_max None: the current L).
    Bidirectional layers share A, B, P, dt between directions and keep one C per direction.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,  # N, real state size; held as N/2 complex conjugate pairs
        *,
        kernel: str = "dplr",  # "dplr" (S4, HiPPO-LegS, bilinear) or "diag" (S4D, ZOH)
        bidirectional: bool = True,  # one kernel per direction (non-causal)
        l_max: int | None = None,  # longest sequence; fixes the length that C_tilde refers to
        dt_min: float = 1e-3,  # log_dt ~ U[ln dt_min, ln dt_max] per channel
        dt_max: float = 1e-1,
        diag_init: str = "lin",  # S4D-Lin or S4D-Inv imaginary parts ("diag" only)
        dropout: float = 0.0,  # after GELU
        readout: bool = True,  # False: kernels only (no D skip, no output projection), for layers such as S4ND
    ) -> None:
        super().__init__()
        if kernel not in ("dplr", "diag"):
            raise ValueError(f"kernel must be 'dplr' or 'diag', got {kernel!r}")
        if diag_init not in ("lin", "inv"):
            raise ValueError(f"diag_init must be 'lin' or 'inv', got {diag_init!r}")
        if d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be a positive even number, got {d_state}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        H, M, dirs = d_model, d_state // 2, 2 if bidirectional else 1
        self.d_model, self.d_state, self.mode = d_model, d_state, kernel
        self.bidirectional, self.l_max = bidirectional, l_max

        # Continuous SSM, shared by both directions.
        if kernel == "dplr":
            A, P, B = dplr_init(d_state)
            self.P = nn.Parameter(torch.view_as_real(P).float().repeat(H, 1, 1))  # (H, M, 2)
        else:
            A, B = s4d_init(d_state, diag_init), torch.ones(M, dtype=torch.complex128)
        self.log_A_real = nn.Parameter(torch.log(-A.real).float().repeat(H, 1))  # (H, M)
        self.A_imag = nn.Parameter(A.imag.float().repeat(H, 1))  # (H, M)
        self.B = nn.Parameter(torch.view_as_real(B).float().repeat(H, 1, 1))  # (H, M, 2)
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        # Readout: complex normal C (variance 1/2 per part), one per direction; D skip ~ N(0, 1).
        self.C = nn.Parameter(torch.randn(dirs, H, M, 2) * math.sqrt(0.5))  # (dirs, H, M, 2)
        self.readout = readout
        if readout:
            self.D = nn.Parameter(torch.randn(H))  # (H,)
            self.dropout = nn.Dropout(dropout)
            self.out_proj = nn.Linear(H, 2 * H)
        self._mark_ssm()
        self._step_cache = None
        self._kernel_cache = None  # (key, kernel); see cached_kernel

    def _mark_ssm(self) -> None:
        for name in SSM_PARAMETERS:
            if name in self._parameters:
                self._parameters[name]._ssm = True

    def __setstate__(self, state):
        # deepcopy / pickle make new Parameter objects without the mark.
        super().__setstate__(state)
        self._mark_ssm()
        self._kernel_cache = None

    def _apply(self, fn, *args, **kwargs):
        # .to() / .float() / .cuda() make new parameter storages: drop the cached kernel.
        self._kernel_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _continuous(self) -> dict[str, Tensor]:
        # Continuous parameters as complex tensors, float64 when the layer is, float32 otherwise.
        rdtype = torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32
        c = lambda p: torch.view_as_complex(p.to(rdtype))
        ssm = dict(
            A=torch.complex(-self.log_A_real.to(rdtype).exp(), self.A_imag.to(rdtype)),
            B=c(self.B),
            C=c(self.C),
            dt=self.log_dt.to(rdtype).exp(),
        )
        if self.readout:
            ssm["D"] = self.D.to(rdtype)
        if self.mode == "dplr":
            ssm["P"] = c(self.P)
        return ssm

    def kernel(self, L: int) -> Tensor:
        """Real SSM kernel (directions, d_model, L), float32 (float64 for a .double() layer)."""
        if self.l_max is not None and L > self.l_max:
            raise ValueError(f"sequence length {L} exceeds l_max={self.l_max} of this S4 layer")
        with torch.autocast(device_type=self.log_dt.device.type, enabled=False):
            s = self._continuous()
            if self.mode == "dplr":
                # C_tilde refers to l_max: compute the full kernel there and truncate.
                return dplr_kernel(s["A"], s["P"], s["B"], s["C"], s["dt"], self.l_max or L)[..., :L]
            return diag_kernel(s["A"], s["B"], s["C"], s["dt"], L)

    def _output(self, y: Tensor) -> Tensor:
        # GELU -> dropout -> Linear(d, 2d) -> GLU; may run under autocast.
        y = self.dropout(F.gelu(y))
        return F.glu(self.out_proj(y.to(self.out_proj.weight.dtype)), dim=-1)

    def _kernel_params(self) -> list[Tensor]:
        return [self._parameters[n] for n in SSM_KERNEL_PARAMETERS if n in self._parameters]

    def _cache_valid(self, L: int, params: list[Tensor]) -> bool:
        """True when the cached kernel was built for this L from parameters equal to the current ones. The values
        are compared, not version counters: writes through ``p.data`` (diffusers ``EMAModel.copy_to`` / ``restore``,
        ``p.data.copy_(...)``) change a parameter without bumping its version counter."""
        if self._kernel_cache is None:
            return False
        key, snapshot, _ = self._kernel_cache
        return key == (L, *((p.device, p.dtype) for p in params)) and all(
            torch.equal(a, b) for a, b in zip(snapshot, params, strict=True))

    @torch.compiler.disable
    def cached_kernel(self, L: int) -> Tensor:
        """``kernel(L)``, reused while the parameters are unchanged and need no gradient: a frozen teacher, the
        multi-step sampler and no-grad generator calls compute each layer's kernel once, not once per call.
        Optimizer steps, ``load_state_dict``, EMA swaps and ``.data`` writes all change the values and so rebuild.
        Never traced by ``torch.compile`` (a graph break): a compiled network runs this eagerly, so its frozen
        layers keep using the cache instead of rebuilding every kernel inside the graph on every call."""
        params = self._kernel_params()
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if needs_grad or not KERNEL_CACHE or any(p.is_inference() for p in params):
            self._kernel_cache = None
            return self.kernel(L)
        if not self._cache_valid(L, params):
            with torch.no_grad():
                key = (L, *((p.device, p.dtype) for p in params))
                self._kernel_cache = (key, [p.detach().clone() for p in params], self.kernel(L))
        return self._kernel_cache[2]

    def forward(self, u: Tensor) -> Tensor:
        """Convolution mode: u (B, L, d_model) -> (B, L, d_model), in u's dtype."""
        if not self.readout:
            raise ValueError("this S4 layer was built with readout=False and only provides kernels")
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"S4 expects input (batch, length, {self.d_model}), got {tuple(u.shape)}")
        # Kernel and FFTs in fp32 even under bf16 autocast.
        with torch.autocast(device_type=u.device.type, enabled=False):
            k = self.cached_kernel(u.shape[1])  # (dirs, H, L)
            x = u.to(k.dtype).transpose(1, 2)  # (B, H, L)
            y = fft_conv(x, k) + self.D.to(k.dtype)[:, None] * x  # (B, H, L)
        return self._output(y.transpose(1, 2)).to(u.dtype)  # (B, L, H)

    # ------------------------------------------------------------------------
    # Recurrent mode (reference for causal layers).

    def _step_params(self) -> dict[str, Tensor]:
        if self.bidirectional:
            raise ValueError("S4 recurrent mode (initial_state/step) needs a causal layer (bidirectional=False)")
        s = self._continuous()
        if self.mode == "diag":
            s["dA"], s["dB"] = zoh(s["A"], s["B"], s["dt"])
        else:
            if self.l_max is None:
                raise ValueError("S4 'dplr' recurrent mode needs l_max set: C is recovered from C_tilde at l_max")
            # Recover C from C_tilde with the dense extended system; keep its first (non-conjugate) half.
            A, B, _ = dplr_dense(s["A"], s["P"], s["B"])
            dA, _ = bilinear(A, B, s["dt"])
            s["C"] = c_from_c_tilde(_ext(s["C"]), dA, self.l_max)[..., : self.d_state // 2]
            # Step helpers: Dg = (2/dt - Lambda)^-1, Woodbury denominator 1 + Q* Dg P (real, extended).
            s["Dg"] = 1 / (2 / s["dt"][:, None] - s["A"])  # (H, M)
            s["den"] = 1 + 2 * (s["P"].conj() * s["Dg"] * s["P"]).sum(-1, keepdim=True).real  # (H, 1)
        return s

    def initial_state(self, batch: int) -> Tensor:
        """Zero state (batch, d_model, d_state / 2), complex; also caches the discretized step matrices from the
        current parameters (call again after changing them)."""
        self._step_cache = self._step_params()
        return torch.zeros(
            batch, self.d_model, self.d_state // 2, dtype=self._step_cache["A"].dtype, device=self.log_dt.device
        )

    def step(self, u_t: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """One recurrent step: u_t (B, d_model), state (B, d_model, d_state/2) -> (y_t (B, d_model), state)."""
        s = self._step_params() if self._step_cache is None else self._step_cache
        u = u_t.to(s["dt"].dtype)[..., None]  # (B, H, 1)
        x = state
        if self.mode == "diag":
            x = s["dA"] * x + s["dB"] * u  # (B, H, M)
        else:
            # x <- A1 (A0 x + 2 B u): A0 = 2/dt + Lambda - P P*, A1 = Dg - Dg P (1 + P* Dg P)^-1 P* Dg, each O(N);
            # P* x_ext = 2 Re(P* x) on the conjugate-extended state.
            lam, P, Dg = s["A"], s["P"], s["Dg"]
            v = (2 / s["dt"][:, None] + lam) * x - 2 * P * (P.conj() * x).sum(-1, keepdim=True).real + 2 * s["B"] * u
            w = Dg * v
            x = w - 2 * Dg * P * (P.conj() * w).sum(-1, keepdim=True).real / s["den"]  # (B, H, M)
        y = 2 * (s["C"][0] * x).sum(-1).real + s["D"] * u[..., 0]  # (B, H)
        return self._output(y).to(u_t.dtype), x
