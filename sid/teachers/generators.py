"""Exported generators (one step, or K steps with shared weights): a denoiser folder (any teacher layout) plus
``sid_generator.json``, a ``model_index.json`` that names :class:`sid.SiDPipeline` and a model card ``README.md``.

Folders written before the pipeline existed (no card; a diffusers teacher's DDPMPipeline index) load unchanged.
"""

from __future__ import annotations

import json
import os

from torch import nn

from ..config import UserError
from ..generator import FewStepGenerator
from ..runs import save_pretrained_atomic
from .loader import load_teacher

GENERATOR_FILE = "sid_generator.json"


def save_generator(denoiser: nn.Module, folder: str, sigma_init: float, extra: dict | None = None,
                   card: str | None = None) -> None:
    """Write ``denoiser`` with ``save_pretrained`` plus ``sid_generator.json``, ``model_index.json`` (naming
    SiDPipeline; it replaces the multi-step pipeline index a diffusers denoiser writes) and the model card ``card``
    (a minimal one from ``extra`` when None), atomically."""
    from ..pipeline import MODEL_CARD, PIPELINE_INDEX, model_card, model_index

    meta = {"sigma_init": float(sigma_init), **(extra or {})}
    save_pretrained_atomic(denoiser, folder, {GENERATOR_FILE: meta, PIPELINE_INDEX: model_index()},
                           {MODEL_CARD: card if card is not None else model_card(meta)})


def load_generator(path: str) -> FewStepGenerator:
    """Load an exported generator (a denoiser folder with ``sid_generator.json``); it samples with the number of
    steps it was trained for (``generator_steps``, 1 in folders that do not record it)."""
    meta_file = os.path.join(path, GENERATOR_FILE)
    if not os.path.isfile(meta_file):
        raise UserError(f"generator path '{path}' has no {GENERATOR_FILE}; expected the generator/ folder of a sid run")
    try:
        with open(meta_file) as fh:
            meta = json.load(fh)
        sigma_init = float(meta["sigma_init"])
        steps = meta.get("generator_steps", 1)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"'{meta_file}' is not a valid generator description ({e})") from e
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"'{meta_file}' has generator_steps {steps!r}, expected a positive integer")
    return FewStepGenerator(load_teacher(path), sigma_init, steps).eval()
