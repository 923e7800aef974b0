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


@dataclass
class Selection:
    indices: torch.Tensor
    log_weights: torch.Tensor
    count: torch.Tensor
    shared: bool = False  # True: H is the KV-head count

    @property
    def shape(self):
        return tuple(self.indices.shape)

    def valid(self) -> torch.Tensor:
        """bool [B, H, T, K]: entries below each row's count."""
        k = self.indices.shape[-1]
        return torch.arange(k, device=self.indices.device) < self.count.unsqueeze(-1)

    def by_group(self, hkv: int, g: int):
        """(indices int64, log_weights, valid) as [B, Hkv, G, T, K], G = query heads per KV
        head: the one per-query-head view (a shared selection is broadcast, not copied)."""
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
    def empty(b, h, t, device, shared=False) -> "Selection":
        return Selection(
            torch.full((b, h, t, 0), -1, dtype=torch.int32, device=device),
            torch.zeros((b, h, t, 0), dtype=torch.float32, device=device),
            torch.zeros((b, h, t), dtype=torch.int32, device=device),
            shared,
        )
