"""What every part shares: the decode context, the selection builder, the registry.

A part is a small dataclass with a `select(ctx, builder)` method that adds keys to
the builder. Parts run in order; later parts see (and skip) what earlier parts chose.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

import torch

from vattn.errors import VattnError
from vattn.selection import Selection

PARTS: dict[str, type] = {}

# The largest integer a spec may hold: key positions and counts are int32 in a Selection,
# so no row can hold more keys, and a larger number is a typo, not a budget.
MAX_INT = 2**31 - 1


def estimates(part) -> bool:
    """Whether `part` estimates the residual's mass from a sample (weighted keys), so that
    no part may follow it: a later part would count keys the sample already stands for."""
    return bool(getattr(part, "estimates", False))  # a class attribute of the sampling parts


def register(name: str):
    """Class decorator: make a part usable by name in spec strings."""
    def wrap(cls):
        cls.name = name
        PARTS[name] = cls
        return cls
    return wrap


@dataclass
class DecodeContext:
    """Everything a part may look at for one attention call.

    q: [B, Hq, T, D]; k, v: [B, Hkv, N, D] (any strides).
    starts: int64 [B] first valid key (left padding); ends: int64 [B, T] one past the
    last key row t may see (causal rows). Row length n = ends - starts.
    state: per-layer dict a method may keep across calls (e.g. page metadata).
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    scale: float
    generator: torch.Generator | None = None
    state: dict = field(default_factory=dict)
    layer: int = 0
    _scores: torch.Tensor | None = None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    def lengths(self) -> torch.Tensor:
        """int64 [B, 1, T]: each row's number of allowed keys."""
        return (self.ends - self.starts[:, None]).clamp(min=0)[:, None, :]

    def allowed(self) -> torch.Tensor:
        """bool [B, 1, T, N]: keys each row may attend."""
        pos = torch.arange(self.k.shape[2], device=self.k.device)
        lo = self.starts[:, None, None, None]
        hi = self.ends[:, None, :, None]
        return (pos >= lo) & (pos < hi)

    def scores(self) -> torch.Tensor:
        """f32 [B, Hq, T, N]: exact scaled scores q.k (oracle parts only; cached)."""
        if self._scores is None:
            self._scores = exact_scores(self.q, self.k, self.scale)
        return self._scores


