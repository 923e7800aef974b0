"""`vattn train-hash`: capture Q/K from a model and learn hashtopk's projections
(vattn.methods.train_hash does the learning)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from vattn.console import console
from vattn.methods.train_hash import recall, synthetic_records, train_hash


def train_hash_command(
    out: Path = Path("hash.pt"),
    model: str = "",
    bits: int = 64,
    kind: str = "linear",
    loss: str = "rank",
    steps: int = 150,
    top: int = 32,
    n_queries: int = 16,
    lengths: str = "1024,2048",
    layers: str = "",
    seed: int = 0,
    synthetic: bool = False,
):
    """Train hashtopk projections on Q/K captured from a model; use them with
    hashtopk(0.05, bits=64, proj="hash.pt").

    model: name or path (default: the embedded SmolLM2). lengths: prompt token lengths,
    comma-separated. layers: comma-separated indices (default all). --synthetic trains
    on generated Q/K instead of a model (for a quick check).
    """
    t0 = time.time()
    if synthetic:
        records = synthetic_records(seed=seed)
    else:
        import vattn
        from vattn.capture import capture_qkv, default_prompts
        mdl, tok = vattn.load_model(model or None)
        want = [int(x) for x in lengths.split(",") if x.strip()]
        chosen = [int(x) for x in layers.split(",") if x.strip()] or None
        records = capture_qkv(mdl, tok, default_prompts(tok, want), n_queries=n_queries, layers=chosen)
    t1 = time.time()
    # The last prompt of each layer is held out to report recall.
    by_layer: dict[int, list] = {}
    for r in records:
        by_layer.setdefault(int(r["layer"]), []).append(r)
    train = [r for rs in by_layer.values() for r in (rs[:-1] if len(rs) > 1 else rs)]
    held = [rs[-1] for rs in by_layer.values()]
    data = train_hash(train, bits=bits, kind=kind, loss=loss, steps=steps, top=top, seed=seed)
    t2 = time.time()
    torch.save(data, out)
    r_rand = sum(recall(None, r, bits, seed=seed, top=top) for r in held) / len(held)
    r_learn = sum(recall(data["layers"][r["layer"]], r, bits, top=top) for r in held) / len(held)
    console.print(f"captured {len(records)} records in {t1 - t0:.1f}s, trained {len(by_layer)} layers "
                  f"in {t2 - t1:.1f}s -> {out}")
    console.print(f"held-out recall of the top-{top} keys in the 5% best by agreement: "
                  f"random {r_rand:.3f}, learned {r_learn:.3f}")
    console.print(f"use it: hashtopk(0.05, bits={bits}, proj=\"{out}\")")
