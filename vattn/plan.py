"""Plans: a spec compiled for a device, and what every caller runs per layer.

    plan = compile(spec, device)                       # once: decides how the spec runs
    out, sel = plan.run(layer, q, k, v, starts, ends, scale)
    plan.reset()                                       # a new sequence: method state, seed

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, N, D]; starts int64 [B] (first valid key);
ends int64 [B, T] (one past the last key each row sees). `sel` is the Selection that ran
(its count gives density; metrics use it).

Paths (`plan.path`):
  "streaming-kernel"  sink/window only, on CUDA: each row's index ranges are built on the
                      GPU and the Triton sparse kernel attends them; no host sync.
  "reference"         any other spec, or the CPU: parts -> Selection -> attend.
A CUDA plan on the reference path says so once in the log, so its numbers are never read
as a fused kernel's. The plan owns each layer's method state and the sampling generator.
"""
from __future__ import annotations

import logging

import torch

from vattn.attend import attend, kernel_misfit
from vattn.errors import VattnError
from vattn.methods.base import DecodeContext, resolve_size
from vattn.selection import Selection
from vattn.spec import Spec, parse

log = logging.getLogger(__name__)
_SAID: set = set()


class Plan:
    def __init__(self, spec: Spec, device: torch.device, path: str, seed: int = 0):
        self.spec, self.device, self.path, self.seed = spec, device, path, int(seed)
        self.states: dict[int, dict] = {}  # per layer: what methods keep across steps
        self._gen = None

    def reset(self):
        """A new sequence: method state and the sampling generator start afresh."""
        self.states.clear()
        self._gen = None

    def generator(self) -> torch.Generator:
        if self._gen is None:
            self._gen = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._gen

    def run(self, layer: int, q, k, v, starts, ends, scale: float) -> tuple[torch.Tensor, Selection]:
        """Attention of q's rows with the spec: (out [B, Hq, T, D] in q.dtype, Selection)."""
        if self.path == "streaming-kernel":
            sel = streaming_selection(self.spec, k, starts, ends)
            why = kernel_misfit(q, k, v)
            if why is None:
                from vattn.kernels.sparse import sparse_decode
                return sparse_decode(q, k, v, sel.indices, sel.log_weights, sel.count, True, scale), sel
            self.path = "reference"  # the plan says what runs from now on, and the log says why
            log.warning("spec %s: the fused streaming kernel cannot take these inputs (%s); "
                        "the reference path runs", self.spec, why)
        ctx = DecodeContext(q, k, v, starts, ends, scale, self.generator(), self.states.setdefault(layer, {}),
                            layer)
        sel = self.spec.select(ctx)
        return attend(q, k, v, sel, scale=scale), sel


def compile(spec, device, seed: int = 0, fused: bool | None = None) -> Plan:
    """The plan for `spec` on `device`. fused: None = the fused path where one exists on
    CUDA; True = insist on it (an error if the spec has none); False = the reference."""
    spec = parse(spec)
    device = torch.device(device)
    fusable = is_streaming(spec)
    if fused is None:
        fused = fusable and device.type == "cuda"
    if fused and not fusable:
        raise VattnError(f"spec {spec} has no fused GPU path (fused: sink/window only so far); "
                         "use fused=None to run the reference path")
    path = "streaming-kernel" if fused else "reference"
    if device.type == "cuda" and path == "reference" and str(spec) not in _SAID:
        _SAID.add(str(spec))
        log.warning("spec %s runs the reference path on CUDA (parts -> Selection -> sparse kernel), "
                    "not a fused plan", spec)
    return Plan(spec, device, path, seed)


def is_streaming(spec: Spec) -> bool:
    """sink and/or window, each at most once, sink first: positions only."""
    names = [p.name for p in spec.parts]
    return names in (["sink"], ["window"], ["sink", "window"])


def streaming_selection(spec: Spec, k: torch.Tensor, starts, ends) -> Selection:
    """sink/window index ranges built on the device: shared [B, Hkv, T, K] with K fixed by
    the key buffer's length N (a host number), so nothing waits for the GPU.

    Row r (length L = end - start): the first ks = size(sink, L) keys, then the last
    kw = min(size(window, L), L - ks) keys; no key twice (the reference's chosen-set rule)."""
    b, hkv, n, _ = k.shape
    sink = next((p.n for p in spec.parts if p.name == "sink"), 0)
    win = next((p.n for p in spec.parts if p.name == "window"), 0)
    nn = torch.tensor([n])  # on the host: N is known there, so sizing K waits for nothing
    kmax = int(resolve_size(sink, nn)) + int(resolve_size(win, nn))
    length = (ends - starts[:, None]).clamp(min=0)  # [B, T]
    ks = resolve_size(sink, length)
    kw = torch.minimum(resolve_size(win, length), length - ks)
    j = torch.arange(kmax, device=k.device)
    idx = torch.where(j < ks[..., None], starts[:, None, None] + j, ends[..., None] - 1 - (j - ks[..., None]))
    count = ks + kw
    idx = torch.where(j < count[..., None], idx, -1)
    t = ends.shape[1]
    expand = (b, hkv, t, kmax)
    return Selection(idx[:, None].expand(expand).to(torch.int32).contiguous(),
                     torch.zeros(expand, dtype=torch.float32, device=k.device),
                     count[:, None].expand(b, hkv, t).to(torch.int32).contiguous(), shared=True)
