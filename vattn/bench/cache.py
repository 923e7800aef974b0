"""`vattn bench cache`: the vmem KV cache against a static max-length cache and a paged one.

Three measurements, side by side in one run:
  memory  bytes held for a batch of mixed lengths: static, vmem (both layouts), paged (16-token blocks)
  map     latency of mapping / unmapping one granule, and of a decode step's grow() call
  decode  one decode step's attention on the same K/V held three ways: static buffer,
          vmem views (must match static within noise) and a shuffled paged pool
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from vattn.bench.app import bench_app, speed_vs
from vattn.cache.kv import KVCache
from vattn.cache.vmem import reserve
from vattn.kernels.paged import paged_decode, paged_decode_ref, to_paged

MiB = 2 ** 20


def _time_us(fn, device: torch.device, reps: int) -> float:
    """Median time of fn() in microseconds (device events on CUDA via do_bench)."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=max(50, reps), return_mode="median") * 1e3
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def _memory(device, layers, batch, max_len, hkv, d, dtype, gen, granule):
    lengths = torch.randint(max_len // 16, max_len + 1, (batch,), generator=gen).tolist()
    esize = torch.empty(0, dtype=dtype).element_size()
    per_tok = 2 * layers * hkv * d * esize
    rows = [("static (max_len per slot)", batch * max_len * per_tok),
            ("paged, 16-token blocks", sum(-(-n // 16) * 16 for n in lengths) * per_tok),
            ("exact (sum of lengths)", sum(lengths) * per_tok)]
    for layout in ("bhnd", "bnhd"):
        kv = KVCache(layers, batch, max_len, hkv, d, dtype=dtype, device=device, layout=layout,
                     ahead_tokens=0, granule=granule)
        s = kv.alloc(batch)
        for i, n in enumerate(lengths):
            kv.grow([s + i], n)
        rows.append((f"vmem {layout}, {kv.G // 1024} KiB granules", kv.stats().mapped_bytes))
        kv.close()
    for layout in ("bhnd", "bnhd"):
        # What 64 KiB pages (vAttention's patched driver) would hold: page arithmetic only, nothing mapped.
        kv = KVCache(layers, 1, max_len, hkv, d, dtype=dtype, device="cpu", layout=layout, granule=64 * 1024)
        rows.append((f"vmem {layout}, 64 KiB granules (computed)",
                     sum(len(kv._pages_for(n)) for n in lengths) * kv.page_bytes))
        kv.close()
    static = rows[0][1]
    return {"lengths": lengths, "rows": [{"cache": name, "bytes": b, "vs_static": b / static} for name, b in rows]}


def _map_latency(device, granule, count):
    r = reserve(2 * count * (granule or 2 * MiB), device, granule)
    G = r.granule
    single, unmap = [], []
    for g in range(count):
        t = time.perf_counter()
        r.map([g])
        single.append(time.perf_counter() - t)
    for g in range(count):
        t = time.perf_counter()
        r.unmap([g])
        unmap.append(time.perf_counter() - t)
    t = time.perf_counter()
    r.map(range(count, 2 * count))  # one run: access set once
    run = (time.perf_counter() - t) / count
    r.close()
    us = 1e6
    return {"granule_bytes": G, "count": count,
            "map_us": statistics.median(single) * us, "map_run_us_per_granule": run * us,
            "unmap_us": statistics.median(unmap) * us}


def _grow_step(device, hkv, d, dtype, granule, steps=2000):
    """Cost of the per-step grow() call over a decode (mostly no-ops between page crossings)."""
    kv = KVCache(1, 1, steps + 64, hkv, d, dtype=dtype, device=device, granule=granule)
    s = kv.alloc()
    t = time.perf_counter()
    for n in range(1, steps + 1):
        kv.grow([s], n)
    us = (time.perf_counter() - t) / steps * 1e6
    kv.close()
    return us


def _decode(device, batch, n, max_len, hq, hkv, d, dtype, gen, reps):
    dev = device
    q = torch.randn(batch, hq, 1, d, generator=gen).to(dev, dtype)
    static_k = torch.empty(batch, hkv, max_len, d, dtype=dtype, device=dev)
    static_v = torch.empty_like(static_k)
    static_k[:, :, :n] = torch.randn(batch, hkv, n, d, generator=gen).to(dev, dtype)
    static_v[:, :, :n] = torch.randn(batch, hkv, n, d, generator=gen).to(dev, dtype)
    kv = KVCache(1, batch, max_len, hkv, d, dtype=dtype, device=dev, ahead_tokens=0)
    s = kv.alloc(batch)
    kv.grow(range(s, s + batch), n)
    vk, vv = kv.view(0, s, batch, n)
    vk.copy_(static_k[:, :, :n])
    vv.copy_(static_v[:, :, :n])
    sk, sv = static_k[:, :, :n], static_v[:, :, :n]
    lengths = torch.full((batch,), n, dtype=torch.int32, device=dev)
    kp, vp, table = to_paged(sk, sv, lengths, 16, generator=gen)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    nbytes = 2 * batch * n * hkv * d * static_k.element_size()
    cases = [("SDPA", "static", lambda: sdpa(q, sk, sv, enable_gqa=True)),
             ("SDPA", "vmem", lambda: sdpa(q, vk, vv, enable_gqa=True))]
    if dev.type == "cuda":
        try:
            from vattn.kernels.decode import dense_decode
            cases += [("triton split-KV", "static", lambda: dense_decode(q, sk, sv, lengths)),
                      ("triton split-KV", "vmem", lambda: dense_decode(q, vk, vv, lengths))]
        except ImportError:
            pass
        cases.append(("triton paged", "paged 16", lambda: paged_decode(q[:, :, 0], kp, vp, table, lengths)[:, :, None]))
    else:  # no Triton on CPU (the interpreter is for tests); the torch gather shows the paging cost
        cases.append(("torch gather", "paged 16", lambda: paged_decode_ref(q[:, :, 0], kp, vp, table, lengths)[:, :, None]))
    ref = cases[0][2]().float()
    rows = []
    for kernel, cache, fn in cases:
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        us = _time_us(fn, dev, reps)
        rows.append({"kernel": kernel, "cache": cache, "us": us, "GBps": nbytes / us / 1e3, "rel_err": err})
    # Timing noise: the first case once more.
    rows.append({**rows[0], "cache": "static (repeat)", "us": _time_us(cases[0][2], dev, reps)})
    rows[-1]["GBps"] = nbytes / rows[-1]["us"] / 1e3
    kv.close()
    return {"batch": batch, "n": n, "hq": hq, "hkv": hkv, "d": d, "kv_bytes": nbytes, "rows": rows}


def _fmt_bytes(b):
    return f"{b / MiB:,.1f} MiB"


@bench_app.command("cache")
def cache(device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
          layers: int = typer.Option(None, help="layers in the memory test"),
          batch: int = typer.Option(16, help="requests in the memory test"),
          max_len: int = typer.Option(None, help="max context per slot"),
          decode_batch: int = typer.Option(8), decode_len: int = typer.Option(None),
          hq: int = 32, hkv: int = 8, head_dim: int = 128,
          granule_kib: int = typer.Option(0, help="CPU granule in KiB (0: 2 MiB, like CUDA)"),
          reps: int = 20, seed: int = 0,
          json_path: Path = typer.Option(None, "--json", help="write all numbers here")):
    """Memory, map/unmap latency and decode speed of the vmem KV cache (vs static and paged)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    layers = layers or (8 if cuda else 2)
    max_len = max_len or (32768 if cuda else 4096)
    decode_len = decode_len or (16384 if cuda else 1024)
    reps = reps if cuda else min(reps, 10)
    dtype = torch.bfloat16 if cuda else torch.float32
    granule = granule_kib * 1024 if (granule_kib and not cuda) else None
    gen = torch.Generator().manual_seed(seed)
    name = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine())
    res = {"device": name, "date": datetime.date.today().isoformat(), "dtype": str(dtype),
           "command": "vattn bench cache", "torch": torch.__version__}
    res["memory"] = _memory(dev, layers, batch, max_len, hkv, head_dim, dtype, gen, granule)
    res["memory"].update(layers=layers, batch=batch, max_len=max_len, hkv=hkv, d=head_dim)
    res["map"] = _map_latency(dev, granule, 64)
    res["map"]["grow_step_us"] = _grow_step(dev, hkv, head_dim, dtype, granule)
    res["decode"] = _decode(dev, decode_batch, decode_len, max(max_len, decode_len), hq, hkv, head_dim, dtype, gen, reps)

    con = Console()
    m = res["memory"]
    t = Table(title=f"KV memory: {batch} requests, lengths U[{max_len // 16}, {max_len}], {layers} layers, "
                    f"Hkv={hkv}, D={head_dim}, {dtype} ({name}, {res['date']})")
    t.add_column("cache")
    t.add_column("memory", justify="right")
    t.add_column("vs static", justify="right")
    for r in m["rows"]:
        t.add_row(r["cache"], _fmt_bytes(r["bytes"]), f"{r['vs_static']:.2f}x")
    con.print(t)
    mp = res["map"]
    t = Table(title=f"map / unmap latency ({mp['granule_bytes'] // 1024} KiB granules, median of {mp['count']})")
    for c in ("map one", "map in a run (per granule)", "unmap one", "grow() per decode step"):
        t.add_column(c, justify="right")
    t.add_row(f"{mp['map_us']:.1f} us", f"{mp['map_run_us_per_granule']:.1f} us", f"{mp['unmap_us']:.1f} us",
              f"{mp['grow_step_us']:.1f} us")
    con.print(t)
    dc = res["decode"]
    t = Table(title=f"decode attention: B={dc['batch']}, N={dc['n']}, Hq={hq}, Hkv={hkv}, D={head_dim}, "
                    f"{dtype}, K+V {dc['kv_bytes'] / 1e6:.0f} MB")
    for c in ("kernel", "cache", "time", "GB/s", f"speed vs {dc['rows'][0]['kernel']} on {dc['rows'][0]['cache']}",
              "rel err"):
        t.add_column(c, justify="right")
    base = dc["rows"][0]["us"]
    for r in dc["rows"]:
        t.add_row(r["kernel"], r["cache"], f"{r['us']:.1f} us", f"{r['GBps']:.0f}", speed_vs(r["us"], base),
                  f"{r['rel_err']:.1e}")
    con.print(t)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=1))
        con.print(f"wrote {json_path}")
