"""SiDPipeline: images bit-identical to sample.py for the same seeds; exports name SiDPipeline (never a multi-step
pipeline) and carry a model card; old folders still load; push_to_hub up to the upload call (offline)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sid import SiDPipeline
from sid.config import UserError
from sid.teachers import load_generator, load_teacher, save_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def generator_dir(tiny_teacher_32, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pipe") / "generator")
    save_generator(load_teacher(tiny_teacher_32), folder, sigma_init=2.5, extra={"teacher": "tiny", "kimg": 0.1})
    return folder


def sample_py_images(generator, seeds, outdir):
    r = subprocess.run([sys.executable, "sample.py", "--generator", generator, "--seeds", seeds, "--outdir",
                        str(outdir), "--npz", "--batch", "3"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(outdir / "images.npz") as f:
        return f["images"], f["labels"] if "labels" in f.files else None


def test_pipeline_equals_sample_py_bit_for_bit(generator_dir, tmp_path):
    expected, _ = sample_py_images(generator_dir, "0-3", tmp_path)  # (4, H, W, C) uint8
    pipe = SiDPipeline.from_pretrained(generator_dir)
    as_np = pipe(seeds=[0, 1, 2, 3], output_type="np").images
    assert as_np.dtype == np.uint8 and np.array_equal(as_np, expected)
    as_pt = pipe(seeds=[0, 1, 2, 3], output_type="pt").images
    assert as_pt.dtype == torch.uint8 and np.array_equal(as_pt.permute(0, 2, 3, 1).numpy(), expected)
    as_pil = pipe(seeds=[0, 1, 2, 3]).images
    assert len(as_pil) == 4 and np.array_equal(np.stack([np.asarray(im) for im in as_pil])[..., None], expected)
    # A seed's image does not depend on its neighbours or the batch size.
    (one,) = pipe(seeds=[2], output_type="np", batch_size=1, return_dict=False)
    assert np.array_equal(one[0], expected[2])


def test_pipeline_class_labels(generator_dir, tmp_path):
    _, labels = sample_py_images(generator_dir, "0-3", tmp_path)
    pipe = SiDPipeline.from_pretrained(generator_dir)
    drawn = pipe(seeds=[0, 1, 2, 3], output_type="pt").images
    same = pipe(seeds=[0, 1, 2, 3], class_labels=labels.tolist(), output_type="pt").images
    assert torch.equal(drawn, same)  # the labels sample.py drew from the seeds
    fixed = pipe(seeds=[0, 1, 2, 3], class_labels=(int(labels[0]) + 1) % 10, output_type="pt").images
    assert not torch.equal(fixed[0], drawn[0])
    for bad, needle in (({"class_labels": [1, 2]}, "one per seed"), ({"class_labels": 10}, "0..9"),
                        ({"output_type": "latent"}, "output_type"), ({"num_inference_steps": 0}, "positive integer")):
        with pytest.raises(UserError, match=needle):
            pipe(seeds=[0, 1, 2, 3], **bad)


def test_export_names_sid_pipeline_and_has_a_card(generator_dir):
    with open(os.path.join(generator_dir, "model_index.json")) as fh:
        index = json.load(fh)
    assert index["_class_name"] == "SiDPipeline"
    card = open(os.path.join(generator_dir, "README.md")).read()
    assert "teacher: `tiny`" in card and "0.100 kimg" in card and "SiDPipeline" in card


def test_diffusers_teacher_generator_is_never_a_ddpm_pipeline(tmp_path):
    from test_teachers import make_pipeline

    make_pipeline(str(tmp_path / "ddpm"), num_class_embeds=3)
    assert json.load(open(tmp_path / "ddpm" / "model_index.json"))["_class_name"] == "DDPMPipeline"
    save_generator(load_teacher(str(tmp_path / "ddpm")), str(tmp_path / "g"), sigma_init=2.5)
    index = json.load(open(tmp_path / "g" / "model_index.json"))
    assert index["_class_name"] == "SiDPipeline" and "Pipeline" not in json.dumps(
        {k: v for k, v in index.items() if k != "_class_name"}).replace("SiDPipeline", "")
    images = SiDPipeline.from_pretrained(str(tmp_path / "g"))(seeds=[0, 1], output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and images.dtype == torch.uint8
    # Images equal the generator's own output through the same conversion.
    G = load_generator(str(tmp_path / "g"))
    from sid.data import to_uint8
    from sid.sampling import seed_labels, seed_latents

    with torch.no_grad():
        direct = to_uint8(G(seed_latents([0, 1], (1, 8, 8)), seed_labels([0, 1], 3)))
    assert torch.equal(images, direct)


def test_old_generator_folders_still_load(generator_dir, tmp_path):
    """Folders from before the pipeline: no card, no index, or a diffusers teacher's DDPMPipeline index."""
    old = tmp_path / "old"
    shutil.copytree(generator_dir, old)
    os.remove(old / "README.md")
    (old / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    new_images = SiDPipeline.from_pretrained(generator_dir)(seeds=[5, 6], output_type="pt").images
    assert torch.equal(SiDPipeline.from_pretrained(str(old))(seeds=[5, 6], output_type="pt").images, new_images)
    os.remove(old / "model_index.json")
    assert load_generator(str(old)).init_sigma == 2.5
    expected, _ = sample_py_images(str(old), "5-6", tmp_path / "s")
    assert np.array_equal(new_images.permute(0, 2, 3, 1).numpy(), expected)


def test_push_to_hub_offline_up_to_the_upload(generator_dir, tmp_path, monkeypatch):
    import sid.pipeline as pipeline_module

    calls = {}

    class Repo:
        repo_id = "someone/sid-tiny"

    def fake_create_repo(repo_id, **kw):
        calls["create"] = repo_id
        return Repo()

    def fake_upload_folder(repo_id, folder_path, **kw):
        calls["upload"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://huggingface.co/someone/sid-tiny/commit/0"

    monkeypatch.setattr(pipeline_module, "create_repo", fake_create_repo)
    monkeypatch.setattr(pipeline_module, "upload_folder", fake_upload_folder)
    pipe = SiDPipeline.from_pretrained(generator_dir)
    assert pipe.push_to_hub("sid-tiny").endswith("/commit/0")
    assert calls == {"create": "sid-tiny", "upload": "someone/sid-tiny"}
    up = tmp_path / "uploaded"
    assert {"model_index.json", "README.md", "sid_generator.json"} <= set(os.listdir(up))
    assert (up / "README.md").read_text() == open(os.path.join(generator_dir, "README.md")).read()
    again = SiDPipeline.from_pretrained(str(up))(seeds=[0, 1], output_type="pt").images
    assert torch.equal(again, pipe(seeds=[0, 1], output_type="pt").images)


def test_sid_run_exports_a_card_with_metrics(tmp_path, tiny_teacher_32):
    from sid.cli import run
    from sid.config import load_config

    cfg = load_config(None, [f"teacher={tiny_teacher_32}", f"run_dir={tmp_path / 'run'}", "data.name=mnist5k",
                             "total_kimg=0.016", "batch_size=8", "tick_kimg=0.008", "checkpoint_kimg=1",
                             "snapshot_kimg=1", "grid_seeds=4", "eval.num_samples=20", "eval.batch_size=20",
                             "mixed_precision=fp32"])
    path = run(cfg)
    card = open(os.path.join(path, "README.md")).read()
    assert f"teacher: `{tiny_teacher_32}`" in card and "trained for: 0.016 kimg" in card
    assert "fd_lenet:" in card and "over 20 samples" in card and "```bash\npython " in card
    assert json.load(open(os.path.join(path, "model_index.json")))["_class_name"] == "SiDPipeline"
    assert SiDPipeline.from_pretrained(path)(seeds=[0], output_type="pt").images.shape == (1, 1, 32, 32)


def test_sample_py_class_equals_pipeline_class_labels(generator_dir, tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--generator", generator_dir, "--seeds", "0-2", "--class", "7",
                        "--outdir", str(tmp_path), "--npz"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / "images.npz") as f:
        assert f["labels"].tolist() == [7, 7, 7]
        images = f["images"]
    pipe = SiDPipeline.from_pretrained(generator_dir)
    assert np.array_equal(pipe(seeds=[0, 1, 2], class_labels=7, output_type="np").images, images)
    r = subprocess.run([sys.executable, "sample.py", "--generator", generator_dir, "--seeds", "0-2", "--class", "10",
                        "--outdir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and "--class is 10" in r.stderr and "Traceback" not in r.stderr
