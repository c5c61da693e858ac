"""Exponential moving average of network weights, with the half-life measured in images (EDM, sec. 5 / App. F)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch_size: int, cur_nimg: int, halflife_kimg: float, rampup: float | None = 0.05) -> float:
    """``0.5 ** (batch / max(min(halflife_nimg, rampup * cur_nimg), 1e-8))`` for one optimizer step."""
    halflife_nimg = halflife_kimg * 1000
    if rampup is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


class EMA:
    """A frozen copy of ``model`` that trails it; ``update`` after every optimizer step (on every process)."""

    def __init__(self, model: nn.Module, halflife_kimg: float = 500.0, rampup: float | None = 0.05):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup = rampup

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend ``model`` in; ``cur_nimg`` counts images before this step. Returns the beta used."""
        beta = ema_beta(batch_size, cur_nimg, self.halflife_kimg, self.rampup)
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
