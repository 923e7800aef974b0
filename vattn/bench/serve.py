"""`vattn bench serve`: a load generator for the OpenAI-compatible server.

Against a running server (--url), or servers it starts itself on one engine (--model PATH or
--random llama3-8b): one row per (admission, spec), side by side in one run, with the same
seeded requests in each row. Requests are token-id prompts (lengths drawn from --prompt-len)
streamed back with ignore_eos (exactly their --output-len tokens), sent at a fixed
concurrency or as Poisson arrivals (--rate). Reported per row: request throughput, output
tokens/s, TTFT and TPOT p50/p99 (TTFT: to the first streamed text), failed requests, and the
server's running requests and mapped KV memory sampled from /metrics every 0.25 s.

    vattn bench serve --random llama3-8b --specs dense,vattention --admission vmem,static \\
        --budget-gb 40 --max-len 32768 --max-batch 64 --prompt-len 16384:32768 --output-len 128:512

The load generator imports no torch; with servers it starts, it runs in a child process so
that the client does not share the engine's interpreter.
"""
from __future__ import annotations

import asyncio
import datetime
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import typer

from vattn.bench.app import bench_app
from vattn.errors import VattnError


@dataclass
class Load:
    num_requests: int = 64
    concurrency: int | None = 8        # in flight at once (None: --rate decides)
    rate: float | None = None          # Poisson arrivals per second
    prompt_len: tuple = (4096, 32768)  # uniform in [lo, hi]
    output_len: tuple = (128, 512)
    seed: int = 0
    timeout: float = 1800.0


