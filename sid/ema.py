"""Moving averages of network weights for export (docs/design.md section 4, step 3).

- EDM's half-life EMA with ramp-up (Karras et al. 2022, App. F): ``beta = 0.5 ** (batch / halflife_nimg)`` with the
  half-life capped at ``rampup * cur_nimg``. In runs much shorter than ``halflife / rampup`` the cap always binds,
  so the average is only ``rampup`` of the run long (20 kimg x 0.05 = 1 kimg).
- EDM2's power-function EMA (Karras et al. 2024, arXiv 2312.02696, sec. 3.1 and App. C): after the t-th update
  ``beta_t = (1 - 1/t) ** (gamma + 1)``, which weights the t-th snapshot in proportion to ``tau ** gamma``; its
  width relative to the run length, ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``, is the same at
  every length, so it averages a fixed fraction of any run. Several widths are tracked at once (``PowerEMA``).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

# ----------------------------------------------------------------------------
# Half-life EMA with ramp-up (EDM).


def ema_beta(batch_size: int, cur_nimg: int, halflife_kimg: float, rampup: float | None = 0.05) -> float:
    """``0.5 ** (batch / max(min(halflife_nimg, rampup * cur_nimg), 1e-8))`` for one optimizer step."""
    halflife_nimg = halflife_kimg * 1000
    if rampup is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def _blend(ema_model: nn.Module, model: nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema_model.parameters(), model.parameters(), strict=True):
        p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
    for b_ema, b in zip(ema_model.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)


class EMA:
    """A frozen copy of ``model`` that trails it; ``update`` after every optimizer step (on every process)."""

    kind = "halflife"

    def __init__(self, model: nn.Module, halflife_kimg: float = 500.0, rampup: float | None = 0.05):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup = rampup

    @property
    def models(self) -> list[nn.Module]:
        return [self.model]

    @property
    def names(self) -> list[str]:
        return ["ema"]

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int, batch_size: int) -> float:
        """Blend ``model`` in; ``cur_nimg`` counts images before this step. Returns the beta used."""
        beta = ema_beta(batch_size, cur_nimg, self.halflife_kimg, self.rampup)
        _blend(self.model, model, beta)
        return beta

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)


# ----------------------------------------------------------------------------
# Power-function EMA (EDM2).


def power_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function profile with exponent gamma (EDM2, App. C)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


SIGMA_REL_MAX = power_sigma_rel(0.0)  # 0.2887: gamma >= 0 (weights that never decrease with time)


def power_exponent(sigma_rel: float) -> float:
    """gamma for a relative width ``sigma_rel`` in (0, 0.2887]: ``sigma_rel^-2 = (gamma+2)^2 (gamma+3) / (gamma+1)``
    is the cubic ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`` with ``s = sigma_rel^-2``; its largest real
    root is the exponent (sigma_rel 0.10 -> 6.94, 0.05 -> 16.97, the EDM2 paper's pairs)."""
    if not 0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel {sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}]")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_beta(t: int, gamma: float) -> float:
    """``(1 - 1/t) ** (gamma + 1)`` for the t-th update (t = 1: beta 0, the average starts as the weights)."""
    return (1 - 1 / t) ** (gamma + 1)


class PowerEMA:
    """One frozen power-function average of ``model`` per ``sigma_rel``; ``update`` after every optimizer step.

    After t updates with weights p_1..p_t, average i is ``sum_tau (tau^(g+1) - (tau-1)^(g+1)) p_tau / t^(g+1)``
    with g its exponent: the product of the betas telescopes. Buffers are copied, as in :class:`EMA`.
    """

    kind = "power"

    def __init__(self, model: nn.Module, sigma_rels=(0.05, 0.10)):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [power_exponent(s) for s in self.sigma_rels]
        self._models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]
        self.num_updates = 0

    @property
    def models(self) -> list[nn.Module]:
        return self._models

    @property
    def model(self) -> nn.Module:
        return self._models[0]

    @property
    def names(self) -> list[str]:
        return [f"ema{s:g}" for s in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, cur_nimg: int | None = None, batch_size: int | None = None) -> list[float]:
        """Blend ``model`` into every average (the images seen do not matter, only the count of updates)."""
        self.num_updates += 1
        betas = [power_beta(self.num_updates, g) for g in self.gammas]
        for ema_model, beta in zip(self._models, betas, strict=True):
            _blend(ema_model, model, beta)
        return betas

    def state_dict(self) -> dict:
        state = {f"{i}.{k}": v for i, m in enumerate(self._models) for k, v in m.state_dict().items()}
        state["num_updates"] = torch.tensor([self.num_updates], dtype=torch.int64)  # (1,): checkpoints hash bytes
        return state

    def load_state_dict(self, state: dict) -> None:
        if "num_updates" not in state:
            raise KeyError("the EMA state has no 'num_updates' (it was saved by a half-life EMA, ema.kind=halflife)")
        for i, m in enumerate(self._models):
            prefix = f"{i}."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        extra = {k.split(".", 1)[0] for k in state if k != "num_updates"} - {str(i) for i in range(len(self._models))}
        if extra:
            raise KeyError(f"the EMA state holds {len(self._models) + len(extra)} averages, this run tracks "
                           f"{len(self._models)}")
        self.num_updates = int(state["num_updates"].reshape(-1)[0])
