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
from vattn.attend import dense_attend, row_bounds
from vattn.plan import compile as compile_plan


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
    layer: int = 0  # a model layer's index: per-layer method state (e.g. hashtopk's projection)


def tolerance(delta: float, rows: int) -> float:
    """Three binomial standard deviations of a coverage estimate over `rows` rows."""
    return 3.0 * math.sqrt(delta * (1 - delta) / max(rows, 1))


def measure(inp: Inputs, spec: str, mode: str, seed: int = 0, fused: bool | None = None) -> dict:
    """Per-row errors and the measured density of one spec on one group. A fused kernel
    lists no keys, so denominator errors need its reference (fused=False; the scan
    kernels' twin makes every choice they make)."""
    q, k, v = inp.q, inp.k, inp.v
    b, hq, t = q.shape[:3]
    starts, ends = row_bounds(b, t, k.shape[2], inp.lengths, inp.starts, q.device)
    plan = compile_plan(spec, q.device, seed=seed, fused=fused)
    ctx = plan.context(starts, ends, inp.scale)
    plan.append(inp.layer, k, v, ctx)
    out, sel = plan.run(inp.layer, q, k, v, ctx)  # what runs
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
    """Rows of the coverage table: one per (group name, mode, eps, delta), plus 'all'.

    Inputs that share a name (e.g. one layer over several prompts) are pooled.
    """
    rows = []
    names = list(dict.fromkeys(g.name for g in groups))
    for mode in modes:
        for eps in eps_list:
            for delta in delta_list:
                spec = f"verified(eps={eps},delta={delta},mode='{mode}',share='{share}')"
                spec = f"{base}+{spec}" if base else spec
                errs = {name: [] for name in names}
                pairs = {name: [] for name in names}  # (density, rows) per input
                for g in groups:
                    m = measure(g, spec, mode, seed)
                    errs[g.name].append(m["errors"])
                    pairs[g.name].append((m["density"], m["errors"].numel()))
                for name in names:
                    rows.append(_row(name, mode, eps, delta, torch.cat(errs[name]), _mean(pairs[name]), spec))
                if len(names) > 1:
                    every = [p for name in names for p in pairs[name]]
                    rows.append(_row("all", mode, eps, delta, torch.cat([e for name in names for e in errs[name]]),
                                     _mean(every), spec))
    return rows


def _mean(pairs):
    """Row-weighted mean density."""
    total = sum(w for _, w in pairs)
    return sum(d * w for d, w in pairs) / max(total, 1)


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


def model_groups(model_path=None, tokens: int = 2048, seed: int = 0, n_queries: int = 16) -> list[Inputs]:
    """Q/K/V of decode-phase queries of a model on prose and passkey prompts, named by layer.

    Prompts of about tokens/2 and tokens tokens (each prose and passkey) are captured.
    """
    from vattn.capture import capture_qkv, default_prompts
    from vattn.models import load_model
    model, tok = load_model(model_path)
    lengths = sorted({max(256, tokens // 2), tokens})
    caps = capture_qkv(model, tok, default_prompts(tok, lengths), n_queries=n_queries)
    return [Inputs(f"layer {c['layer']:02d}", c["q"], c["k"], c["v"], c["scale"], c["lengths"], c["starts"],
                   c["layer"])
            for c in caps]
