"""``SiDPipeline``: a diffusers ``DiffusionPipeline`` for the generators that sid exports (one step, or K steps).

A generator folder (``run_dir/generator``) is the generator's denoiser in its own layout (a sid HybridDenoiser, a
diffusers UNet2DModel + scheduler, an EDM network) plus ``sid_generator.json`` (``sigma_init``, teacher, kimg,
``generator_steps``), a
``model_index.json`` naming this class and a model card ``README.md`` (docs/design.md section 7). Images depend only on
their seeds and are bit-identical to what ``sample.py --generator DIR --seeds ...`` writes: the same per-seed
latents, step noise and labels (:func:`sid.sampling.seed_latents`, :func:`sid.generator.seed_step_noise`,
:func:`sid.sampling.seed_labels`) and the same uint8 conversion (:func:`sid.data.to_uint8`).

    from sid import SiDPipeline
    pipe = SiDPipeline.from_pretrained("runs/sid-mnist5k/generator")
    images = pipe(seeds=[0, 1, 2, 3]).images             # 4 PIL images, K network evaluations each (K trained)
    images = pipe(seeds=[0, 1], num_inference_steps=2).images   # any other number of steps
    pipe.push_to_hub("user/sid-mnist5k")                  # the same folder on the Hugging Face Hub
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from huggingface_hub import create_repo, upload_folder

from .config import UserError
from .data import to_uint8
from .generator import FewStepGenerator, seed_step_noise
from .sampling import seed_labels, seed_latents

PIPELINE_INDEX = "model_index.json"
MODEL_CARD = "README.md"
OUTPUT_TYPES = ("pil", "np", "pt")


def model_index() -> dict:
    """The ``model_index.json`` of a generator folder: it names :class:`SiDPipeline`, never a multi-step pipeline."""
    import diffusers

    return {"_class_name": "SiDPipeline", "_diffusers_version": diffusers.__version__,
            "_sid_library": "sid (load with sid.SiDPipeline.from_pretrained)",
            "generator": ["sid.generator", "FewStepGenerator"]}


def model_card(meta: dict, metrics: dict | None = None, command: str | None = None, config_yaml: str | None = None,
               ) -> str:
    """A model card (README.md with YAML front matter) for a generator folder: teacher, kimg, steps, guidance,
    metrics, command."""
    steps = int(meta.get("generator_steps", 1))
    kind = "One-step" if steps == 1 else f"{steps}-step"
    lines = ["---", "library_name: sid", "pipeline_tag: unconditional-image-generation",
             "tags:", "- sid", "- score-identity-distillation", "- one-step" if steps == 1 else "- few-step", "---",
             "", f"# {kind} generator distilled with Score identity Distillation (SiD)", "",
             f"- teacher: `{meta.get('teacher')}`",
             f"- trained for: {float(meta.get('kimg', 0)):.3f} kimg",
             f"- sigma_init: {meta.get('sigma_init')}",
             f"- network evaluations per image: {steps}" + (
                 f" (noise levels {', '.join(f'{x:.4g}' for x in meta['generator_sigmas'])})"
                 if steps > 1 and "generator_sigmas" in meta else "")]
    if meta.get("guidance"):
        g = meta["guidance"]
        lines.append(f"- LSG guidance in training: kappa1 (train_fake) {g.get('train_fake')}, kappa2 = kappa3 "
                     f"(eval_fake) {g.get('eval_fake')}, kappa4 (eval_real) {g.get('eval_real')}")
    for name, m in (metrics or {}).items():
        lines.append(f"- {name}: {m['value']:.4f} over {m['num_samples']} samples at {m['kimg']:.3f} kimg"
                     + (" (fd_lenet is not FID)" if name == "fd_lenet" else ""))
    if not metrics:
        lines.append("- metrics: none measured during training")
    lines += ["", "## Made by", "", "```bash", command or "(not recorded)", "```"]
    if config_yaml:
        lines += ["", "Resolved configuration of the run:", "", "```yaml", config_yaml.rstrip(), "```"]
    lines += ["", "## Use", "", "```python", "from sid import SiDPipeline", "",
              "pipe = SiDPipeline.from_pretrained(\"PATH_OR_REPO\")",
              "images = pipe(seeds=[0, 1, 2, 3]).images  # same images as sample.py --seeds 0-3", "```", "",
              "or `python sample.py --generator PATH --seeds 0-63 --outdir out`.", ""]
    return "\n".join(lines)


class SiDPipeline(DiffusionPipeline):
    """Image generation in one or a few steps from a sid generator folder: ``pipe(seeds=[...]).images``.

    Args:
        generator: a :class:`sid.generator.FewStepGenerator` (``OneStepGenerator`` is the same class; its
            ``denoiser`` has ``img_resolution``, ``img_channels``, ``label_dim``; ``steps`` is the default number
            of steps).
    """

    def __init__(self, generator: FewStepGenerator):
        super().__init__()
        self.register_modules(generator=generator)

    # Loading and saving: sid's generator folder, read by sid.teachers.load_generator.

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> SiDPipeline:
        """Load a generator folder (``run_dir/generator``) or a Hub repository holding one.

        Keyword arguments go to ``huggingface_hub.snapshot_download`` for a repository id; a local folder needs none.
        """
        from .teachers import load_generator

        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path) and not os.path.exists(path) and path.count("/") == 1:
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, **kwargs)
        pipe = cls(load_generator(path))
        # Keep the folder's description and card, so that save_pretrained / push_to_hub write them again.
        from .teachers import GENERATOR_FILE

        with open(os.path.join(path, GENERATOR_FILE)) as fh:
            pipe._sid_meta = json.load(fh)
        card = os.path.join(path, MODEL_CARD)
        if os.path.isfile(card):
            with open(card) as fh:
                pipe._sid_card = fh.read()
        return pipe

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write the generator folder (denoiser, ``sid_generator.json``, ``model_index.json``, model card)."""
        from .teachers import save_generator

        meta = dict(getattr(self, "_sid_meta", {}))
        meta.pop("sigma_init", None)
        meta["generator_steps"] = self.generator.steps
        card = getattr(self, "_sid_card", None)
        save_generator(self.generator.denoiser, save_directory, self.generator.init_sigma, meta, card=card)

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, **kwargs) -> str:
        """Upload the generator folder (with its model card) to the Hugging Face Hub repository ``repo_id``."""
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "generator")
            self.save_pretrained(folder)
            return upload_folder(repo_id=repo_id, folder_path=folder, token=token, create_pr=create_pr,
                                 commit_message=commit_message or "Upload SiD generator")

    # Devices: the generator is a plain nn.Module.

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def to(self, *args, **kwargs) -> SiDPipeline:
        self.generator.to(*args, **kwargs)
        return self

    # Generation.

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], class_labels: int | Sequence[int] | torch.Tensor | None = None,
                 num_inference_steps: int | None = None, output_type: str = "pil", batch_size: int = 100,
                 return_dict: bool = True):
        """Generate one image per seed with ``num_inference_steps`` network evaluations.

        Args:
            seeds: non-negative integers; image ``i`` depends only on ``seeds[i]``.
            class_labels: None draws each image's label from its seed (as ``sample.py`` does); an int or one int
                per seed fixes them. Unconditional generators take None only.
            num_inference_steps: None (the number of steps the generator was trained for, ``generator.steps``) or
                any positive K: the shared network applied K times (:class:`sid.generator.FewStepGenerator`).
            output_type: ``"pil"`` (list of PIL images), ``"np"`` (uint8 array (N, H, W, C), as ``sample.py``
                stores in images.npz) or ``"pt"`` (uint8 tensor (N, C, H, W)). The values are exact uint8 levels,
                not floats in [0, 1].
            batch_size: images per network call; does not change the images.

        Returns:
            ``ImagePipelineOutput(images=...)``, or ``(images,)`` when ``return_dict`` is False.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type is {output_type!r}, expected one of {', '.join(OUTPUT_TYPES)}")
        steps = self.generator.steps if num_inference_steps is None else num_inference_steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserError(f"num_inference_steps is {num_inference_steps!r}, expected None (the generator's "
                            f"{self.generator.steps}) or a positive integer")
        seeds = [int(s) for s in seeds]
        if not seeds or min(seeds) < 0:
            raise UserError(f"seeds are {seeds}, expected a non-empty list of non-negative integers")
        denoiser = self.generator.denoiser
        shape = (denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
        label_dim = int(denoiser.label_dim)
        device = self.device
        labels_all = self._labels(class_labels, seeds, label_dim)
        chunks = []
        for i in range(0, len(seeds), batch_size):
            batch = seeds[i:i + batch_size]
            z = seed_latents(batch, shape, device)
            labels = seed_labels(batch, label_dim, device) if labels_all is None or label_dim == 0 else \
                labels_all[i:i + batch_size].to(device)
            noise = seed_step_noise(batch, shape, steps, device)
            chunks.append(to_uint8(self.generator(z, labels, noise, steps=steps)).cpu())
        images = torch.cat(chunks)  # (N, C, H, W) uint8
        if output_type == "pt":
            out = images
        else:
            out = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
            if output_type == "pil":
                from PIL import Image

                out = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in out]
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    @staticmethod
    def _labels(class_labels, seeds: list[int], label_dim: int) -> torch.Tensor | None:
        if class_labels is None:
            return None
        if label_dim == 0:
            raise UserError("class_labels were given, but this generator is unconditional; pass class_labels=None")
        labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(len(seeds))
        if labels.numel() != len(seeds):
            raise UserError(f"class_labels has {labels.numel()} entries for {len(seeds)} seeds, expected one per seed")
        if labels.min() < 0 or labels.max() >= label_dim:
            raise UserError(f"class_labels hold {labels.tolist()}, expected classes in 0..{label_dim - 1}")
        return labels.clone()


__all__ = ["SiDPipeline", "model_card", "model_index"]
