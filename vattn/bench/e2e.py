"""`vattn bench e2e`: end-to-end decode, side by side in one run, on one random-weight model:

  transformers eager  the user's default: model(...) one token at a time with its DynamicCache
  engine dense        vattn.engine Runner, dense attention (CUDA-graphed step on a GPU)
  engine SPEC         the same Runner with each given spec's plan in every layer

Llama-3-8B shape (hidden 4096, 32 layers, 32 q / 8 kv heads of 128, ffn 14336, vocab 128256),
bf16 on a GPU; --layers shrinks it; --tiny is a small fp32 model for the CPU. The KV cache is
filled with unit-normal keys and values (prefill is not timed; random keys make attention
flat, so a sparse spec's density here is not a real model's). Per row: ms per decode step
(wall clock, host included: grow, graph replay, argmax, token ids back), tokens/s, and the
fraction of the bytes roofline: (weights + KV bytes read per step) / measured bandwidth / step
time, where a sparse spec reads density x the KV bytes.
"""
from __future__ import annotations

import datetime
import gc
import json
import logging
import os
import time

import torch

from vattn.errors import VattnError

log = logging.getLogger(__name__)

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=131072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=256, max_position_embeddings=4096)


def model_config(layers: int | None, tiny: bool):
    import transformers as tf
    shape = dict(TINY if tiny else LLAMA3_8B)
    if layers:
        shape["num_hidden_layers"] = layers
    return tf.LlamaConfig(**shape)


def bandwidth_gbs(device: torch.device) -> float:
    """Measured read bandwidth, GB/s: a big reduction on this device (GPU: the best of copy and
    read-only over 2 GiB, as `vattn bench` measures it; CPU: 256 MiB)."""
    if device.type == "cuda":
        from vattn.bench.attn_core import hbm_ceiling
        return max(hbm_ceiling())
    x = torch.ones(2 ** 26, dtype=torch.float32)
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * x.numel() * 4 / (time.perf_counter() - t) / 1e9


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_bytes(cfg, batch: int, n: int, esize: int) -> int:
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * n * hd * esize


