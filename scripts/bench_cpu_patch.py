"""ms per decoded token through vattn.patch on the CPU (the reference methods, what `vattn eval`
runs there): the embedded SmolLM2-135M, a random prompt of N tokens prefilled densely, then
greedy decode steps with each spec; median of the steps after two warm-up ones.
Usage: python scripts/bench_cpu_patch.py [N] [steps] [spec ...]   (default 4096 10 and four specs)"""
import copy
import sys
import time

import torch

import vattn
from vattn.models import load_model


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    specs = sys.argv[3:] or ["dense", "streaming", "oracle-topk", "vattention"]
    torch.manual_seed(0)
    model, _ = load_model()
    ids = torch.randint(100, 20000, (1, n))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        for spec in specs:
            p = vattn.patch(model, spec, sparse_from=n)
            cache, nxt, ts = copy.deepcopy(out.past_key_values), out.logits[:, -1:].argmax(-1), []
            for _ in range(steps):
                t = time.perf_counter()
                o = model(nxt, past_key_values=cache, use_cache=True)
                ts.append(time.perf_counter() - t)
                cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            p.undo()
            kept = sorted(ts[2:])
            print(f"{spec:24s} {kept[len(kept) // 2] * 1e3:8.1f} ms/token (N={n}, {torch.get_num_threads()} threads)",
                  flush=True)


if __name__ == "__main__":
    main()
