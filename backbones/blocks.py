"""adaLN-Zero blocks (DiT, Peebles & Xie 2023) whose token mixer is bidirectional S4, MLA or MHA."""

from __future__ import annotations

import torch
from torch import nn

from .mla import MHA, MLA
from .s4 import S4
from .s4nd import S4ND

__all__ = ["MIXERS", "modulate", "make_mixer", "Mlp", "ConvMlp", "AdaLNBlock", "FinalLayer"]

MIXERS = {"S": "bidirectional S4", "M": "multi-head latent attention (MLA)", "A": "multi-head attention (MHA)"}

# ----------------------------------------------------------------------------
# Helpers.


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) * (1 + scale) + shift with shift, scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def make_mixer(kind: str, d_model: int, *, n_tokens: int, d_state: int = 64, s4_kernel: str = "dplr",
               n_heads: int = 4, kv_lora_rank: int = 64, q_lora_rank: int | None = None, qk_nope_head_dim: int = 32,
               qk_rope_head_dim: int = 16, v_head_dim: int = 32, grid: tuple[int, int] | None = None,
               s4_2d: bool = False) -> nn.Module:
    """Build the token mixer named by one pattern character: 'S' = S4 (S4ND over ``grid`` when ``s4_2d``),
    'M' = MLA, 'A' = MHA."""
    if kind == "S" and s4_2d:
        if grid is None:
            raise ValueError("s4_2d needs the token grid (H, W)")
        return S4ND(d_model, d_state, grid=grid, kernel=s4_kernel)
    if kind == "S":
        return S4(d_model, d_state, kernel=s4_kernel, bidirectional=True, l_max=n_tokens)
    if kind == "M":
        return MLA(d_model, n_heads, kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank,
                   qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim)
    if kind == "A":
        return MHA(d_model, n_heads)
    raise ValueError(f"unknown mixer {kind!r}; expected one of {', '.join(f'{k!r} ({v})' for k, v in MIXERS.items())}.")


class Mlp(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0):
        hidden = int(d_model * mlp_ratio)
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d_model))


class ConvMlp(nn.Module):
    """Linear -> depthwise 3x3 conv over the token grid -> GELU(tanh) -> Linear: the MLP with local spatial mixing
    (as in SegFormer's Mix-FFN), which gives every block a 2-D locality bias for the cost of one depthwise conv."""

    def __init__(self, d_model: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(d_model * mlp_ratio)
        self.fc1 = nn.Linear(d_model, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        B, L, _ = x.shape
        H, W = grid
        h = self.fc1(x)                                                                 # (B, L, hidden)
        h = self.dwconv(h.transpose(1, 2).reshape(B, -1, H, W)).flatten(2).transpose(1, 2)
        return self.fc2(nn.functional.gelu(h, approximate="tanh"))

# ----------------------------------------------------------------------------
# adaLN-Zero block: x + gate * mixer(modulate(LN(x))), then the same around the MLP.


class AdaLNBlock(nn.Module):
    """One residual block with adaLN-Zero conditioning; the modulation is zero-initialised so the block starts as
    the identity. S4 mixers with ``column_major=True`` scan the (H, W) token grid column by column."""

    def __init__(
        self,
        d_model: int,                       # Model width d.
        mixer: nn.Module,                   # S4 (called as mixer(x)) or MLA/MHA (called as mixer(x, grid)).
        *,
        mlp_ratio: float = 4.0,             # MLP hidden width / d_model.
        column_major: bool = False,         # S4 only: scan the grid in column-major order.
        mlp_conv: bool = False,             # Depthwise 3x3 conv inside the MLP (ConvMlp).
    ):
        super().__init__()
        self.uses_grid = isinstance(mixer, (MLA, MHA, S4ND))
        if column_major and self.uses_grid:
            raise ValueError("column_major applies to S4 mixers only; attention sees the grid through RoPE.")
        self.column_major = column_major
        self.norm1 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.mlp = ConvMlp(d_model, mlp_ratio) if mlp_conv else Mlp(d_model, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 6 * d_model))
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def mix(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.uses_grid:
            return self.mixer(x, grid)
        if not self.column_major:
            return self.mixer(x)
        # Column-major scan: transpose the (H, W) grid, run S4, transpose back.
        B, L, D = x.shape
        H, W = grid
        x = x.view(B, H, W, D).transpose(1, 2).reshape(B, L, D)                         # (B, W*H, D)
        y = self.mixer(x)
        return y.view(B, W, H, D).transpose(1, 2).reshape(B, L, D)                      # (B, H*W, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """x (B, L, D) tokens, c (B, D) conditioning, grid = (H, W) with H*W = L."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate1[:, None] * self.mix(modulate(self.norm1(x), shift1, scale1), grid)
        h = modulate(self.norm2(x), shift2, scale2)
        x = x + gate2[:, None] * (self.mlp(h, grid) if isinstance(self.mlp, ConvMlp) else self.mlp(h))
        return x


class FinalLayer(nn.Module):
    """adaLN shift/scale, then a linear map from d_model to p*p*C per token; zero-initialised."""

    def __init__(self, d_model: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d_model, 2 * d_model))
        self.linear = nn.Linear(d_model, out_dim)
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))                        # (B, L, out_dim)
