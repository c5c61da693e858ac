"""Neural network backbones: S4 state-space layers, multi-head latent attention and the HybridDenoiser."""

from .denoiser import PRESETS, HybridDenoiser
from .mla import MHA, MLA
from .s4 import S4, hippo_legs

__all__ = ["hippo_legs", "S4", "MLA", "MHA", "HybridDenoiser", "PRESETS"]
