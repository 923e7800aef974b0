"""Check the (eps, delta) guarantee empirically: coverage = fraction of rows within eps.

Works on any attention inputs: the synthetic score families, or Q/K/V captured from a
model (vattn.capture). The guaranteed quantity depends on the mode: the relative L2
error of the output (mode="output") or of the softmax denominator ("denominator").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vattn import metrics
from vattn.attend import attend, dense_attend, row_bounds
from vattn.spec import select


@dataclass
class Inputs:
    """One group of attention rows: q [B, Hq, T, D], k/v [B, Hkv, N, D]."""
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    lengths: torch.Tensor | None = None
    starts: torch.Tensor | None = None


def tolerance(delta: float, rows: int) -> float:
    """Three binomial standard deviations of a coverage estimate over `rows` rows."""
    return 3.0 * math.sqrt(delta * (1 - delta) / max(rows, 1))


def measure(inp: Inputs, spec: str, mode: str, seed: int = 0) -> dict:
    """Per-row errors and the measured density of one spec on one group."""
    q, k, v = inp.q, inp.k, inp.v
    b, hq, t = q.shape[:3]
    starts, ends = row_bounds(b, t, k.shape[2], inp.lengths, inp.starts, q.device)
    sel = select(spec, q, k, v, lengths=inp.lengths, starts=inp.starts, scale=inp.scale, seed=seed)
    out = attend(q, k, v, sel, scale=inp.scale)
    ref = dense_attend(q, k, v, lengths=inp.lengths, starts=inp.starts, scale=inp.scale)
    live = (ends > starts[:, None])[:, None].expand(b, hq, t)  # rows with at least one key
    out_err = metrics.relative_error(out, ref)[live]
    den_err = metrics.denominator_error(q, k, sel, starts, ends, inp.scale)[live]
    return {
        "errors": out_err if mode == "output" else den_err,
        "output_errors": out_err,
        "density": metrics.density(sel, starts, ends, hq),
    }


def verify(groups: list[Inputs], base: str, eps_list, delta_list, modes, share="none", seed=0):
    """Rows of the coverage table: one per (group, mode, eps, delta), plus 'all' per setting."""
    rows = []
    for mode in modes:
        for eps in eps_list:
            for delta in delta_list:
                spec = f"verified(eps={eps},delta={delta},mode='{mode}',share='{share}')"
                spec = f"{base}+{spec}" if base else spec
                errs, dens, weights = [], [], []
                for g in groups:
                    m = measure(g, spec, mode, seed)
                    errs.append(m["errors"])
                    dens.append(m["density"])
                    weights.append(m["errors"].numel())
                    rows.append(_row(g.name, mode, eps, delta, m["errors"], m["density"], spec))
                if len(groups) > 1:
                    d = sum(x * w for x, w in zip(dens, weights)) / max(sum(weights), 1)
                    rows.append(_row("all", mode, eps, delta, torch.cat(errs), d, spec))
    return rows


def _row(name, mode, eps, delta, errors, density, spec):
    n = errors.numel()
    cov = metrics.coverage(errors, eps)
    tol = tolerance(delta, n)
    return {
        "group": name, "mode": mode, "eps": eps, "delta": delta, "rows": n,
        "density": round(density, 4), "coverage": round(cov, 4), "target": round(1 - delta, 4),
        "tolerance": round(tol, 4), "ok": bool(cov >= 1 - delta - tol),
        "mean_error": round(float(errors.mean()), 5) if n else float("nan"), "spec": spec,
    }


def synthetic_groups(families, rows=256, n=2048, d=64, seed=0) -> list[Inputs]:
    from vattn.synthetic import make_inputs
    out = []
    for fam in families:
        q, k, v, scale = make_inputs(fam, rows=rows, n=n, d=d, seed=seed)
        out.append(Inputs(fam, q, k, v, scale))
    return out
