"""Metrics: Frechet distance vs closed forms, streaming statistics vs numpy (also over 2 real processes), reference
files, the FID path end to end with a stand-in TorchScript detector, the shipped LeNet detector, CLI errors."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from sid.config import UserError
from sid.data import ArrayDataset, mnist5k
from sid.detectors import INCEPTION_FILE, INCEPTION_URL, heldout_split, load_detector
from sid.metrics import (
    FeatureStats,
    append_jsonl,
    compute_metrics,
    dataset_stats,
    frechet_distance,
    inception_score,
    load_ref,
    plot_fd_vs_kimg,
    save_ref,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENET = os.path.join(ROOT, "assets", "detectors", "lenet_mnist5k.safetensors")


def random_spd(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))

# ----------------------------------------------------------------------------
# Frechet distance.


def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_direct_scipy(seed):
    rng = np.random.default_rng(seed)
    d = 24
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # Symmetric in its two arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)


def test_fd_identical_is_zero():
    rng = np.random.default_rng(3)
    mu, s = rng.standard_normal(64), random_spd(64, rng)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


def test_fd_rank_deficient_is_finite():
    rng = np.random.default_rng(4)
    d = 32
    s1, s2 = random_spd(d, rng, rank=5), random_spd(d, rng, rank=3)  # rank 5 and 3 in 32 dimensions
    mu = rng.standard_normal(d)
    fd = frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(fd) and fd > 0
    # Close to the eigenvalue formula tr sqrtm(s1 s2) = sum sqrt(eig(s1^1/2 s2 s1^1/2)).
    r1 = np.real(scipy.linalg.sqrtm(s1))
    ref = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    assert fd == pytest.approx(ref, rel=1e-3, abs=1e-4)
    # Identical singular statistics still give ~0.
    assert abs(frechet_distance(mu, s1, mu, s1)) < 1e-4

# ----------------------------------------------------------------------------
# Streaming statistics.


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_streaming_equals_batch(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((301, 12)) * rng.uniform(0.5, 3, 12) + rng.standard_normal(12) * 5
    cuts = np.sort(rng.choice(np.arange(1, len(x)), size=rng.integers(1, 8), replace=False))
    stats = FeatureStats(12)
    for part in np.split(x, cuts):
        stats.update(torch.from_numpy(part).float() if seed % 2 else part)
    x_used = x.astype(np.float32).astype(np.float64) if seed % 2 else x
    assert stats.num == len(x)
    np.testing.assert_allclose(stats.mean(), x_used.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(x_used, rowvar=False), rtol=1e-9, atol=1e-10)


def test_merge_of_halves_equals_whole():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 8))
    whole = FeatureStats(8).update(x)
    a, b = FeatureStats(8).update(x[:77]), FeatureStats(8).update(x[77:])
    merged = a.merge(b)
    assert merged.num == whole.num
    np.testing.assert_allclose(merged.mean(), whole.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError):
        FeatureStats(8).update(np.zeros((3, 7)))

# ----------------------------------------------------------------------------
# A random-weight stand-in of the Inception TorchScript detector (same call signature), and images from seeds.


class StandInDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        x = nn.functional.interpolate(x.to(torch.float32) / 127.5 - 1, size=(24, 24), mode="bilinear")
        features = torch.tanh(self.conv(x)).mean(dim=(2, 3)) * 10  # (N, 16)
        if return_features:
            return features
        if no_output_bias:
            return (features @ self.fc.weight.T).softmax(1)
        return self.fc(features).softmax(1)


def make_standin(path):
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torch.jit.script is deprecated in recent torch; the real file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(StandInDetector()).save(str(path))
    return str(path)


def make_images(seeds, shift=0):
    """uint8 (N, 1, 16, 16): a deterministic function of each seed."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        out.append((torch.rand(1, 16, 16, generator=g) * 200 + shift).clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from accelerate import Accelerator
    sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
    from sid.metrics import FeatureStats, compute_metrics
    from test_metrics import make_images
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2
    x = np.random.default_rng(0).standard_normal((101, 6))
    part = x[:30] if acc.process_index == 0 else x[30:]   # uneven split
    stats = FeatureStats(6).update(part).reduce(acc)
    results = compute_metrics(make_images, list(range(11)), ["fid", "is"], accelerator=acc, batch_size=3,
                              detector_path={det!r}, ref_path={ref!r}, nfe=1, progress=False)
    if acc.is_main_process:
        json.dump({{"num": stats.num, "mean": stats.mean().tolist(), "cov": stats.cov().tolist(),
                   "results": results}}, open({out!r}, "w"))
    torch.distributed.destroy_process_group()
