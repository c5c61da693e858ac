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
    return EDMPrecond(backbone)
