"""transformers Cache over a KVCache: `model.generate(..., past_key_values=VmemCache.for_model(...))`.

Each layer's `update` writes the new K/V into the batch's slots and returns views
[B, Hkv, n, D] of the contiguous buffers (no copies). The batch takes B consecutive slots
on its first update and gives them back on `reset()` / `close()`. Rows of a batch share
one length (transformers pads on the left), as with DynamicCache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from vattn.cache.kv import KVCache
from vattn.errors import VattnError


class _Batch:
    """The slots one VmemCache holds in a KVCache, shared by its layers."""

    def __init__(self, kv: KVCache):
        self.kv, self.start, self.size, self.capacity = kv, None, 0, 0

    def ensure(self, batch: int, n: int) -> None:
        if self.start is None:
            self.start, self.size = self.kv.alloc(batch), batch
        elif batch != self.size:
            raise VattnError(f"batch size changed from {self.size} to {batch}; reset() the cache first")
        if n > self.capacity:
            self.kv.grow(range(self.start, self.start + batch), n)
            self.capacity = n

    def release(self) -> None:
        if self.start is not None:
            self.kv.free(self.start, self.size)
        self.start, self.size, self.capacity = None, 0, 0


class VmemLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, batch: _Batch, layer_idx: int):
        super().__init__()
        self.batch, self.layer_idx, self.n = batch, layer_idx, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        kv = self.batch.kv
        B, H, _, D = key_states.shape
        if (H, D) != (kv.H, kv.D):
            raise VattnError(f"cache was built for {kv.H} KV heads x head_dim {kv.D}, the model gives {H} x {D}")
        if key_states.device.type != kv.device.type:
            raise VattnError(f"cache lives on {kv.device}, the model runs on {key_states.device}; "
                             "pass device= to VmemCache.for_model")
        self.dtype, self.device = kv.dtype, kv.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [B, Hkv, T, D] -> full K, V [B, Hkv, n+T, D] (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, T = key_states.shape[0], key_states.shape[2]
        end = self.n + T
        self.batch.ensure(B, end)
        s = self.batch.start
        K, V = self.batch.kv.view(self.layer_idx, s, B, end)
        K[:, :, self.n:end].copy_(key_states)
        V[:, :, self.n:end].copy_(value_states)
        self.n = end
        self.keys, self.values = K, V
        return K, V

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        return self.n

    def get_max_length(self) -> int:
        return -1  # grows on demand; kv.N is the hard limit

    def reset(self) -> None:
        self.n, self.keys, self.values = 0, None, None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise VattnError("crop takes a negative number of tokens to remove")
        self.n = max(0, self.n + tokens_to_remove)
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :self.n], self.values[:, :, :self.n]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # In place, so the buffers stay where the slots are.
        if self.n and self.keys is not None:
            idx = beam_idx.to(self.keys.device)
            self.keys.copy_(self.keys.index_select(0, idx))
            self.values.copy_(self.values.index_select(0, idx))

    def offload(self):
        raise VattnError("VmemCache does not support offloading")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise VattnError("VmemCache cannot change its batch size in place; expand inputs before generate()")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise VattnError("VmemCache cannot change its batch size in place")


class VmemCache(Cache):
    """A transformers Cache whose K/V live in a KVCache (contiguous virtual memory)."""

    def __init__(self, kv: KVCache, owns_kv: bool = False):
        self.kv, self._owns = kv, owns_kv
        self._batch = _Batch(kv)
        super().__init__(layers=[VmemLayer(self._batch, i) for i in range(kv.L)])

    @classmethod
    def for_model(cls, model, max_batch: int, max_len: int, device=None, dtype=None,
                  budget_bytes: int | None = None, **kv_kwargs) -> "VmemCache":
        """Build a KVCache sized for `model` (its config) with `max_batch` slots of `max_len` tokens."""
        cfg = model.config.get_text_config(decoder=True)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = KVCache(cfg.num_hidden_layers, max_batch, max_len, kv_heads, head_dim,
                     dtype=dtype or model.dtype, device=device or model.device,
                     budget_bytes=budget_bytes, **kv_kwargs)
        return cls(kv, owns_kv=True)

    def reset(self):
        """Forget the tokens and give the slots back (their pages stay mapped for the next batch)."""
        super().reset()
        self._batch.release()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._batch.capacity = min(self._batch.capacity, self.get_seq_length())

    def close(self):
        """Give the slots back, and all memory too when this cache built its own KVCache."""
        self.reset()
        if self._owns:
            self.kv.close()
