"""The U-Nets of NVIDIA's EDM (Karras et al. 2022, Appendix F), written for sid: SongUNet and DhariwalUNet.

- SongUNet: DDPM++ (positional noise embedding, standard encoder, resample filter [1,1]) and NCSN++ (Fourier
  embedding with ``channel_mult_noise=2``, residual encoder, filter [1,3,3,1]) of Song et al. 2021.
- DhariwalUNet: ADM of Dhariwal & Nichol 2021 (ImageNet 64x64).

Both compute the raw ``F(x_in, c_noise, class_labels, augment_labels)`` with ONE-HOT ``class_labels`` (B, label_dim)
and return a tensor of ``out_channels``. The constructor keywords are those of EDM's ``network_kwargs`` and every
parameter has the name it has in EDM's snapshot files, e.g. ``enc.32x32_block0.conv0.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock

__all__ = ["SongUNet", "DhariwalUNet", "EDM_NETWORKS"]


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero each sample's label vector with probability ``p`` while training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand(labels.shape[0], 1, device=labels.device) >= p
    return labels * keep.to(labels.dtype)


# ----------------------------------------------------------------------------
# DDPM++ / NCSN++.


class SongUNet(nn.Module):
    def __init__(
        self,
        img_resolution: int,  # image size at input and output
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,  # number of classes, 0 = unconditional
        augment_dim: int = 0,  # augmentation label size (the released CIFAR-10 models: 9), 0 = none
        model_channels: int = 128,  # base channel count
        channel_mult: list[int] = (1, 2, 2, 2),  # channel multiplier per resolution
        channel_mult_emb: int = 4,  # conditioning vector width = model_channels * this
        num_blocks: int = 4,  # residual blocks per resolution
        attn_resolutions: list[int] = (16,),  # resolutions with self-attention
        dropout: float = 0.10,
        label_dropout: float = 0.0,  # training-time label dropout
        embedding_type: str = "positional",  # positional (DDPM++) | fourier (NCSN++)
        channel_mult_noise: int = 1,  # noise embedding width = model_channels * this (NCSN++: 2)
        encoder_type: str = "standard",  # standard (DDPM++) | skip | residual (NCSN++)
        decoder_type: str = "standard",  # standard | skip
        resample_filter: list[int] = (1, 1),  # DDPM++: [1,1]; NCSN++: [1,3,3,1]
    ):
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type is {embedding_type!r}, expected positional or fourier")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type is {encoder_type!r}, expected standard, skip or residual")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type is {decoder_type!r}, expected standard or skip")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=init_attn)

        # Mapping: noise level (+ label + augmentation) -> conditioning vector.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional" \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder; 'aux' entries carry the input image down the side (skip / residual encoders).
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        # Decoder: concatenates one encoder output per block; the image comes out of the 'aux' convolutions.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Mapping; the embedding is used as [sin, cos].
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # (B, noise_channels)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # (B, emb_channels)

        # Encoder.
        skips, aux = [], x
        for name, m in self.enc.items():
            if "aux_down" in name:
                aux = m(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + m(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + m(aux)) / math.sqrt(2)
            else:
                x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
                skips.append(x)

        # Decoder.
        aux = tmp = None
        for name, m in self.dec.items():
            if "aux_up" in name:
                aux = m(aux)
            elif "aux_norm" in name:
                tmp = m(x)
            elif "aux_conv" in name:
                tmp = m(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != m.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
        return aux


# ----------------------------------------------------------------------------
# ADM.


class DhariwalUNet(nn.Module):
    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: list[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: list[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping: the label enters after the first layer, at full width.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)  # (B, emb_channels)

        # Encoder, then decoder with one skip per block.
        skips = []
        for m in self.enc.values():
            x = m(x, emb) if isinstance(m, UNetBlock) else m(x)
            skips.append(x)
        for m in self.dec.values():
            if x.shape[1] != m.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = m(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


EDM_NETWORKS = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}
