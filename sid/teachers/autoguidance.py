"""Autoguidance (Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024,
arXiv 2406.02507): a denoiser guided by a weaker version of itself,

    D_w(x, sigma, c) = D_guide(x, sigma, c) + w * (D_main(x, sigma, c) - D_guide(x, sigma, c)),

with both networks given the same class label (no null class is needed, unlike classifier-free guidance) and
``w = 1`` the main network alone. The guide is a version of the main model with the same kind of errors, only
larger: less trained and/or smaller. Extrapolating away from it removes those errors without the loss of variety
that classifier-free guidance brings. It costs one guide evaluation per main evaluation.

A teacher folder declares its guide in ``autoguidance.json``: ``{"guide": "guide", "weight": 2.0}``, where
``guide`` is a folder (relative to the teacher folder, or absolute) in any layout :func:`sid.teachers.load_teacher`
reads, and ``weight`` the default ``w``. The file is plain JSON; nothing in it is executed.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from ..config import UserError

AUTOGUIDANCE_FILE = "autoguidance.json"


class AutoGuidedDenoiser(nn.Module):
    """``guide + weight * (main - guide)``; frozen like every teacher. ``main`` is the network that SiD copies into
    its generator and fake score; ``guide`` only steers the teacher's predictions."""

    def __init__(self, main: nn.Module, guide: nn.Module, weight: float):
        super().__init__()
        for attr in ("img_resolution", "img_channels", "label_dim"):
            a, b = getattr(main, attr), getattr(guide, attr)
            if a != b:
                raise UserError(f"the autoguidance guide has {attr} {b} but the main network {a}; expected the same")
        self.main, self.guide, self.weight = main, guide, float(weight)

    @property
    def img_resolution(self) -> int:
        return self.main.img_resolution

    @property
    def img_channels(self) -> int:
        return self.main.img_channels

    @property
    def label_dim(self) -> int:
        return self.main.label_dim

    @property
    def sigma_data(self) -> float:
        return self.main.sigma_data

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        d_main = self.main(x, sigma, class_labels)
        d_guide = self.guide(x, sigma, class_labels)
        return d_guide + self.weight * (d_main - d_guide)


def main_network(denoiser: nn.Module) -> nn.Module:
    """The network of a teacher that trainable copies start from: the main network of an autoguided teacher."""
    return denoiser.main if isinstance(denoiser, AutoGuidedDenoiser) else denoiser


def autoguidance_weight(denoiser: nn.Module) -> float:
    """The autoguidance weight a denoiser runs with (1 = none)."""
    return denoiser.weight if isinstance(denoiser, AutoGuidedDenoiser) else 1.0


def check_weight(weight: float, what: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise UserError(f"{what} is {weight!r}, expected a number > 0 (1 = the main network alone)")
    return float(weight)


def read_declaration(folder: str) -> tuple[str, float] | None:
    """(guide folder, default weight) from ``folder/autoguidance.json``, or None when the folder has no such file."""
    path = os.path.join(folder, AUTOGUIDANCE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as fh:
            decl = json.load(fh)
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e})") from e
    if not isinstance(decl, dict) or not isinstance(decl.get("guide"), str) or "weight" not in decl:
        raise UserError(f"'{path}' must be a JSON object with \"guide\" (a folder) and \"weight\" (a number); "
                        f"it holds {json.dumps(decl)[:120]}")
    weight = check_weight(decl["weight"], f"\"weight\" in '{path}'")
    guide = decl["guide"] if os.path.isabs(decl["guide"]) else os.path.join(folder, decl["guide"])
    if not os.path.isdir(guide):
        raise UserError(f"'{path}' names the guide folder '{decl['guide']}', which does not exist (looked for "
                        f"'{guide}')")
    return guide, weight
