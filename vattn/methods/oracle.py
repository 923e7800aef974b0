"""Oracle parts: exact scores pick the keys (they read all of K)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.kernels.select import topk_ref
from vattn.methods.base import Builder, DecodeContext, check_range, check_size, host_size, register, resolve_size

NEG = float("-inf")


def masked_scores(ctx: DecodeContext, out: Builder) -> torch.Tensor:
    """Exact scores with disallowed and already chosen keys at -inf: [B, Hq, T, N]."""
    s = ctx.scores()
    return s.masked_fill(~ctx.allowed() | out.chosen, NEG)


@register("topk")
@dataclass
class TopK:
    """The k keys with the largest exact scores among those not yet chosen, per query head;
    among equal scores the lower positions first (kernels.select.topk_ref: the rule the topk
    plan's kernels follow, vattn.plan). host_size(k, N) candidates (N: the key buffer's
    length, known on the host), so nothing waits for the device."""
    k: int | float = 0.05

    def __post_init__(self):
        check_size("topk", "k", self.k)

    def select(self, ctx: DecodeContext, out: Builder):
        s = masked_scores(ctx, out)
        k = resolve_size(self.k, ctx.lengths())
        kmax = host_size(self.k, s.shape[-1])
        vals, idx = topk_ref(s, kmax)
        ok = (torch.arange(kmax, device=s.device) < k[..., None]) & (vals > NEG)
        out.add(idx, None, ok)


@register("topp")
@dataclass
class TopP:
    """The fewest keys whose exact softmax mass, with keys already chosen, reaches p."""
    p: float = 0.9

    def __post_init__(self):
        check_range("topp", "p", self.p, 0.0, 1.0, lo_open=True)

    def select(self, ctx: DecodeContext, out: Builder):
        s = ctx.scores().masked_fill(~ctx.allowed(), NEG)
        prob = torch.softmax(s, -1).nan_to_num(0.0)
        have = (prob * out.chosen).sum(-1, keepdim=True)
        rest = prob.masked_fill(out.chosen, 0.0)
        vals, idx = torch.sort(rest, dim=-1, descending=True)
        before = have + torch.cumsum(vals, -1) - vals
        # Keep a key while the mass gathered before it is still short of p.
        ok = (before < self.p - 1e-6) & (vals > 0)
        if self.p >= 1.0:
            ok = ok | ((vals > 0) | torch.isfinite(torch.gather(s, -1, idx)) & ~torch.gather(out.chosen, -1, idx))
        kmax = int(ok.sum(-1).max()) if ok.numel() else 0
        out.add(idx[..., :kmax], None, ok[..., :kmax])
