"""Position-only parts: attention sinks (first keys) and the local window (last keys)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.methods.base import Builder, DecodeContext, check_size, register, resolve_size


def _positions(ctx: DecodeContext, size, from_end: bool):
    n = ctx.lengths()  # [B, 1, T]
    k = resolve_size(size, n)
    kmax = int(k.max()) if k.numel() else 0
    off = torch.arange(kmax, device=ctx.k.device)
    if from_end:
        idx = ctx.ends[:, None, :, None] - 1 - off
    else:
        idx = ctx.starts[:, None, None, None] + off
    return idx.long(), off < k[..., None]


@register("sink")
@dataclass
class Sink:
    """The first n keys of each row (StreamingLLM's attention sinks)."""
    n: int | float = 128

    def __post_init__(self):
        check_size("sink", "n", self.n)

    def select(self, ctx: DecodeContext, out: Builder):
        idx, ok = _positions(ctx, self.n, from_end=False)
        out.add(idx, None, ok)


@register("window")
@dataclass
class Window:
    """The last n keys each row may see (the local window)."""
    n: int | float = 128

    def __post_init__(self):
        check_size("window", "n", self.n)

    def select(self, ctx: DecodeContext, out: Builder):
        idx, ok = _positions(ctx, self.n, from_end=True)
        out.add(idx, None, ok)


@register("dense")
@dataclass
class Dense:
    """Every allowed key, exactly."""

    def select(self, ctx: DecodeContext, out: Builder):
        idx, ok = _positions(ctx, 1.0, from_end=False)
        out.add(idx, None, ok)
