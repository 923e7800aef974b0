"""A/B timing across two checkouts on one GPU: per-layer us of SDPA, the scan pipeline and the
dense kernel for the code on PYTHONPATH (one process per checkout, run alternately by the caller).
Usage: python scripts/ab_time.py TAG"""
import os
import sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_round11 import compare  # noqa: E402
from vattn.bench.attn_core import graph_us  # noqa: E402
from vattn.kernels.decode import dense_decode  # noqa: E402
from trace_scan import data  # noqa: E402

compare(sys.argv[1], ((1, 131072), (1, 32768), (8, 131072)), lambda B: {"scan": {}})
for B, N in ((1, 131072), (8, 32768)):
    sets = [data(B, N, i)[:3] for i in range(max(1, 4 // B))]
    L = torch.full((B,), N, dtype=torch.int32, device="cuda")
    us = [graph_us([lambda s=s: dense_decode(*s, L) for s in sets]) for _ in range(2)]
    print(f"{sys.argv[1]} DENSE B={B} N={N}: {sum(us) / 2:.1f} us [{', '.join(f'{u:.1f}' for u in us)}]")
    del sets