def hf_eager(model, cfg, batch: int, ctx: int, steps: int, device) -> float:
    """Seconds per decode step of transformers' own forward over a DynamicCache of ctx random tokens."""
    from transformers import DynamicCache

    from vattn.hf import cache_keyword
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=device).manual_seed(0)
    cache = DynamicCache(config=cfg)
    dt = next(model.parameters()).dtype
    for i in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, ctx, hd)
        cache.update(torch.randn(shape, generator=g, device=device, dtype=dt),
                     torch.randn(shape, generator=g, device=device, dtype=dt), i)
    tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
    key = cache_keyword(model)
    with torch.inference_mode():
        for i in range(steps + 2):
            if i == 2:
                _sync(device)
                t = time.perf_counter()
            out = model(input_ids=tok, use_cache=True, **{key: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.tolist()  # the host sees each token, as a generate loop does
    _sync(device)
    del cache, out
    return (time.perf_counter() - t) / steps


def engine(decoder, spec, batch: int, ctx: int, steps: int, device, budget=None) -> dict:
    """Seconds per decode step of the engine (spec or dense), its density and graph note."""
    from vattn.engine.runner import Runner
    r = Runner(decoder, spec=spec, device=device, dtype=decoder.dtype, max_len=ctx + steps + 4,
               max_batch=batch)
    try:
        slots = [r.alloc() for _ in range(batch)]
        for i, s in enumerate(slots):
            r.fill_random(s, ctx, seed=i)
        sec = decode_loop(r, slots, steps)
        dens = [r.density(s) for s in slots]
        plan = r.plan()
        return {"seconds": sec, "density": sum(dens) / len(dens),
                "path": "dense" if plan is None else plan.path,
                "graphed": r.graphs and not r.graph_notes, "note": "; ".join(r.graph_notes.values()) or None}
    finally:
        r.close()


def decode_loop(r, slots, steps: int, warmup: int = 2) -> float:
    """Seconds per greedy decode step, stepped as the scheduler steps (Scheduler._decode): each
    step takes the previous step's ids on the device, and the host reads them back while the
    next step runs. Warm-up steps first: Triton compiles, the graph is captured."""
    from vattn.engine.runner import StepIds
    toks, prev = torch.zeros(len(slots), dtype=torch.long, device=r.device), None
    for i in range(steps + warmup):
        if i == warmup:
            _sync(r.device)
            t = time.perf_counter()
        toks = r.decode(slots, toks, greedy=True)
        step = StepIds(toks)
        if prev is not None:
            prev.tolist()  # the host's read of the step before
        prev = step
    prev.tolist()
    return (time.perf_counter() - t) / steps


def run(batches=(1, 4, 16), contexts=(32768, 131072), specs=("streaming", "vattention-scan"), layers=None,
        steps: int = 16, tiny: bool = False, device=None, hf: bool = True, json_path=None, on_row=None) -> dict:
    """All rows, side by side; writes json_path after each row (a cut run keeps what it measured)."""
    from vattn.engine.model import Decoder
    from vattn.models import resolve_device
    from vattn.spec import parse
    dev = resolve_device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not tiny:
        raise VattnError("the Llama-3-8B-shaped benchmark needs a CUDA GPU; on the CPU run it with --tiny")
    specs = [str(parse(s)) for s in specs]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = model_config(layers, tiny)
    esize = torch.empty(0, dtype=dtype).element_size()
    bw = bandwidth_gbs(dev)
    import transformers as tf
    torch.manual_seed(0)
    with torch.device(dev):  # initialised in the target dtype on the device (8B: no fp32 copy)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    decoder = Decoder(cfg, model.state_dict(), dev, dtype, max(contexts) + steps + 4)
    weights = decoder.weight_bytes()
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "transformers": tf.__version__,
            "dtype": str(dtype).replace("torch.", ""), "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "bandwidth_gbs": bw, "weight_bytes": weights, "steps": steps,
            "kv": "unit-normal random keys/values (prefill not timed)"}
    rows = []
    result = {"info": info, "rows": rows}
    for b in batches:
        for ctx in contexts:
            kvb = kv_bytes(cfg, b, ctx, esize)
            free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
            if free is not None and kvb > 0.9 * free:
                rows.append({"B": b, "ctx": ctx, "system": "all", "skipped":
                             f"KV {kvb / 2**30:.1f} GiB > 90% of free {free / 2**30:.1f} GiB"})
                _emit(rows[-1], on_row, json_path, result)
                continue
            base = {}

            def add(system, sec, density=1.0, **extra):
                bytes_ = weights + kvb * density
                row = {"B": b, "ctx": ctx, "system": system, "ms_per_step": sec * 1e3, "tok_s": b / sec,
                       "roofline_frac": bytes_ / (bw * 1e9) / sec, "density": density, **extra}
                if "hf" in base:
                    row["vs_hf"] = base["hf"] / sec
                if "dense" in base:
                    row["vs_dense"] = base["dense"] / sec
                rows.append(row)
                _emit(row, on_row, json_path, result)

            # transformers' cache: the KV, plus one layer's copy while torch.cat grows it
            if hf and (free is None or kvb * (1 + 2 / cfg.num_hidden_layers) < 0.9 * free):
                base["hf"] = hf_eager(model, cfg, b, ctx, steps, dev)
                add("transformers eager", base["hf"], attn=model.config._attn_implementation)
            elif hf:
                rows.append({"B": b, "ctx": ctx, "system": "transformers eager",
                             "skipped": "its DynamicCache (grown by torch.cat) does not fit next to the engine's"})
                _emit(rows[-1], on_row, json_path, result)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            e = engine(decoder, "dense", b, ctx, steps, dev)
            base["dense"] = e["seconds"]
            add("engine dense", e["seconds"], graphed=e["graphed"], note=e["note"])
            for spec in specs:
                try:
                    e = engine(decoder, spec, b, ctx, steps, dev)
                except Exception as err:  # the row says why; the other specs' rows still run
                    log.error("engine %s at B=%d ctx=%d failed: %s", spec, b, ctx, err)
                    rows.append({"B": b, "ctx": ctx, "system": f"engine {spec}",
                                 "skipped": f"failed: {type(err).__name__}: {str(err)[:300]}"})
                    _emit(rows[-1], on_row, json_path, result)
                    continue
                add(f"engine {spec}", e["seconds"], e["density"], path=e["path"], graphed=e["graphed"], note=e["note"])
    return result


def _emit(row, on_row, json_path, result):
    if on_row is not None:
        on_row(row)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)


