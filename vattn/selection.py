"""Selection: which keys each query row attends, with which log-weights.

    indices      int32 [B, H, T, K]   key positions, padded with -1
    log_weights  f32   [B, H, T, K]   log of each key's weight (0 = exact key)
    count        int32 [B, H, T]      valid entries per row

H is the query-head count, or the KV-head count when one selection serves a GQA
group (``shared=True``). Valid entries come first in each row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vattn.errors import VattnError


@dataclass
class Selection:
    indices: torch.Tensor
    log_weights: torch.Tensor
    count: torch.Tensor
    shared: bool = False  # True: H is the KV-head count
    listed: bool = True  # False: a fused kernel's counts only (Selection.counted); no indices to read

    def _check_listed(self):
        if not self.listed:
            raise VattnError("this Selection holds only counts (a fused kernel ran, which lists no keys): "
                             "density is known, per-key metrics are not; run the plan with fused=False "
                             "(the same algorithm's reference) for them")

    @property
    def shape(self):
        return tuple(self.indices.shape)

    def valid(self) -> torch.Tensor:
        """bool [B, H, T, K]: entries below each row's count."""
        self._check_listed()
        k = self.indices.shape[-1]
        return torch.arange(k, device=self.indices.device) < self.count.unsqueeze(-1)

    def by_group(self, hkv: int, g: int):
        """(indices int64, log_weights, valid) as [B, Hkv, G, T, K], G = query heads per KV
        head: the one per-query-head view (a shared selection is broadcast, not copied)."""
        self._check_listed()
        def grouped(x):
            if self.shared:
                return x[:, :, None].expand(x.shape[0], hkv, g, *x.shape[2:])
            return x.reshape(x.shape[0], hkv, g, *x.shape[2:])
        return grouped(self.indices.long()), grouped(self.log_weights), grouped(self.valid())

    def per_query_head(self, hq: int):
        """(indices int64, log_weights, valid) as [B, Hq, T, K]."""
        hkv = self.indices.shape[1] if self.shared else hq
        g = hq // hkv
        return tuple(x.reshape(x.shape[0], hq, *x.shape[3:]) for x in self.by_group(hkv, g))

    @staticmethod
    def counted(count: torch.Tensor, shared: bool = False) -> "Selection":
        """Counts only [B, H, T], from a kernel that attends without listing its keys."""
        b, h, t = count.shape
        return Selection(torch.empty((b, h, t, 0), dtype=torch.int32, device=count.device),
                         torch.empty((b, h, t, 0), device=count.device), count.to(torch.int32), shared, listed=False)

    def row(self, t: int) -> "Selection":
        """Query row t alone ([B, H, 1, K])."""
        return Selection(self.indices[:, :, t:t + 1], self.log_weights[:, :, t:t + 1], self.count[:, :, t:t + 1],
                         self.shared, listed=self.listed)

    @staticmethod
    def cat_rows(sels: list) -> "Selection":
        """Selections of consecutive query rows (dim T), padded to one K."""
        if len(sels) == 1:
            return sels[0]
        kmax = max(s.indices.shape[-1] for s in sels)

        def pad(x, fill):
            return torch.nn.functional.pad(x, (0, kmax - x.shape[-1]), value=fill)
        return Selection(torch.cat([pad(s.indices, -1) for s in sels], 2),
                         torch.cat([pad(s.log_weights, 0.0) for s in sels], 2),
                         torch.cat([s.count for s in sels], 2), sels[0].shared, listed=sels[0].listed)

    @staticmethod
    def empty(b, h, t, device, shared=False) -> "Selection":
        return Selection(
            torch.full((b, h, t, 0), -1, dtype=torch.int32, device=device),
            torch.zeros((b, h, t, 0), dtype=torch.float32, device=device),
            torch.zeros((b, h, t), dtype=torch.int32, device=device),
            shared,
        )
