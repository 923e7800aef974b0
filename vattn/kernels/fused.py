"""vAttention decode on GPU in one launch (plus the merge): vattention_fused_decode.

The scan pipeline's cut, scan and sample kernels (kernels/scan.py) as three phases of one
kernel, with the same cut, budget, draws and result (its twin is scan.scan_decode_ref).
Each KV-head row gets S programs; program sp
 1. histograms its share of the subsample, scores its slice of the pilot and the first
    block of its span;
 2. waits for the row's programs, makes the cut from the row's histograms, compacts its
    span's exact keys (sinks, window, taken) and attends them;
 3. waits again, sizes the sample from D_F (the row's phase-2 partials) and the pilot, and
    attends draw blocks sp, sp + S, ...
A third wait, then the row's programs merge its 2 S partials. The waits are spin barriers on
a per-row counter, so every program must be resident at once: S is the kernel's occupancy
times the SMs over the rows. The counters live on the device between calls (the row's last
program sets its counter back to 0), so two calls must not run at once on different streams.
Where S would be below 1 (many rows), or under the interpreter, the three phases run as
three launches (fused=False) and a merge launch, with the same code.
Why one launch: the four-launch pipeline waits at each launch for the slowest program of
the whole grid, and some of its programs start late (docs/kernel_notes.md, round 10).
"""
from __future__ import annotations

import functools

import torch

from vattn.kernels._common import (check_runnable, interpret, merge_partials, next_pow2, target_programs, use_ieee,
                                   use_pdl)
from vattn.kernels.scan import SUB_BLOCK, bins, check_scan_inputs, subsample_stride

_CTR = {}


def _row_counters(dev, rows):
    """Spin-barrier counters, zero, kept per device and row count (the kernel leaves them zero).
    Under graph capture a first one is made per call (a memset in the graph)."""
    key = (dev.index or 0, rows)
    if key not in _CTR:
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(rows, dtype=torch.int32, device=dev)
        _CTR[key] = torch.zeros(rows, dtype=torch.int32, device=dev)
    return _CTR[key]
from vattn.kernels.sample import M32, var_inflation, z_two_sided


