"""Teachers from NVIDIA's EDM (docs/design.md section 10): snapshot pickles and the safetensors folders
converted from them.

A snapshot's ``ema`` record names a preconditioner (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) with its
constructor keywords (``_init_kwargs``: resolution, channels, labels, ``model_type`` and the network's keywords);
sid builds its own implementation of that preconditioner and network (``sid.precond``, ``backbones.edm_unets``)
and loads the file's tensors into it by name. The folder format (``save_pretrained``) is ``config.json``
(``_class_name: EDMNetwork``, the preconditioner's name and keywords) plus ``diffusion_pytorch_model.safetensors``.
"""

from __future__ import annotations

import inspect
import json
import os

import torch

from ..config import UserError
from ..precond import EDM_PRECONDS, EDMNetworkPrecond
from .edm_pickle import ModuleRecord, PersistentRecord, read_snapshot

FOLDER_CLASS = "EDMNetwork"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Constants that belong to each preconditioner (EDM's defaults); every other keyword goes to the network.
PRECOND_KEYS = {
    "EDMPrecond": ("sigma_min", "sigma_max", "sigma_data"),
    "VPPrecond": ("beta_d", "beta_min", "M", "epsilon_t"),
    "VEPrecond": ("sigma_min", "sigma_max"),
    "iDDPMPrecond": ("C_1", "C_2", "M"),
}
DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                 "iDDPMPrecond": "DhariwalUNet"}

# ----------------------------------------------------------------------------
# Building a denoiser from a preconditioner's name and EDM constructor keywords.


def _plain(v, where: str):
    """JSON-compatible copy of a keyword value (tuples become lists); anything else is refused."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, where) for k, x in v.items()}
    raise UserError(f"{where} has a {type(v).__name__} value, expected numbers, strings or lists")


def build_denoiser(precond: str, init_kwargs: dict, where: str = "the EDM network") -> EDMNetworkPrecond:
    """A freshly initialised sid denoiser for EDM's ``precond(**init_kwargs)``."""
    from backbones.edm_unets import EDM_NETWORKS

    if precond not in EDM_PRECONDS:
        raise UserError(f"{where} is a {precond}, expected one of {', '.join(EDM_PRECONDS)}")
    kw = _plain(dict(init_kwargs), f"{where}'s init kwargs")
    try:
        img_resolution, img_channels = int(kw.pop("img_resolution")), int(kw.pop("img_channels"))
    except KeyError as e:
        raise UserError(f"{where}'s init kwargs have no {e.args[0]}") from None
    label_dim, use_fp16 = int(kw.pop("label_dim", 0)), bool(kw.pop("use_fp16", False))
    model_type = kw.pop("model_type", DEFAULT_MODEL[precond])
    if model_type not in EDM_NETWORKS:
        raise UserError(f"{where} uses model_type {model_type!r}, expected one of {', '.join(EDM_NETWORKS)}")
    constants = {k: kw.pop(k) for k in PRECOND_KEYS[precond] if k in kw}
    network = EDM_NETWORKS[model_type]
    accepted = set(inspect.signature(network.__init__).parameters) - {"self"}
    unknown = sorted(set(kw) - accepted)
    if unknown:
        raise UserError(f"{where} passes {', '.join(unknown)} to {model_type}, which takes "
                        f"{', '.join(sorted(accepted - {'img_resolution', 'in_channels', 'out_channels'}))}")
    out_channels = img_channels * (2 if precond == "iDDPMPrecond" else 1)
    try:
        model = network(img_resolution=img_resolution, in_channels=img_channels, out_channels=out_channels,
                        label_dim=label_dim, **kw)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as e:
        raise UserError(f"{where}: {model_type} cannot be built from its init kwargs ({e})") from e
    denoiser = EDM_PRECONDS[precond](model, img_resolution=img_resolution, img_channels=img_channels,
                                     label_dim=label_dim, use_fp16=use_fp16, **constants)
    denoiser.init_kwargs = {"img_resolution": img_resolution, "img_channels": img_channels, "label_dim": label_dim,
                            "use_fp16": use_fp16, "model_type": model_type, **constants, **kw}
    return denoiser


