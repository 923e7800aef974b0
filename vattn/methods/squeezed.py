"""Squeezed Attention (Hooper et al., 2024): cluster the keys, pick clusters by centroid.

At a sequence's first call (the prefill) the visible keys of each batch row and KV
head are clustered by k-means (a few Lloyd iterations from seeded random keys). A
query scores every centroid (scale * q.c) and the row attends the members of the
best clusters, whole clusters in score order, until at least k keys are taken.
Keys appended later join their nearest centroid; centroids stay fixed.

Per-layer state: centroids f32 [B, Hkv, C, D] and each key's cluster, int64
[B, Hkv, N] (-1 for keys outside the row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import VattnError
from vattn.methods.base import Builder, DecodeContext, check_size, register, resolve_size
from vattn.methods.quest import block_state, check_int, row_ends

NEG = float("-inf")
CHUNK = 8192  # keys per distance block: bounds the [M, C] distance matrix's memory


def nearest(x: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean): x [B, H, M, D], cent [B, H, C, D] -> int64 [B, H, M].

    |x - c|^2 = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for every c."""
    half = 0.5 * (cent * cent).sum(-1)[:, :, None, :]
    parts = [(half - xb @ cent.transpose(-1, -2)).argmin(-1) for xb in x.split(CHUNK, dim=2)]
    return torch.cat(parts, 2) if parts else torch.zeros(x.shape[:3], dtype=torch.long, device=x.device)


def kmeans(x: torch.Tensor, vis: torch.Tensor, clusters: int, iters: int, gen: torch.Generator):
    """Lloyd's k-means per (batch row, head) over the visible keys.

    x f32 [B, H, M, D]; vis bool [B, M]. Starts from `clusters` distinct visible keys
    drawn by gen (with fewer visible keys than clusters, starts repeat and the copies
    stay empty). Returns centroids [B, H, C, D] and the nearest-centroid assignment
    [B, H, M] of the final centroids (-1 where not visible).
    """
    b, h, m, d = x.shape
    # Random order of the visible keys (invisible last), then the first `clusters`, cycling.
    r = torch.rand(b, h, m, generator=gen).to(x.device).masked_fill(~vis[:, None], 2.0)
    perm = torch.argsort(r, -1)
    nvis = vis.sum(-1).clamp(min=1)[:, None, None]
    start = perm.gather(2, torch.arange(clusters, device=x.device).expand(b, h, clusters) % nvis)
    cent = x.gather(2, start[..., None].expand(b, h, clusters, d))
    for _ in range(iters):
        a = nearest(x, cent).masked_fill(~vis[:, None], clusters)  # invisible keys: a spare bin
        sums = torch.zeros(b, h, clusters + 1, d, device=x.device).scatter_add_(2, a[..., None].expand(b, h, m, d), x)
        cnt = torch.zeros(b, h, clusters + 1, device=x.device).scatter_add_(2, a, torch.ones_like(x[..., 0]))
        sums, cnt = sums[:, :, :clusters], cnt[:, :, :clusters, None]
        cent = torch.where(cnt > 0, sums / cnt.clamp(min=1), cent)  # an emptied cluster keeps its centroid
    return cent, nearest(x, cent).masked_fill(~vis[:, None], -1)


@register("squeezed")
@dataclass
class Squeezed:
    """Members of the clusters whose centroids score highest, until k keys are taken.

    k: count or fraction of the row length. clusters: count, or fraction of the prefill
    length (0.02 = one cluster per 50 keys). iters: Lloyd iterations in [0, 100].
    seed: the k-means start (with the layer).
    """
    k: int | float = 0.05
    clusters: int | float = 0.02
    iters: int = 8
    seed: int = 0

    def __post_init__(self):
        check_size("squeezed", "k", self.k)
        c = self.clusters
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0 or (isinstance(c, float) and not c <= 1):
            raise VattnError(f"squeezed: clusters must be a count (an integer >= 1, e.g. 64) or a "
                             f"fraction of the prefill length in (0, 1] (e.g. 0.02), got {c!r}")
        check_int("squeezed", "iters", self.iters, 0, 100)
        check_int("squeezed", "seed", self.seed, 0, 2**31 - 1)

    def clustering(self, ctx: DecodeContext):
        """(centroids f32 [B, Hkv, C, D], cluster of each key int64 [B, Hkv, N]), kept across
        calls: k-means at a sequence's first call, nearest centroid for later keys."""
        key = f"squeezed/{self.clusters}/{self.iters}/{self.seed}"
        pos = torch.arange(ctx.k.shape[2], device=ctx.k.device)
        vis = (pos >= ctx.starts[:, None]) & (pos < row_ends(ctx)[:, None])  # [B, N]

        def build(lo, n):
            x = ctx.k[:, :, lo:n].float()
            if lo == 0:
                longest = int(vis.sum(-1).max()) if vis.numel() else 0
                c = max(1, int(resolve_size(self.clusters, torch.tensor(longest))))
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer)
                ctx.state[key + "/centroids"], assign = kmeans(x, vis[:, lo:n], c, self.iters, gen)
                return assign
            return nearest(x, ctx.state[key + "/centroids"]).masked_fill(~vis[:, None, lo:n], -1)

        assign = block_state(ctx, key, 1, build)
        return ctx.state[key + "/centroids"], assign

    def select(self, ctx: DecodeContext, out: Builder):
        cent, assign = self.clustering(ctx)
        b, hq, t, d = ctx.q.shape
        hkv, c, n = cent.shape[1], cent.shape[2], assign.shape[-1]
        qg = ctx.q.float().reshape(b, hkv, hq // hkv * t, d)
        score = (qg @ cent.transpose(-1, -2) * ctx.scale).reshape(b, hq, t, c)
        # Per row: how many keys of each cluster it may take (allowed, not yet chosen).
        avail = ctx.allowed() & ~out.chosen  # [B, Hq, T, N]
        a = assign.masked_fill(assign < 0, c).repeat_interleave(hq // hkv, 1)[:, :, None, :].expand(b, hq, t, n)
        size = torch.zeros(b, hq, t, c + 1, device=a.device).scatter_add_(3, a, avail.float())[..., :c]
        score = score.masked_fill(size == 0, NEG)
        order = torch.argsort(score, -1, descending=True)
        sz = size.gather(3, order)
        before = torch.cumsum(sz, -1) - sz
        want = resolve_size(self.k, ctx.lengths())[..., None]  # [B, 1, T, 1]
        take = (before < want) & (sz > 0)
        taken = torch.zeros(b, hq, t, c + 1, dtype=torch.bool, device=a.device)
        taken[..., :c] = torch.zeros_like(take).scatter_(3, order, take)
        keep = avail & taken.gather(3, a)
        # The kept keys in position order, padded with -1.
        cnt = keep.sum(-1)
        kmax = int(cnt.max()) if cnt.numel() else 0
        pos = torch.arange(n, device=a.device)
        idx = torch.topk(torch.where(keep, pos, n + pos), kmax, dim=-1, largest=False).values
        ok = idx < n
        out.add(torch.where(ok, idx, -1), None, ok)