@functools.lru_cache(maxsize=None)
def _per_sm(device_index: int, n_regs: int, shared: int, num_warps: int) -> int:
    """Programs of this kernel one SM holds at once (registers, shared memory, threads)."""
    p = torch.cuda.get_device_properties(device_index)
    regs_warp = -(-n_regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = p.regs_per_multiprocessor // (regs_warp * num_warps)
    by_smem = p.shared_memory_per_multiprocessor // (shared + 1024)  # 1 KB per block for the system
    by_threads = p.max_threads_per_multi_processor // (32 * num_warps)
    return max(0, min(by_regs, by_smem, by_threads, 32))


_CAPACITY = {}


def fused_capacity(kernel, args, meta, device) -> int:
    """Programs of the fused kernel the GPU holds at once, per device and meta-parameters
    (compiles it once without running it)."""
    key = (device.index or 0, tuple(sorted(meta.items())))
    if key not in _CAPACITY:
        ck = kernel.warmup(*args, grid=(1, 1), **meta)
        ck._init_handles()
        _CAPACITY[key] = _per_sm(key[0], ck.n_regs, ck.metadata.shared, meta["num_warps"]) * \
            torch.cuda.get_device_properties(key[0]).multi_processor_count
    return _CAPACITY[key]


def vattention_fused_decode(q, k, v, ksig, proj, lengths=None, *, sink=128, window=128, topk=4096, m0=128,
                            eps=0.05, delta=0.05, seed=0, scale=None, var_conf=-1.0, stats=False, sub=8192,
                            sub_block=SUB_BLOCK, block_c=2048,
                            block_n=64, per_row=None, num_warps=8, max_regs=128, fused=None, pdl=None, trace=None):
    """See the module docstring; arguments and stats as scan.vattention_scan_decode. per_row:
    programs per row (default: as many as the GPU holds at once, fused; else two per SM in all).
    fused (default: on CUDA when the rows fit) runs the three phases in one launch; max_regs caps
    the registers per thread (8 warps x 128: two programs per SM; ptxas spills nothing). trace (a
    dict, GPU only) gets 'fused' int64 [programs, 8] stamps: start, after phase 1, 2, 3, end."""
    check_scan_inputs(q, k, v, ksig, proj, lengths, sink, window, topk, m0)
    from vattn.kernels import _fused_triton as kt
    B, Hq, _, D = q.shape
    Hkv, N, W = k.shape[1], k.shape[2], ksig.shape[-1]
    G = Hq // Hkv
    dev = q.device
    if lengths is None:
        lengths = torch.full((B,), N, dtype=torch.int32, device=dev)
    q, k, v, ksig = q.contiguous(), k.contiguous(), v.contiguous(), ksig.contiguous()
    proj = proj.float().contiguous()
    check_runnable(q, k, v, ksig, lengths)
    rows = B * Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    R, M = G, max(16, next_pow2(G))
    NH, SH = bins(G * 32 * W)
    pdl = use_pdl(dev) if pdl is None else pdl
    fused = (dev.type == "cuda" and not interpret()) if fused is None else fused
    M0P = max(16, next_pow2(m0))
    n_mid = max(N - sink - window, 1)  # the subsample as the scan's cut kernel takes it
    stride = subsample_stride(n_mid, sub)
    P = -(-n_mid // (sub_block * stride))
    meta = dict(G=G, R=R, M=M, W=W, WP=max(2, next_pow2(W)), D=D, RWP=max(2, next_pow2(R * W)), NH=NH, SH=SH,
                PP=max(2, next_pow2(P)), BH=sub_block, CL=32, M0P=M0P, CB=block_c, BN=block_n, HW=not interpret(),
                IEEE=use_ieee(q.dtype), num_warps=num_warps,
                **({} if interpret() or not max_regs else dict(maxnreg=max_regs)))

    def buffers(S, fused):
        return dict(
            out=torch.empty((B, Hq, 1, D), dtype=q.dtype, device=dev),
            hist=torch.empty(rows * P * NH, dtype=torch.int32, device=dev),
            ctr=_row_counters(dev, rows) if fused else q.new_empty(1, dtype=torch.int32),
            cut=torch.empty(rows * 2, dtype=torch.int32, device=dev),
            pil=torch.empty(rows * R * M0P, dtype=torch.float32, device=dev),
            pbin=torch.empty(rows * M0P, dtype=torch.int32, device=dev),
            scr=torch.empty((rows, N), dtype=torch.int32, device=dev),
            cnt=torch.empty((rows, 2 * S), dtype=torch.int32, device=dev),
            po=torch.empty((B, Hq, 1, 2 * S, D), dtype=torch.float32, device=dev),
            plse=torch.empty((B, Hq, 1, 2 * S), dtype=torch.float32, device=dev),
            st=torch.empty((rows, 8), dtype=torch.float32, device=dev))

    def args(bf, S, tr):
        return (q, proj, ksig, k, v, lengths, *(bf[n] for n in ("hist", "ctr", "cut", "pil", "pbin", "scr", "cnt", "po",
                                                                "plse", "st", "out")), tr,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                v.stride(2), Hkv, N, S, P, stride, sink, window, topk, m0, seed & M32, scale * 1.4426950408889634, z_two_sided(delta) ** 2, eps * eps,
                var_inflation(m0, delta, var_conf))

    def sized(S):
        return dict(SPP=max(2, next_pow2(S)), SP2=max(2, next_pow2(2 * S)),
                    PC=max(16, next_pow2(-(-M0P // S))))

    if trace is not None:
        meta["TR"] = 1
    meta |= dict(PDL=1, launch_pdl=True) if pdl else {}
    S = per_row or max(1, -(-target_programs(dev) // rows))
    if fused:  # every program resident at once, or the spin barriers never open
        probe = buffers(1, False)
        cap = fused_capacity(kt.fused_kernel, args(probe, 1, probe["cnt"]), meta | sized(1) | dict(PH=0), dev)
        fused = cap >= rows and (per_row is None or rows * per_row <= cap)
        S = (per_row or max(1, cap // rows)) if fused else S
    bf = buffers(S, fused)
    tr = bf["cnt"]
    if trace is not None:
        tr = trace["fused"] = torch.zeros((rows * S, 8), dtype=torch.int64, device=dev)
    for ph in ((0,) if fused else (1, 2, 3)):
        kt.fused_kernel[(rows, S)](*args(bf, S, tr), **meta, **sized(S), PH=ph)
    out = bf["out"]
    if not fused:
        merge_partials(bf["po"], bf["plse"], out, pdl=pdl)
    if not stats:
        return out
    cnt = bf["cnt"]
    return out, dict(rows=bf["st"][:, :7], exact_keys=cnt[:, :S].sum(1, dtype=torch.int32),
                     sample_keys=cnt[:, S:].sum(1, dtype=torch.int32), per_row=S, fused=fused)
