"""Quest (Tang et al., 2024): pick pages of keys by an upper bound on their scores.

Keys are grouped in pages of `page` positions (page p holds positions [p*S, (p+1)*S)).
Each page keeps the element-wise min m and max M of its keys; for a query q,
U = sum_i max(q_i m_i, q_i M_i) is at least q.k for every key k of the page. A row
attends its last page plus the pages with the largest U.

This file also holds `block_state`, the per-layer metadata cache the other
approximate parts (magicpig, hashtopk) share: metadata is built at prefill and only
the blocks touched by newly appended keys are rebuilt on later calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import VattnError
from vattn.kernels.select import group_scores_ref, topk_ref
from vattn.methods.base import Builder, DecodeContext, check_size, host_size, register, resolve_size

NEG = float("-inf")


def check_int(part: str, param: str, value, lo: int, hi: int):
    """Integer parameters: raise a VattnError naming the part, parameter and range."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise VattnError(f"{part}: {param} must be an integer in [{lo}, {hi}], got {value!r}")


def row_ends(ctx: DecodeContext) -> torch.Tensor:
    """int64 [B]: one past the last key any query row of the batch row may see."""
    if ctx.ends.shape[1] == 0:
        return ctx.starts.clone()
    return ctx.ends.amax(-1)


