"""KVCache over virtual memory: content under random churn, memory return, out-of-memory.

The CPU backend always runs; the CUDA backend runs where a GPU and cuda-bindings exist.
"""
import mmap
import random

import pytest
import torch

from vattn.cache.kv import KVCache
from vattn.cache.vmem import VattnOutOfMemory, reserve
from vattn.errors import VattnError


def _cuda_ok():
    if not torch.cuda.is_available():
        return False
    try:
        import cuda.bindings.driver  # noqa: F401
        return True
    except ImportError:
        return False


DEVICES = ["cpu"] + (["cuda"] if _cuda_ok() else [])

# Shapes with many page boundaries per slot: CPU pages are 4 KiB granules; CUDA's are 2 MiB,
# so there a token is 2 KiB (4 heads x 128 x fp32): 1024 tokens a granule (bnhd), 4096 a head's granule (bhnd).
SHAPES = {"cpu": dict(num_kv_heads=2, head_dim=8, dtype=torch.float32, granule=4096, max_len=300),
          "cuda": dict(num_kv_heads=4, head_dim=128, dtype=torch.float32, max_len=8192)}


def make(device, layers=2, slots=6, layout="bhnd", budget_pages=None, **kw):
    """A small cache; budget_pages(kv) -> pages sets a budget from the probed page geometry."""
    shape = dict(SHAPES[device])
    shape.update(kw)
    args = (layers, slots, shape.pop("max_len"), shape.pop("num_kv_heads"), shape.pop("head_dim"))
    kv = KVCache(*args, device=device, layout=layout, **shape)
    if budget_pages is None:
        return kv
    budget = budget_pages(kv) * kv.page_bytes
    kv.close()
    return KVCache(*args, device=device, layout=layout, budget_bytes=budget, **shape)


