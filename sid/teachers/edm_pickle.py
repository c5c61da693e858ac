"""A code-free reader of NVIDIA EDM snapshot pickles (``network-snapshot-*.pkl``, the released ``edm-*.pkl``).

EDM's ``torch_utils.persistence`` pickles every network module as a call of ``_reconstruct_persistent_obj(meta)``
whose ``meta`` carries the module's Python source, which ``pickle.load`` would execute. This reader never imports
or runs anything from the file: :class:`SnapshotUnpickler` resolves only the globals below, each to a function of
this module (or a plain container), and refuses every other name with one sentence.

- ``torch_utils.persistence._reconstruct_persistent_obj`` -> :class:`PersistentRecord`, an inert record of
  ``meta`` (class name, version, state); ``module_src`` is kept as text and never compiled;
- ``torch.storage._load_from_bytes`` -> :func:`load_storage_bytes`, which reads the embedded ``torch.save`` bytes
  with ``weights_only=True`` (torch's own function uses ``weights_only=False``, which would reopen the hole);
- ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` -> checked tensor rebuilds;
- ``collections.OrderedDict``; ``torch.nn.modules.container.ModuleDict`` -> :class:`ModuleRecord`;
- numpy ``dtype`` and ``scalar`` (``numpy.core.multiarray`` in numpy 1, ``numpy._core.multiarray`` in numpy 2)
  -> plain Python numbers (object dtypes refused).
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import UserError

__all__ = ["PersistentRecord", "ModuleRecord", "SnapshotUnpickler", "read_snapshot", "load_storage_bytes"]

# ----------------------------------------------------------------------------
# Inert stand-ins for the objects of the file.


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have rebuilt, as data: nothing of it is executed."""

    class_name: str  # e.g. 'EDMPrecond', 'SongUNet', 'Conv2d' (the last component when dotted)
    version: Any
    type: str
    state: dict  # the module's __dict__: _init_kwargs, _parameters, _buffers, _modules, ...
    source_chars: int  # length of the embedded module source, for diagnostics only


def _persistent_record(meta: Any) -> PersistentRecord:
    if not isinstance(meta, dict):
        raise UserError(f"a persistent object's meta is a {type(meta).__name__}, expected a dict")
    state = meta.get("state")
    name = meta.get("class_name")
    if not isinstance(name, str) or not isinstance(state, dict):
        raise UserError("a persistent object has no class_name or no state dict")
    return PersistentRecord(class_name=name.rsplit(".", 1)[-1], version=meta.get("version"),
                            type=str(meta.get("type")), state=state, source_chars=len(str(meta.get("module_src", ""))))


@dataclass
class ModuleRecord:
    """A plain ``torch.nn.ModuleDict`` of the file (not persistent in EDM), as its pickled state."""

    state: dict = field(default_factory=dict)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise UserError(f"a ModuleDict's state is a {type(state).__name__}, expected a dict")
        self.state = state


# ----------------------------------------------------------------------------
# Tensors, storages and numpy scalars, rebuilt without trusting the file.


def load_storage_bytes(data: Any):
    """A storage from the ``torch.save`` bytes EDM's pickles embed, read with ``weights_only=True``."""
    if not isinstance(data, (bytes, bytearray)):
        raise UserError(f"a tensor storage is a {type(data).__name__}, expected bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on refused or corrupt content
        raise UserError(f"an embedded tensor storage cannot be read as plain weights ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]})") from e
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UserError(f"an embedded tensor storage holds a {type(storage).__name__}, expected a storage")
    return storage


def _is_int_tuple(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and all(isinstance(i, int) for i in v)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise UserError(f"a tensor is built on a {type(storage).__name__}, expected a storage")
    if not (isinstance(storage_offset, int) and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise UserError("a tensor has a malformed offset, size or stride")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))
    except RuntimeError as e:
        raise UserError(f"a tensor does not fit its storage ({str(e).splitlines()[0][:200]})") from e
    return t.requires_grad_(bool(requires_grad)) if t.is_floating_point() else t


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None):
    if not isinstance(data, torch.Tensor):
        raise UserError(f"a parameter wraps a {type(data).__name__}, expected a tensor")
    return torch.nn.Parameter(data.detach(), requires_grad=bool(requires_grad))


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UserError("a numpy scalar of an object or malformed dtype is not plain data")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


_NUMPY_MODULES = ("numpy", "numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("torch.storage", "_load_from_bytes"): load_storage_bytes,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.nn.modules.container", "ModuleDict"): ModuleRecord,
    **{(m, "dtype"): np.dtype for m in _NUMPY_MODULES},
    **{(m, "scalar"): _numpy_scalar for m in _NUMPY_MODULES[1:]},
}

# ----------------------------------------------------------------------------
# The unpickler.


class SnapshotUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`; every other global is a UserError."""

    def find_class(self, module: str, name: str):
        target = ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise UserError(f"the file names {module}.{name}, which an EDM snapshot never holds; refusing it (only "
                            "tensors, storages, containers and EDM persistent objects are read, and no code is run)")
        return target

    def persistent_load(self, pid):
        raise UserError("the file uses pickle persistent ids, which EDM snapshots never hold; refusing it")


def read_snapshot(path: str) -> dict:
    """Unpickle ``path`` with :class:`SnapshotUnpickler`; returns the top-level dict with 'ema' a
    :class:`PersistentRecord`.

    Raises:
        UserError: unreadable, truncated, a refused global, not a dict, or no 'ema' network.
    """
    try:
        with open(path, "rb") as fh:
            data = SnapshotUnpickler(fh).load()
    except UserError as e:
        raise UserError(f"EDM snapshot '{path}': {e}") from None
    except OSError as e:
        raise UserError(f"cannot read the EDM snapshot '{path}' ({e.strerror})") from e
    except Exception as e:  # truncated or not a pickle: EOFError, UnpicklingError, ValueError, ...
        raise UserError(f"EDM snapshot '{path}' is truncated or not a pickle ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise UserError(f"EDM snapshot '{path}' holds a {type(data).__name__}, expected a dict with an 'ema' network")
    if "ema" not in data:
        raise UserError(f"EDM snapshot '{path}' has no 'ema' network (keys: {', '.join(map(str, data))})")
    if not isinstance(data["ema"], PersistentRecord):
        raise UserError(f"EDM snapshot '{path}' holds a {type(data['ema']).__name__} as 'ema', expected an EDM "
                        "persistent network")
    return data
