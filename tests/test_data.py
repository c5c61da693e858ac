"""Every dataset kind round-trips pixels and labels; bad files give one clear sentence."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from sid.config import DataConfig, UserError
from sid.data import StepBatches, batch_indices, load_dataset, to_model_range, to_uint8


def random_images(n, c, res, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, res, res), dtype=np.uint8)


def save_png(arr, path):
    Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).save(path)


def check_same(ds, images, labels):
    assert len(ds) == len(images)
    for i in range(len(images)):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images[i]))
        assert y == (-1 if labels is None else labels[i])
    batch, blabels = ds.get_batch([1, 0])
    assert torch.equal(batch, torch.from_numpy(images[[1, 0]]))
    assert (blabels is None) == (labels is None)


def test_mnist5k():
    ds = load_dataset(DataConfig(name="mnist5k"))
    assert len(ds) == 5000 and ds.resolution == 32 and ds.channels == 1 and ds.num_classes == 10
    assert np.bincount(ds.labels).tolist() == [500] * 10
    x, _ = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.uint8
    assert int(x[:, :2].max()) == 0 and int(x[:, :, -2:].max()) == 0  # zero padding 28 -> 32
    assert int(x.max()) > 200


def test_digits():
    ds = load_dataset(DataConfig(name="digits"))
    assert len(ds) == 1797 and ds.resolution == 16 and ds.num_classes == 10
    x, _ = ds[0]
    assert torch.equal(x[:, ::2, ::2], x[:, 1::2, 1::2])  # pixel repetition
    with pytest.raises(UserError, match="multiple of 8"):
        load_dataset(DataConfig(name="digits", resolution=12))


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_with_and_without_classes(tmp_path, channels):
    images = random_images(6, channels, 8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    for i, (img, y) in enumerate(zip(images, labels)):
        (tmp_path / "lab" / f"class{y}").mkdir(parents=True, exist_ok=True)
        save_png(img, tmp_path / "lab" / f"class{y}" / f"{i:03d}.png")
        (tmp_path / "flat").mkdir(exist_ok=True)
        save_png(img, tmp_path / "flat" / f"{i:03d}.png")
    check_same(load_dataset(DataConfig(name="folder", path=str(tmp_path / "lab"))), images, labels)
    flat = load_dataset(DataConfig(name="folder", path=str(tmp_path / "flat")))
    check_same(flat, images, None)
    assert flat.num_classes == 0 and flat.channels == channels


def make_zip(path, images, labels):
    with zipfile.ZipFile(path, "w") as zf:
        names = []
        for i, img in enumerate(images):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buf = __import__("io").BytesIO()
            Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="png")
            zf.writestr(name, buf.getvalue())
            names.append(name)
        meta = {"labels": [[n, int(y)] for n, y in zip(names, labels)] if labels is not None else None}
        zf.writestr("dataset.json", json.dumps(meta))


def test_edm_zip(tmp_path):
    images, labels = random_images(5, 3, 16), np.array([3, 1, 4, 1, 5])
    make_zip(tmp_path / "d.zip", images, labels)
    ds = load_dataset(DataConfig(name="zip", path=str(tmp_path / "d.zip")))
    check_same(ds, images, labels)
    assert ds.num_classes == 6
    # Picklable for DataLoader workers, and reads the same after a round trip.
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again[2][0], torch.from_numpy(images[2]))
    make_zip(tmp_path / "u.zip", images, None)
    check_same(load_dataset(DataConfig(name="zip", path=str(tmp_path / "u.zip"))), images, None)


def test_npz_and_npy(tmp_path):
    images, labels = random_images(4, 3, 8), np.array([1, 0, 1, 0])
    np.savez(tmp_path / "a.npz", images=images.transpose(0, 2, 3, 1), labels=labels)
    check_same(load_dataset(DataConfig(name="npz", path=str(tmp_path / "a.npz"))), images, labels)
    gray = random_images(3, 1, 8)
    np.save(tmp_path / "g.npy", gray[:, 0])
    check_same(load_dataset(DataConfig(name="npz", path=str(tmp_path / "g.npy"))), gray, None)


def test_cifar10_local_root(tmp_path, monkeypatch):
    # A CIFAR-10 folder in torchvision's layout, with one tiny batch per file.
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    images, labels = random_images(2, 3, 32), [7, 2]
    batch = {"data": images.reshape(2, -1), "labels": labels}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, fh)
    # The md5 sums of the real archive do not match these tiny files.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert len(ds) == 10 and ds.resolution == 32
    assert torch.equal(ds[0][0], torch.from_numpy(images[0])) and ds[0][1] == 7


def test_cifar10_missing_is_clear(tmp_path):
    with pytest.raises(UserError, match="data.download=true"):
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))


def test_bad_files(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        load_dataset(DataConfig(name="zip", path=str(tmp_path / "bad.zip")))
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(UserError, match="not a readable"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "bad.npz")))
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 8, 8), np.float32))
    with pytest.raises(UserError, match="uint8"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "f.npz")))
    np.savez(tmp_path / "k.npz", x=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="'images'"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "k.npz")))
    os.makedirs(tmp_path / "imgs")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(DataConfig(name="folder", path=str(tmp_path / "imgs")))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="no images"):
        load_dataset(DataConfig(name="folder", path=str(tmp_path / "empty")))


def test_size_mismatch_reported_not_resized(tmp_path):
    os.makedirs(tmp_path / "mixed")
    save_png(random_images(1, 1, 8)[0], tmp_path / "mixed" / "a.png")
    save_png(random_images(1, 1, 16)[0], tmp_path / "mixed" / "b.png")
    ds = load_dataset(DataConfig(name="folder", path=str(tmp_path / "mixed")))
    with pytest.raises(UserError, match="never resized"):
        ds[1]
    with pytest.raises(UserError, match="'data.resolution' is 64"):
        load_dataset(DataConfig(name="mnist5k", resolution=64))


def test_batches_are_deterministic_and_split_across_processes():
    a = batch_indices(100, 8, seed=3, step=5)
    assert torch.equal(a, batch_indices(100, 8, seed=3, step=5))
    assert not torch.equal(a, batch_indices(100, 8, seed=3, step=6))
    # Two processes with two accumulation steps see exactly the global batch, resumed at any step.
    parts = []
    for rank in range(2):
        it = iter(StepBatches(100, 8, seed=3, start_step=5, rank=rank, world=2, accum=2))
        parts += [next(it), next(it)]
    assert sum(parts, []) == a.tolist()


def test_value_range_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_model_range(u)
    assert x.min() == -1 and x.max() == 1
    assert torch.equal(to_uint8(x), u)