class Shadow:
    """What each live slot should hold: per layer, K and V [Hkv, n, D]."""

    def __init__(self, kv, seed):
        self.kv, self.data, self.g = kv, {}, torch.Generator(device=kv.device).manual_seed(seed)

    def start(self, slot):
        kv = self.kv
        empty = torch.empty(kv.H, 0, kv.D, dtype=kv.dtype, device=kv.device)
        self.data[slot] = [[empty, empty] for _ in range(kv.L)]

    def append(self, slot, t):
        kv = self.kv
        n = self.data[slot][0][0].shape[1]
        for layer in range(kv.L):
            for i, buf in enumerate((kv.k(layer), kv.v(layer))):
                new = torch.randn(kv.H, t, kv.D, generator=self.g, device=kv.device).to(kv.dtype)
                buf[slot, :, n:n + t] = new
                self.data[slot][layer][i] = torch.cat([self.data[slot][layer][i], new], 1)

    def check(self, slot):
        n = self.data[slot][0][0].shape[1]
        for layer in range(self.kv.L):
            K, V = self.kv.view(layer, slot, 1, n)
            assert torch.equal(K[0], self.data[slot][layer][0]), f"slot {slot} layer {layer} K differs"
            assert torch.equal(V[0], self.data[slot][layer][1]), f"slot {slot} layer {layer} V differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_random_churn_keeps_content(device, layout):
    # Budget below what all slots at full length need, so reclaim and out-of-memory both happen.
    # (CUDA slots hold few 2 MiB pages, so there the budget is two full slots.)
    kv = make(device, layout=layout, budget_pages=lambda kv: (3 if device == "cpu" else 2) * kv.slot_pages)
    rng = random.Random(0)
    sh = Shadow(kv, 0)
    ops = 2000 if device == "cpu" else 400
    ooms = reuses = 0
    for step in range(ops):
        r = rng.random()
        live = list(sh.data)
        if r < 0.2 and len(live) < kv.S:
            s = kv.alloc()
            reuses += bool(kv._mapped[s])
            sh.start(s)
            n = rng.randint(1, kv.N // 2)
            try:
                kv.grow([s], n)
            except VattnOutOfMemory:
                ooms += 1
                kv.free(s)
                del sh.data[s]
                continue
            # A new request must see zeros, never a freed request's tokens.
            for layer in range(kv.L):
                K, V = kv.view(layer, s, 1, n)
                assert not K.any() and not V.any(), "new slot exposes old data"
            sh.append(s, n)
        elif r < 0.35 and live:
            s = rng.choice(live)
            kv.free(s)
            del sh.data[s]
        elif live:
            s = rng.choice(live)
            n = sh.data[s][0][0].shape[1]
            t = rng.randint(1, 40)
            if n + t > kv.N:
                continue
            try:
                kv.grow([s], n + t)
            except VattnOutOfMemory as e:
                assert "budget" in str(e)
                ooms += 1
                sh.check(s)  # a failed grow changes nothing
                continue
            sh.append(s, t)
            sh.check(s)
        st = kv.stats()
        assert st.mapped_bytes <= kv.budget_bytes
        assert st.slots_in_use == len(sh.data)
        if step % 100 == 0:
            for s in sh.data:
                sh.check(s)
    for s in sh.data:
        sh.check(s)
    assert ooms > 0 and reuses > 0  # both paths were exercised
    kv.close()


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_memory_is_clear_and_others_survive(device):
    probe = make(device)
    per_page = 1
    while probe._pages_for(per_page + 1) == probe._pages_for(1):
        per_page += 1  # tokens that fit in a slot's first pages
    p1 = len(probe._pages_for(1))
    probe.close()
    kv = make(device, slots=3, ahead_tokens=0, budget_pages=lambda kv: 2 * p1)
    sh = Shadow(kv, 1)
    a, b, c = kv.alloc(), kv.alloc(), kv.alloc()
    for s in (a, b):
        sh.start(s)
        kv.grow([s], per_page)
        sh.append(s, per_page)
    with pytest.raises(VattnError, match="budget"):
        kv.grow([c], 1)
    with pytest.raises(VattnError, match="budget"):
        kv.grow([a], per_page + 1)
    sh.check(a)
    sh.check(b)
    kv.free(b)
    del sh.data[b]
    kv.grow([c], 1)  # reclaims b's page
    sh.check(a)
    assert kv.stats().pages_mapped == 2 * p1
    kv.close()


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


def test_cpu_memory_returns_after_free():
    mb = 1 << 20
    kv = KVCache(1, 4, 4096, 8, 128, dtype=torch.float32, device="cpu", ahead_tokens=0)  # 16 MiB/slot/K
    base = _rss()
    s = kv.alloc(4)
    kv.grow(range(s, s + 4), 4096)  # 128 MiB: populated on map, before any write
    assert kv.stats().mapped_bytes == 128 * mb
    assert _rss() - base > 120 * mb
    kv.k(0)[s:s + 4].fill_(1.0)
    kv.free(s, 4)
    assert kv.stats().cached_bytes == 128 * mb  # deferred: still mapped
    assert kv.trim() == 128 * mb
    assert _rss() - base < 8 * mb
    assert kv.stats().mapped_bytes == 0
    kv.close()


def test_cpu_reserve_is_free():
    r = reserve(64 << 30, "cpu")  # 64 GiB of address space, nothing committed
    base = _rss()
    r.map([0, 1])
    t = r.tensor()
    t[: 4 << 20].fill_(7)
    assert _rss() - base >= 4 << 20
    r.unmap([0, 1])
    assert int(t[: 4 << 20].sum()) == 0  # reads back zeros
    r.close()


@pytest.mark.parametrize("device", DEVICES)
def test_views_are_zero_copy(device):
    for layout in ("bhnd", "bnhd"):
        kv = make(device, layout=layout)
        s = kv.alloc(2)
        kv.grow(range(s, s + 2), 10)
        K, V = kv.view(1, s, 2, 10)
        assert K.shape == (2, kv.H, 10, kv.D) and K.stride(-1) == 1
        K[1, 0, 3] = 5.0
        assert kv.k(1)[s + 1, 0, 3, 0] == 5.0
        base = kv.range.tensor().data_ptr()
        assert base <= K.data_ptr() < base + kv.range.num_granules * kv.G
        kv.close()


@pytest.mark.parametrize("device", DEVICES)
def test_background_grow_and_errors(device):
    kv = make(device, background=True, ahead_tokens=0)
    s = kv.alloc()
    kv.grow_async([s], 50)
    kv.sync()
    assert kv.stats().pages_mapped == len(kv._pages_for(50))
    with pytest.raises(VattnError, match="max_len"):
        kv.grow([s], kv.N + 1)
    with pytest.raises(VattnError, match="not allocated"):
        kv.free(s + 1)
    with pytest.raises(VattnError, match="consecutive free slots"):
        kv.alloc(kv.S)
    with pytest.raises(VattnError, match="layout"):
        KVCache(1, 1, 8, 1, 8, layout="nope")
    kv.close()


# ---------------------------------------------------------------- issue 16: failures change nothing
def _two_cached(device):
    """A cache with a budget of 2 one-token requests: slot a live, slot b freed (pages cached),
    slot c allocated and empty."""
    probe = make(device)
    p1 = len(probe._pages_for(1))
    probe.close()
    kv = make(device, slots=3, ahead_tokens=0, budget_pages=lambda kv: 2 * p1)
    a, b, c = kv.alloc(), kv.alloc(), kv.alloc()
    kv.grow([a], 1)
    kv.grow([b], 1)
    kv.free(b)
    return kv, a, b, c


def _snapshot(kv):
    return (kv.stats(), [set(m) for m in kv._mapped], list(kv._freed_order), kv.range.mapped)


@pytest.mark.parametrize("device", DEVICES)
def test_failed_grow_over_budget_changes_nothing(device):
    kv, a, b, c = _two_cached(device)
    before = _snapshot(kv)
    with pytest.raises(VattnOutOfMemory, match="budget"):
        kv.grow([c], kv.N)  # more than the budget even after reclaiming b's cached pages
    assert _snapshot(kv) == before
    assert kv.stats().pages_cached > 0  # b's pages are still there for its next request
    kv.grow([c], 1)  # what fits still works (reclaims b's pages now)
    kv.close()


@pytest.mark.parametrize("device", DEVICES)
def test_failed_grow_on_full_device_changes_nothing(device, monkeypatch):
    kv, a, b, c = _two_cached(device)
    deny = set(kv._granules(c, kv._pages_for(1)))
    real = kv.range.map

    def full_for_c(granules):  # the device refuses c's memory, even after the cache gives back b's pages
        if deny & set(granules):
            raise VattnOutOfMemory("device full (test)")
        return real(granules)

    monkeypatch.setattr(kv.range, "map", full_for_c)
    kv._budget_pages = None  # only the device limit applies
    before = _snapshot(kv)
    with pytest.raises(VattnOutOfMemory, match="device full"):
        kv.grow([c], 1)
    assert _snapshot(kv) == before
    kv.close()


def test_slot_arguments_are_checked():
    kv = make("cpu", slots=4)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(VattnError, match="count must be an int >= 1"):
            kv.alloc(bad)
    with pytest.raises(VattnError, match="consecutive free slots"):
        kv.alloc(5)
    s = kv.alloc(2)
    with pytest.raises(VattnError, match=r"slot 99 does not exist: slots are 0\.\.3 \(num_slots=4\); allocated now: \[0, 1\]"):
        kv.free(99)
    with pytest.raises(VattnError, match="slot -1 does not exist"):
        kv.free(-1)
    with pytest.raises(VattnError, match="slot 2 is not allocated"):
        kv.free(s + 1, 2)  # slots 1 and 2: 2 is free, so nothing is freed
    assert kv.stats().slots_in_use == 2
    with pytest.raises(VattnError, match="count must be an int >= 1"):
        kv.free(s, 0)
    with pytest.raises(VattnError, match="slot 7 does not exist"):
        kv.grow([7], 1)
    with pytest.raises(VattnError, match="slot -2 does not exist"):
        kv.grow([-2], 1)
    with pytest.raises(VattnError, match="list or range"):
        kv.grow(0, 1)
    with pytest.raises(VattnError, match="n must be an int >= 0"):
        kv.grow([s], -1)
    kv.free(s, 2)
    assert kv.stats().slots_in_use == 0
    kv.close()


def test_grow_within_mapped_pages_maps_nothing_and_freed_slots_map_again():
    """A decode step's grow inside pages already mapped (the look-ahead) takes the fast path:
    no mapping, length updated; a freed slot's pages may be reclaimed, so after free + alloc it
    is checked and mapped again."""
    kv = make("cpu", slots=2, ahead_tokens=64)
    s = kv.alloc()
    kv.grow([s], 10)
    calls = []
    real = kv.range.map
    kv.range.map = lambda g: (calls.append(len(g)), real(g))[1]
    kv.grow([s], 11)
    kv.grow([s], 74)  # 10 + 64: still inside
    assert calls == [] and kv.length(s) == 74
    kv.grow([s], 200)
    assert calls and kv.length(s) == 200
    kv.free(s)
    with pytest.raises(VattnError, match="not allocated"):
        kv.grow([s], 5)  # the fast path never serves a freed slot
    kv.trim()  # its pages given back
    assert kv.alloc() == s
    calls.clear()
    kv.grow([s], 5)
    assert calls, "a reallocated slot whose pages were unmapped must map them again"
    kv.close()
