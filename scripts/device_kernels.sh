#!/bin/bash
# The one script run on the GPU machine: GPU correctness checks, dense variants sweep,
# then the full `vattn bench` (JSON to $OUT). Usage: bash scripts/device_kernels.sh [quick]
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee $OUT/gpu.txt
python3 - <<'PY' 2>&1 | tee $OUT/checks.log
import torch, triton, traceback
from vattn.kernels.decode import dense_decode, dense_decode_ref
from vattn.kernels.sparse import sparse_decode, sparse_decode_ref
from vattn.kernels.bits import sign_bits, bit_topk, bit_topk_ref, bit_scores_ref
from vattn.kernels.sample import perm_sample, perm_sample_ref
from vattn.kernels.pages import page_bounds, quest_scores, quest_scores_ref
rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
dev = "cuda"
print("triton", triton.__version__, "torch", torch.__version__)
try:
    for T, G, dt in [(1, 4, torch.bfloat16), (4, 4, torch.bfloat16), (8, 4, torch.float16), (2, 4, torch.float32)]:
        q = torch.randn(3, 8 * G, T, 128, device=dev, dtype=dt); big = torch.randn(3, 8, 5000, 256, device=dev, dtype=dt)
        k, v = big[:, :, :4096, :128], big[:, :, 7:4103, 128:]
        L = torch.tensor([4096, 1000, 37], dtype=torch.int32, device=dev)
        print(f"dense T={T} {dt}: rel err {rel(dense_decode(q, k, v, L), dense_decode_ref(q.double(), k.double(), v.double(), L)):.2e}")
    for shared in (True, False):
        B, Hq, Hkv, N, K = 2, 32, 8, 4096, 1000
        H = Hkv if shared else Hq
        q = torch.randn(B, Hq, 2, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, Hkv, N, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
        cnt = torch.randint(1, K + 1, (B, H, 2), device=dev, dtype=torch.int32)
        idx = torch.argsort(torch.rand(B, H, 2, N, device=dev), -1)[..., :K].int()
        idx = torch.where(torch.arange(K, device=dev) < cnt[..., None], idx, -1).int(); lw = torch.randn(B, H, 2, K, device=dev)
        print(f"sparse shared={shared}: rel err {rel(sparse_decode(q, k, v, idx, lw, cnt, shared), sparse_decode_ref(q.double(), k.double(), v.double(), idx, lw.double(), cnt, shared)):.2e}")
    proj = torch.randn(128, 64, device=dev)
    qs = sign_bits(torch.randn(2, 32, 1, 128, device=dev), proj); ks = sign_bits(torch.randn(2, 8, 20000, 128, device=dev), proj)
    hi = torch.tensor([19000, 5000], dtype=torch.int32, device=dev)
    idx, cnt, mem = bit_topk(qs, ks, 700, 128, hi, True); ridx, rcnt = bit_topk_ref(qs, ks, 700, 128, hi, True)
    s = bit_scores_ref(qs, ks, True).view(-1, 20000)
    ok = torch.equal(cnt, rcnt) and all(torch.equal(s[r][idx.view(-1, 700)[r].long()].sort().values, s[r][ridx.view(-1, 700)[r].long()].sort().values) for r in range(16))
    print("bit_topk matches torch.topk scores:", ok, "member ok:", torch.equal(mem.view(16, -1).sum(-1).int(), cnt.view(-1)))
    mem8 = (torch.rand(2, 8, 1, 20000, device=dev) < .1).to(torch.uint8)
    a = perm_sample(mem8, 128, hi, 3000, 5); b = perm_sample_ref(mem8, 128, hi, 3000, 5)
    print("perm_sample bit-exact vs torch:", torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    q = torch.randn(2, 32, 1, 128, device=dev); mn, mx = page_bounds(torch.randn(2, 8, 4096, 128, device=dev), None, 16)
    print(f"quest rel err {rel(quest_scores(q, mn, mx), quest_scores_ref(q, mn, mx)):.2e}")
except Exception:
    traceback.print_exc()
# selection cost: bit top-k vs torch.topk at 128K (8 rows shared, 32 rows per head)
try:
    from vattn.bench.attn_core import graph_us
    for B in (1, 8):
        N = 131072; k = 10000
        proj = torch.randn(128, 32, device=dev)
        qs = sign_bits(torch.randn(B, 32, 1, 128, device=dev), proj); ks = sign_bits(torch.randn(B, 8, N, 128, device=dev), proj)
        hi = torch.full((B,), N - 128, dtype=torch.int32, device=dev)
        sc = torch.randn(B, 8, 1, N, device=dev)
        print(f"B={B} N=128K k=10000: bit_topk {graph_us([lambda: bit_topk(qs, ks, k, 128, hi, True)]):.1f} us, "
              f"torch.topk(f32 scores) {graph_us([lambda: torch.topk(sc, k, -1)]):.1f} us")
except Exception:
    traceback.print_exc()
# selection stage breakdown at B=1, N=32K and 128K
try:
    from vattn.bench.attn_core import graph_us, spec_params
    from vattn.kernels.select import fixed_indices
    from vattn.kernels.sample import verified_budget
    for B, N in ((1, 32768), (1, 131072)):
        p = spec_params(N)
        q = torch.randn(B, 32, 1, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, 8, N, 128, device=dev, dtype=torch.bfloat16)
        proj = torch.randn(128, 32, device=dev); ks = sign_bits(k, proj)
        L = torch.full((B,), N, dtype=torch.int32, device=dev); hi = L - 128
        qs = sign_bits(q, proj)
        top, tn, mem = bit_topk(qs, ks, p["topk"], 128, hi, True)
        si, sa = perm_sample(mem, 128, hi, p["cap"], 1)
        nr = ((hi.long() - 128).view(B, 1, 1) - tn).clamp(min=0); fi = fixed_indices(L, B, 8, 1, 128, 128)
        t = dict(sign=graph_us([lambda: sign_bits(q, proj)]), topk=graph_us([lambda: bit_topk(qs, ks, p["topk"], 128, hi, True)]),
                 sample=graph_us([lambda: perm_sample(mem, 128, hi, p["cap"], 1)]),
                 budget=graph_us([lambda: verified_budget(q, k, fi, None, si, sa, nr, m0=128, eps=.05, delta=.05)]))
        print(f"select breakdown B={B} N={N}:", {a: round(b, 1) for a, b in t.items()})
except Exception:
    traceback.print_exc()
# dense variants at B=1, N=128K
try:
    from vattn.bench.attn_core import graph_us
    B, N = 1, 131072
    q = torch.randn(B, 32, 1, 128, device=dev, dtype=torch.bfloat16); k = torch.randn(B, 8, N, 128, device=dev, dtype=torch.bfloat16); v = torch.randn_like(k)
    nb = 2 * k.numel() * 2
    for bn, w, st, sp in [(64, 4, 3, None), (64, 4, 4, None), (128, 4, 3, None), (128, 8, 3, None), (64, 4, 3, 64), (128, 4, 3, 64), (64, 4, 2, 32), (32, 4, 4, None)]:
        us = graph_us([lambda: dense_decode(q, k, v, block_n=bn, num_warps=w, num_stages=st, splits=sp)])
        print(f"dense variant BN={bn} warps={w} stages={st} splits={sp}: {us:.1f} us, {nb / us / 1e3:.0f} GB/s")
    print(f"sdpa: {graph_us([lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)]):.1f} us")
except Exception:
    traceback.print_exc()
PY
if [ "$1" = quick ]; then ARGS="--quick"; else ARGS=""; fi
COLUMNS=200 python3 -m vattn.cli bench $ARGS --json $OUT/bench.json 2>&1 | tee $OUT/bench.log
