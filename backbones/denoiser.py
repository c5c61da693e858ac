"""HybridDenoiser: a DiT-style patch transformer whose token mixers are bidirectional S4 and MLA layers.

It computes the raw network F(x_in, c_noise, class_labels) of an EDM denoiser; preconditioning lives in sid/.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .blocks import MIXERS, AdaLNBlock, FinalLayer, make_mixer
from .conv_levels import ConvDecoder, ConvEncoder
from .s4 import S4

__all__ = ["HybridDenoiser", "PRESETS", "sincos_pos_embed_2d"]

# ----------------------------------------------------------------------------
# Presets. Parameter counts are measured at each preset's intended resolution, channels and labels. Forward +
# backward at batch 128 on 2 cores of an AMD EPYC without AVX-512 (idle): "small" 2.1 s fp32, "small_v2" 1.9-2.5 s;
# bf16 autocast is about 6x slower than fp32 on such CPUs, faster only where the CPU has AVX-512 BF16 (0.61 s fp32,
# 0.36 s bf16 for "small" on one).

PRESETS: dict[str, dict[str, Any]] = {
    # Tests: works at 16/32/64 resolution with 1 or 3 channels. 33,952 params at 32x32x1, unconditional.
    "tiny": dict(patch_size=4, d_model=32, depth=2, layer_pattern="SM", mlp_ratio=2.0, d_state=16, n_heads=2,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, noise_channels=32),
    # Embedded MNIST teacher (32x32x1, 10 classes), trained and distilled on a 2-core CPU; 64 tokens, 4 S4 + 2 MLA
    # layers (version 1: 1-D S4 scans over the raster-ordered token grid, alternating row- and column-major).
    # 1,888,912 params, 0.15 GFLOPs.
    "small": dict(patch_size=4, d_model=128, depth=6, layer_pattern="SSM", mlp_ratio=4.0, d_state=64,
                  s4_kernel="dplr", n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, noise_channels=128),
    # "small" with the version 2 options: S4ND 2-D mixers, conv MLPs, U-ViT long skips, output conv. 2,182,682
    # params, 0.16 GFLOPs, about 1.4x the fwd+bwd time of "small" on a CPU. Not yet better per CPU minute: trained
    # 200 kimg it matched "small"'s class agreement at ~250 kimg (benchmarks/BENCHMARKS.md, teacher backbones).
    "small_v2": dict(patch_size=4, d_model=128, depth=6, layer_pattern="SSM", mlp_ratio=4.0, d_state=64,
                     s4_kernel="dplr", n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, noise_channels=128, s4_2d=True, mlp_conv=True, long_skips=True, final_conv=True),
    # Version 3: conv U-Net levels at 32 and 16 px (32 and 64 channels) around 6 token blocks (4 S4ND + 2 MLA) on the
    # 8x8 grid, patch size 1. 2,471,841 params, 0.46 GFLOPs ("small": 0.16), about 2.3x the fwd+bwd time of "small".
    "small_v3": dict(patch_size=1, d_model=128, depth=6, layer_pattern="SSM", mlp_ratio=4.0, d_state=64,
                     s4_kernel="dplr", n_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, noise_channels=128, s4_2d=True, conv_channels=[32, 64], conv_blocks=1),
    # GPU presets sized like EDM's teachers. GFLOPs: one forward pass of one image counted by torch.utils.flop_counter
    # (matmuls, convolutions, attention; the S4 kernels' and FFTs' few FLOPs are not counted).
    # CIFAR-10 (32x32x3, 10 classes), 256 tokens, 8 S4 + 4 MLA layers. 54,830,092 params (54,824,460 uncond),
    # 17.7 GFLOPs (EDM's DDPM++ teacher: 56 M params). With the version 2 options: 59,539,552 params, 19.0 GFLOPs.
    "cifar10": dict(patch_size=2, d_model=512, depth=12, layer_pattern="SSM", mlp_ratio=4.0, d_state=64,
                    s4_kernel="dplr", n_heads=8, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                    v_head_dim=64, noise_channels=256),
    # ImageNet 64x64 (64x64x3, 1000 classes), 1024 tokens, 16 S4 + 8 MLA layers. 240,716,300 params, 309.9 GFLOPs
    # (EDM's ADM teacher: 296 M params). With the version 2 options: 259,563,104 params, 335.7 GFLOPs.
    "imagenet64": dict(patch_size=2, d_model=768, depth=24, layer_pattern="SSM", mlp_ratio=4.0, d_state=64,
                       s4_kernel="dplr", n_heads=12, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, noise_channels=256),
}

# ----------------------------------------------------------------------------
# Embeddings.


def sincos_pos_embed_2d(d_model: int, H: int, W: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (H*W, d_model), row-major; half the channels encode the row."""
    if d_model % 4 != 0:
        raise ValueError(f"d_model must be divisible by 4 for the 2-D sin-cos position embedding, got {d_model}.")
    omega = 1.0 / 10000 ** (np.arange(d_model // 4, dtype=np.float64) / (d_model // 4))       # (D/4,)
    rows, cols = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        ang = np.outer(pos, omega)                                                            # (L, D/4)
        parts += [np.sin(ang), np.cos(ang)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()                            # (L, D)


class FourierEmbedding(nn.Module):
    """[cos(2 pi f c), sin(2 pi f c)] with fixed geometric frequencies f from 1/16 to 32 cycles per unit, so that
    c_noise = ln(sigma) / 4 in about [-2, 2] is resolved both coarsely (monotone over the range) and finely."""

    def __init__(self, num_channels: int, f_min: float = 1 / 16, f_max: float = 32.0):
        super().__init__()
        n = num_channels // 2
        freqs = torch.exp(torch.linspace(math.log(f_min), math.log(f_max), n, dtype=torch.float64)).float()
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        freqs = self.freqs.to(torch.promote_types(self.freqs.dtype, torch.float32))           # fp32 or fp64
        ang = (2 * math.pi) * c.to(freqs.dtype)[:, None] * freqs                              # (B, n)
        return torch.cat([ang.cos(), ang.sin()], dim=1)                                       # (B, 2n)

# ----------------------------------------------------------------------------
# The network.


class HybridDenoiser(ModelMixin, ConfigMixin):
    """DiT-style denoiser backbone with S4 / MLA / MHA token mixers chosen by ``layer_pattern``.

    ``forward(x, c_noise, class_labels=None)`` maps images (B, C, R, R) to F_x of the same shape. ``c_noise`` is
    ln(sigma) / 4 with shape (B,), (B, 1, 1, 1) or a scalar. ``class_labels`` is None or a LongTensor (B,) of class
    indices in [0, label_dim]; index ``label_dim`` is the null class, and None on a conditional model means all-null.
    Modulations and the final layer are zero-initialised, so F == 0 at initialisation.
    """

    @register_to_config
    def __init__(
        self,
        img_resolution: int,                # Image height = width.
        img_channels: int,                  # Image channels C.
        *,
        label_dim: int = 0,                 # Number of classes; 0 = unconditional.
        patch_size: int = 2,                # Patch size p; img_resolution must be divisible by it.
        d_model: int = 256,                 # Token width.
        depth: int = 8,                     # Number of blocks; layer_pattern is tiled to this length.
        layer_pattern: str = "SSM",         # Mixer per block: S = bidirectional S4, M = MLA, A = MHA.
        mlp_ratio: float = 4.0,             # MLP hidden width / d_model.
        d_state: int = 64,                  # S4 state size N.
        s4_kernel: str = "dplr",            # S4 kernel: "dplr" (S4) or "diag" (S4D).
        n_heads: int = 4,                   # Attention heads (MLA and MHA).
        kv_lora_rank: int = 64,             # MLA KV latent dim.
        q_lora_rank: int | None = None,     # MLA query latent dim; None = no query compression.
        qk_nope_head_dim: int = 32,         # MLA per-head q/k dims without position.
        qk_rope_head_dim: int = 16,         # MLA per-head decoupled RoPE dims (divisible by 4).
        v_head_dim: int = 32,               # MLA per-head value dims.
        noise_channels: int = 256,          # Fourier features of c_noise.
        # Version 2 options; the defaults are version 1, so config.json files written before them load unchanged.
        s4_2d: bool = False,                # S layers are 2-D S4ND mixers over the token grid (else 1-D scans).
        mlp_conv: bool = False,             # Depthwise 3x3 conv inside every MLP.
        long_skips: bool = False,           # U-ViT long skips: block i feeds block depth-1-i (concat + linear).
        final_conv: bool = False,           # 3x3 conv on the unpatchified output (smooths patch seams).
        # Version 3: convolutional U-Net levels around the token blocks; None = none (versions 1 and 2).
        conv_channels: list[int] | None = None,  # Widths of the conv levels at R, R/2, ...; None = none.
        conv_blocks: int = 1,               # ConvResBlocks per conv level (encoder and decoder each).
    ):
        super().__init__()
        # Validate the configuration.
        if img_resolution % patch_size != 0:
            raise ValueError(f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}.")
        if not layer_pattern:
            raise ValueError("layer_pattern is empty; expected characters from " + ", ".join(MIXERS) + ".")
        for ch in layer_pattern:
            if ch not in MIXERS:
                raise ValueError(f"layer_pattern {layer_pattern!r} has unknown mixer character {ch!r}; expected "
                                 + ", ".join(f"{k!r} ({v})" for k, v in MIXERS.items()) + ".")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}.")
        conv_channels = tuple(int(ch) for ch in conv_channels or ())
        if any(ch < 1 for ch in conv_channels) or conv_blocks < 1:
            raise ValueError(f"conv_channels must be positive widths and conv_blocks >= 1, got {conv_channels} and "
                             f"{conv_blocks}.")
        token_res = img_resolution >> len(conv_channels)                                       # after the conv levels
        if token_res << len(conv_channels) != img_resolution or token_res % patch_size != 0:
            raise ValueError(f"img_resolution {img_resolution} halved {len(conv_channels)} times (conv_channels "
                             f"{list(conv_channels)}) must stay an integer divisible by patch_size {patch_size}.")
        self.grid = (token_res // patch_size, token_res // patch_size)
        n_tokens = self.grid[0] * self.grid[1]
        self.layers = (layer_pattern * depth)[:depth]                                          # tiled pattern

        # Conv levels (version 3) and patchify + position embedding.
        token_channels = conv_channels[-1] if conv_channels else img_channels
        self.encoder = ConvEncoder(img_channels, conv_channels, conv_blocks, d_model) if conv_channels else None
        self.decoder = ConvDecoder(img_channels, conv_channels, conv_blocks, d_model) if conv_channels else None
        self.x_embedder = nn.Conv2d(token_channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d_model, *self.grid), persistent=False)

        # Conditioning: MLP(Fourier(c_noise)) + label embedding (row label_dim is the null class).
        self.map_noise = FourierEmbedding(noise_channels)
        self.map_layer = nn.Sequential(nn.Linear(noise_channels, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.label_embed = nn.Embedding(label_dim + 1, d_model) if label_dim > 0 else None

        # Blocks; the k-th S4 layer scans row-major for even k and column-major for odd k.
        mixer_kwargs = dict(n_tokens=n_tokens, d_state=d_state, s4_kernel=s4_kernel, n_heads=n_heads,
                            kv_lora_rank=kv_lora_rank, q_lora_rank=q_lora_rank, qk_nope_head_dim=qk_nope_head_dim,
                            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, grid=self.grid, s4_2d=s4_2d)
        blocks, n_s4 = [], 0
        for kind in self.layers:
            blocks.append(AdaLNBlock(d_model, make_mixer(kind, d_model, **mixer_kwargs), mlp_ratio=mlp_ratio,
                                     column_major=(kind == "S" and not s4_2d and n_s4 % 2 == 1),
                                     mlp_conv=mlp_conv))
            n_s4 += kind == "S"
        self.blocks = nn.ModuleList(blocks)
        # U-ViT long skips: the outputs of the first depth // 2 blocks enter the last depth // 2 in reverse order.
        self.skip_linears = (nn.ModuleList(nn.Linear(2 * d_model, d_model) for _ in range(depth // 2))
                             if long_skips else None)
        self.final_layer = FinalLayer(d_model, patch_size * patch_size * token_channels)
        self.out_conv = nn.Conv2d(img_channels, img_channels, 3, padding=1) if final_conv else None
        self._init_weights()

    def _init_weights(self) -> None:
        # Xavier for every linear (DiT), the patch embedding like a linear; then zero the adaLN-Zero layers.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for layer in self.map_layer:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.out_conv is not None:
            nn.init.zeros_(self.out_conv.bias)
        for m in self.modules():                     # conv levels: their blocks start as their skip paths
            if hasattr(m, "affine") and hasattr(m, "conv2"):
                for layer in (m.affine, m.conv2):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, img_resolution: int, img_channels: int, label_dim: int = 0,
                    **overrides: Any) -> HybridDenoiser:
        """Build a network from ``PRESETS[name]``; keyword overrides replace preset values."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}.")
        return cls(img_resolution, img_channels, label_dim=label_dim, **{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> HybridDenoiser:
        """diffusers ``from_pretrained``; then marks the S4 parameters again (``backbones.s4.is_ssm_parameter``),
        because loading replaces Parameter objects and drops their ``_ssm`` attribute."""
        model = super().from_pretrained(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, S4) and hasattr(module, "_mark_ssm"):
                module._mark_ssm()
        return model

    def _noise_vector(self, c_noise: torch.Tensor | float, B: int, device: torch.device) -> torch.Tensor:
        c = torch.as_tensor(c_noise, device=device, dtype=torch.float32).reshape(-1)
        if c.numel() == 1:
            return c.expand(B)
        if c.numel() != B:
            raise ValueError(f"c_noise has {c.numel()} values for a batch of {B}; expected shape (B,), (B, 1, 1, 1) "
                             "or a scalar.")
        return c

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, R, R), c_noise = ln(sigma)/4 of shape (B,), (B, 1, 1, 1) or scalar -> F_x (B, C, R, R)."""
        cfg = self.config
        R, C, p = cfg.img_resolution, cfg.img_channels, cfg.patch_size
        if x.ndim != 4 or x.shape[1] != C or x.shape[2] != R or x.shape[3] != R:
            raise ValueError(f"expected input of shape (B, {C}, {R}, {R}), got {tuple(x.shape)}.")
        B = x.shape[0]
        H, W = self.grid

        # Conditioning vector.
        emb = self.map_noise(self._noise_vector(c_noise, B, x.device))                         # (B, noise_channels)
        c = self.map_layer(emb.to(self.map_layer[0].weight.dtype))                             # (B, D)
        if self.label_embed is not None:
            if class_labels is None:
                class_labels = torch.full((B,), cfg.label_dim, device=x.device, dtype=torch.long)
            c = c + self.label_embed(class_labels.reshape(B).long())
        elif class_labels is not None:
            raise ValueError("class_labels were given to an unconditional model (label_dim = 0); pass None.")

        # Conv levels (version 3), then tokens with position embedding.
        if self.encoder is not None:
            x, skips_conv = self.encoder(x, c)                                                 # (B, C', R', R')
        h = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)        # (B, L, D)

        # Blocks, final layer, unpatchify.
        n_skip = len(self.skip_linears) if self.skip_linears is not None else 0
        skips = []
        for i, block in enumerate(self.blocks):
            if n_skip and i >= len(self.blocks) - n_skip:
                h = self.skip_linears[i - (len(self.blocks) - n_skip)](torch.cat([h, skips.pop()], dim=-1))
            h = block(h, c, (H, W))
            if i < n_skip:
                skips.append(h)
        h = self.final_layer(h, c)                                                             # (B, L, p*p*C')
        Ct = h.shape[-1] // (p * p)
        h = h.view(B, H, W, p, p, Ct).permute(0, 5, 1, 3, 2, 4)                                # (B, C', H, p, W, p)
        h = h.reshape(B, Ct, H * p, W * p)
        if self.decoder is not None:                  # the token blocks are a residual middle of the conv U-Net
            h = self.decoder(x + h, skips_conv, c)                                             # (B, C, R, R)
        return self.out_conv(h) if self.out_conv is not None else h
