"""Shared helpers for the Triton kernels: lazy triton import, checks, the LSE merge.

GPU-only imports stay inside functions so that `import vattn.kernels.*` works on a
CPU machine; kernels run on CPU only under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools
import os

import torch

from vattn.errors import VattnError

LOG2E = 1.4426950408889634


def interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_ieee(dtype) -> bool:
    # float32 inputs get exact dots; the interpreter's bf16 tl.dot is wrong (triton 3.9), so
    # under TRITON_INTERPRET the kernels upcast to float32 there as well.
    return dtype == torch.float32 or interpret()


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _interpreter_compat() -> None:
    """Triton's interpreter before 3.7 reads a loop bound as int(array of shape (1,)), which
    NumPy 2.4 refuses ('only 0-dimensional arrays...'); later ones squeeze it first. Give the
    older interpreter the same __index__ (e.g. the triton 3.6 that torch 2.11 pins)."""
    try:
        import triton.language as tl
        import triton.runtime.interpreter as ti
    except Exception:
        return
    orig = getattr(ti, "_patch_lang", None)
    if orig is None:
        return

    def patch_lang(fn):
        scope = orig(fn)
        scope.set_attr(tl.core.tensor, "__index__", lambda self: int(self.handle.data.squeeze()))
        return scope

    ti._patch_lang = patch_lang


def check_runnable(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if not triton_available():
        raise VattnError("triton is not installed: use the torch reference (*_ref) or `pip install triton`")
    if interpret():
        _interpreter_compat()
    for t in tensors:
        if t.device.type != "cuda" and not interpret():
            raise VattnError(f"tensor on {t.device}: the Triton kernels need CUDA tensors "
                             "(or set TRITON_INTERPRET=1 to run them on CPU for testing)")


def check_dtype(name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        raise VattnError(f"{name} has dtype {t.dtype}; use one of {[str(a) for a in allowed]}")


def check_lastdim(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise VattnError(f"{name} must have last-dim stride 1 (got strides {tuple(t.stride())}); "
                         "call .contiguous() first")


def load_online(namespace: dict) -> None:
    """Put the shared online-softmax jit functions into a kernel module's globals: jit
    bodies (and the interpreter) resolve called functions there, not in closures."""
    from vattn.kernels import _online
    namespace.update(dot_qk=_online.dot_qk, online_init=_online.online_init, online_step=_online.online_step,
                     finish=_online.finish, pdl_wait=_online.pdl_wait, stamp=_online.stamp)


def check_4d(tensors: dict, allowed) -> None:
    """Each named tensor is 4-D, of an allowed dtype, with last-dim stride 1."""
    for name, t in tensors.items():
        if t.dim() != 4:
            raise VattnError(f"{name} must be 4-D [B, H, N_or_T, D], got shape {tuple(t.shape)}")
        check_dtype(name, t, allowed)
        check_lastdim(name, t)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    # Two waves of programs over the SMs keep enough loads in flight; few under the interpreter.
    if device.type != "cuda":
        return 8
    return 2 * sm_count(device.index or 0)


@functools.lru_cache(maxsize=None)
def _merge_kernel():
    import triton
    import triton.language as tl

    load_online(globals())

    @triton.jit
    def merge(po, plse, out, tr, pick, RP, S, D: tl.constexpr, DB: tl.constexpr, SP: tl.constexpr,
              SB: tl.constexpr, PDL: tl.constexpr = 0, TR: tl.constexpr = 0, PICK: tl.constexpr = 0):
        # Program (row, j) merges columns [j*DB, (j+1)*DB) of one output row: partials po
        # [rows, S, D] f32, plse [rows, S] (log2 units). D/DB programs per row keep the SMs busy
        # at B=1. A partial with lse = -inf saw no key and its po may be unwritten: never read.
        # The lse are loaded once where one block holds them (SB == SP); smaller SB blocks keep
        # a tile small for large S. PICK: output row o merges partial row pick[o // RP] * RP +
        # o % RP (RP rows per batch row): the attention's batch order, gathered here.
        stamp(tr, 0, tl.program_id(1), TR)
        pdl_wait(PDL)  # launched as a programmatic dependent: wait for the partials' writer
        o_row = tl.program_id(0).to(tl.int64)
        if PICK:
            r = tl.load(pick + o_row // RP).to(tl.int64) * RP + o_row % RP
        else:
            r = o_row
        d = tl.program_id(1) * DB + tl.arange(0, DB)
        s = tl.arange(0, SP)
        lse = tl.load(plse + r * S + s, mask=s < S, other=float("-inf"))
        m = tl.max(lse, 0)
        stamp(tr, 1, m.to(tl.int32), TR)
        m = tl.where(m == float("-inf"), 0.0, m)
        tot = tl.sum(tl.exp2(lse - m), 0)
        acc = tl.zeros([DB], tl.float32)
        for s0 in range(0, S, SB):
            sb = s0 + tl.arange(0, SB)
            lb = tl.load(plse + r * S + sb, mask=sb < S, other=float("-inf")) if SB < SP else lse
            live = lb > float("-inf")
            o = tl.load(po + r * S * D + sb[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
            acc += tl.sum(tl.where(live[:, None], tl.exp2(lb - m)[:, None] * o, 0.0), 0)
        acc = acc / tl.maximum(tot, 1e-30)  # a row with no visible key gives 0
        tl.store(out + o_row * D + d, acc.to(out.dtype.element_ty))
        stamp(tr, 2, tl.sum(acc, 0).to(tl.int32), TR)

    return merge


MERGE_BLOCK_D = 32  # output columns per merge program


def merge_programs(rows: int, D: int, block_d: int = MERGE_BLOCK_D) -> int:
    """Programs of one merge_partials launch over `rows` output rows of width D."""
    return rows * (D // min(block_d, D))


def merge_partials(po: torch.Tensor, plse: torch.Tensor, out: torch.Tensor, *, block_d=MERGE_BLOCK_D, block_s=128,
                   num_warps=4, pdl=False, trace=None, pick=None) -> torch.Tensor:
    """po f32 [B, rows..., S, D], plse f32 [B, rows..., S] (log2 units) -> out [B, rows..., D]
    (contiguous), or with pick (int64 [b]): out [b, rows..., D], out[i] merged from batch row
    pick[i] (the rest are not merged).
    pdl: launch as a programmatic dependent of the previous kernel (see use_pdl).
    trace (GPU): int64 [merge_programs(rows, D), 8] filled with global-timer stamps (start,
    after the wait, end)."""
    S, D = po.shape[-2], po.shape[-1]
    rows = plse.numel() // S
    per = rows // po.shape[0]
    db = min(block_d, D)
    extra = dict(PDL=1, launch_pdl=True) if pdl else {}
    if trace is not None:
        extra["TR"] = 1
    if pick is not None:
        if pick.dim() != 1 or pick.dtype != torch.int64 or pick.device != po.device:
            raise VattnError(f"pick must be int64 [b] on {po.device}, got {pick.dtype} {tuple(pick.shape)} "
                             f"on {pick.device}")
        rows = pick.shape[0] * per
        extra["PICK"] = 1
    if out.numel() != rows * D:
        raise VattnError(f"merge_partials: out has {out.numel()} elements, the merge writes {rows} rows of {D}")
    _merge_kernel()[(rows, D // db)](po, plse, out, out if trace is None else trace,
                                     out if pick is None else pick, per, S, D=D, DB=db,
                                     SP=max(2, next_pow2(S)), SB=min(block_s, max(2, next_pow2(S))),
                                     num_warps=num_warps, **extra)
    return out


_ZEROED: dict = {}


def zeroed_counters(n: int, device: torch.device) -> torch.Tensor:
    """int32 [n] of zeros for kernels that count with atomics and zero what they used before
    they exit: one buffer per device, so a call needs no memset (in a CUDA graph a memset node
    between two calls also cuts their programmatic dependent launch; H100 B=1 128K scan 51.9 ->
    50.8 us). Calls on one device share it: do not run two at once on different streams. Made
    under graph capture, its zeros would exist only once the graph replays, so there a fresh
    buffer joins the graph instead."""
    key = str(device)
    bufs = _ZEROED.setdefault(key, [])  # older, smaller ones are kept: a captured graph may use them
    if not bufs or bufs[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return torch.zeros(n, dtype=torch.int32, device=device)
        bufs.append(torch.zeros(max(n, 2 * (bufs[-1].numel() if bufs else 0)), dtype=torch.int32, device=device))
    return bufs[-1][:n]


def use_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch: a launch may start while the previous one drains (Hopper
    and later, CUDA only; the interpreter has no griddepcontrol)."""
    return device.type == "cuda" and not interpret() and _major(device.index or 0) >= 9


def resolve_pdl(pdl, device: torch.device) -> bool:
    """pdl None: use_pdl(device); True where it is not available is an error."""
    if pdl is None:
        return use_pdl(device)
    if pdl and not use_pdl(device):
        raise VattnError(f"pdl=True needs a CUDA GPU of compute capability 9.0 or newer (got {device}"
                         f"{', under TRITON_INTERPRET' if interpret() else ''}); pass pdl=None or False")
    return bool(pdl)


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def scratch_allocator(scratch, dev):
    """new(name, shape, dtype): a fresh tensor, or with a scratch dict the one kept there under
    (name, shape, dtype, device), made on first use."""
    def new(name, shape, dtype):
        if scratch is None:
            return torch.empty(shape, dtype=dtype, device=dev)
        size = shape if isinstance(shape, tuple) else (shape,)
        key = (name, size, dtype, str(dev))  # never replaced: a captured graph may still use an old one
        if key not in scratch:
            scratch[key] = torch.empty(size, dtype=dtype, device=dev)
        return scratch[key]
    return new
