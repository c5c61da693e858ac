"""Teachers from anywhere, adapted to the one boundary ``D(x, sigma, class_labels) -> x0_hat``
(docs/design.md sections 2 and 10).

One module per source:

- ``sid_folder``: a sid denoiser folder (``HybridDenoiser.save_pretrained``), wrapped in :class:`sid.EDMPrecond`;
- ``diffusers_vp``: a diffusers pipeline folder with ``unet/`` (UNet2DModel) and ``scheduler/`` (DDPM family),
  wrapped in :class:`DiffusersVPDenoiser` (EDM Table 1, VP column);
- ``edm`` + ``edm_pickle``: NVIDIA EDM snapshot pickles, read without running their code, rebuilt on sid's own
  EDM networks and preconditioners; ``python -m sid.teachers convert PKL OUTDIR`` writes a safetensors folder.

``autoguidance``: a teacher folder may name a weaker version of itself as its guide (``autoguidance.json``);
:func:`load_teacher` then returns an :class:`AutoGuidedDenoiser`.

Every kind writes itself back with ``save_pretrained(folder)`` in a layout :func:`load_teacher` reads, so a
distilled generator exported from any of them loads again (``generators``).
"""

from .autoguidance import AUTOGUIDANCE_FILE, AutoGuidedDenoiser, autoguidance_weight, main_network
from .diffusers_vp import DiffusersVPDenoiser
from .edm import convert, load_snapshot
from .generators import GENERATOR_FILE, load_generator, save_generator
from .loader import load_teacher

__all__ = ["load_teacher", "load_generator", "save_generator", "GENERATOR_FILE", "DiffusersVPDenoiser",
           "load_snapshot", "convert",
           "AutoGuidedDenoiser", "AUTOGUIDANCE_FILE", "autoguidance_weight", "main_network"]
