"""A small writer of EDM-format snapshot pickles for the tests (never used by sid itself).

It emits the structure of NVIDIA's files: ``dict(ema=..., loss_fn=..., augment_pipe=..., dataset_kwargs=...)`` with
every module (and the loss and augmentation objects) pickled as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, meta = dict(type='class', version=6, module_src,
class_name, state); ``state`` is the module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, hooks, ...)
plus ``_init_args`` / ``_init_kwargs``; ``torch.nn.ModuleDict`` stays a plain class (NEWOBJ + BUILD); tensors go
through torch's own reduction under plain ``pickle`` (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` /
``torch.storage._load_from_bytes`` of ``torch.save``d bytes). ``torch_utils.persistence`` exists in
``sys.modules`` only while writing.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types

import numpy as np
import torch
from torch import nn

from sid.precond import EDM_PRECONDS
from sid.teachers.edm import build_denoiser


def sentinel_source(flag_file: str) -> str:
    """Module source that, if anything executed it, would write ``flag_file`` and set a builtin."""
    return ("import builtins, pathlib\n"
            "builtins.SID_EDM_SENTINEL = True\n"
            f"pathlib.Path({flag_file!r}).write_text('the embedded source was executed')\n"
            "class EDMPrecond: pass\n")


@contextlib.contextmanager
def fake_persistence():
    """Register a stand-in ``torch_utils.persistence`` module so pickle can name its function; removed after."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # never called: only its name goes into the file
        raise AssertionError("the test writer's stand-in was called")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": pkg, "torch_utils.persistence": mod})
    try:
        yield _reconstruct_persistent_obj
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """A non-module persistent object of EDM (loss, augmentation pipe): a class name and a state."""

    def __init__(self, class_name: str, **state):
        self.class_name, self.state = class_name, state


class SnapshotPickler(pickle.Pickler):
    def __init__(self, fh, reconstruct, module_src: str, class_names: dict, init_kwargs: dict[int, dict],
                 version: int = 6):
        super().__init__(fh, protocol=4)
        self.reconstruct, self.module_src, self.version = reconstruct, module_src, version
        self.class_names, self.init_kwargs = class_names, init_kwargs

    def reducer_override(self, obj):
        if isinstance(obj, Persistent):
            name, state = obj.class_name, {**obj.state, "_init_args": (), "_init_kwargs": {}}
        elif isinstance(obj, nn.Module) and not isinstance(obj, nn.ModuleDict):
            state = dict(obj.__dict__)
            state.pop("init_kwargs", None)  # sid's own record; EDM keeps _init_kwargs instead
            state.update(_init_args=(), _init_kwargs=self.init_kwargs.get(id(obj), {}))
            name = self.class_names.get(type(obj), type(obj).__name__)
        else:
            return NotImplemented
        meta = dict(type="class", version=self.version, module_src=self.module_src, class_name=name, state=state)
        return self.reconstruct, (meta,)


EDM_NAMES = {cls: name for name, cls in EDM_PRECONDS.items()}


def make_denoiser(precond: str, init_kwargs: dict, seed: int = 0, noise: float = 0.05):
    """A random-weight sid denoiser of EDM's ``precond(**init_kwargs)``, perturbed so no output is trivial."""
    torch.manual_seed(seed)
    D = build_denoiser(precond, init_kwargs)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(noise * torch.randn_like(p))
    return D.eval()


def write_snapshot(path, denoiser, flag_file: str, *, ema_class_name: str | None = None, extra: dict | None = None,
                   version: int = 6) -> str:
    """Pickle ``denoiser`` as EDM's training loop does (protocol 4 by default in Python 3.8+)."""
    names = dict(EDM_NAMES)
    if ema_class_name is not None:
        names[type(denoiser)] = ema_class_name
    data = dict(
        ema=denoiser,
        loss_fn=Persistent("EDMLoss", P_mean=-1.2, P_std=1.2, sigma_data=0.5),
        augment_pipe=Persistent("AugmentPipe", p=np.float64(0.12), xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                                aniso=1, translate_frac=1, xint_max=np.float32(0.125)),
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                            use_labels=denoiser.label_dim > 0, xflip=False, cache=True,
                            resolution=denoiser.img_resolution, max_size=50000),
        **(extra or {}),
    )
    with fake_persistence() as reconstruct, open(path, "wb") as fh:
        SnapshotPickler(fh, reconstruct, sentinel_source(flag_file), names,
                        {id(denoiser): dict(denoiser.init_kwargs)}, version).dump(data)
    return str(path)


# Tiny versions of every supported network (8x8 images; ADM needs 64 channels for one attention head).
TINY = {
    "ddpmpp_cond_edm": ("EDMPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=10, use_fp16=False, model_type="SongUNet",
        embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
        augment_dim=9, dropout=0.13)),
    "ddpmpp_uncond_vp": ("VPPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
        embedding_type="positional", encoder_type="standard", decoder_type="standard", channel_mult_noise=1,
        resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
        dropout=0.1, beta_d=19.9, beta_min=0.1)),
    "ncsnpp_uncond_ve": ("VEPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet",
        embedding_type="fourier", encoder_type="residual", decoder_type="standard", channel_mult_noise=2,
        resample_filter=[1, 3, 3, 1], model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
        attn_resolutions=[4], augment_dim=9, dropout=0.13)),
    "ncsnpp_skip_edm": ("EDMPrecond", dict(
        img_resolution=8, img_channels=1, label_dim=3, model_type="SongUNet", embedding_type="fourier",
        encoder_type="skip", decoder_type="skip", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
        model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    "adm_cond_edm": ("EDMPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=5, use_fp16=True, model_type="DhariwalUNet",
        model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1)),
    "adm_uncond_iddpm": ("iDDPMPrecond", dict(
        img_resolution=8, img_channels=3, label_dim=0, model_type="DhariwalUNet", model_channels=64,
        channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], dropout=0.1)),
}