def exact_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """f32 [B, Hq, T, N]: scale * q.k of every query row and key, one float32 product per
    KV head (q [B, Hq, T, D], k [B, Hkv, N, D]); the oracle parts and the topk plan share it."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv * t, d)
    s = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    return s.reshape(b, hq, t, -1)


def resolve_size(size, n: torch.Tensor) -> torch.Tensor:
    """A part's size: an int count, or a float fraction of each row's length n."""
    if isinstance(size, float):
        return torch.ceil(size * n.double()).long().clamp(max=n)
    return torch.minimum(torch.full_like(n, int(size)), n)


def host_size(size, n: int) -> int:
    """resolve_size for a length known on the host (the same double arithmetic): the most a
    row of at most n keys takes, so buffers are sized without reading the device."""
    if isinstance(size, float):
        return min(math.ceil(size * float(n)), n)
    return min(int(size), n)


class Builder:
    """Accumulates chosen keys per row; `chosen` is what later parts must skip.

    heads: Hq, or Hkv once the selection is shared per KV head.
    """

    def __init__(self, ctx: DecodeContext):
        self.ctx = ctx
        b, hq, t, _ = ctx.q.shape
        self.shared = False
        self.chosen = torch.zeros(b, hq, t, ctx.k.shape[2], dtype=torch.bool, device=ctx.k.device)
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, idx: torch.Tensor, lw: torch.Tensor | None, ok: torch.Tensor):
        """idx int64 [B, H, T, k]; ok bool (entries to keep). Chosen keys are skipped."""
        idx = idx.expand(*self.chosen.shape[:3], idx.shape[-1])
        n = self.chosen.shape[-1]
        ok = ok.expand_as(idx) & (idx >= 0) & (idx < n)
        safe = idx.clamp(0, n - 1)
        ok = ok & ~torch.gather(self.chosen, 3, safe)
        # amax: padded entries (ok False) that alias a real position must not clear it.
        self.chosen = self.chosen.to(torch.uint8).scatter_reduce_(
            3, safe, ok.to(torch.uint8), "amax").bool()
        if lw is None:
            lw = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
        self.pieces.append((safe, lw.expand_as(idx).float(), ok))

    def share(self):
        """Turn per-query-head choices into one set per KV head: the union over the group."""
        if self.shared:
            return
        for _, lw, ok in self.pieces:
            if bool((lw[ok] != 0).any()):
                raise VattnError("share='kv' needs the parts before it to choose exact keys "
                                 "(log-weight 0); put sampling parts last")
        b, hq, t, n = self.chosen.shape
        g = self.ctx.group
        self.chosen = self.chosen.reshape(b, hq // g, g, t, n).any(2)
        idx, lw, ok = (torch.zeros(b, hq // g, t, 0, dtype=torch.long, device=self.chosen.device),
                       None, None)
        pos = torch.arange(n, device=self.chosen.device).expand_as(self.chosen)
        cnt = self.chosen.sum(-1)
        kmax = int(cnt.max()) if cnt.numel() else 0
        # The union in position order: the kmax smallest positions among chosen keys.
        key = torch.where(self.chosen, pos, n + pos)
        idx = torch.topk(key, kmax, dim=-1, largest=False, sorted=True).values if kmax else idx
        ok = idx < n
        idx = torch.where(ok, idx, -1)
        self.pieces = [(idx, torch.zeros(idx.shape, device=idx.device), ok)]
        self.shared = True

    def selection(self) -> Selection:
        b, h, t, _ = self.chosen.shape
        if not self.pieces:
            return Selection.empty(b, h, t, self.chosen.device, self.shared)
        idx = torch.cat([p[0] for p in self.pieces], -1)
        lw = torch.cat([p[1] for p in self.pieces], -1)
        ok = torch.cat([p[2] for p in self.pieces], -1)
        # Valid entries first (stable), padding after.
        order = torch.sort((~ok).to(torch.int8), dim=-1, stable=True).indices
        idx, lw, ok = (torch.gather(x, -1, order) for x in (idx, lw, ok))
        count = ok.sum(-1)
        kmax = int(count.max()) if count.numel() else 0
        idx, lw, ok = idx[..., :kmax], lw[..., :kmax], ok[..., :kmax]
        idx = torch.where(ok, idx, -1).to(torch.int32)
        lw = torch.where(ok, lw, 0.0)
        return Selection(idx, lw, count.to(torch.int32), self.shared)


def check_range(part: str, param: str, value, lo, hi, lo_open=False, hi_open=False):
    """Raise a VattnError naming the part, parameter and valid range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise VattnError(f"{part}: {param} must be in {rng}, got {value!r}")


def check_size(part: str, param: str, value):
    """Sizes: an int count in [0, MAX_INT], or a float fraction in (0, 1]."""
    msg = (f"{part}: {param} must be a count (an integer >= 0, e.g. 128, at most {MAX_INT} = 2**31 - 1 "
           f"as key positions are int32) or a fraction in (0, 1] (e.g. 0.05), got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise VattnError(msg)
    if isinstance(value, int) and not 0 <= value <= MAX_INT:
        raise VattnError(msg)
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        raise VattnError(msg)


def part_fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]


_LOADED: dict = {}


def load_part_file(part: str, path: str, fmt: str, what: str) -> dict:
    """A part's data file (torch.save'd dict with "format" == fmt), cached by path and
    modification time so every layer and decode step reads it once."""
    key = (os.path.abspath(path), os.path.getmtime(path))
    if key not in _LOADED:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a user-facing message
            raise VattnError(f"{part}: cannot read {path}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != fmt:
            raise VattnError(f"{part}: {path} is not a {what}")
        _LOADED[key] = data
    return _LOADED[key]
