"""The decoder layer's small ops, fused for the engine's CUDA decode step (Triton) + torch references.

    add_rms_norm(x, delta, w, eps, gemma, w_delta) -> (h, x')   x' = x + [rms(delta, w_delta)], h = rms(x', w)
    qkv_rope(qkv, pos, cos, sin, Hq, Hkv, qn, kn, cache)        split heads, [q/k RMSNorm], RoPE,
                                                                [k, v written into the KV cache]
    glu(gu, act) -> act(g) * u                                  gu = [g | u] on the last dim

Why: a graphed decode step at batch 1 is latency-bound outside its GEMMs; in torch each of
these is 4-10 small launches per layer (casts, reductions, cat, index_put). Each here is one.

Numerics: every kernel rounds where the torch code rounds (the engine's model dtype after each
torch op; statistics and products in float32), so a kernel equals its reference up to the
float32 reduction order of the RMS statistic (bf16: at most 1 ulp, rarely). The references
are the engine's CPU math (vattn/engine/model.py calls them).
Shapes: x, delta [..., H]; qkv [B, T, (Hq + 2 Hkv) D]; pos int64 [B, T]; cos, sin float32
[P, D] (rows = positions); cache (K, V, rows): K, V [S, Hkv, N, D], rows int64 [B] (slot of
each batch row). Kernels run on CUDA tensors, or CPU ones under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from vattn.errors import VattnError
from vattn.kernels.common import check_runnable, next_pow2

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1}  # act name -> kernel ACT code


# ------------------------------------------------------------------ torch references

def rms_norm_ref(x, w, eps: float, gemma: bool = False):
    """RMSNorm over the last dim, float32 statistics. Plain (Llama): normalise, round to x.dtype,
    times w (x.dtype, rounded again). Gemma: w is the float32 (1 + w), applied before rounding."""
    if gemma:
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=eps) * w).to(x.dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * w


def add_rms_norm_ref(x, delta, w, eps: float, gemma: bool = False, w_delta=None):
    """(h, x'): x' = x + delta (delta first normed by w_delta: Gemma's sandwich norms), h = rms(x', w).
    delta None: x' = x (the first layer's input norm)."""
    if delta is not None:
        if w_delta is not None:
            delta = rms_norm_ref(delta, w_delta, eps, gemma)
        x = x + delta
    return rms_norm_ref(x, w, eps, gemma), x


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def rope_at(cos, sin, pos, dtype):
    """Tables float32 [P, D] at positions int64 [B, T] -> cos, sin [B, 1, T, D] in dtype."""
    return cos[pos].to(dtype)[:, None], sin[pos].to(dtype)[:, None]


def heads_rope_ref(qkv, cs, heads: int, kv_heads: int, qn=None, kn=None, eps: float = 1e-6,
                   gemma: bool = False):
    """qkv [B, T, (Hq + 2Hkv) D], cs = rope_at(...) -> q [B, Hq, T, D], k, v [B, Hkv, T, D]:
    per-head RMSNorm of q and k when qn/kn are given (Qwen3, Gemma 3), then RoPE on q and k."""
    b, t, width = qkv.shape
    d = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k = q.view(b, t, heads, d), k.view(b, t, kv_heads, d)
    if qn is not None:
        q, k = rms_norm_ref(q, qn, eps, gemma), rms_norm_ref(k, kn, eps, gemma)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, kv_heads, d).transpose(1, 2)
    cos, sin = cs
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def write_kv_ref(cache, pos, k, v):
    """K[rows[b], :, pos[b, t]] = k[b, :, t] (and V): k, v [B, Hkv, T, D]."""
    K, V, rows = cache[:3]
    K[rows[:, None], :, pos] = k.transpose(1, 2)
    V[rows[:, None], :, pos] = v.transpose(1, 2)


def place_q(cache, q):
    """q [B, Hq, T, D], or with cache = (K, V, rows, Q): Q [S, Hq, T, D] with Q[rows[b]] = q[b]
    (the attention's all-slots query buffer, written in place)."""
    if len(cache) < 4:
        return q
    cache[3][cache[2]] = q
    return cache[3]


def qkv_rope_ref(qkv, pos, cos, sin, heads: int, kv_heads: int, *, qn=None, kn=None, eps: float = 1e-6,
                 gemma: bool = False, cache=None):
    """Contract of qkv_rope: (q, k, v); with cache=(K, V, rows[, Q]) k and v are written there and
    returned as None, and q goes to Q's rows when Q is given (place_q)."""
    q, k, v = heads_rope_ref(qkv, rope_at(cos, sin, pos, qkv.dtype), heads, kv_heads, qn, kn, eps, gemma)
    if cache is None:
        return q, k, v
    write_kv_ref(cache[:3], pos, k, v)
    return place_q(cache, q), None, None


def glu_ref(gu, act: str):
    """gu [..., 2I] = [gate | up] -> act(gate) * up [..., I] (act: a transformers ACT2FN name)."""
    from transformers.activations import ACT2FN
    g, u = gu.chunk(2, -1)
    return ACT2FN[act](g) * u


# ------------------------------------------------------------------ Triton kernels

@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    from vattn.kernels._rounding import rms_apply as _norm, round_to as _round

    @triton.jit
    def _rstd(x, n, eps):
        # 1 / sqrt(mean(x^2) + eps) of a float32 row (padding lanes zero), as F.rms_norm
        return 1.0 / tl.sqrt(tl.sum(x * x, 0) / n + eps)

    globals().update(_round=_round, _rstd=_rstd, _norm=_norm)  # jit bodies resolve helpers in module globals

    @triton.jit
    def add_rms_kernel(x, delta, w, wd, h_out, x_out, H, eps,
                       BH: tl.constexpr, HAS_DELTA: tl.constexpr, NORM_DELTA: tl.constexpr,
                       GEMMA: tl.constexpr):
        # One program per row: the residual add and both norms need the whole row (one reduction
        # each), and H <= a few thousand fits a block. Rows are contiguous [R, H].
        T = h_out.dtype.element_ty
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BH)
        m = c < H
        xr = tl.load(x + r * H + c, mask=m, other=0.0).to(tl.float32)
        if HAS_DELTA:
            dr = tl.load(delta + r * H + c, mask=m, other=0.0).to(tl.float32)
            if NORM_DELTA:  # Gemma: the sublayer output is normed before it joins the residual
                wdr = tl.load(wd + c, mask=m, other=0.0).to(tl.float32)
                dr = _norm(dr, _rstd(dr, H, eps), wdr, T, GEMMA).to(tl.float32)
            xr = _round(xr + dr, T).to(tl.float32)
            tl.store(x_out + r * H + c, xr.to(T), mask=m)
        y = _norm(xr, _rstd(xr, H, eps), tl.load(w + c, mask=m, other=0.0).to(tl.float32), T, GEMMA)
        tl.store(h_out + r * H + c, y, mask=m)

    @triton.jit
    def qkv_rope_kernel(qkv, pos, cos, sin, qn, kn, q_out, k_out, v_out, rows,
                        sxb, sxt, spb, spt, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                        T, HQ, HKV, D, eps,
                        HP: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr, GEMMA: tl.constexpr,
                        CACHE: tl.constexpr, Q_ROWS: tl.constexpr):
        # Program (token row, part): part 0 all Hq query heads, 1 the Hkv key heads, 2 (CACHE
        # only) the value heads, each one [HP, BD] tile (heads x head dim): three programs a
        # token keep a batch-1 decode step at one short wave. rotate_half needs the other half
        # of each head: loaded again at d +- D/2 (cache hits). CACHE: k/v go to
        # K[rows[b], h, pos[b, t]] (V likewise) through the cache's strides, any vmem layout.
        # Q_ROWS: q goes to row rows[b] of the all-slots query buffer (no scatter launch after).
        OT = q_out.dtype.element_ty
        i = tl.program_id(0)
        part = tl.program_id(1)
        b = i // T
        t = i % T
        hh = tl.arange(0, HP)[:, None]
        d = tl.arange(0, BD)[None, :]
        if part == 0:
            nh = HQ
            h0 = 0
        elif part == 1:
            nh = HKV
            h0 = HQ
        else:
            nh = HKV
            h0 = HQ + HKV
        m = (hh < nh) & (d < D)
        src = qkv + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + (h0 + hh) * D
        p = tl.load(pos + b * spb + t * spt)  # int64
        if part < 2:
            half = D // 2
            x = tl.load(src + d, mask=m, other=0.0).to(tl.float32)
            dr = tl.where(d < half, d + half, d - half)
            xr = tl.load(src + dr, mask=m, other=0.0).to(tl.float32)
            if NORM:  # per-head RMSNorm (Qwen3, Gemma 3) before RoPE, as the reference
                if part == 0:
                    wp = qn
                else:
                    wp = kn
                w = tl.load(wp + d, mask=d < D, other=0.0).to(tl.float32)
                wr = tl.load(wp + dr, mask=d < D, other=0.0).to(tl.float32)
                rstd = (1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps))[:, None]  # one statistic per head
                x = _norm(x, rstd, w, OT, GEMMA).to(tl.float32)
                xr = _norm(xr, rstd, wr, OT, GEMMA).to(tl.float32)
            xr = tl.where(d < half, -xr, xr)
            c = _round(tl.load(cos + p * D + d, mask=d < D, other=0.0), OT).to(tl.float32)
            s = _round(tl.load(sin + p * D + d, mask=d < D, other=0.0), OT).to(tl.float32)
            y = _round(_round(x * c, OT).to(tl.float32) + _round(xr * s, OT).to(tl.float32), OT)
            if part == 0:
                if Q_ROWS:
                    qrow = tl.load(rows + b)
                else:
                    qrow = b.to(tl.int64)
                tl.store(q_out + qrow * sqb + hh * sqh + t * sqt + d, y, mask=m)
            else:
                if CACHE:
                    dst = k_out + tl.load(rows + b) * skb + hh * skh + p * skt
                else:
                    dst = k_out + b.to(tl.int64) * skb + hh * skh + t * skt
                tl.store(dst + d, y, mask=m)
        else:  # CACHE only: the value heads, copied into V
            xv = tl.load(src + d, mask=m, other=0.0)
            tl.store(v_out + tl.load(rows + b) * svb + hh * svh + p * svt + d, xv, mask=m)

    @triton.jit
    def glu_kernel(gu, out, I, BI: tl.constexpr, ACT: tl.constexpr):
        # Program (row, block of I): gate and up are the two halves of one contiguous [2I] row.
        T = out.dtype.element_ty
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BI + tl.arange(0, BI)
        m = c < I
        g = tl.load(gu + r * 2 * I + c, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu + r * 2 * I + I + c, mask=m, other=0.0).to(tl.float32)
        if ACT == 0:  # SiLU
            a = g / (1.0 + tl.exp(-g))
        else:  # gelu, tanh approximation: 0.5 g (1 + tanh(y)) = g sigmoid(2y), no cancellation at g << 0
            y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(-2.0 * y))
        a = _round(a, T).to(tl.float32)  # torch rounds act(g) before the product
        tl.store(out + r * I + c, _round(a * u, T), mask=m)

    return add_rms_kernel, qkv_rope_kernel, glu_kernel


