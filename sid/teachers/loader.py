"""``load_teacher``: one entry point for every teacher layout, each adapted to ``D(x, sigma, class_labels)``."""

from __future__ import annotations

import json
import os

from torch import nn

from ..config import UserError

SNAPSHOT_SUFFIXES = (".pkl", ".pickle")


def load_teacher(path: str, autoguidance: float | None = None) -> nn.Module:
    """Load a frozen denoiser ``D(x, sigma, class_labels)`` (eval mode, no gradients) from

    - a sid denoiser folder (``HybridDenoiser.save_pretrained``),
    - a diffusers pipeline folder (``unet/`` + ``scheduler/``),
    - an EDM snapshot file ``network-snapshot-*.pkl`` / ``edm-*.pkl``, read without executing it, or the folder
      ``python -m sid.teachers convert`` writes from one.

    A folder with an ``autoguidance.json`` (``sid.teachers.autoguidance``) loads as an
    :class:`~sid.teachers.autoguidance.AutoGuidedDenoiser`: its network guided by the guide folder it names.

    Args:
        autoguidance: the guide's weight ``w``; None = the folder's own (1 without ``autoguidance.json``), 1 = the
            main network alone (the guide is not loaded).

    Raises:
        UserError: the path does not exist, holds none of these layouts, or is corrupt; a weight other than 1 for a
            teacher without a guide.
    """
    from .autoguidance import AutoGuidedDenoiser, check_weight, read_declaration

    if autoguidance is not None:
        check_weight(autoguidance, "the autoguidance weight")
    decl = read_declaration(path) if os.path.isdir(path) else None  # a bad declaration fails before any loading
    main = _load_one(path)
    if decl is None:
        if autoguidance is not None and autoguidance != 1:
            raise UserError(f"autoguidance weight {autoguidance:g} was asked for, but the teacher '{path}' names no "
                            f"guide network (no autoguidance.json in it); expected 1")
        return main
    guide_path, weight = decl
    weight = weight if autoguidance is None else float(autoguidance)
    if weight == 1:
        return main
    return AutoGuidedDenoiser(main, _load_one(guide_path), weight).eval().requires_grad_(False)


def _load_one(path: str) -> nn.Module:
    """One network, without its guide."""
    if not os.path.exists(path):
        raise UserError(f"teacher path '{path}' does not exist")
    if not os.path.isdir(path):
        if path.lower().endswith(SNAPSHOT_SUFFIXES):
            from .edm import load_snapshot

            return load_snapshot(path).eval().requires_grad_(False)
        raise UserError(f"teacher path '{path}' is a file, expected a folder (sid denoiser or diffusers pipeline) or "
                        "an EDM snapshot .pkl")
    config_file = os.path.join(path, "config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file) as fh:
                config = json.load(fh)
        except json.JSONDecodeError as e:
            raise UserError(f"'{config_file}' is not valid JSON ({e})") from e
        class_name = config.get("_class_name") if isinstance(config, dict) else None
        if class_name == "HybridDenoiser":
            from .sid_folder import load_sid

            return load_sid(path).eval().requires_grad_(False)
        if class_name == "EDMNetwork":
            from .edm import load_folder

            return load_folder(path, config).eval().requires_grad_(False)
        raise UserError(f"teacher '{path}' holds a {class_name} model; expected a sid HybridDenoiser folder, an EDM "
                        "network folder or a diffusers pipeline folder with unet/ and scheduler/")
    if os.path.isdir(os.path.join(path, "unet")):
        from .diffusers_vp import load_diffusers

        return load_diffusers(path).eval().requires_grad_(False)
    raise UserError(f"teacher '{path}' is neither a sid denoiser folder (config.json + safetensors) nor a diffusers "
                    "pipeline folder (unet/ + scheduler/)")
