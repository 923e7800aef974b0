"""The statistics of the verified guarantee, in one place (see docs/guarantee.md).

z quantile, chi-square quantile, the pilot variance's upper confidence bound, the
finite-population budget and the heavy-key threshold. Torch only, float64.
"""
from __future__ import annotations

import functools
import math

import torch


def z_two_sided(delta: float) -> float:
    """z with P(|Z| > z) = delta for a standard normal Z."""
    return math.sqrt(2.0) * torch.special.erfinv(torch.tensor(1.0 - delta, dtype=torch.float64)).item()


def chi2_quantile(k: torch.Tensor, p: float, iters: int = 30) -> torch.Tensor:
    """x with P(chi2_k <= x) = p, per element of k (real degrees of freedom).

    Bisection on the exact CDF inside a bracket around the Wilson-Hilferty value (which
    is within a few percent for k >= 1), so few steps reach ~1e-6 relative precision.
    """
    k = k.double()
    z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
    c = 2.0 / (9.0 * k)
    wh = k * (1 - c + z * torch.sqrt(c)).clamp(min=0.05) ** 3
    # The search runs on x / 2, the incomplete gamma's argument: halving is exact, so this is
    # the same bisection with three fewer tensor ops a step (called per layer on the CPU).
    a = k / 2
    lo, hi = 0.25 * wh, 0.75 * wh + 0.5
    # Far tails can leave the bracket: widen those elements to a safe one.
    lo = torch.where(torch.special.gammainc(a, lo) > p, torch.zeros_like(lo), lo)
    wide = a + 15.0 * torch.sqrt(2.0 * k) + 30.0
    hi = torch.where(torch.special.gammainc(a, hi) < p, wide, hi)
    for _ in range(iters):
        mid = (lo + hi) * 0.5
        below = torch.special.gammainc(a, mid) < p
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return hi * 2


def var_inflation(cnt: torch.Tensor, conf: float) -> torch.Tensor | float:
    """Factor from a sample variance of cnt values to its normal-theory upper confidence
    bound at confidence conf: (cnt - 1) / chi2_{cnt-1}^{-1}(1 - conf). conf = 0: 1 (plug-in).
    On the CPU, whole counts are looked up (_inflation): a decoder asks for the same few pilot
    sizes at every layer and step, and each solve is 30 steps of the CDF."""
    if conf == 0:
        return 1.0
    dof = (cnt.double() - 1).clamp(min=1)
    if dof.device.type == "cpu" and dof.numel() and bool((dof == dof.round()).all()):
        u, inv = torch.unique(dof, return_inverse=True)
        if u.numel() <= 64:
            return torch.tensor([_inflation(int(x), float(conf)) for x in u.tolist()], dtype=torch.float64)[inv]
    return dof / chi2_quantile(dof, 1.0 - conf)


@functools.lru_cache(maxsize=4096)
def _inflation(dof: int, conf: float) -> float:
    """var_inflation for one whole dof >= 1, the same solve as the batched one."""
    d = torch.tensor([float(dof)], dtype=torch.float64)
    return float((d / chi2_quantile(d, 1.0 - conf))[0])


def budget_from_b0(b0: torch.Tensor, n_r: torch.Tensor) -> torch.Tensor:
    """Smallest b with b0 * (n_r - b) / (n_r - 1) <= b (variance with the finite-population
    correction), i.e. b = b0 n_r / (n_r - 1 + b0)."""
    nr = n_r.double()
    b = torch.where(torch.isinf(b0), nr, b0 * nr / (nr - 1 + b0).clamp(min=1e-30))
    return torch.ceil(b.nan_to_num(0.0) - 1e-9).long()


def heavy_threshold(eps: float, delta: float, m0: torch.Tensor, n_r: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """Attention probability above which a residual key is taken exactly instead of sampled.

    A key of probability p left to a uniform sample of size m from n_r keys moves the
    estimate of D by p D (n_r/m - 1) when drawn and by -p D when not: its own standard
    deviation is p D sqrt(n_r/m - 1). Requiring it to be at most c * eps D / z at the
    smallest sample the budget can choose (m = m0, the pilot) gives

        gamma = c * eps / (z * sqrt(n_r / m0 - 1)),

    so that no single key left to the sample can by itself spend more than c^2 of the
    variance the budget allows, and a key the pilot does not see cannot hide more than
    that from the budget. Rows with n_r <= m0 are sampled whole: gamma = inf.
    """
    z = z_two_sided(delta)
    ratio = (n_r.double() / m0.double().clamp(min=1) - 1).clamp(min=0)
    gamma = c * eps / (z * ratio.sqrt()).clamp(min=1e-300)
    return torch.where(ratio > 0, gamma, torch.full_like(gamma, float("inf")))