""")


def test_two_process_reduction_equals_one(tmp_path):
    det = make_standin(tmp_path / "standin.pt")
    ref = str(tmp_path / "ref.npz")
    stats = dataset_stats(ArrayDataset(make_images(range(100, 150)).numpy()), load_detector("inception", det), 16,
                          progress=False)
    save_ref(ref, stats.mean(), stats.cov())
    out = str(tmp_path / "out.json")
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(root=ROOT, here=os.path.dirname(__file__), det=det, ref=ref, out=out))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.load(open(out))
    x = np.random.default_rng(0).standard_normal((101, 6))
    assert got["num"] == 101
    np.testing.assert_allclose(got["mean"], x.mean(0), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got["cov"], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    # compute_metrics over 2 processes (11 seeds, batches of 3: uneven) equals 1 process.
    one = compute_metrics(make_images, list(range(11)), ["fid", "is"], batch_size=3, detector_path=det, ref_path=ref,
                          nfe=1, progress=False)
    assert got["results"][0]["num_samples"] == 11 == one[0]["num_samples"]
    assert got["results"][0]["value"] == pytest.approx(one[0]["value"], rel=1e-6)
    # The Inception Score's splits follow the seed list, not the processes: the same score and std.
    assert got["results"][1]["metric"] == "is" and got["results"][1]["num_samples"] == 11
    assert got["results"][1]["value"] == pytest.approx(one[1]["value"], rel=1e-9)
    assert got["results"][1]["std"] == pytest.approx(one[1]["std"], rel=1e-9, abs=1e-12)

# ----------------------------------------------------------------------------
# Inception Score.


def inception_score_reference(p, splits):
    """The original code's loop (Salimans et al.): per contiguous split, exp(mean_i KL(p_i || mean p))."""
    scores, n = [], len(p)
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_closed_forms_and_reference():
    k = 7
    one_hot = np.eye(k)[np.arange(70) % k] * (1 - 1e-12) + 1e-12 / k  # confident and balanced: IS = K
    mean, std = inception_score(one_hot, splits=10)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6
    same = np.tile(np.random.default_rng(0).dirichlet(np.ones(k)), (50, 1))  # every sample alike: IS = 1
    assert inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    p = np.random.default_rng(1).dirichlet(np.full(k, 0.3), size=103)  # uneven splits of 10 or 11
    ref = inception_score_reference(p, 10)
    got = inception_score(p, splits=10)
    assert got[0] == pytest.approx(ref[0], rel=1e-12) and got[1] == pytest.approx(ref[1], rel=1e-9)
    with pytest.raises(ValueError, match="N >= 10"):
        inception_score(p[:9])


def test_inception_score_via_compute_metrics(tmp_path):
    det_path = make_standin(tmp_path / "standin.pt")
    detector = load_detector("inception", det_path)
    seeds = list(range(5, 128))
    # Streaming in uneven batches, with FID alongside, equals the score of the probabilities in seed order.
    fid, score = compute_metrics(make_images, seeds, ["fid", "is"], batch_size=17, detector_path=det_path,
                                 ref_dataset=ArrayDataset(make_images(range(1000, 1100)).numpy()), progress=False)
    assert fid["metric"] == "fid" and score["metric"] == "is" and score["num_samples"] == len(seeds)
    probs = detector.probabilities(make_images(seeds)).numpy()
    ref = inception_score_reference(probs, 10)
    assert score["value"] == pytest.approx(ref[0], rel=1e-9) and score["std"] == pytest.approx(ref[1], rel=1e-6)
    assert score["splits"] == 10 and 1.0 <= score["value"] <= 10.0
    # No reference statistics are needed for a score alone.
    (alone,) = compute_metrics(make_images, seeds, ["is"], batch_size=64, detector_path=det_path, progress=False)
    assert alone["value"] == pytest.approx(score["value"], rel=1e-12)
    with pytest.raises(UserError, match="at least 10 samples"):
        compute_metrics(make_images, list(range(5)), ["is"], detector_path=det_path, progress=False)

# ----------------------------------------------------------------------------
# Reference files and the FID path end to end.


