"""Synthetic attention inputs with controlled score distributions, for `vattn verify`.

Each row gets its own query and keys (B rows, one head): keys are built as
k_i = a_i * q/|q|^2 / scale + (noise orthogonal to q), so the scaled score of key i is
exactly a_i, drawn from the family's distribution.
"""
from __future__ import annotations

import torch

from vattn.errors import VattnError

FAMILIES = ("peaked", "heavy", "flat")


def scores(family: str, rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """f64 [rows, n]: the scaled scores a_i of one family."""
    if family == "flat":
        return 0.5 * torch.randn(rows, n, generator=g, dtype=torch.float64)
    if family == "heavy":
        # Student-t with 3 degrees of freedom: a few large scores, no clear winner.
        z = torch.randn(rows, n, generator=g, dtype=torch.float64)
        chi = (torch.randn(rows, n, 3, generator=g, dtype=torch.float64) ** 2).sum(-1)
        return 1.2 * z / torch.sqrt(chi / 3)
    if family == "peaked":
        a = torch.randn(rows, n, generator=g, dtype=torch.float64)
        hot = torch.rand(rows, n, generator=g) < 0.01  # ~1% of keys far above the rest
        return a + hot * 6.0
    raise VattnError(f"unknown score family {family!r}; choose from {', '.join(FAMILIES)}")


def make_inputs(family: str, rows: int = 256, n: int = 2048, d: int = 64, seed: int = 0):
    """q [rows, 1, 1, d], k, v [rows, 1, n, d] float32, one independent row per batch entry."""
    g = torch.Generator().manual_seed(seed)
    a = scores(family, rows, n, g)
    scale = d ** -0.5
    q = torch.randn(rows, d, generator=g, dtype=torch.float64)
    qn = q / q.norm(dim=-1, keepdim=True)
    noise = torch.randn(rows, n, d, generator=g, dtype=torch.float64)
    noise = noise - (noise @ qn[:, :, None]) * qn[:, None, :]  # orthogonal to q
    k = a[..., None] * (q / (q.norm(dim=-1, keepdim=True) ** 2) / scale)[:, None, :] + noise
    # Values share a mean direction, as in real models; without it the output of a flat
    # row nearly cancels (||o|| << ||v||) and any sample has a large relative error.
    mean_v = torch.randn(rows, 1, d, generator=g, dtype=torch.float64)
    v = 0.5 * mean_v + torch.randn(rows, n, d, generator=g, dtype=torch.float64)
    return (q[:, None, None].float(), k[:, None].float(), v[:, None].float(), scale)
