"""Reserve a large virtual range once; back parts of it with physical memory on demand.

Two backends with one interface (`VirtualRange`):

- CPU: anonymous mmap with MAP_NORESERVE (reserving costs nothing); `map` commits pages
  with MADV_POPULATE_WRITE, `unmap` returns them with MADV_DONTNEED (reads back zeros).
- CUDA: the driver's virtual memory API (cuMemAddressReserve / cuMemCreate / cuMemMap /
  cuMemSetAccess / cuMemUnmap / cuMemRelease) through `cuda.bindings.driver`, imported
  lazily. One physical allocation per granule (2 MiB), so any granule can be unmapped.

Offsets and sizes given to `map` / `unmap` are in granules. `tensor()` is a zero-copy
uint8 view of the whole range; reading an unmapped CUDA granule faults the GPU, so only
read what is mapped.
"""
from __future__ import annotations

import logging
import mmap
import threading

import torch

from vattn.errors import VattnError

log = logging.getLogger(__name__)

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux value
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14; we fall back to touching pages


class VattnOutOfMemory(VattnError):
    """Physical memory for the KV cache ran out (budget or device)."""


def runs(granules):
    """Sorted granule indices -> [(start, count)] of consecutive runs (fewer driver calls)."""
    out = []
    for g in sorted(granules):
        if out and out[-1][0] + out[-1][1] == g:
            out[-1][1] += 1
        else:
            out.append([g, 1])
    return [(s, n) for s, n in out]


class VirtualRange:
    """Interface: a reserved range of `num_granules * granule` bytes."""

    granule: int
    num_granules: int
    device: torch.device

    def map(self, granules) -> None: ...
    def unmap(self, granules) -> None: ...
    def tensor(self) -> torch.Tensor: ...
    def close(self) -> None: ...

    @property
    def mapped(self) -> int:
        """Number of granules backed by physical memory right now."""
        return len(self._mapped)


