"""Feature detectors for Frechet distances (docs/design.md section 8): NVIDIA's TF-Inception for FID, a small LeNet
for ``fd_lenet``.

Every detector takes uint8 images (N, C, H, W) and returns features (N, D); it normalises, resizes and repeats
channels inside. Detectors are loaded from local files only: nothing is downloaded unless the user asks for it
(:func:`download_inception`, called by ``--download-detector``).

- ``inception``: the TorchScript file ``inception-2015-12-05.pt`` used by stylegan2-ada-pytorch and clean-fid,
  called as ``detector(x_uint8, return_features=True)`` -> 2048-d pool features.
- ``lenet``: a classifier trained by this project on ``mnist5k``; its 128 penultimate pre-activations are the
  features. FD in this space is ``fd_lenet``: NOT FID, and not comparable to published numbers.

Train the shipped LeNet again with ``python -m sid.detectors train --out assets/detectors/lenet_mnist5k.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from . import rng
from .config import UserError, project_path

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
DEFAULT_INCEPTION_PATH = os.path.join(os.path.expanduser("~"), ".cache", "sid", INCEPTION_FILE)
DEFAULT_LENET_PATH = "assets/detectors/lenet_mnist5k.safetensors"
LENET_FORMAT = "sid.lenet.v1"
LENET_TRAIN_COMMAND = "python -m sid.detectors train --out assets/detectors/lenet_mnist5k.safetensors"

# ----------------------------------------------------------------------------
# LeNet: a small MNIST classifier whose penultimate layer is the fd_lenet feature space.


class LeNet(nn.Module):
    """conv5-pool-conv5-pool-fc-fc on 1x32x32 uint8 images; ``features`` = penultimate pre-activations."""

    def __init__(
        self,
        channels: int = 16,  # first conv width; the second is twice as wide
        feature_dim: int = 128,  # penultimate layer = feature space of fd_lenet
        num_classes: int = 10,
        dropout: float = 0.3,  # before the classifier, training only
    ):
        super().__init__()
        self.feature_dim = feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (N, c, 16, 16)
            nn.Conv2d(channels, 2 * channels, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # (N, 2c, 8, 8)
        )
        self.fc = nn.Linear(2 * channels * 8 * 8, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 1, 32, 32) -> float32 features (N, feature_dim)."""
        x = x.to(torch.float32) / 127.5 - 1
        return self.fc(self.conv(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 1, 32, 32) -> logits (N, num_classes)."""
        return self.head(self.features(x))


def heldout_split(labels: np.ndarray, seed: int, per_class: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: ``per_class`` held-out images of every class, the rest for training (sorted indices)."""
    g = rng.generator(seed, "lenet-split")
    labels = np.asarray(labels)
    heldout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = torch.randperm(len(idx), generator=g).numpy()
        heldout.append(idx[perm[:per_class]])
    heldout = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift every image by up to ``max_shift`` pixels in each direction, filling with zeros (black)."""
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net: LeNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` on uint8 images (N, 1, 32, 32)."""
    net.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (net(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(images)


def train_lenet(epochs: int = 15, seed: int = 0, batch_size: int = 64, lr: float = 2e-3, max_shift: int = 2,
                log=print) -> tuple[LeNet, dict[str, str]]:
    """Train LeNet on mnist5k minus a stratified held-out set of 1,000 images; returns (net, metadata)."""
    from .data import mnist5k

    ds = mnist5k()
    images, labels = ds.images, torch.as_tensor(ds.labels)
    train_idx, heldout_idx = heldout_split(ds.labels, seed)
    x_train, y_train = images[train_idx], labels[train_idx]
    torch.manual_seed(rng.derive_seed(seed, "lenet-init"))
    net = LeNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = (len(x_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        g = rng.generator(seed, epoch, "lenet-epoch")
        perm = torch.randperm(len(x_train), generator=g)
        net.train()
        total = 0.0
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x = _random_shift(x_train[idx], max_shift, g) if max_shift > 0 else x_train[idx]
            loss = nn.functional.cross_entropy(net(x), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = accuracy(net, images[heldout_idx], labels[heldout_idx])
        log(f"epoch {epoch + 1:3d}/{epochs}  loss {total / len(perm):.4f}  held-out accuracy {acc:.4f}")
    net.eval()
    meta = {
        "format": LENET_FORMAT, "feature_dim": str(net.feature_dim), "channels": str(net.conv[0].out_channels),
        "num_classes": "10", "heldout_accuracy": f"{acc:.4f}", "split_seed": str(seed),
        "heldout_per_class": "100", "num_train": str(len(train_idx)), "num_heldout": str(len(heldout_idx)),
        "epochs": str(epochs), "dataset": "mnist5k",
    }
    return net, meta


def save_lenet(net: LeNet, path: str, metadata: dict[str, str]) -> None:
    """Write weights + metadata as safetensors, atomically (temporary name, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(state, tmp, metadata=metadata)
    os.chmod(tmp, 0o644)  # safetensors creates the file owner-only; this one is shipped
    os.replace(tmp, path)


def load_lenet(path: str, device: torch.device | str = "cpu") -> tuple[LeNet, dict[str, str]]:
    """LeNet + its metadata from a safetensors file written by :func:`save_lenet`."""
    path = project_path(path)
    if not os.path.isfile(path):
        raise UserError(f"LeNet detector file '{path}' does not exist; train it with `{LENET_TRAIN_COMMAND}` or pass "
                        "its path (eval.lenet)")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != LENET_FORMAT:
            raise ValueError(f"metadata format is {meta.get('format')!r}, expected {LENET_FORMAT!r}")
        net = LeNet(channels=int(meta["channels"]), feature_dim=int(meta["feature_dim"]),
                    num_classes=int(meta["num_classes"]))
        net.load_state_dict(state)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise UserError(f"LeNet detector file '{path}' is corrupt or not a sid LeNet ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); train it again with `{LENET_TRAIN_COMMAND}`"
                        ) from e
    return net.to(device).eval().requires_grad_(False), meta

# ----------------------------------------------------------------------------
# Detectors: one interface over LeNet and the Inception TorchScript file.


class Detector:
    """uint8 images (N, C, H, W) -> features (N, feature_dim) float32 on ``device``; ``logits`` may be None."""

    name: str
    feature_dim: int
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K) for the Inception Score."""
        raise UserError(f"the {self.name} detector has no classifier output for an Inception Score")

    def check_shape(self, channels: int, resolution: int) -> None:
        """Raise UserError when images of this shape cannot be measured (checked before any work is done)."""

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{self.name} detector expects a uint8 tensor (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images))} of shape {tuple(getattr(images, 'shape', ()))}")
        return images.to(self.device)


class LeNetDetector(Detector):
    """fd_lenet detector: 128-d penultimate features of the project's mnist5k classifier (1x32x32 images only)."""

    name = "lenet"

    def __init__(self, path: str = DEFAULT_LENET_PATH, device: torch.device | str = "cpu"):
        self.path = path
        self.device = torch.device(device)
        self.net, self.metadata = load_lenet(path, self.device)
        self.feature_dim = self.net.feature_dim

    def check_shape(self, channels, resolution):
        if (channels, resolution) != (1, 32):
            raise UserError(f"the lenet detector ('{self.path}') measures 1x32x32 images like mnist5k, got "
                            f"{channels}x{resolution}x{resolution}; use fid for other data")

    def _check(self, images):
        images = super()._check(images)
        if images.shape[2] != images.shape[3]:
            raise UserError(f"the lenet detector measures square 1x32x32 images, got {tuple(images.shape[1:])}")
        self.check_shape(images.shape[1], images.shape[2])
        return images

    @torch.no_grad()
    def __call__(self, images):
        return self.net.features(self._check(images))

    @torch.no_grad()
    def logits(self, images):
        return self.net(self._check(images))

    @torch.no_grad()
    def probabilities(self, images):
        return torch.softmax(self.logits(images).double(), dim=1)


class InceptionDetector(Detector):
    """FID detector: NVIDIA's TF-Inception TorchScript file; 2048-d pool features; resizes internally."""

    name = "inception"

    def __init__(self, path: str | None = None, device: torch.device | str = "cpu"):
        path = path or DEFAULT_INCEPTION_PATH
        self.path = path
        self.device = torch.device(device)
        if not os.path.isfile(path):
            raise UserError(f"FID detector file '{path}' does not exist: download {INCEPTION_FILE} from "
                            f"{INCEPTION_URL} and pass its path with --detector PATH (eval.detector=PATH), put it at "
                            f"{DEFAULT_INCEPTION_PATH}, or pass --download-detector")
        try:
            with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; the file is TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.jit.load(path, map_location=self.device).eval()
        except Exception as e:  # RuntimeError, zipfile errors, pickle errors for a .pkl
            raise UserError(f"FID detector file '{path}' is not a readable TorchScript file ({type(e).__name__}); "
                            f"expected {INCEPTION_FILE} from {INCEPTION_URL}") from e
        # One tiny call fixes the feature dimension and checks the call signature.
        try:
            probe = self(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        except Exception as e:
            raise UserError(f"FID detector file '{path}' does not accept detector(images_uint8, "
                            f"return_features=True) ({type(e).__name__}); expected {INCEPTION_FILE}") from e
        if probe.ndim != 2 or probe.shape[0] != 1:
            raise UserError(f"FID detector file '{path}' returned features of shape {tuple(probe.shape)}, expected "
                            f"(N, D); expected {INCEPTION_FILE}")
        self.feature_dim = int(probe.shape[1])

    @torch.no_grad()
    def __call__(self, images):
        images = self._check(images)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return self.model(images, return_features=True).to(torch.float32)

    @torch.no_grad()
    def probabilities(self, images):
        """1008 softmax outputs without the output bias, as the original Inception Score code computes them."""
        images = self._check(images)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        try:
            probs = self.model(images, no_output_bias=True)
        except Exception as e:
            raise UserError(f"FID detector file '{self.path}' does not accept detector(images_uint8, "
                            f"no_output_bias=True) ({type(e).__name__}), which the Inception Score needs; expected "
                            f"{INCEPTION_FILE}") from e
        return probs.to(torch.float64)


def load_detector(name: str, path: str | None = None, device: torch.device | str = "cpu") -> Detector:
    """``lenet`` (safetensors, default: the shipped file) or ``inception`` (TorchScript ``inception-2015-12-05.pt``)."""
    if name == "lenet":
        return LeNetDetector(path or DEFAULT_LENET_PATH, device)
    if name == "inception":
        return InceptionDetector(path, device)
    raise UserError(f"detector kind is {name!r}, expected lenet or inception")


def download_inception(dest: str | None = None) -> str:
    """Download ``inception-2015-12-05.pt`` to ``dest`` (default ~/.cache/sid/); only ever called on user request."""
    import urllib.request

    dest = dest or DEFAULT_INCEPTION_PATH
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    print(f"downloading {INCEPTION_URL} -> {dest}", file=sys.stderr)
    try:
        urllib.request.urlretrieve(INCEPTION_URL, tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(tmp, map_location="cpu")  # refuse to install a truncated or wrong file
    except Exception as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {INCEPTION_URL} to '{dest}' ({type(e).__name__}: {e}); download it "
                        "by hand and pass --detector PATH") from e
    os.replace(tmp, dest)
    return dest

# ----------------------------------------------------------------------------
# Command line: python -m sid.detectors train --out FILE [--epochs N --seed S]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sid.detectors", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the fd_lenet detector on mnist5k")
    p.add_argument("--out", default=DEFAULT_LENET_PATH, help="output .safetensors file")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split, initialisation and batches")
    args = parser.parse_args(argv)
    try:
        if args.epochs < 1:
            raise UserError(f"--epochs is {args.epochs}, expected a positive integer")
        t0 = time.time()
        net, meta = train_lenet(epochs=args.epochs, seed=args.seed)
        save_lenet(net, args.out, meta)  # no wall time in the file: same seed, same bytes
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"out": args.out, **meta, "train_seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
