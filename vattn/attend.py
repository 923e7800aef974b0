"""attend(q, k, v, sel): attention over a Selection; dense_attend: the exact reference.

Shapes: q [B, Hq, T, D]; k, v [B, Hkv, N, D] (any strides, e.g. views of a bigger cache);
Hq = G * Hkv (grouped-query attention). Rows may be ragged: `lengths` [B] counts each
batch row's keys (they end at lengths - 1; with left padding, `starts` [B] is the first
valid key). With T > 1 the rows are causal: row t sees keys < lengths - T + 1 + t.
Softmax is accumulated in float32 whatever the input dtype; the output has q's dtype.
A row with no keys gives zeros. Inputs are not checked for NaN/inf (that costs a host
sync on a GPU): as in exact attention, a non-finite score, key or value that a row
attends makes that row's output NaN/inf.
"""
from __future__ import annotations

import logging
import math
import numbers

import torch

from vattn.errors import VattnError
from vattn.selection import Selection

log = logging.getLogger(__name__)
_SAID: set = set()

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_qkv(q, k, v):
    """Validate shapes and dtypes; return (B, Hq, T, D, Hkv, N)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise VattnError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise VattnError(f"{name} must have 4 dims [B, H, T|N, D], got shape {tuple(x.shape)}")
        if x.dtype not in FLOATS:
            raise VattnError(f"{name} must be float32, float16 or bfloat16 (or float64), got {x.dtype}")
    b, hq, t, d = q.shape
    if hq == 0:
        raise VattnError(f"q must have at least one query head [B, Hq >= 1, T, D], got shape {tuple(q.shape)}")
    if d == 0:
        raise VattnError(f"the head dim D must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape != v.shape:
        raise VattnError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[3] != d:
        raise VattnError(f"k/v must be [B={b}, Hkv, N, D={d}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    hkv, n = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise VattnError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not (q.device == k.device == v.device):
        raise VattnError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    return b, hq, t, d, hkv, n


def _bounds(name, x, b, device):
    """lengths/starts: an integer tensor (or list of ints) of shape [B] -> int64 [B] on device."""
    if isinstance(x, (list, tuple)):
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in x):
            raise VattnError(f"{name} must be ints, one per batch row, got {x!r}")
        x = torch.tensor(x, dtype=torch.long).reshape(len(x))
    if not isinstance(x, torch.Tensor):
        raise VattnError(f"{name} must be an int tensor [B={b}], got {type(x).__name__} {x!r}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise VattnError(f"{name} must be an int tensor [B={b}] (e.g. torch.long), got {x.dtype}")
    if x.dim() != 1 or x.shape[0] != b:
        raise VattnError(f"{name} must have one entry per batch row ({b}): shape [{b}], got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.long)


def row_bounds(b, t, n, lengths=None, starts=None, device=None):
    """starts int64 [B] and ends int64 [B, T] (one past each row's last allowed key).

    lengths, starts: int tensors [B] with 0 <= starts <= lengths <= N (default N and 0).
    """
    if lengths is None:
        lengths = torch.full((b,), n, dtype=torch.long, device=device)
    lengths = _bounds("lengths", lengths, b, device)
    if bool((lengths > n).any()) or bool((lengths < 0).any()):
        raise VattnError(f"lengths must be in [0, N={n}], got {lengths.tolist()}")
    if starts is None:
        starts = torch.zeros(b, dtype=torch.long, device=device)
    starts = _bounds("starts", starts, b, device)
    if bool((starts < 0).any()) or bool((starts > lengths).any()):
        raise VattnError(f"starts must be [B={b}] with 0 <= start <= length, got starts {starts.tolist()} "
                         f"and lengths {lengths.tolist()}")
    ends = lengths[:, None] - t + 1 + torch.arange(t, device=device)
    return starts, ends.clamp(min=0)


def check_scale(scale, d: int) -> float:
    """The softmax scale: a positive finite number; None means 1/sqrt(d)."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            math.isfinite(scale) and scale > 0):
        raise VattnError(f"scale must be a positive finite number (default 1/sqrt(D)), got {scale!r}")
    return float(scale)


def softmax_rows(s: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; rows where `live` is False (no keys) give zeros.

    Not nan_to_num: a NaN/inf from the inputs must stay visible, as in exact attention."""
    return torch.softmax(s, -1).masked_fill(~live, 0.0)


def gather_kv(k, v, idx, group):
    """k, v at idx: idx int64 [B, H, T, K] (H = Hkv * group) -> two [B, H, T, K, D] float32."""
    b, h, t, kk = idx.shape
    bi = torch.arange(b, device=idx.device)[:, None, None, None]
    hi = (torch.arange(h, device=idx.device) // group)[None, :, None, None]
    return k[bi, hi, idx].float(), v[bi, hi, idx].float()


def attend(q, k, v, sel: Selection, scale: float | None = None) -> torch.Tensor:
    """Attention over the selected keys with their log-weights: [B, Hq, T, D] in q.dtype.

    Memory is at most the selection's gather (on CPU, large selections score all keys
    instead: [.., T, N] floats, fewer than [.., T, K, D]). On CUDA it runs
    our Triton sparse decode kernel.
    """
    b, hq, t, d, hkv, n = check_qkv(q, k, v)
    h = hkv if sel.shared else hq
    if tuple(sel.indices.shape[:3]) != (b, h, t):
        kind = "KV" if sel.shared else "query"
        raise VattnError(f"selection shape {tuple(sel.indices.shape)} does not match "
                         f"[B={b}, {kind} heads={h}, T={t}, K]")
    scale = check_scale(scale, d)
    if q.numel() == 0 or sel.indices.shape[-1] == 0:
        return torch.zeros_like(q)  # no rows, or no row attends a key
    if q.is_cuda:
        why = kernel_misfit(q, k, v)
        if why is None:
            from vattn.kernels import sparse as ks
            return ks.sparse_decode(q, k, v, sel.indices.int(), sel.log_weights.float(), sel.count.int(),
                                    sel.shared, scale)
        if why not in _SAID:  # a GPU run on the torch path is said, once per reason
            _SAID.add(why)
            log.warning("attend on CUDA runs the torch path, not the Triton sparse kernel: %s", why)
    return attend_torch(q, k, v, sel, scale)


def kernel_misfit(q, k, v) -> str | None:
    """None when the Triton sparse kernel takes these inputs, else why not (the torch path runs)."""
    from vattn.kernels.common import triton_available
    d = q.shape[-1]
    if not triton_available():
        return "triton is not installed (pip install 'vattn[gpu]')"
    if d not in (16, 32, 64, 128, 256):
        return f"head dim {d} is not one of 16, 32, 64, 128, 256"
    if not q.dtype == k.dtype == v.dtype:
        return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
    if not q.stride(-1) == k.stride(-1) == v.stride(-1) == 1:
        return "the head dim of q, k or v is not contiguous"
    return None


def attend_torch(q, k, v, sel: Selection, scale: float) -> torch.Tensor:
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    ok = sel.valid()
    idx = sel.indices.long().clamp(min=0)
    h = idx.shape[1]
    if dense_is_cheaper(h, idx.shape[-1], hkv, k.shape[2], q.device):
        return attend_scattered(q, k, v, sel, scale)
    kk, vv = gather_kv(k, v, idx, 1 if sel.shared else g)
    vv = vv.masked_fill(~ok[..., None], 0.0)  # padding entries alias key 0: p = 0 must not meet a NaN
    qf = q.float().reshape(b, h, hq // h, t, d)  # query heads grouped by selection head
    s = torch.einsum("bhgtd,bhtkd->bhgtk", qf, kk) * scale + sel.log_weights[:, :, None]
    s = s.masked_fill(~ok[:, :, None], float("-inf"))
    p = softmax_rows(s, ok[:, :, None].any(-1, keepdim=True))  # a row with no keys gives zeros
    out = torch.einsum("bhgtk,bhtkd->bhgtd", p, vv)
    return out.reshape(b, hq, t, d).to(q.dtype)


def dense_is_cheaper(h, kk, hkv, n, device) -> bool:
    """CPU path choice: gathering K/V rows costs far more per element than a BLAS
    multiply-add (measured ~8x on 2 cores), so past 1/8 of the keys per selection head,
    scoring all keys is faster. Memory stays below the gather's (scores are [.., N], not
    [.., K, D]). Never on a GPU, where reading all of K and V is what sparsity avoids."""
    return device.type == "cpu" and h * kk * 8 > hkv * n


def weighted_values(w, idx, v):
    """sum_j w_j v[idx_j] per row by scattering into [.., N] and one matmul.
    w, idx: [B, Hkv, G, T, K]; v [B, Hkv, N, D] -> f32 [B, Hkv, G, T, D]."""
    b, hkv, g, t, _ = w.shape
    n, d = v.shape[2], v.shape[3]
    dense = torch.zeros(b, hkv, g, t, n, dtype=w.dtype, device=w.device).scatter_add_(-1, idx, w)
    return (dense.reshape(b, hkv, g * t, n) @ v.to(w.dtype)).reshape(b, hkv, g, t, d)


def attend_scattered(q, k, v, sel: Selection, scale: float) -> torch.Tensor:
    """attend_torch's twin for many query rows: exact scores for all keys, gathered at the
    selection, softmax with the log-weights, probabilities scattered back for one P @ V."""
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    s = torch.matmul(q.float().reshape(b, hkv, g * t, d), k.float().transpose(-1, -2))
    s = s.reshape(b, hkv, g, t, n) * scale
    idx, lw, ok = sel.by_group(hkv, g)
    idx = idx.clamp(min=0)
    ss = (torch.gather(s, -1, idx) + lw).masked_fill(~ok, float("-inf"))
    p = softmax_rows(ss, ok.any(-1, keepdim=True))
    out, bad = values_product(lambda vf: weighted_values(p, idx, vf), v)
    if bad is not None:  # a non-finite value reaches the rows that attend it, and only those
        hit = (torch.gather(bad[:, :, None, None].expand(b, hkv, g, t, n), -1, idx) & ok).any(-1, keepdim=True)
        out = out.masked_fill(hit, float("nan"))
    return out.reshape(b, hq, t, d).to(q.dtype)


def values_product(prod, v: torch.Tensor):
    """(prod(vf), bad): vf the values in float32, bad as finite_values gives it, or None when no
    value read was non-finite. Keys a row does not attend enter P @ V with p = 0, and 0 * NaN
    is NaN: on the CPU a finite product proves every value finite, so the zeroing pass (a read
    of all of V per layer) runs only when it is not. On a GPU that test would cost a host sync:
    the pass always runs."""
    if v.device.type == "cpu":
        out = prod(v.float())
        if bool(torch.isfinite(out).all()):
            return out, None
    vf, bad = finite_values(v)
    return prod(vf), bad


def finite_values(v: torch.Tensor):
    """(v in float32 with non-finite rows zeroed, bool [B, Hkv, N]: which rows were not finite).

    P @ V over all keys multiplies keys a row does not attend by p = 0, and 0 * NaN is NaN:
    the zeroed copy keeps such a key out of rows that do not attend it."""
    vf = v.float()
    bad = ~torch.isfinite(vf).all(-1)
    return vf.masked_fill(bad[..., None], 0.0), bad


def dense_attend(q, k, v, lengths=None, starts=None, scale=None) -> torch.Tensor:
    """Exact attention in float32 (the reference): [B, Hq, T, D] in q.dtype.

    A row with no keys gives zeros; a row whose q, or a key or value it attends, is not
    finite gives NaN/inf (keys outside its [starts, ends) range do not reach it)."""
    b, hq, t, d, hkv, n = check_qkv(q, k, v)
    scale = check_scale(scale, d)
    starts, ends = row_bounds(b, t, n, lengths, starts, q.device)
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g * t, d)
    s = torch.matmul(qf, k.float().transpose(-1, -2)).reshape(b, hkv, g, t, n) * scale
    pos = torch.arange(n, device=q.device)
    allowed = (pos >= starts[:, None, None]) & (pos < ends[:, :, None])  # [B, T, N]
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    p = softmax_rows(s, allowed.any(-1, keepdim=True)[:, None, None])
    out, bad = values_product(lambda vf: torch.matmul(p.reshape(b, hkv, g * t, n), vf).reshape(b, hkv, g, t, d), v)
    if bad is not None:
        hit = (allowed.float()[:, None] @ bad.float()[..., None]) > 0  # [B, Hkv, T, 1]: attends a bad value
        out = out.masked_fill(hit[:, :, None], float("nan"))
    return out.reshape(b, hq, t, d).to(q.dtype)
