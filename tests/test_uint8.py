"""The uint8 conversion every metric and image file goes through (EDM's writer): round to the nearest level, clamp
out-of-range values. Values between levels and outside [-1, 1] make truncation or a missing clamp fail."""

import torch

from sid.data import to_uint8


def level(k: float) -> float:
    """The model-range value whose exact uint8 level is k (level k sits at x = (k - 127.5) / 127.5)."""
    return (k - 127.5) / 127.5


def test_rounds_to_the_nearest_level():
    x = torch.tensor([level(10.4), level(10.6), level(200.49), level(200.51), level(0.3), level(254.7)])
    assert to_uint8(x).tolist() == [10, 11, 200, 201, 0, 255]


def test_clamps_out_of_range_values():
    x = torch.tensor([-1.0, 1.0, -1.5, 1.5, -100.0, 100.0, level(-0.6), level(255.4)])
    assert to_uint8(x).tolist() == [0, 255, 0, 255, 0, 255, 0, 255]


def test_exact_levels_round_trip_and_dtype():
    u = torch.arange(256, dtype=torch.uint8)
    out = to_uint8(torch.tensor([level(k) for k in range(256)]))
    assert out.dtype == torch.uint8 and torch.equal(out, u)
    assert to_uint8(torch.tensor([level(100.4)], dtype=torch.bfloat16).float()).dtype == torch.uint8


def test_pipeline_and_sample_py_share_it():
    """Both one-step paths convert with this function (so their images agree bit for bit)."""
    import sid.pipeline
    import sid.sample

    assert sid.pipeline.to_uint8 is to_uint8 and sid.sample.to_uint8 is to_uint8
