"""Retrieval heads (RazorAttention, DuoAttention): a few heads keep every key, the others
keep only sinks and a local window.

    heads(full='3 7 12.0', sink=16, window=64)

full: query heads that attend everything, separated by spaces: "h" for head h in every
layer, "l.h" for head h of layer l only (spaces, since ',' separates arguments).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import VattnError
from vattn.methods.base import Builder, DecodeContext, check_size, register, resolve_size


def parse_heads(text) -> list[tuple[int | None, int]]:
    """'3 7 12.0' -> [(None, 3), (None, 7), (12, 0)]."""
    out = []
    for tok in str(text).split():
        parts = tok.split(".")
        if len(parts) > 2 or not all(p.isdigit() for p in parts):
            raise VattnError(f"heads: full must list heads as 'h' or 'layer.h' separated by spaces, got {tok!r}")
        out.append((int(parts[0]), int(parts[1])) if len(parts) == 2 else (None, int(parts[0])))
    return out


@register("heads")
@dataclass
class Heads:
    """Listed heads attend every allowed key; the others their first `sink` and last `window` keys."""
    full: str = ""
    sink: int | float = 16
    window: int | float = 64

    def __post_init__(self):
        self.listed = parse_heads(self.full)
        check_size("heads", "sink", self.sink)
        check_size("heads", "window", self.window)

    def select(self, ctx: DecodeContext, out: Builder):
        hq = ctx.q.shape[1]
        full = torch.zeros(hq, dtype=torch.bool, device=ctx.k.device)
        for layer, h in self.listed:
            if h >= hq:
                raise VattnError(f"heads: head {h} does not exist (the model has {hq} query heads)")
            if layer is None or layer == ctx.layer:
                full[h] = True
        n = ctx.lengths()  # [B, 1, T]
        m = int(n.max()) if n.numel() else 0
        off = torch.arange(m, device=ctx.k.device)
        idx = ctx.starts[:, None, None, None] + off  # every key of the row, from its start
        last = ctx.ends[:, None, :, None] - 1 - off  # same keys, counted from the end
        head = full[None, :, None, None]
        ok = off < n[..., None]
        keep = head | (off < resolve_size(self.sink, n)[..., None])
        out.add(torch.where(ok & keep, idx, -1), None, ok & keep)
        keep_w = ~head & (off < resolve_size(self.window, n)[..., None])
        out.add(torch.where(ok & keep_w, last, -1), None, ok & keep_w)