def test_ref_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = rng.standard_normal(10), random_spd(10, rng)
    path = str(tmp_path / "ref.npz")
    save_ref(path, mu, sigma)
    mu2, sigma2 = load_ref(path)
    assert mu2.dtype == np.float64 and np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, mean=mu, cov=sigma)
    with pytest.raises(UserError, match="'mu'.*'sigma'"):
        load_ref(bad)
    with open(tmp_path / "corrupt.npz", "wb") as f:
        f.write(b"not a zip")
    with pytest.raises(UserError, match="corrupt.npz"):
        load_ref(str(tmp_path / "corrupt.npz"))
    with pytest.raises(UserError, match="does not exist"):
        load_ref(str(tmp_path / "missing.npz"))


def test_fid_end_to_end_with_standin(tmp_path):
    det_path = make_standin(tmp_path / "standin.pt")
    detector = load_detector("inception", det_path)
    assert detector.name == "inception" and detector.feature_dim == 16 and detector.logits(make_images([0])) is None
    ref_path = str(tmp_path / "ref.npz")
    ref_stats = dataset_stats(ArrayDataset(make_images(range(1000, 1300)).numpy()), detector, 64, progress=False)
    save_ref(ref_path, ref_stats.mean(), ref_stats.cov())

    seeds = list(range(200))
    (res,) = compute_metrics(make_images, seeds, ["fid"], batch_size=64, detector_path=det_path, ref_path=ref_path,
                             nfe=1, progress=False)
    assert res["metric"] == "fid" and res["num_samples"] == 200 and res["nfe"] == 1
    # Equals the direct computation: features -> numpy mean / cov -> Frechet distance.
    f = detector(make_images(seeds)).double().numpy()
    direct = frechet_distance(f.mean(0), np.cov(f, rowvar=False), *load_ref(ref_path))
    assert res["value"] == pytest.approx(direct, rel=1e-6)
    # Same distribution -> small; brighter images -> much larger.
    (shifted,) = compute_metrics(lambda s: make_images(s, shift=60), seeds, ["fid"], batch_size=64,
                                 detector_path=det_path, ref_path=ref_path, progress=False)
    assert shifted["value"] > 20 * res["value"]
    # Reference computed from a dataset and cached gives the same value.
    ds = ArrayDataset(make_images(range(1000, 1300)).numpy(), name="standin-ref")
    (cached,) = compute_metrics(make_images, seeds, ["fid"], batch_size=64, detector_path=det_path,
                                ref_dataset=ds, cache_dir=str(tmp_path / "cache"), progress=False)
    assert cached["value"] == pytest.approx(res["value"], rel=1e-9)
    assert len(os.listdir(tmp_path / "cache")) == 1
    # metrics.jsonl
    append_jsonl(str(tmp_path / "out" / "metrics.jsonl"), [res, shifted])
    lines = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["metric"] for r in lines] == ["fid", "fid"] and lines[0]["value"] == res["value"]


def test_missing_detector_and_ref_errors(tmp_path):
    with pytest.raises(UserError) as e:
        compute_metrics(make_images, list(range(4)), ["fid"], detector_path=str(tmp_path / "nope.pt"),
                        ref_path=None, progress=False)
    msg = str(e.value)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and "--detector" in msg and "\n" not in msg
    with open(tmp_path / "corrupt.pt", "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(UserError, match="corrupt.pt"):
        load_detector("inception", str(tmp_path / "corrupt.pt"))
    det = make_standin(tmp_path / "standin.pt")
    with pytest.raises(UserError, match="reference .npz"):
        compute_metrics(make_images, list(range(4)), ["fid"], detector_path=det, progress=False)


def test_cli_missing_detector_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sid.metrics", "ref", "--data", "mnist5k", "--detector-kind", "inception",
         "--detector", "/nonexistent.pt", "--out", str(tmp_path / "ref.npz")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and INCEPTION_FILE in lines[0]
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "ref.npz")

# ----------------------------------------------------------------------------
# The shipped LeNet detector (fd_lenet).


@pytest.fixture(scope="module")
def mnist():
    return mnist5k()


@pytest.fixture(scope="module")
def lenet():
    return load_detector("lenet", LENET)