def parse_range(text: str, what: str) -> tuple[int, int]:
    """'A' or 'A:B' -> (A, B) with 1 <= A <= B."""
    try:
        parts = [int(x) for x in str(text).split(":")]
    except ValueError:
        raise VattnError(f"{what} must be N or LO:HI (tokens), got {text!r}") from None
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else tuple(parts) if len(parts) == 2 else (0, -1)
    if not 1 <= lo <= hi:
        raise VattnError(f"{what} must be N or LO:HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def make_requests(load: Load, vocab: int, max_len: int) -> list[tuple[list[int], int, float]]:
    """(prompt ids, output tokens, arrival offset s) per request; the same for every row."""
    rng = random.Random(load.seed)
    lo_id = min(100, vocab // 4)  # stay clear of the special tokens at the start of most vocabularies
    out, t = [], 0.0
    for _ in range(load.num_requests):
        n_out = rng.randint(*load.output_len)
        n_in = min(rng.randint(*load.prompt_len), max_len - n_out)
        if n_in < 1:
            raise VattnError(f"--output-len {load.output_len[1]} leaves no room for a prompt in max_len {max_len}")
        if load.rate:
            t += rng.expovariate(load.rate)
        out.append(([rng.randrange(lo_id, vocab) for _ in range(n_in)], n_out, t))
    return out


def split_specs(text: str) -> list[str]:
    """'dense,sink(4)+verified(eps=0.1,delta=0.1)' -> two specs (commas inside parentheses stay)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [s.strip() for s in out + [cur] if s.strip()]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    f = int(k)
    return xs[f] + (xs[min(f + 1, len(xs) - 1)] - xs[f]) * (k - f)


async def _one(client, url: str, model: str, ids: list[int], n_out: int, spec: str | None) -> dict:
    body = {"model": model, "prompt": ids, "max_tokens": n_out, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if spec:
        body["vattn_spec"] = spec
    t0 = time.perf_counter()
    first = last = None
    tokens, error = 0, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        error = obj["error"].get("message", str(obj["error"]))
                        break
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
                    if any(c.get("text") for c in obj.get("choices", [])):
                        last = time.perf_counter()
                        first = first or last
    except Exception as e:  # a broken connection is a failed request, not a failed benchmark
        error = f"{type(e).__name__}: {e}"
    if error is None and tokens != n_out:
        error = f"asked for {n_out} tokens, got {tokens}"
    return {"ok": error is None, "error": error, "ttft": None if first is None else first - t0,
            "tpot": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "latency": time.perf_counter() - t0, "tokens": tokens if error is None else 0}


async def _metrics(client, url: str) -> dict:
    try:
        text = (await client.get(url + "/metrics")).text
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}
    except Exception:  # a server without /metrics (or a replica that is busy) gives no samples
        return {}


async def _sample_metrics(client, url: str, samples: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        m = await _metrics(client, url)
        if m:
            samples.append(m)
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def _run(url: str, load: Load, spec: str | None, warmup: int) -> dict:
    import httpx2
    url = url.rstrip("/")
    async with httpx2.AsyncClient(timeout=load.timeout, limits=httpx2.Limits(max_connections=None)) as client:
        info = (await client.get(url + "/v1/models")).json()["data"][0]
        reqs = make_requests(load, info["vocab_size"], info["max_model_len"])
        if warmup:  # CUDA graphs, Triton compiles: not in the timed run
            await asyncio.gather(*[_one(client, url, info["id"], ids, min(n, 16), spec)
                                   for ids, n, _ in reqs[:warmup]])
        samples, stop = [], asyncio.Event()
        before = await _metrics(client, url)
        sampler = asyncio.ensure_future(_sample_metrics(client, url, samples, stop))
        sem = asyncio.Semaphore(load.concurrency or len(reqs))
        t0 = time.perf_counter()

        async def send(ids, n, at):
            if load.rate:
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            async with sem:
                return await _one(client, url, info["id"], ids, n, spec)
        results = await asyncio.gather(*[send(*r) for r in reqs])
        duration = time.perf_counter() - t0
        after = await _metrics(client, url)
        stop.set()
        await sampler
    row = summarize(results, duration, samples, info)
    key = "vattn_running_seconds_total"
    if key in before and key in after:  # exact mean concurrency (the sampled one is a fallback)
        row["running_mean"] = (after[key] - before[key]) / duration
    return row


def summarize(results: list[dict], duration: float, samples: list[dict], info: dict) -> dict:
    ok = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    running = [s.get("vattn_requests_running", 0) for s in samples]
    # while requests wait, admission (memory) bounds concurrency, not the offered load
    queued = [s.get("vattn_requests_running", 0) for s in samples if s.get("vattn_requests_waiting", 0) > 0]
    ms = (lambda x: None if x is None else x * 1e3)
    return {"model": info["id"], "server_spec": info.get("vattn_spec"), "requests": len(results),
            "failed": len(results) - len(ok), "errors": sorted({r["error"] for r in results if r["error"]})[:5],
            "duration_s": duration, "req_per_s": len(ok) / duration,
            "output_tok_per_s": sum(r["tokens"] for r in ok) / duration,
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "tpot_p50_ms": ms(percentile(tpot, 50)), "tpot_p99_ms": ms(percentile(tpot, 99)),
            "running_mean": sum(running) / len(running) if running else None,
            "running_max": max(running) if running else None,
            "running_queued_mean": sum(queued) / len(queued) if queued else None,
            "kv_mapped_max_gib": max((s.get("vattn_kv_mapped_bytes", 0) for s in samples), default=0) / 2**30}


def run_load(url: str, load: Load, spec: str | None = None, warmup: int = 0) -> dict:
    """One row: `load` against the server at `url` (every request with vattn_spec=spec)."""
    return asyncio.run(_run(url, load, spec, warmup))


def _run_child(url, load_dict, spec, warmup):  # top level: picklable for the child process
    return run_load(url, Load(**load_dict), spec, warmup)


def compare(runner, load: Load, specs: list, admissions: list, *, model_name: str = "model", chunk: int = 2048,
            max_waiting: int = 100_000, warmup: int = 0, child: bool = True) -> list[dict]:
    """Serve `runner` once per admission mode (same memory budget) and run `load` once per spec."""
    import concurrent.futures as cf
    import multiprocessing as mp

    from vattn.serve.app import Engine, ServerThread, build_app
    rows = []
    pool = cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) if child else None
    try:
        for adm in admissions:
            runner.kv.trim()  # each mode starts with nothing mapped
            engine = Engine(runner, model_name=model_name, admission=adm, chunk_tokens=chunk, max_waiting=max_waiting)
            with ServerThread(build_app(engine)) as srv:
                for spec in specs:
                    preempted = engine.scheduler.metrics()["preempted"]
                    engine.scheduler.max_running = 0  # this row's peak (warm-up included)
                    if pool is not None:
                        row = pool.submit(_run_child, srv.url, asdict(load), spec, warmup).result()
                    else:
                        row = run_load(srv.url, load, spec, warmup)
                    rows.append({"admission": adm, "spec": spec or runner.spec,
                                 "capacity": engine.scheduler.capacity,
                                 "preempted": engine.scheduler.metrics()["preempted"] - preempted,
                                 "max_running": engine.scheduler.max_running, **row})
    finally:
        if pool is not None:
            pool.shutdown()
    return rows


def random_model(shape: str, device, dtype):
    """(transformers model, tokenizer) with random weights in the shapes of `vattn bench e2e`:
    llama3-8b (Llama-3-8B) or tiny. The tokenizer is word-level over the whole vocabulary
    ('t0', 't1', ...): enough for token-id prompts."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vattn.bench.e2e import model_config
    if shape not in ("llama3-8b", "tiny"):
        raise VattnError(f"--random must be llama3-8b or tiny, got {shape!r}")
    cfg = model_config(None, tiny=shape == "tiny")
    cfg.bos_token_id, cfg.eos_token_id = 1, 2
    torch.manual_seed(0)
    with torch.device(device):  # initialised in the target dtype on the device (8B: no fp32 copy)
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, cfg.vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    return model, tok


def table(rows: list[dict], title: str):
    from rich.table import Table
    t = Table(title=title)
    cols = ["admission", "spec", "ok/failed", "req/s", "out tok/s", "vs row 1", "TTFT p50/p99 ms",
            "TPOT p50/p99 ms", "running mean/max", "running while queued", "KV GiB max",
            "preempted"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("admission", "spec") else "right", overflow="fold")
    base = rows[0]["output_tok_per_s"] if rows else 0
    f = (lambda x, p=1: "-" if x is None else f"{x:.{p}f}")
    for r in rows:
        peak = r.get("max_running", r["running_max"])
        adm = f"{r['admission']} ({r['capacity']} max)" if r["admission"] == "static" else r["admission"]
        t.add_row(adm, r["spec"], f"{r['requests'] - r['failed']}/{r['failed']}", f(r["req_per_s"], 2),
                  f(r["output_tok_per_s"]), f"{r['output_tok_per_s'] / base:.2f}x" if base else "-",
                  f"{f(r['ttft_p50_ms'])}/{f(r['ttft_p99_ms'])}", f"{f(r['tpot_p50_ms'], 2)}/{f(r['tpot_p99_ms'], 2)}",
                  f"{f(r['running_mean'])}/{f(peak, 0)}", f(r.get("running_queued_mean")), f(r["kv_mapped_max_gib"], 2), str(r.get("preempted", "-")))
    return t


@bench_app.command("serve")
def serve_bench(
    url: str = typer.Option(None, help="A running vattn server (e.g. http://127.0.0.1:8000); else start one."),
    model: str = typer.Option(None, help="Without --url: a HF model dir or .gguf (default: the embedded SmolLM2)."),
    random_shape: str = typer.Option(None, "--random", help="Without --url: random weights of this shape "
                                     "(llama3-8b, tiny) instead of --model."),
    specs: str = typer.Option("dense", help="Comma-separated specs, one row each (sent as vattn_spec)."),
    admission: str = typer.Option("vmem", help="Without --url: comma-separated admission modes (vmem,static), "
                                  "one server each on the same engine and memory budget."),
    budget_gb: float = typer.Option(None, help="Without --url: KV memory budget in GiB (equal for every mode)."),
    max_len: int = typer.Option(32768, help="Without --url: max tokens per request."),
    max_batch: int = typer.Option(16, help="Without --url: KV slots (most requests at once)."),
    device: str = typer.Option(None, help="Without --url: cpu or cuda (default: cuda when there is one)."),
    dtype: str = typer.Option(None, help="Without --url: float32, float16, bfloat16."),
    chunk: int = typer.Option(2048, help="Without --url: prefill tokens per engine step."),
    kv_layout: str = typer.Option("bhnd", help="Without --url: KV cache layout, bhnd (head-major) or bnhd "
                                  "(token-major: a slot grows in finer steps; docs/serve.md)."),
    num_requests: int = typer.Option(64, help="Requests per row."),
    concurrency: int = typer.Option(None, help="Requests in flight at once (default: --max-batch; "
                                    "unlimited with --rate)."),
    rate: float = typer.Option(None, help="Poisson arrivals per second instead of a fixed concurrency."),
    prompt_len: str = typer.Option("4096:32768", help="Prompt tokens, N or LO:HI (uniform)."),
    output_len: str = typer.Option("128:512", help="Output tokens, N or LO:HI (uniform)."),
    warmup: int = typer.Option(4, help="Untimed requests before each row (graph captures, compiles)."),
    seed: int = 0,
    json_out: Path = typer.Option(None, "--json", help="Also write the rows as JSON here."),
):
    """Load-test an OpenAI-compatible vattn server: throughput, TTFT, TPOT, concurrency, KV memory."""
    from vattn.console import console, fail
    from vattn.paths import check_writable_file
    try:
        if json_out is not None:
            check_writable_file(json_out, "--json")
        if rate is not None and not rate > 0:
            raise VattnError(f"--rate must be > 0 requests/s, got {rate}")
        if num_requests < 1 or (concurrency is not None and concurrency < 1):
            raise VattnError("--num-requests and --concurrency must be >= 1")
        load = Load(num_requests=num_requests, concurrency=concurrency, rate=rate, prompt_len=parse_range(prompt_len, "--prompt-len"),
                    output_len=parse_range(output_len, "--output-len"), seed=seed)
        spec_list = split_specs(specs)
        if not spec_list:
            raise VattnError("--specs is empty")
        if url:
            if load.concurrency is None and load.rate is None:
                load.concurrency = 8
            rows = [{"admission": "(server's)", "spec": s, **run_load(url, load, s, warmup)} for s in spec_list]
            where = url
        else:
            rows, where = _launch(model, random_shape, spec_list, admission, budget_gb, max_len, max_batch,
                                  device, dtype, chunk, load, warmup, console, kv_layout)
    except VattnError as e:
        fail(e)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = f"rate {rate}/s" if rate else f"concurrency {load.concurrency}"
    console.print(table(rows, f"vattn bench serve: {where}, {num_requests} requests per row, {mode}, prompts "
                              f"{prompt_len}, outputs {output_len}, {now}"))
    for r in rows:
        if r["errors"]:
            console.print(f"[red]{r['admission']} {r['spec']}: {r['failed']} failed[/red], e.g. {r['errors'][0]}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"date": now, "where": where, "load": asdict(load), "rows": rows}, indent=1))
        console.print(f"wrote {json_out}")


def _launch(model, random_shape, specs, admission, budget_gb, max_len, max_batch, device, dtype, chunk, load,
            warmup, console, kv_layout="bhnd"):
    """Build one Runner and compare admission modes and specs on it; returns (rows, description)."""
    import torch

    from vattn.engine.runner import Runner
    from vattn.engine.scheduler import ADMISSIONS
    from vattn.models import resolve_device, resolve_dtype
    from vattn.serve.app import model_name
    from vattn.spec import parse
    modes = [a.strip() for a in admission.split(",") if a.strip()]
    for a in modes:
        if a not in ADMISSIONS:
            raise VattnError(f"--admission takes {', '.join(ADMISSIONS)} (comma-separated), got {a!r}")
    for s in specs:
        parse(s)
    if model and random_shape:
        raise VattnError("give --model or --random, not both")
    dev = resolve_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = resolve_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    budget = None if budget_gb is None else int(budget_gb * 2**30)
    if "static" in modes and budget is None:
        raise VattnError("comparing with static admission needs --budget-gb (equal memory for both modes)")
    if load.concurrency is None and load.rate is None:
        load.concurrency = max_batch
    tok, name = None, model_name(model)
    if random_shape:
        console.print(f"building a random-weight {random_shape} model on {dev} ...")
        model, tok = random_model(random_shape, dev, dt)
        name = f"random-{random_shape}"
    runner = Runner(model, spec="dense", device=dev, dtype=dt, max_len=max_len, max_batch=max_batch,
                    budget_bytes=budget, tokenizer=tok, kv_layout=kv_layout)
    del model
    desc = (f"{name} on {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'} ({dt}), "
            f"KV budget {'-' if budget is None else f'{budget_gb:g} GiB'} ({kv_layout}), max_len {max_len}, max_batch {max_batch}")
    console.print(f"serving {desc}")
    rows = compare(runner, load, specs, modes, model_name=name, chunk=chunk, warmup=warmup)
    return rows, desc