def precond_name(denoiser: EDMNetworkPrecond) -> str:
    return next(name for name, cls in EDM_PRECONDS.items() if type(denoiser) is cls)


def _load_state(denoiser: EDMNetworkPrecond, state: dict[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)``; missing, unexpected or misshapen tensors are one sentence."""
    expected = denoiser.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise UserError(f"{where} does not match sid's {type(denoiser.model).__name__}: {' and '.join(parts)} tensors")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{where} holds {k} of shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    denoiser.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------
# Snapshot pickles.


def _flatten_records(record, prefix: str, out: dict[str, torch.Tensor], where: str) -> None:
    """Parameters and persistent buffers of a record tree, with dotted names as in ``state_dict``."""
    if not isinstance(record, (PersistentRecord, ModuleRecord)):
        raise UserError(f"{where} holds a {type(record).__name__} at '{prefix.rstrip('.')}', expected a module")
    state = getattr(record, "state", None)
    if not isinstance(state, dict):
        raise UserError(f"{where} has a module without state at '{prefix.rstrip('.')}'")
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        tensors = state.get(group) or {}
        if not isinstance(tensors, dict):
            raise UserError(f"{where} has a malformed {group} at '{prefix.rstrip('.')}'")
        for name, t in tensors.items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise UserError(f"{where} holds a {type(t).__name__} as {prefix}{name}, expected a tensor")
            out[prefix + name] = t.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten_records(child, f"{prefix}{name}.", out, where)


def load_snapshot(path: str) -> EDMNetworkPrecond:
    """The ``ema`` network of an EDM snapshot pickle as a sid denoiser, read without executing the file."""
    record = read_snapshot(path)["ema"]
    where = f"EDM snapshot '{path}'"
    if record.class_name not in EDM_PRECONDS:
        raise UserError(f"{where} holds a {record.class_name} network, expected one of {', '.join(EDM_PRECONDS)}")
    init_kwargs = record.state.get("_init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise UserError(f"{where} has no _init_kwargs for its {record.class_name}")
    denoiser = build_denoiser(record.class_name, init_kwargs, where)
    inner = (record.state.get("_modules") or {}).get("model")
    model_type = denoiser.init_kwargs["model_type"]
    if isinstance(inner, PersistentRecord) and inner.class_name != model_type:
        raise UserError(f"{where} says model_type {model_type} but holds a {inner.class_name}")
    state: dict[str, torch.Tensor] = {}
    _flatten_records(record, "", state, where)
    _load_state(denoiser, state, where)
    return denoiser


# ----------------------------------------------------------------------------
# Folders: config.json + safetensors.


def save_folder(denoiser: EDMNetworkPrecond, folder: str) -> None:
    """Write ``config.json`` and the weights; :func:`load_folder` (and ``load_teacher``) read them back."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": FOLDER_CLASS, "precond": precond_name(denoiser), "init_kwargs": denoiser.init_kwargs}
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})


def load_folder(path: str, config: dict) -> EDMNetworkPrecond:
    from safetensors.torch import load_file

    where = f"EDM network folder '{path}'"
    if not isinstance(config.get("init_kwargs"), dict):
        raise UserError(f"{where} has no init_kwargs in config.json")
    denoiser = build_denoiser(str(config.get("precond")), config["init_kwargs"], where)
    weights = os.path.join(path, WEIGHTS_FILE)
    try:
        state = load_file(weights)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise UserError(f"cannot load the weights '{weights}' ({type(e).__name__})") from e
    _load_state(denoiser, state, where)
    return denoiser


def convert(pkl: str, outdir: str) -> EDMNetworkPrecond:
    """Read an EDM snapshot and write it as a folder (atomically); returns the denoiser."""
    from ..runs import save_pretrained_atomic

    denoiser = load_snapshot(pkl)
    save_pretrained_atomic(denoiser, outdir)
    return denoiser
