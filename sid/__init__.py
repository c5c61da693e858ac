"""sid: Score identity Distillation of diffusion teachers into one-step generators, with S4 + MLA denoisers."""

from . import loss, sampling
from .generator import FewStepGenerator, OneStepGenerator
from .precond import EDMPrecond

__version__ = "0.1.0"
__all__ = ["EDMPrecond", "FewStepGenerator", "OneStepGenerator", "SiDPipeline", "loss", "sampling", "teachers",
           "metrics", "__version__"]


def __getattr__(name):
    # Heavier submodules (diffusers, scipy) load on first use: `sid.teachers`, `sid.metrics`, `sid.SiDPipeline`.
    if name == "SiDPipeline":
        from .pipeline import SiDPipeline

        return SiDPipeline
    if name in ("teachers", "metrics", "data", "config"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sid' has no attribute {name!r}")
