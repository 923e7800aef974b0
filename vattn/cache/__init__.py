"""KV cache in contiguous virtual memory, physical pages mapped on demand (docs/cache.md)."""
from vattn.cache.kv import CacheStats, KVCache
from vattn.cache.vmem import VattnOutOfMemory, VirtualRange, reserve

__all__ = ["KVCache", "CacheStats", "VattnOutOfMemory", "VirtualRange", "reserve", "VmemCache"]


def __getattr__(name):
    # VmemCache needs transformers; import it only when asked for.
    if name == "VmemCache":
        from vattn.cache.hf import VmemCache
        return VmemCache
    raise AttributeError(name)