class CpuRange(VirtualRange):
    """Anonymous MAP_NORESERVE mapping; the OS commits a page when it is touched."""

    def __init__(self, nbytes: int, granule: int = 2 << 20):
        if granule % mmap.PAGESIZE:
            raise VattnError(f"granule must be a multiple of the OS page size {mmap.PAGESIZE}, got {granule}")
        self.granule = granule
        self.num_granules = -(-nbytes // granule)
        self.device = torch.device("cpu")
        self._mm = mmap.mmap(-1, self.num_granules * granule,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self._mapped: set[int] = set()
        self._populate = True
        self._lock = threading.Lock()

    def map(self, granules) -> None:
        with self._lock:
            new = [g for g in granules if g not in self._mapped]
            for start, n in runs(new):
                off, size = start * self.granule, n * self.granule
                if self._populate:
                    try:
                        self._mm.madvise(_MADV_POPULATE_WRITE, off, size)
                    except OSError:  # old kernel: touch one byte per OS page instead
                        self._populate = False
                if not self._populate:
                    view = memoryview(self._mm)[off:off + size]
                    for p in range(0, size, mmap.PAGESIZE):
                        view[p] = view[p]
                    view.release()
            self._mapped.update(new)

    def unmap(self, granules) -> None:
        with self._lock:
            old = [g for g in granules if g in self._mapped]
            for start, n in runs(old):
                self._mm.madvise(mmap.MADV_DONTNEED, start * self.granule, n * self.granule)
            self._mapped.difference_update(old)

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(self._mm, dtype=torch.uint8)

    def close(self) -> None:
        # The mmap stays alive while tensors view it (buffer export); drop what we hold.
        self.unmap(list(self._mapped))


class _CudaArray:
    """Minimal `__cuda_array_interface__` holder so torch.as_tensor can wrap a raw pointer."""

    def __init__(self, ptr: int, nbytes: int, owner):
        self._owner = owner  # keeps the reservation alive as long as a tensor views it
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3, "strides": None}


def _check(result, what: str):
    from cuda.bindings import driver as drv
    err = result[0]
    if err != drv.CUresult.CUDA_SUCCESS:
        name = drv.cuGetErrorName(err)[1]
        if err == drv.CUresult.CUDA_ERROR_OUT_OF_MEMORY:
            raise VattnOutOfMemory(f"{what}: the GPU is out of memory ({name!r}); lower max_batch/max_len "
                                   "or set budget_bytes below free memory")
        raise RuntimeError(f"{what} failed: {name!r}")
    return result[1] if len(result) == 2 else result[1:]


class CudaRange(VirtualRange):
    """cuMemAddressReserve'd range; each mapped granule is its own cuMemCreate allocation."""

    def __init__(self, nbytes: int, device=None):
        try:
            from cuda.bindings import driver as drv
        except ImportError as e:  # pragma: no cover - GPU machines only
            raise VattnError("the CUDA vmem backend needs the package cuda-bindings "
                             "(pip install cuda-bindings)") from e
        self._drv = drv
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # torch must create (and make current) the primary context before we use the driver.
        torch.cuda.init()
        torch.empty(1, device=self.device)
        self._ctx = _check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        prop = drv.CUmemAllocationProp()
        prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self.device.index
        self._prop = prop
        self.granule = int(_check(drv.cuMemGetAllocationGranularity(
            prop, drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM),
            "cuMemGetAllocationGranularity"))
        self.num_granules = -(-nbytes // self.granule)
        self.nbytes = self.num_granules * self.granule
        self._base = int(_check(drv.cuMemAddressReserve(self.nbytes, self.granule, 0, 0), "cuMemAddressReserve"))
        access = drv.CUmemAccessDesc()
        access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self.device.index
        access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = access
        self._mapped: dict[int, object] = {}  # granule -> physical handle
        self._lock = threading.Lock()
        self._closed = False

    def _ptr(self, g: int):
        return self._drv.CUdeviceptr(self._base + g * self.granule)

    def map(self, granules) -> None:
        drv = self._drv
        with self._lock:
            _check(drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")  # callers may be other threads
            new = [g for g in granules if g not in self._mapped]
            done = []
            try:
                for start, n in runs(new):
                    for g in range(start, start + n):
                        h = _check(drv.cuMemCreate(self.granule, self._prop, 0), "cuMemCreate")
                        try:
                            _check(drv.cuMemMap(self._ptr(g), self.granule, 0, h, 0), "cuMemMap")
                        except BaseException:
                            drv.cuMemRelease(h)
                            raise
                        self._mapped[g] = h
                        done.append(g)
                    # One access call per run is cheaper than one per granule.
                    _check(drv.cuMemSetAccess(self._ptr(start), n * self.granule, [self._access], 1),
                           "cuMemSetAccess")
            except BaseException:
                self._unmap_locked(done)  # all or nothing
                raise

    def _unmap_locked(self, granules):
        drv = self._drv
        for g in granules:
            h = self._mapped.pop(g, None)
            if h is None:
                continue
            _check(drv.cuMemUnmap(self._ptr(g), self.granule), "cuMemUnmap")
            _check(drv.cuMemRelease(h), "cuMemRelease")

    def unmap(self, granules) -> None:
        # cuMemUnmap does not wait for kernels still reading the range.
        torch.cuda.synchronize(self.device)
        with self._lock:
            _check(self._drv.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            self._unmap_locked(list(granules))

    def tensor(self) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(self._base, self.nbytes, self), device=self.device)

    def close(self) -> None:
        if self._closed:
            return
        self.unmap(list(self._mapped))
        _check(self._drv.cuMemAddressFree(self._drv.CUdeviceptr(self._base), self.nbytes), "cuMemAddressFree")
        self._closed = True


def reserve(nbytes: int, device=None, granule: int | None = None) -> VirtualRange:
    """Reserve `nbytes` of virtual address space on `device` ("cpu" or "cuda[:i]")."""
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        return CpuRange(nbytes, granule or (2 << 20))
    if dev.type == "cuda":
        r = CudaRange(nbytes, dev)
        if granule is not None and granule != r.granule:
            log.warning("CUDA granule is fixed at %d bytes by the driver; ignoring granule=%d", r.granule, granule)
        return r
    raise VattnError(f"vmem supports device 'cpu' or 'cuda', got {device!r}")
