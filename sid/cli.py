"""Command lines of ``train.py`` and ``sample.py``: parse, call the library, turn user errors into exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "sid",
                              "mnist5k.yaml")


@contextlib.contextmanager
def user_errors():
    """Print a UserError as one line on stderr (main process only) and exit 2; no traceback for user mistakes."""
    from .config import UserError

    try:
        yield
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _finish_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------
# train.py


def _default_run_keys() -> str:
    """The keys with the values the default run (configs/sid/mnist5k.yaml) uses; the schema's if it cannot load."""
    from .config import UserError, describe_keys, load_config

    try:
        return describe_keys(load_config(DEFAULT_CONFIG))
    except UserError:
        return describe_keys()


def train_main(argv: list[str] | None = None) -> None:

    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a teacher (kind=teacher) or distill one into a one-step generator with SiD (kind=sid; "
                    "sid.generator_steps=K for K steps, sid.guidance.* for SiD-LSG guidance). Without --config it "
                    "runs the main job: configs/sid/mnist5k.yaml, SiDA on the embedded MNIST "
                    "teacher, 14 kimg (or 9 minutes) on 2 CPU cores in under 10 minutes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="configs: configs/sid/mnist5k.yaml (default, SiDA), configs/sid/mnist5k_sid.yaml (data-free SiD), "
               "configs/sid/smoke.yaml, configs/sid/cifar10_ddpm.yaml, configs/sid/edm_*.yaml (the SiD paper's "
               "recipes on EDM teachers), configs/teacher/mnist5k.yaml, configs/teacher/mnist5k_v3.yaml, "
               "configs/teacher/cifar10.yaml\n"
               "several processes: torchrun --nproc_per_node N train.py ... or accelerate launch --multi_gpu "
               "--num_processes N train.py ... (without --multi_gpu accelerate runs one process, which is refused)\n"
               "no metrics (e.g. offline without the FID detector): 'eval.metrics=[]'; lists take YAML syntax\n\n"
               "keys (key=value overrides the config file), with the values of the default run "
               "(configs/sid/mnist5k.yaml):\n"
               + _default_run_keys(),
    )
    parser.add_argument("--config", help="YAML file overriding the schema (default: configs/sid/mnist5k.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied last")
    args = parser.parse_args(argv)
    with user_errors():
        from .config import load_config

        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        try:
            run(cfg)
        except KeyboardInterrupt:
            if os.environ.get("RANK", "0") == "0":
                print(f"interrupted; continue from the newest checkpoint in {os.path.join(cfg.run_dir, 'checkpoints')} "
                      f"with: {resume_command(args.config, args.overrides)}", file=sys.stderr)
            sys.exit(130)
    _finish_distributed()


def resume_command(config: str | None, overrides: list[str]) -> str:
    """The same train.py command with ``resume=auto`` (replacing any resume=...)."""
    import shlex

    kept = [o for o in overrides if not o.split("=", 1)[0].strip() == "resume"]
    return shlex.join(["python", "train.py", *(["--config", config] if config else []), *kept, "resume=auto"])


def run(cfg) -> str:
    """Build the accelerator and the loop of ``cfg.kind`` and train; returns the exported folder."""
    from .training import make_accelerator

    accelerator = make_accelerator(cfg)
    if cfg.kind == "teacher":
        from .train_teacher import TeacherLoop as Loop
    else:
        from .train_sid import SiDLoop as Loop
    return Loop(cfg, accelerator).train()


# ----------------------------------------------------------------------------
# sample.py


def sample_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sample.py",
        description="Generate images from a generator (K network evaluations, K = 1 for SiD) or a teacher (EDM Heun "
                    "sampler), write a PNG grid, optionally images.npz and metrics (one JSON line each in "
                    "OUTDIR/metrics.jsonl).",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--generator", metavar="DIR", help="generator/ folder of a sid run")
    src.add_argument("--teacher", metavar="DIR|PKL", help="sid denoiser folder, diffusers pipeline folder, EDM "
                     "snapshot .pkl (read without running its code) or a folder converted from one")
    parser.add_argument("--steps", type=int, default=None, help="generator: steps K (K NFE; default: the steps it "
                        "was trained for); teacher: Heun steps (2*steps-1 NFE; default 18)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance weight (teacher)")
    parser.add_argument("--autoguidance", type=float, default=None, metavar="W", help="weight of the guide network "
                        "that a teacher folder names in its autoguidance.json (2x NFE; default: the weight it names; "
                        "1 = the main network alone)")
    parser.add_argument("--seeds", required=True, help="seeds, e.g. 0-99 or 1,5,7-9; one image per seed")
    parser.add_argument("--class", dest="class_label", type=int, default=None, metavar="C", help="class label of "
                        "every image (conditional models; default: each seed's own, see --labels)")
    # The choices are sid.sampling.LABEL_MODES, written out so that --help does not import torch.
    parser.add_argument("--labels", choices=("balanced", "random"), default="balanced", help="class label of seed s "
                        "(conditional models): balanced = s mod the class count, so every run of that many seeds "
                        "holds each class once (default; steadier metrics on few samples); random = a uniform draw "
                        "per seed, as EDM's generate.py does")
    parser.add_argument("--outdir", required=True, help="output folder")
    parser.add_argument("--batch", type=int, default=100, help="images per batch and process (default 100)")
    parser.add_argument("--npz", action="store_true", help="also write all images to OUTDIR/images.npz")
    parser.add_argument("--metrics", default="", help="comma-separated: fd_lenet, fid, is (Inception Score), "
                        "is_lenet (the same score from the LeNet's classes)")
    parser.add_argument("--trials", type=int, default=1, metavar="T", help="measure the metrics on T disjoint seed "
                        "sets of the size of --seeds (trial t adds t * (max seed + 1)) and report mean, std, minimum")
    parser.add_argument("--ref", help="reference statistics .npz (mu, sigma); fid needs one")
    parser.add_argument("--data", default="mnist5k", help="dataset for reference statistics when --ref is not "
                        "given (default mnist5k)")
    parser.add_argument("--data-path", help="path of that dataset (folder, zip, npz, cifar10 root)")
    parser.add_argument("--detector", help="Inception TorchScript file for fid (inception-2015-12-05.pt)")
    parser.add_argument("--download-detector", action="store_true", help="download the Inception file for fid if "
                        "it is missing (needs internet; never done otherwise)")
    parser.add_argument("--lenet", default="assets/detectors/lenet_mnist5k.safetensors", help="fd_lenet detector")
    parser.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast")
    parser.add_argument("--cpu", action="store_true", help="force CPU")
    args = parser.parse_args(argv)
    with user_errors():
        from .sample import sample

        sample(args)
    _finish_distributed()
