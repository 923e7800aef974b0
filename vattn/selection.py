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

    @staticmethod
    def empty(b, h, t, device, shared=False) -> "Selection":
        return Selection(
            torch.full((b, h, t, 0), -1, dtype=torch.int32, device=device),
            torch.zeros((b, h, t, 0), dtype=torch.float32, device=device),
            torch.zeros((b, h, t), dtype=torch.int32, device=device),
            shared,
        )
