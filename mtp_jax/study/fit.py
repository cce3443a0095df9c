"""Scaling-law fit and effective speedup (marin PR #9287).

The baseline's next-token validation loss against compute C (here: training tokens) is fit
with `L(C) = L_inf + A * C**-alpha`. A variant that reaches loss L_v with compute C_v would
have cost the baseline C* = ((L_v - L_inf) / A) ** (-1 / alpha); its effective speedup is
`C* / C_v * (variant tokens/s / baseline tokens/s)`: how much sooner, in wall-clock time on
the same machine, the variant reaches that loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(C) = l_inf + a * C ** -alpha, fit on points with the given RMS residual."""

    l_inf: float
    a: float
    alpha: float
    rms: float

    def __call__(self, compute: float | np.ndarray) -> float | np.ndarray:
        return self.l_inf + self.a * np.asarray(compute, np.float64) ** -self.alpha

    def compute_for(self, loss: float) -> float:
        """The compute at which the curve reaches `loss` (inf when it never does)."""
        if loss <= self.l_inf or self.a <= 0:
            return math.inf
        return ((loss - self.l_inf) / self.a) ** (-1.0 / self.alpha)


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least-squares fit of `L = l_inf + a C^-alpha` (alpha on a fine grid in (0, 2], then
    l_inf and a by linear least squares, l_inf kept below the smallest loss).

    Args:
      compute, loss: >= 3 points (compute > 0), e.g. tokens seen and eval loss of a run.
    """
    c = np.asarray(compute, np.float64)
    y = np.asarray(loss, np.float64)
    if c.size < 3 or np.any(c <= 0):
        raise ValueError(f"need >= 3 points with compute > 0, got {c.size}")
    best = None
    for alpha in np.linspace(0.01, 2.0, 400):
        x = c**-alpha
        design = np.stack([np.ones_like(x), x], axis=1)
        (l_inf, a), *_ = np.linalg.lstsq(design, y, rcond=None)
        if l_inf >= y.min() or a <= 0:  # the curve must keep falling and stay above l_inf
            continue
        rms = float(np.sqrt(np.mean((l_inf + a * x - y) ** 2)))
        if best is None or rms < best.rms:
            best = PowerLaw(float(l_inf), float(a), float(alpha), rms)
    if best is None:
        raise ValueError("the losses do not fall with compute: no power law fits")
    return best


def effective_speedup(
    baseline: PowerLaw, variant_loss: float, variant_compute: float, throughput_ratio: float
) -> float:
    """`C* / C_v * throughput_ratio` (see the module docstring); inf when the baseline's
    curve never reaches the variant's loss."""
    needed = baseline.compute_for(variant_loss)
    return needed / variant_compute * throughput_ratio
