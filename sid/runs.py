"""Run directories: resolved config, stats.jsonl, sample grids and atomic, exactly-resumable checkpoints.

A run directory holds ``config.yaml``, ``stats.jsonl``, ``samples/``, ``checkpoints/`` and the exported network.
Checkpoints are state dicts + resolved config + counters (never pickled classes), written to a temporary name and
renamed, so a killed run never leaves a file that ``resume=auto`` could pick half-written. Randomness in the loops
is a pure function of (seed, step, rank), so counters are all the RNG state a resume needs.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import signal
import threading
import warnings

import numpy as np
import torch
from PIL import Image

from .config import Config, UserError, to_yaml

CHECKPOINT_FORMAT = "sid-checkpoint-v1"
_CKPT_RE = re.compile(r"checkpoint-(\d+)\.pt$")

# ----------------------------------------------------------------------------
# Files written atomically.


class defer_sigint:
    """Hold back Ctrl-C while a file is written; the KeyboardInterrupt comes when the write is complete.

    A SIGINT that lands inside ``torch.save`` surfaces as a RuntimeError from its C++ writer (not a
    KeyboardInterrupt), so the run would exit as if it had crashed and leave a temporary behind. Outside the main
    thread, or when SIGINT is not Python's default handler, this does nothing.
    """

    def __enter__(self):
        self._received = False
        self._old = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame):
        self._received = True

    def __exit__(self, exc_type, exc, tb):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        if self._received and exc_type is None:
            raise KeyboardInterrupt
        return False


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: str, ncols: int | None = None) -> None:
    """Save uint8 images (N, C, H, W) as one PNG grid with a 2-pixel gap."""
    images = images.detach().cpu()
    n, c, h, w = images.shape
    ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
    nrows = int(math.ceil(n / ncols))
    gap = 2
    grid = np.zeros((c, nrows * (h + gap) - gap, ncols * (w + gap) - gap), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[:, r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = images[i].numpy()
    img = Image.fromarray(grid[0] if c == 1 else grid.transpose(1, 2, 0))
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)


def save_pretrained_atomic(model, folder: str, json_files: dict[str, dict] | None = None,
                           text_files: dict[str, str] | None = None) -> None:
    """``model.save_pretrained`` into a temporary folder, add JSON and text files, then swap it in by rename."""
    folder = folder.rstrip("/")
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name, content in (json_files or {}).items():
        with open(os.path.join(tmp, name), "w") as fh:
            json.dump(content, fh, indent=2)
    for name, text in (text_files or {}).items():
        with open(os.path.join(tmp, name), "w") as fh:
            fh.write(text)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# The run directory.


class RunDir:
    """Paths and writers of one run; only the main process writes."""

    def __init__(self, path: str, is_main: bool = True):
        self.path = path
        self.is_main = is_main
        self.samples = os.path.join(path, "samples")
        self.checkpoints = os.path.join(path, "checkpoints")
        self.stats_file = os.path.join(path, "stats.jsonl")
        if is_main:
            try:
                os.makedirs(self.samples, exist_ok=True)
                os.makedirs(self.checkpoints, exist_ok=True)
            except OSError as e:
                raise UserError(f"cannot create the run directory '{path}' ({e.strerror})") from e

    def write_config(self, cfg: Config) -> None:
        if self.is_main:
            atomic_write_bytes(os.path.join(self.path, "config.yaml"), to_yaml(cfg).encode())

    def log_stats(self, record: dict) -> None:
        if self.is_main:
            with open(self.stats_file, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def truncate_stats(self, cur_nimg: int) -> None:
        """On resume, drop stats lines written after the checkpoint so the log has no duplicates."""
        if not (self.is_main and os.path.isfile(self.stats_file)):
            return
        lines = []
        with open(self.stats_file) as fh:
            for ln in fh:
                try:
                    record = json.loads(ln)
                except json.JSONDecodeError:  # a line cut short by a killed run
                    continue
                if isinstance(record, dict) and record.get("kimg", 0) * 1000 <= cur_nimg + 1e-6:
                    lines.append(ln if ln.endswith("\n") else ln + "\n")
        atomic_write_bytes(self.stats_file, "".join(lines).encode())

    def grid_path(self, cur_nimg: int) -> str:
        return os.path.join(self.samples, f"grid-{cur_nimg:09d}.png")

    # Checkpoints.

    def remove_stale_temporaries(self) -> list[str]:
        """Delete checkpoint temporaries a killed run left behind (never complete, never resumed from)."""
        if not self.is_main:
            return []
        stale = glob.glob(os.path.join(self.checkpoints, ".checkpoint-*.pt.tmp"))
        for f in stale:
            os.remove(f)
        return stale

    def checkpoint_path(self, cur_nimg: int) -> str:
        return os.path.join(self.checkpoints, f"checkpoint-{cur_nimg:09d}.pt")

    def save_checkpoint(self, state: dict, cur_nimg: int, keep: int = 3) -> str | None:
        """Write atomically (temporary name, fsync, rename); keep the newest ``keep`` checkpoints."""
        if not self.is_main:
            return None
        path = self.checkpoint_path(cur_nimg)
        tmp = os.path.join(self.checkpoints, f".checkpoint-{cur_nimg:09d}.pt.tmp")
        with defer_sigint():
            with open(tmp, "wb") as fh:
                torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            for old in list_checkpoints(self.checkpoints)[:-keep]:
                os.remove(old)
        return path


def list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints in ``folder``, oldest first (temporary files never match)."""
    files = [f for f in glob.glob(os.path.join(folder, "checkpoint-*.pt")) if _CKPT_RE.search(f)]
    return sorted(files, key=lambda f: int(_CKPT_RE.search(f).group(1)))


def load_checkpoint(path: str) -> dict:
    """Load one checkpoint file (weights only, on CPU); a corrupt or foreign file is a UserError."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on corrupt files
        raise UserError(f"checkpoint '{path}' is corrupt or not a sid checkpoint ({type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint '{path}' is not a sid checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def resolve_resume(resume: str, run_dir: str) -> tuple[str, dict] | None:
    """``none`` -> None; ``auto`` -> the newest loadable checkpoint of ``run_dir`` (or None); a file or run dir."""
    if resume == "none":
        return None
    if resume == "auto" or os.path.isdir(resume):
        folder = os.path.join(run_dir if resume == "auto" else resume, "checkpoints")
        candidates = list_checkpoints(folder)
        for path in reversed(candidates):
            try:
                return path, load_checkpoint(path)
            except UserError as e:
                if resume != "auto":
                    raise
                warnings.warn(f"skipping {e}", stacklevel=2)
        if resume != "auto":
            raise UserError(f"config key 'resume' is '{resume}', which holds no checkpoints/checkpoint-*.pt")
        return None
    return resume, load_checkpoint(resume)
