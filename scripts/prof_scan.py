"""Launch the scan pipeline a few times at one shape (for ncu). Usage: prof_scan.py B N [reps]"""
import sys
import torch
from vattn.bench.attn_core import spec_params
from vattn.kernels.bits import sign_bits
from vattn.kernels.scan import vattention_scan_decode
from vattn.kernels.select import vattention_hash_decode

B, N = int(sys.argv[1]), int(sys.argv[2])
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
which = sys.argv[4] if len(sys.argv) > 4 else "scan"
p = spec_params(N)
sp = {k: p[k] for k in ("sink", "window", "topk", "m0", "eps", "delta")}
q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(B, 8, N, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
proj = torch.randn(128, 32, device="cuda")
ks = sign_bits(k, proj)
L = torch.full((B,), N, dtype=torch.int32, device="cuda")
for i in range(reps):
    if which == "scan":
        vattention_scan_decode(q, k, v, ks, proj, L, seed=i, **sp)
    else:
        vattention_hash_decode(q, k, v, ks, proj, L, seed=i, **p)
torch.cuda.synchronize()