def block_state(ctx: DecodeContext, key: str, block: int, build) -> torch.Tensor:
    """Metadata over blocks of `block` key positions, kept in ctx.state[key] across calls.

    build(lo, n) returns the metadata of blocks lo/block .. ceil(n/block)-1 as a tensor
    [B, Hkv, nblocks, ...]; lo is 0 (rebuild) or a multiple of block. A KV cache only
    appends, so a block lying wholly below every row's end is final; later blocks
    (partial pages, keys not yet written) are rebuilt on the next call. A change of
    shape, of starts, or ends moving back means a new sequence: rebuild from scratch.
    """
    b, hkv, n, d = ctx.k.shape
    ends = row_ends(ctx)
    st = ctx.state.get(key)
    low = int(ends.min()) if b else 0
    fresh = (st is None or st["shape"] != (b, hkv, d) or st["n"] > n or low < st["done"]
             or not torch.equal(st["starts"], ctx.starts))
    lo = 0 if fresh else st["done"]
    new = build(lo, n)
    meta = new if lo == 0 else torch.cat([st["meta"][:, :, : lo // block], new], 2)
    ctx.state[key] = {"meta": meta, "done": (min(low, n) // block) * block, "n": n,
                      "shape": (b, hkv, d), "starts": ctx.starts.clone()}
    return meta


def page_minmax(ctx: DecodeContext, page: int, lo: int, n: int):
    """Element-wise key min and max of pages lo/page .. : two f32 [B, Hkv, P, D].

    Positions a batch row cannot see (left padding, keys not written yet) are left
    out; a page with no visible key gets min = max = 0 (it is never selected).
    """
    b, hkv, _, d = ctx.k.shape
    k = ctx.k[:, :, lo:n].float()
    pos = torch.arange(lo, n, device=k.device)
    vis = (pos >= ctx.starts[:, None]) & (pos < row_ends(ctx)[:, None])  # [B, n-lo]
    pad = (-(n - lo)) % page
    vis = torch.nn.functional.pad(vis, (0, pad))[:, None, :, None]
    k = torch.nn.functional.pad(k, (0, 0, 0, pad))
    kmin = k.masked_fill(~vis, float("inf")).reshape(b, hkv, -1, page, d).amin(3)
    kmax = k.masked_fill(~vis, NEG).reshape(b, hkv, -1, page, d).amax(3)
    empty = ~vis.reshape(b, 1, -1, page).any(-1)[..., None]
    return kmin.masked_fill(empty, 0.0), kmax.masked_fill(empty, 0.0)


def page_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, scale: float) -> torch.Tensor:
    """Quest's bound scale * sum_i max(q_i m_i, q_i M_i): f32 [B, Hq, T, P].

    q [B, Hq, T, D]; kmin, kmax [B, Hkv, P, D]. max(q m, q M) is q M where q >= 0 and
    q m where q < 0, so the bound is two matrix products.
    """
    b, hq, t, d = q.shape
    hkv = kmin.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv * t, d)
    u = qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)
    return (u * scale).reshape(b, hq, t, -1)


def pages_to_keys(ctx: DecodeContext, pages: torch.Tensor, page_ok: torch.Tensor, page: int):
    """Pages [B, H, T, p] -> key positions [B, H, T, p*page] and which are in the row."""
    off = torch.arange(page, device=pages.device)
    idx = (pages[..., None] * page + off).flatten(-2)
    ok = page_ok[..., None].expand(*page_ok.shape, page).flatten(-2)
    inside = (idx >= ctx.starts[:, None, None, None]) & (idx < ctx.ends[:, None, :, None])
    ok = ok & inside
    return torch.where(ok, idx, -1), ok


def add_all(ctx: DecodeContext, out: Builder):
    """Every allowed key, exactly (for layers a method leaves dense)."""
    n = int(ctx.lengths().max()) if ctx.ends.numel() else 0
    idx = ctx.starts[:, None, None, None] + torch.arange(n, device=ctx.k.device)
    ok = idx < ctx.ends[:, None, :, None]
    out.add(torch.where(ok, idx, -1), None, ok)


@register("quest")
@dataclass
class Quest:
    """The row's last page plus the pages with the largest score bound.

    budget: tokens (count, or fraction of the row length), i.e. ceil(budget/page) pages
    besides the last page. dense_layers: layers below this index attend every key
    (the paper keeps layers 0-1 dense). share='kv': one set of pages per KV head, ranked by
    kernels.select.group_scores_ref over the group's query heads (each head's bounds shifted
    to its best page, the largest over the group), so a GQA kernel gathers each page once for
    the group, not once per query head.
    """
    budget: int | float = 0.05
    page: int = 16
    dense_layers: int = 0
    share: str = "none"

    def __post_init__(self):
        check_size("quest", "budget", self.budget)
        check_int("quest", "page", self.page, 1, 4096)
        check_int("quest", "dense_layers", self.dense_layers, 0, 10_000)
        if self.share not in ("none", "kv"):
            raise VattnError(f"quest: share must be 'none' (pages per query head) or 'kv' (per KV head), "
                             f"got {self.share!r}")

    def metadata(self, ctx: DecodeContext):
        """(kmin, kmax) f32 [B, Hkv, P, D], updated incrementally across calls."""
        s = self.page

        def build(lo, n):
            return torch.stack(page_minmax(ctx, s, lo, n), -1)

        meta = block_state(ctx, f"quest/{s}", s, build)
        return meta[..., 0], meta[..., 1]

    def select(self, ctx: DecodeContext, out: Builder):
        if ctx.layer < self.dense_layers:
            return add_all(ctx, out)
        s = self.page
        if self.share == "kv":
            out.share()
        kmin, kmax = self.metadata(ctx)
        u = page_bounds(ctx.q, kmin, kmax, ctx.scale)  # [B, Hq, T, P]
        b, hq, t, p = u.shape
        h = out.chosen.shape[1]  # Hq, or Hkv once shared
        last = ((ctx.ends - 1).clamp(min=0) // s)[:, None, :]  # [B, 1, T]
        has_keys = ctx.ends > ctx.starts[:, None]
        # A page is worth ranking if it holds an allowed key no earlier part chose.
        fresh = ctx.allowed() & ~out.chosen
        fresh = torch.nn.functional.pad(fresh, (0, p * s - fresh.shape[-1])).reshape(b, h, t, p, s).any(-1)
        pid = torch.arange(p, device=u.device)
        rank = u.masked_fill(~fresh.repeat_interleave(hq // h, 1) | (pid == last[..., None]), NEG)
        if hq > h:  # shared over a group (with one query head a KV head, as the kernel: no shift)
            rank = group_scores_ref(rank, hq // h)
        want = torch.div(resolve_size(self.budget, ctx.lengths()) + s - 1, s, rounding_mode="floor")
        # candidates sized by the key buffer's length (a host number), as the quest plan does;
        # equal bounds: the lower pages first (kernels.select.topk_ref, the plan kernels' rule)
        kmax_p = min(-(-host_size(self.budget, ctx.k.shape[2]) // s), p)
        vals, top = topk_ref(rank, kmax_p)
        ok_top = (torch.arange(kmax_p, device=u.device) < want[..., None]) & (vals > NEG)
        pages = torch.cat([last[..., None].expand(b, h, t, 1), top], -1)
        page_ok = torch.cat([has_keys[:, None, :, None].expand(b, h, t, 1), ok_top], -1)
        idx, ok = pages_to_keys(ctx, pages, page_ok, s)
        out.add(idx, None, ok)
