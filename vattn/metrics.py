"""Error, density, attention-mass recall and coverage of a Selection against exact attention.

Row conventions follow vattn.attend: starts [B], ends [B, T]; a shared selection counts
once per query head of its group.
"""
from __future__ import annotations

import torch

from vattn.selection import Selection


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row ||out - ref|| / ||ref|| over the head dim: [B, Hq, T] float32."""
    diff = (out.float() - ref.float()).norm(dim=-1)
    return diff / ref.float().norm(dim=-1).clamp(min=1e-30)


def frobenius_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """One number for a whole call: ||out - ref||_F / ||ref||_F (the hub's layer error)."""
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def density(sel: Selection, starts: torch.Tensor, ends: torch.Tensor, hq: int) -> float:
    """Attended (query, key) pairs / allowed pairs, as measured from the selection."""
    g = hq // sel.indices.shape[1]
    attended = float(sel.count.sum()) * g
    allowed = float((ends - starts[:, None]).clamp(min=0).sum()) * hq
    return attended / max(allowed, 1.0)


def exact_scores(q, k, starts, ends, scale) -> torch.Tensor:
    """f32 [B, Hq, T, N], -inf outside each row's allowed keys."""
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    s = torch.matmul(q.float().reshape(b, hkv, -1, d), k.float().transpose(-1, -2))
    s = s.reshape(b, hq, t, n) * scale
    pos = torch.arange(n, device=q.device)
    allowed = (pos >= starts[:, None, None]) & (pos < ends[:, :, None])
    return s.masked_fill(~allowed[:, None], float("-inf"))


def mass_recall(q, k, sel: Selection, starts, ends, scale) -> torch.Tensor:
    """Exact softmax mass that falls on the chosen keys, per row: [B, Hq, T]."""
    s = exact_scores(q, k, starts, ends, scale)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    idx, _, ok = sel.per_query_head(q.shape[1])
    return (torch.gather(p, -1, idx.clamp(min=0)) * ok).sum(-1)


def denominator_error(q, k, sel: Selection, starts, ends, scale) -> torch.Tensor:
    """Per row |D_hat - D| / D for the softmax denominator: [B, Hq, T]."""
    s = exact_scores(q, k, starts, ends, scale).double()
    shift = s.amax(-1, keepdim=True).clamp(min=-1e30)
    d = torch.exp(s - shift).sum(-1)
    idx, lw, ok = sel.per_query_head(q.shape[1])
    s_sel = torch.gather(s, -1, idx.clamp(min=0)) + lw.double()
    d_hat = (torch.exp(s_sel - shift) * ok).sum(-1)
    return ((d_hat - d).abs() / d.clamp(min=1e-300)).float()


def coverage(errors: torch.Tensor, eps: float) -> float:
    """Fraction of rows whose error is at most eps."""
    errors = errors.reshape(-1)
    return float((errors <= eps).float().mean()) if errors.numel() else float("nan")