def _command():
    import typer
    from rich.console import Console
    from rich.table import Table

    from vattn.bench.app import bench_app

    @bench_app.command("e2e")
    def e2e(batch: str = typer.Option("1,4,16", "--batch", help="batch sizes, comma separated"),
            contexts: str = typer.Option("32768,131072", "--contexts", help="context lengths (tokens in the KV cache)"),
            specs: str = typer.Option("streaming,vattention-scan", "--specs",
                                      help="specs next to dense, separated by ';' (or ',' between presets)"),
            layers: int = typer.Option(None, "--layers", help="decoder layers (default 32; fewer for memory/time)"),
            steps: int = typer.Option(16, "--steps", help="timed decode steps per row"),
            tiny: bool = typer.Option(False, "--tiny", help="a tiny fp32 model on the CPU (checks the pipeline)"),
            no_hf: bool = typer.Option(False, "--no-hf", help="skip the transformers eager baseline"),
            device: str = typer.Option(None, help="cuda, cuda:N or cpu (default: cuda when present)"),
            json_path: str = typer.Option(None, "--json", help="write all numbers to this file")):
        """End-to-end decode: transformers eager vs the vattn engine (dense and each spec), side by side."""
        con = Console(width=None if Console().is_terminal else 170)
        try:
            bs = [int(x) for x in batch.split(",") if x.strip()]
            ns = [int(x) for x in contexts.split(",") if x.strip()]
        except ValueError:
            con.print(f"[red]error:[/] --batch and --contexts take comma-separated integers, got {batch!r}, {contexts!r}")
            raise typer.Exit(2)
        sp = [x.strip() for x in (specs.split(";") if ";" in specs or "(" in specs else specs.split(",")) if x.strip()]
        if tiny and contexts == "32768,131072":
            ns = [64]
        if tiny and batch == "1,4,16":
            bs = [1, 2]
        try:
            res = run(bs, ns, sp, layers, steps, tiny, device, not no_hf, json_path,
                      on_row=lambda r: con.print(_line(r)))
        except VattnError as e:
            con.print(f"[red]error:[/] {e}")
            raise typer.Exit(2)
        i = res["info"]
        t = Table(title=f"e2e decode, {i['device']}, {i['date']}, torch {i['torch']}, {i['dtype']}, "
                        f"{i['layers']} layers x hidden {i['hidden']}, weights {i['weight_bytes'] / 2**30:.2f} GiB, "
                        f"read bandwidth {i['bandwidth_gbs']:.0f} GB/s; KV: {i['kv']}")
        for c in ("B", "ctx", "system", "ms/step", "tok/s", "% roofline", "density", "vs transformers", "vs dense",
                  "graphed"):
            t.add_column(c, justify="left" if c == "system" else "right")
        for r in res["rows"]:
            if "skipped" in r:
                t.add_row(str(r["B"]), str(r["ctx"]), r["system"], "skipped: " + r["skipped"], *[""] * 6)
                continue
            t.add_row(str(r["B"]), str(r["ctx"]), r["system"], f"{r['ms_per_step']:.3f}", f"{r['tok_s']:.1f}",
                      f"{100 * r['roofline_frac']:.1f}%", f"{r['density']:.3f}",
                      f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-", f"{r['vs_dense']:.2f}x" if "vs_dense" in r else "-",
                      "-" if "graphed" not in r else ("yes" if r["graphed"] else "no"))
        con.print(t)
        for r in res["rows"]:
            if r.get("note"):
                con.print(f"{r['system']} (B={r['B']}, ctx={r['ctx']}) ran eagerly: {r['note']}")
        if json_path:
            con.print(f"wrote {json_path}")


def _line(r) -> str:
    if "skipped" in r:
        return f"B={r['B']} ctx={r['ctx']} {r['system']}: skipped ({r['skipped']})"
    return f"B={r['B']} ctx={r['ctx']} {r['system']}: {r['ms_per_step']:.2f} ms/step, {r['tok_s']:.1f} tok/s"


try:  # the command registers when vattn.cli loads the bench group (typer is a CLI dependency)
    _command()
except ImportError:
    pass