def _warps(block: int) -> int:
    # ~16 elements a thread (a [32, 128] rope tile: 8 warps); 1..16 warps
    return max(1, min(16, block // 512))


def _check_float(name, t, dtype=None):
    if t.dtype not in FLOATS:
        raise VattnError(f"{name} has dtype {t.dtype}; the layer kernels take {[str(f) for f in FLOATS]}")
    if dtype is not None and t.dtype != dtype:
        raise VattnError(f"{name} is {t.dtype} but the activations are {dtype}: build the model in one dtype")


def add_rms_norm(x, delta, w, eps: float, gemma: bool = False, w_delta=None):
    """Triton add_rms_norm_ref: one launch. x, delta contiguous [..., H] in one float dtype; w
    (and w_delta) [H]. Returns (h, x'), new tensors (x' is x itself when delta is None)."""
    _check_float("x", x)
    H = x.shape[-1]
    if not x.is_contiguous() or (delta is not None and (delta.shape != x.shape or not delta.is_contiguous()
                                                        or delta.dtype != x.dtype)):
        raise VattnError(f"add_rms_norm takes contiguous x and delta of one shape and dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {None if delta is None else (tuple(delta.shape), delta.dtype)}")
    for name, t in (("w", w), ("w_delta", w_delta)):
        if t is not None and (t.shape != (H,) or not t.is_contiguous()):
            raise VattnError(f"{name} must be a contiguous [{H}] weight, got {tuple(t.shape)}")
    if w_delta is not None and delta is None:
        raise VattnError("w_delta norms delta: pass delta too")
    check_runnable(x, w)
    h = torch.empty_like(x)
    x_new = torch.empty_like(x) if delta is not None else x
    BH = next_pow2(H)
    kern = _kernels()[0]
    kern[(x.numel() // H,)](x, x if delta is None else delta, w, w if w_delta is None else w_delta, h, x_new,
                            H, float(eps), BH=BH, HAS_DELTA=delta is not None, NORM_DELTA=w_delta is not None,
                            GEMMA=bool(gemma), num_warps=_warps(BH))
    return h, x_new


def qkv_rope(qkv, pos, cos, sin, heads: int, kv_heads: int, *, qn=None, kn=None, eps: float = 1e-6,
             gemma: bool = False, cache=None):
    """Triton qkv_rope_ref: one launch. Returns q [B, Hq, T, D] (contiguous) and k, v [B, Hkv, T, D]
    (k contiguous, v a view of qkv), or k = v = None when cache=(K, V, rows) took them; with
    cache=(K, V, rows, Q), q is written to Q [S, Hq, T, D] at rows (place_q) and Q returned."""
    _check_float("qkv", qkv)
    if qkv.dim() != 3 or qkv.stride(-1) != 1:
        raise VattnError(f"qkv must be [B, T, (Hq + 2Hkv) D] with last-dim stride 1, got {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    D, q, q_rows = rope_targets(B, T, width, qkv.dtype, qkv.device, pos, cos, sin, heads, kv_heads, cache)
    if (qn is None) != (kn is None):
        raise VattnError("q/k norm takes both qn and kn, or neither")
    for name, t in (("qn", qn), ("kn", kn)):
        if t is not None and (t.shape != (D,) or not t.is_contiguous()):
            raise VattnError(f"{name} must be a contiguous [{D}] weight, got {tuple(t.shape)}")
    check_runnable(qkv, pos, cos)
    if cache is None:
        k = torch.empty(B, kv_heads, T, D, dtype=qkv.dtype, device=qkv.device)
        v = qkv[..., (heads + kv_heads) * D:].view(B, T, kv_heads, D).transpose(1, 2)
        rows, parts = pos, 2
        kt, vt = k, k  # vt unused: v heads are not launched
    else:
        (kt, vt, rows), parts = cache[:3], 3
        k = v = None
    HP, BD = next_pow2(max(heads, kv_heads)), max(2, next_pow2(D))
    _kernels()[1][(B * T, parts)](
        qkv, pos, cos, sin, qkv if qn is None else qn, qkv if kn is None else kn, q, kt, vt, rows,
        qkv.stride(0), qkv.stride(1), pos.stride(0), pos.stride(1), q.stride(0), q.stride(1), q.stride(2),
        kt.stride(0), kt.stride(1), kt.stride(2), vt.stride(0), vt.stride(1), vt.stride(2),
        T, heads, kv_heads, D, float(eps),
        HP=HP, BD=BD, NORM=qn is not None, GEMMA=bool(gemma), CACHE=cache is not None, Q_ROWS=q_rows,
        num_warps=_warps(HP * BD))
    return q, k, v


def rope_targets(B, T, width, dtype, device, pos, cos, sin, heads: int, kv_heads: int, cache):
    """Checks of a RoPE launch over a [B, T, width] qkv (qkv_rope, gemv.rms_linear's rope=):
    -> (D, q, q_rows): the head dim, where q goes (cache's Q, or a new [B, Hq, T, D]) and whether
    that is Q's slot rows."""
    D = width // (heads + 2 * kv_heads)
    if D * (heads + 2 * kv_heads) != width or D % 2:
        raise VattnError(f"qkv width {width} is not (Hq={heads} + 2 Hkv={kv_heads}) x an even head dim")
    if pos.shape != (B, T) or pos.dtype != torch.int64:
        raise VattnError(f"pos must be int64 [B={B}, T={T}], got {pos.dtype} {tuple(pos.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != D or not t.is_contiguous():
            raise VattnError(f"{name} must be a contiguous float32 [positions, {D}] table, got "
                             f"{t.dtype} {tuple(t.shape)}")
    if cache is not None:
        K, V, rows = cache[:3]
        for name, t in (("K", K), ("V", V)):
            if t.dim() != 4 or t.shape[1] != kv_heads or t.shape[3] != D or t.stride(-1) != 1:
                raise VattnError(f"cache {name} must be [S, {kv_heads}, N, {D}] with last-dim stride 1, "
                                 f"got {tuple(t.shape)}")
            _check_float(name, t, dtype)
        if rows.shape != (B,) or rows.dtype != torch.int64:
            raise VattnError(f"cache rows must be int64 [B={B}] (a slot per batch row), got "
                             f"{rows.dtype} {tuple(rows.shape)}")
    if cache is not None and len(cache) == 4:
        q = cache[3]
        if q.dim() != 4 or q.shape[1:] != (heads, T, D) or q.stride(-1) != 1 or q.dtype != dtype:
            raise VattnError(f"the query buffer must be {dtype} [S, {heads}, {T}, {D}] with last-dim stride 1, "
                             f"got {q.dtype} {tuple(q.shape)}")
        return D, q, True
    return D, torch.empty(B, heads, T, D, dtype=dtype, device=device), False


def glu(gu, act: str):
    """Triton glu_ref for act in ACTS: one launch. gu contiguous [..., 2I] -> [..., I]."""
    _check_float("gu", gu)
    if act not in ACTS:
        raise VattnError(f"the glu kernel runs {sorted(ACTS)}, not {act!r}")
    if not gu.is_contiguous() or gu.shape[-1] % 2:
        raise VattnError(f"gu must be contiguous [..., 2I], got {tuple(gu.shape)}")
    check_runnable(gu)
    I = gu.shape[-1] // 2
    out = torch.empty(*gu.shape[:-1], I, dtype=gu.dtype, device=gu.device)
    BI = min(1024, next_pow2(I))
    _kernels()[2][(gu.numel() // (2 * I), -(-I // BI))](gu, out, I, BI=BI, ACT=ACTS[act], num_warps=4)
    return out