def test_lenet_heldout_accuracy(lenet, mnist):
    assert lenet.name == "lenet" and lenet.feature_dim == int(lenet.metadata["feature_dim"]) == 128
    _, heldout = heldout_split(mnist.labels, int(lenet.metadata["split_seed"]))
    assert len(heldout) == 1000 and np.all(np.bincount(mnist.labels[heldout]) == 100)
    images, labels = mnist.get_batch(heldout)
    features = lenet(images)
    assert features.shape == (1000, 128) and torch.isfinite(features).all()
    acc = (lenet.logits(images).argmax(1) == labels).float().mean().item()
    assert acc > 0.95
    assert abs(acc - float(lenet.metadata["heldout_accuracy"])) < 2e-3
    with pytest.raises(UserError, match="1x32x32"):
        lenet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_fd_lenet_measures_something(lenet, mnist):
    perm = torch.randperm(len(mnist), generator=torch.Generator().manual_seed(0)).numpy()
    a, b = ArrayDataset(mnist.images[perm[:2500]].numpy()), ArrayDataset(mnist.images[perm[2500:]].numpy())
    sa, sb = dataset_stats(a, lenet, 500, progress=False), dataset_stats(b, lenet, 500, progress=False)
    fd_halves = frechet_distance(sa.mean(), sa.cov(), sb.mean(), sb.cov())
    # Corrupted: Gaussian noise of std 40 (in uint8 units) on the second half.
    g = torch.Generator().manual_seed(1)
    noisy = (b.images.float() + 40 * torch.randn(b.images.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    sn = dataset_stats(ArrayDataset(noisy.numpy()), lenet, 500, progress=False)
    fd_noisy = frechet_distance(sa.mean(), sa.cov(), sn.mean(), sn.cov())
    # Blurred: 3x3 box filter.
    blurred = nn.functional.avg_pool2d(b.images.float(), 3, 1, 1).round().to(torch.uint8)
    sbl = dataset_stats(ArrayDataset(blurred.numpy()), lenet, 500, progress=False)
    fd_blur = frechet_distance(sa.mean(), sa.cov(), sbl.mean(), sbl.cov())
    print(f"fd_lenet halves {fd_halves:.3f} noisy {fd_noisy:.3f} blurred {fd_blur:.3f}")
    assert 0 < fd_halves < 10 * fd_halves < min(fd_noisy, fd_blur)


def test_fd_lenet_via_compute_metrics(lenet, mnist, tmp_path):
    # Generated = mnist5k images picked by seed; reference = all of mnist5k computed and cached.
    make = lambda seeds: mnist.images[torch.as_tensor(seeds) % len(mnist)]
    (res,) = compute_metrics(make, list(range(0, 5000, 2)), ["fd_lenet"], lenet_path=LENET, ref_dataset=mnist,
                             cache_dir=str(tmp_path), nfe=35, progress=False)
    assert res["metric"] == "fd_lenet" and res["num_samples"] == 2500 and res["nfe"] == 35
    assert 0 < res["value"] < 5

# ----------------------------------------------------------------------------
# Plot.


def test_plot_fd_vs_kimg(tmp_path):
    stats = tmp_path / "stats.jsonl"
    with open(stats, "w") as f:
        for k, v in [(0, 300.0), (1, 80.0), (2, 20.0), (3, 9.0)]:
            f.write(json.dumps({"kimg": float(k), "fd_lenet": v, "loss": 1.0}) + "\n")
        f.write(json.dumps({"kimg": 4.0, "loss": 1.0}) + "\n")  # a tick without the metric
        f.write('{"kimg": 5.0, "fd_len')  # a line cut by a kill
    out = plot_fd_vs_kimg(str(stats), str(tmp_path / "plots" / "fd_vs_kimg.png"), teacher_value=5.0)
    assert out is not None and os.path.getsize(out) > 1000
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plot_fd_vs_kimg(str(tmp_path / "none.jsonl"), str(tmp_path / "none.png")) is None


def test_is_lenet_on_real_digits(lenet, mnist):
    # Real digits: near the 10 balanced, confidently recognised classes; one class only: near 1.
    seeds = list(range(1000))
    images = mnist.get_batch(np.random.default_rng(0).permutation(len(mnist))[:1000])[0]  # (sorted by class)
    (res,) = compute_metrics(lambda s: images[s], seeds, ["is_lenet"], batch_size=250, progress=False)
    assert res["metric"] == "is_lenet" and res["num_samples"] == 1000
    assert 8.5 < res["value"] <= 10.0
    ones = np.flatnonzero(mnist.labels == 1)[:200]
    single = mnist.get_batch(ones)[0]
    (one,) = compute_metrics(lambda s: single[s], list(range(200)), ["is_lenet"], batch_size=250, progress=False)
    assert one["value"] < 1.5
