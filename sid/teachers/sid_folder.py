"""Teachers trained by sid: a ``HybridDenoiser.save_pretrained`` folder wrapped in :class:`sid.EDMPrecond`."""

from __future__ import annotations

from ..config import UserError
from ..precond import EDMPrecond


def load_sid(path: str) -> EDMPrecond:
    from backbones import HybridDenoiser

    try:
        backbone = HybridDenoiser.from_pretrained(path)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"cannot load the sid denoiser in '{path}' ({str(e).splitlines()[0]})") from e
    return EDMPrecond(backbone, sigma_data=read_sigma_data(path))


def read_sigma_data(path: str) -> float:
    """``sigma_data`` recorded in ``path/sid_precond.json``; 0.5 (EDM's value) for folders written before it was."""
    import json
    import math
    import os

    from ..precond import PRECOND_FILE

    file = os.path.join(path, PRECOND_FILE)
    if not os.path.isfile(file):
        return 0.5
    try:
        with open(file) as fh:
            value = json.load(fh)["sigma_data"]
        value = float(value)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"'{file}' is not a valid preconditioning description ({e}); expected "
                        '{"sigma_data": a positive number}') from e
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"'{file}' has sigma_data {value}, expected a positive number")
    return value
