"""Randomness as a pure function of named counters, so runs resume exactly and do not depend on process count."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*keys: int | str) -> int:
    """A stable 63-bit seed from any tuple of ints and strings (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded by ``derive_seed(*keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))
