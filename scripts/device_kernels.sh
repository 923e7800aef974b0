#!/bin/bash
# The one script run on the GPU machine: GPU correctness checks of the fused selection and the
# sparse kernel, selection stage breakdown, sparse variants, then `vattn bench` (JSON to $OUT).
# Usage: bash scripts/device_kernels.sh [quick]
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee $OUT/gpu.txt
python3 - <<'PY' 2>&1 | tee $OUT/checks.log
import torch, triton, traceback
from vattn.kernels.decode import dense_decode, dense_decode_ref
from vattn.kernels.sparse import sparse_decode, sparse_decode_ref
from vattn.kernels.bits import sign_bits, bit_topk, bit_topk_ref, bit_scores_ref, topk_launch
from vattn.kernels.sample import perm_sample, perm_sample_ref, budget_emit, verified_ext_ref
from vattn.kernels.select import vattention_hash_select
from vattn.bench.attn_core import graph_us, spec_params
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
dev = "cuda"
print("triton", triton.__version__, "torch", torch.__version__)
try:
    for shared in (True, False):
        B, Hq, Hkv, N, K = 2, 32, 8, 4096, 1000
        H = Hkv if shared else Hq
        q = torch.randn(B, Hq, 2, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, Hkv, N, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        cnt = torch.randint(1, K + 1, (B, H, 2), device=dev, dtype=torch.int32)
        idx = torch.argsort(torch.rand(B, H, 2, N, device=dev), -1)[..., :K].int()
        idx = torch.where(torch.arange(K, device=dev) < cnt[..., None], idx, -1).int(); lw = torch.randn(B, H, 2, K, device=dev)
        for bn, w, st in ((32, 4, 3), (64, 4, 3), (64, 8, 2)):
            print(f"sparse shared={shared} BN={bn} w={w} st={st}: rel err {rel(sparse_decode(q, k, v, idx, lw, cnt, shared, block_n=bn, num_warps=w, num_stages=st), sparse_decode_ref(q.double(), k.double(), v.double(), idx, lw.double(), cnt, shared)):.2e}")
    proj = torch.randn(128, 64, device=dev)
    qs = sign_bits(torch.randn(2, 32, 1, 128, device=dev), proj); ks = sign_bits(torch.randn(2, 8, 20000, 128, device=dev), proj)
    hi = torch.tensor([19000, 5000], dtype=torch.int32, device=dev)
    idx, cnt, mem = bit_topk(qs, ks, 700, 128, hi, True); ridx, rcnt = bit_topk_ref(qs, ks, 700, 128, hi, True)
    s = bit_scores_ref(qs, ks, True).view(-1, 20000)
    ok = torch.equal(cnt, rcnt) and all(torch.equal(s[r][idx.view(-1, 700)[r].long()].sort().values, s[r][ridx.view(-1, 700)[r].long()].sort().values) for r in range(16))
    print("bit_topk matches torch.topk scores:", ok, "member ok:", torch.equal(mem.view(16, -1).sum(-1).int(), cnt.view(-1)))
    # fused selection at a real size: exact count, layout, top-k scores, budget vs float64 reference
    B, N = 2, 32768; p = spec_params(N)
    q = torch.randn(B, 32, 1, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, 8, N, 128, device=dev, dtype=torch.bfloat16)
    proj = torch.randn(128, 32, device=dev); ks = sign_bits(k, proj); L = torch.tensor([N, 20000], dtype=torch.int32, device=dev)
    sel, st = vattention_hash_select(q, k, ks, proj, L, stats=True, **p)
    sc = bit_scores_ref(sign_bits(q, proj), ks, True).view(B * 8, N)
    F0 = p["sink"] + p["window"]; bad = 0; exts = []; capped = 0
    for r in range(B * 8):
        b = r // 8; hi_ = int(L[b]) - p["window"]; c = int(sel.count.view(-1)[r])
        row = sel.indices.view(B * 8, -1)[r]; live = row[:c].long()
        tn = min(p["topk"], hi_ - p["sink"]); m, ext, n_r = (int(x) for x in st[r, :3])
        bad += int(not ((row[c:] == -1).all() and (live >= 0).all() and live.unique().numel() == c))
        bad += int(not torch.equal(sc[r][live[F0:F0 + tn]].sort().values, torch.topk(sc[r][p["sink"]:hi_], tn).values.sort().values))
        re, rb = verified_ext_ref(q[b, 4 * (r % 8):4 * (r % 8) + 4, 0].float(), k[b, r % 8].float(), live[:F0], live[F0 + tn:F0 + tn + m], n_r, p["eps"], p["delta"])
        bad += int(abs(float(st[r, 3]) - rb) > max(1, 0.002 * rb)); exts.append((float(st[r, 3]), rb, ext)); capped += int(ext < min(re, n_r - m))
    print("fused select checks failed rows:", bad, "of", B * 8, "| raw budget (gpu, ref, ext) first rows:", exts[:3], "| rows where the cap cut the budget:", capped)
    o = sparse_decode(q, k, k, sel.indices, sel.log_weights, sel.count, True)
    print(f"sparse on fused selection rel err {rel(o, sparse_decode_ref(q.double(), k.double(), k.double(), sel.indices, sel.log_weights.double(), sel.count, True)):.2e}")
except Exception:
    traceback.print_exc()
# selection stage breakdown and sparse variants at N=128K (and 32K at B=1)
try:
    for B, N in ((1, 32768), (1, 131072), (8, 131072)):
        p = spec_params(N)
        q = torch.randn(B, 32, 1, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, 8, N, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        proj = torch.randn(128, 32, device=dev); ks = sign_bits(k, proj)
        L = torch.full((B,), N, dtype=torch.int32, device=dev); hi = L - 128
        KT = 256 + p["topk"] + p["cap"]
        out = torch.empty(B * 8, KT, dtype=torch.int32, device=dev); lw = torch.empty(B * 8, KT, device=dev)
        tn, mem, _ = topk_launch(q, None, proj, ks, hi, p["topk"], 128, out, 256, KT, shared=True)
        si, sa = perm_sample(mem.view(B, 8, 1, N), 128, hi, p["cap"], 1)
        t = dict(topk=graph_us([lambda: topk_launch(q, None, proj, ks, hi, p["topk"], 128, out, 256, KT, shared=True)]),
                 topk_nocache=graph_us([lambda: topk_launch(q, None, proj, ks, hi, p["topk"], 128, out, 256, KT, shared=True, cache=False)]),
                 topk_full_hist=graph_us([lambda: topk_launch(q, None, proj, ks, hi, p["topk"], 128, out, 256, KT, shared=True, half=False)]),
                 sample=graph_us([lambda: perm_sample(mem.view(B, 8, 1, N), 128, hi, p["cap"], 1)]),
                 budget=graph_us([lambda: budget_emit(q, k, L, tn, si, sa, out, lw, sink=128, window=128, m0=128, eps=.05, delta=.05)]),
                 select=graph_us([lambda: vattention_hash_select(q, k, ks, proj, L, **p)]))
        print(f"select breakdown B={B} N={N}:", {a: round(b, 1) for a, b in t.items()})
        sel = vattention_hash_select(q, k, ks, proj, L, **p)
        nkeys = sel.count.float().mean().item()
        nb = 2 * B * 8 * nkeys * 256
        for bn, w, st, sp in ((64, 4, 3, None), (64, 4, 4, None), (64, 4, 2, None), (64, 4, 3, 48), (128, 4, 3, None)):
            us = graph_us([lambda: sparse_decode(q, k, v, sel.indices, sel.log_weights, sel.count, True, block_n=bn, num_warps=w, num_stages=st, splits=sp)])
            print(f"  sparse B={B} N={N} keys/row={nkeys:.0f} BN={bn} w={w} st={st} splits={sp}: {us:.1f} us, {nb / us / 1e3:.0f} GB/s")
except Exception:
    traceback.print_exc()
PY
if [ "$1" = quick ]; then ARGS="--quick"; else ARGS="--e2e-layers 0"; fi
COLUMNS=200 python3 -m vattn.cli bench $ARGS --json $OUT/bench.json 2>&1 | tee $OUT/bench.log
