"""A KV cache in contiguous virtual memory, backed by physical pages as sequences grow.

Layout of the one reserved range: [layer][K or V][slot][slot bytes], each slot padded to
a whole number of granules so that no granule is shared by two slots. Inside a slot:

    layout="bhnd" (default): [Hkv, max_len, D]  each head's tokens are contiguous, so
                             K/V views are [B, Hkv, N, D] with unit stride in D and N*D
                             packed per head (what dense decode kernels like best).
    layout="bnhd":           [max_len, Hkv, D]  one growing strip per slot: finer memory
                             granularity (a granule holds tokens of all heads); views are
                             permuted [B, Hkv, N, D] with token stride Hkv*D.

A "page" below is one local granule of a slot in every layer and both K and V (the unit
in which a slot grows: 2 * num_layers granules). Pages of a freed slot stay mapped
(deferred reclamation): a new request in that slot reuses them for free, and they are
unmapped only when another slot needs memory the budget no longer covers.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from vattn.cache.vmem import VattnOutOfMemory, runs, reserve
from vattn.errors import VattnError

log = logging.getLogger(__name__)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB"


@dataclass
class CacheStats:
    mapped_bytes: int      # physical memory mapped now (in use + ahead + cached in freed slots)
    used_bytes: int        # bytes the stored tokens occupy (sum of lengths, all layers, K and V)
    cached_bytes: int      # mapped but held by freed slots, reclaimable
    pages_mapped: int      # pages as defined in the module docstring
    pages_cached: int
    page_bytes: int
    budget_bytes: int | None
    slots_in_use: int
    static_bytes: int      # what a static cache of num_slots x max_len would take


class KVCache:
    """Per-layer K and V buffers [num_slots, Hkv, max_len, D] over one virtual range.

    Use: `s = kv.alloc(B)` (B consecutive slots), `kv.grow(range(s, s+B), n)` before
    writing token n-1, write into `kv.k(layer)[s:s+B, :, pos]`, read views with
    `kv.view(layer, s, B, n)`, and `kv.free(s, B)` when the requests end.
    """

    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float16, device=None, budget_bytes: int | None = None,
                 granule: int | None = None, layout: str = "bhnd", ahead_tokens: int = 16,
                 scrub: bool = True, background: bool = False):
        for name, v in (("num_layers", num_layers), ("num_slots", num_slots), ("max_len", max_len),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise VattnError(f"{name} must be a positive int, got {v!r}")
        if layout not in ("bhnd", "bnhd"):
            raise VattnError(f"layout must be 'bhnd' or 'bnhd', got {layout!r}")
        if budget_bytes is not None and budget_bytes < 0:
            raise VattnError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.L, self.S, self.N, self.H, self.D = num_layers, num_slots, max_len, num_kv_heads, head_dim
        self.dtype, self.layout, self.ahead, self.scrub = dtype, layout, ahead_tokens, scrub
        self.esize = torch.empty(0, dtype=dtype).element_size()
        # Reserve a generous upper bound first: the granule is only known once reserved.
        raw_slot = self.H * self.N * self.D * self.esize
        probe = reserve(1, device, granule)
        self.G = probe.granule
        probe.close()
        self.slot_pages = -(-raw_slot // self.G)
        self.range = reserve(2 * self.L * self.S * self.slot_pages * self.G, device, granule)
        self.device = self.range.device
        self.page_bytes = 2 * self.L * self.G
        self.budget_bytes = budget_bytes
        self._budget_pages = None if budget_bytes is None else budget_bytes // self.page_bytes
        self._mapped: list[set[int]] = [set() for _ in range(self.S)]
        self._in_use = [False] * self.S
        self._length = [0] * self.S
        self._ready = [0] * self.S  # tokens [0, ready) of an in-use slot are known mapped (0 when free)
        self._freed_order: list[int] = []  # freed slots holding pages, oldest first
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vattn-map") if background else None
        self._pending: Future | None = None
        self._build_views()

    # ---------------------------------------------------------------- views
    def _build_views(self):
        flat = self.range.tensor().view(self.dtype)
        slot = self.slot_pages * self.G // self.esize
        if self.layout == "bhnd":
            stride = (slot, self.N * self.D, self.D, 1)
        else:
            stride = (slot, self.D, self.H * self.D, 1)
        self._kv = [[flat.as_strided((self.S, self.H, self.N, self.D), stride, ((l * 2 + i) * self.S * slot))
                     for i in (0, 1)] for l in range(self.L)]

    def k(self, layer: int) -> torch.Tensor:
        """All slots' keys of one layer: [num_slots, Hkv, max_len, D] (only mapped parts are readable)."""
        return self._kv[layer][0]

    def v(self, layer: int) -> torch.Tensor:
        return self._kv[layer][1]

    def view(self, layer: int, start: int, count: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots [start, start+count), first n tokens: two [count, Hkv, n, D] views."""
        return (self._kv[layer][0][start:start + count, :, :n],
                self._kv[layer][1][start:start + count, :, :n])

    # ---------------------------------------------------------------- pages
    def _pages_for(self, n: int) -> set[int]:
        """Local pages (granule indices inside a slot) that hold tokens [0, n)."""
        if n <= 0:
            return set()
        G, tb = self.G, self.D * self.esize
        if self.layout == "bnhd":
            return set(range(0, (n * self.H * tb - 1) // G + 1))
        out = set()
        for h in range(self.H):
            a = h * self.N * tb
            out.update(range(a // G, (a + n * tb - 1) // G + 1))
        return out

    def _granules(self, slot: int, pages) -> list[int]:
        """Global granule indices of `pages` of `slot` in every layer, K and V."""
        sp = self.slot_pages
        return [((l2 * self.S) + slot) * sp + p for l2 in range(2 * self.L) for p in pages]

    def _pages_mapped(self) -> int:
        return sum(len(m) for m in self._mapped)

    def _zero(self, slot: int, pages) -> None:
        flat = self.range.tensor()
        for g, n in runs(self._granules(slot, pages)):
            flat[g * self.G:(g + n) * self.G].zero_()

    def _reclaimable(self, keep: set[int]) -> int:
        """Pages that freed slots (not in `keep`) hold and `_reclaim` may unmap."""
        return sum(len(self._mapped[s]) for s in self._freed_order if s not in keep and not self._in_use[s])

    def _reclaim(self, pages: int, keep: set[int]) -> dict[int, list[int]]:
        """Unmap up to `pages` pages from freed slots (oldest first, not in `keep`);
        returns {slot: pages unmapped}."""
        done, taken = 0, {}
        for slot in list(self._freed_order):
            if done >= pages:
                break
            if slot in keep or self._in_use[slot]:
                continue
            take = sorted(self._mapped[slot], reverse=True)[:pages - done]
            self.range.unmap(self._granules(slot, take))
            self._mapped[slot].difference_update(take)
            taken[slot] = take
            done += len(take)
            if not self._mapped[slot]:
                self._freed_order.remove(slot)
        return taken

    def _restore(self, taken: dict[int, list[int]], order: list[int]) -> None:
        """Map back pages `_reclaim` took (a failed grow changes nothing). Best effort: if the
        device refuses, those cached pages stay given back (they held no live tokens)."""
        if not taken:
            return
        try:
            self.range.map([g for s, p in taken.items() for g in self._granules(s, p)])
        except VattnOutOfMemory:
            log.warning("KV cache: %d cached pages given back during a failed grow could not be mapped again",
                        sum(len(p) for p in taken.values()))
            return
        for s, p in taken.items():
            self._mapped[s].update(p)
        self._freed_order[:] = [s for s in order if self._mapped[s] and not self._in_use[s]]

    def _ensure(self, slots, want: dict[int, set[int]]) -> None:
        """Map `want[slot]` pages for each slot, reclaiming if the budget requires; all or nothing:
        on VattnOutOfMemory no page is mapped or unmapped (freed slots keep their cached pages)."""
        need = sum(len(p) for p in want.values())
        if need == 0:
            return
        order = list(self._freed_order)
        taken: dict[int, list[int]] = {}
        if self._budget_pages is not None:
            over = self._pages_mapped() + need - self._budget_pages
            if over > 0 and self._reclaimable(set(slots)) < over:  # check before unmapping anything
                raise VattnOutOfMemory(
                    f"KV cache budget exhausted: slots {sorted(want)} need {_mib(need * self.page_bytes)} more, "
                    f"{_mib(self._pages_mapped() * self.page_bytes)} of the {_mib(self.budget_bytes)} budget is "
                    "mapped by live requests; free requests or raise budget_bytes")
            if over > 0:
                taken = self._reclaim(over, set(slots))
        granules = [g for s, p in want.items() for g in self._granules(s, p)]
        try:
            try:
                self.range.map(granules)
            except VattnOutOfMemory:
                # Device is full: give back every cached page, then try once more.
                for s, p in self._reclaim(self._pages_mapped(), set(slots)).items():
                    taken[s] = taken.get(s, []) + p
                self.range.map(granules)
        except VattnOutOfMemory:
            self._restore(taken, order)
            raise
        for s, p in want.items():
            self._mapped[s].update(p)
            if self.scrub and self.device.type == "cuda":
                self._zero(s, p)  # fresh device memory is not promised to be zero

    # ---------------------------------------------------------------- slots
    def _slot_error(self, what: str) -> VattnError:
        used = [s for s in range(self.S) if self._in_use[s]]
        return VattnError(f"{what}: slots are 0..{self.S - 1} (num_slots={self.S}); allocated now: {used}")

    def _check_slots(self, slots, allocated: bool = True) -> None:
        """Every slot an int in [0, num_slots) and (if `allocated`) in use; else a VattnError naming them."""
        for s in slots:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.S:
                raise self._slot_error(f"slot {s!r} does not exist")
            if allocated and not self._in_use[s]:
                raise self._slot_error(f"slot {s} is not allocated; call alloc() first")

    def alloc(self, count: int = 1) -> int:
        """Take `count` consecutive free slots (preferring ones whose pages are still mapped); returns the first."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise VattnError(f"alloc(count): count must be an int >= 1 (slots to take), got {count!r}")
        with self._lock:
            best, best_pages = None, -1
            for s in range(self.S - count + 1):
                if any(self._in_use[s:s + count]):
                    continue
                pages = sum(len(self._mapped[i]) for i in range(s, s + count))
                if pages > best_pages:
                    best, best_pages = s, pages
            if best is None:
                raise VattnError(f"no {count} consecutive free slots (num_slots={self.S}, "
                                 f"in use={sum(self._in_use)}); free requests or raise max_batch")
            for s in range(best, best + count):
                self._in_use[s] = True
                self._length[s] = 0
                self._ready[s] = 0
                if s in self._freed_order:
                    self._freed_order.remove(s)
                if self.scrub and self._mapped[s]:
                    self._zero(s, self._mapped[s])  # the previous request's tokens must not leak
            return best

    def free(self, start: int, count: int = 1) -> None:
        """End the requests in slots [start, start+count); their pages stay mapped until needed elsewhere."""
        self.sync()
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise VattnError(f"free(start, count): count must be an int >= 1, got {count!r}")
        if isinstance(start, bool) or not isinstance(start, int):
            raise self._slot_error(f"free(start): start must be an int, got {start!r}")
        with self._lock:
            self._check_slots(range(start, start + count))  # all checked before any is freed
            for s in range(start, start + count):
                self._in_use[s] = False
                self._length[s] = 0
                self._ready[s] = 0  # its pages may be reclaimed from now on
                if self._mapped[s]:
                    self._freed_order.append(s)

    def grow(self, slots, n: int) -> None:
        """Make tokens [0, n) of each slot writable, mapping `ahead_tokens` more when the budget allows.

        Raises VattnOutOfMemory (a VattnError) when even n tokens do not fit; nothing changes then:
        no page is mapped, and freed slots keep their cached pages (on the device-full path they
        are mapped back; should the device refuse even that, a warning is logged).
        """
        self.sync()
        slots = self._slot_list(slots)
        if self._mapped_up_to(slots, n):  # a decode step's usual case: nothing to map, nothing to check
            for s in slots:
                self._length[s] = max(self._length[s], n)
            return
        self._grow(slots, n)

    def _mapped_up_to(self, slots: list, n) -> bool:
        """Whether tokens [0, n) of every slot are known mapped (n >= 1: then each slot is in use,
        since only in-use slots have a nonzero _ready)."""
        if type(n) is not int or n < 1:
            return False
        return all(type(s) is int and 0 <= s < self.S and self._ready[s] >= n for s in slots)

    def _slot_list(self, slots) -> list[int]:
        if isinstance(slots, int):
            raise VattnError(f"slots must be a list or range of slot ids, e.g. [{slots}], got {slots!r}")
        try:
            return list(slots)
        except TypeError:
            raise VattnError(f"slots must be a list or range of slot ids, got {slots!r}") from None

    def _grow(self, slots: list[int], n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise VattnError(f"grow(slots, n): n must be an int >= 0 (tokens), got {n!r}")
        if n > self.N:
            raise VattnError(f"sequence length {n} exceeds max_len {self.N}; build the cache with a larger max_len")
        with self._lock:
            self._check_slots(slots)
            must = {s: self._pages_for(n) - self._mapped[s] for s in slots}
            ahead = {s: self._pages_for(min(n + self.ahead, self.N)) - self._mapped[s] for s in slots}
            try:
                self._ensure(slots, ahead)
                top = min(n + self.ahead, self.N)
            except VattnOutOfMemory:
                self._ensure(slots, must)  # the look-ahead is optional
                top = n
            for s in slots:
                self._length[s] = max(self._length[s], n)
                self._ready[s] = max(self._ready[s], top)

    def grow_async(self, slots, n: int) -> None:
        """Like grow, in the background thread (if enabled); the next grow/free/sync waits for it."""
        if self._pool is None:
            return self.grow(slots, n)
        self.sync()
        self._pending = self._pool.submit(self._grow, self._slot_list(slots), n)

    def sync(self) -> None:
        """Wait for background mapping; re-raises its error."""
        f, self._pending = self._pending, None
        if f is not None:
            f.result()

    def trim(self) -> int:
        """Unmap every page held by freed slots now; returns the bytes given back."""
        self.sync()
        with self._lock:
            taken = self._reclaim(self._pages_mapped(), set())
            return sum(len(p) for p in taken.values()) * self.page_bytes

    def length(self, slot: int) -> int:
        return self._length[slot]

    def stats(self) -> CacheStats:
        with self._lock:
            cached = sum(len(self._mapped[s]) for s in range(self.S) if not self._in_use[s])
            used_tokens = sum(self._length)
            pm = self._pages_mapped()
            return CacheStats(
                mapped_bytes=pm * self.page_bytes,
                used_bytes=used_tokens * self.H * self.D * self.esize * 2 * self.L,
                cached_bytes=cached * self.page_bytes, pages_mapped=pm, pages_cached=cached,
                page_bytes=self.page_bytes, budget_bytes=self.budget_bytes, slots_in_use=sum(self._in_use),
                static_bytes=self.S * self.N * self.H * self.D * self.esize * 2 * self.L)

    def close(self) -> None:
        """Give back all physical memory and the address range. Views taken before become invalid."""
        self.sync()
        if self._pool is not None:
            self._pool.shutdown()
        self._kv = []
        self.range.close()
