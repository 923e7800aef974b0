"""`vattn serve`: the OpenAI-compatible server (one process, or --ray --replicas N)."""
from __future__ import annotations

import logging
import socket
import time

import typer

from vattn.errors import VattnError


def check_port(host: str, port: int) -> None:
    """Fail before the model load when host:port cannot be bound."""
    if not 0 <= port <= 65535:
        raise VattnError(f"--port must be in 0..65535, got {port}")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise VattnError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host") from None


def engine_kwargs(model, spec, device, dtype, max_len, max_batch, budget_gb, seed, dense_layers, admission,
                  max_waiting, chunk, name, kv_layout="bhnd") -> dict:
    """load_engine's arguments, checked as far as can be without loading the model."""
    from vattn.engine.scheduler import ADMISSIONS
    from vattn.models import resolve_device, resolve_dtype
    from vattn.spec import parse
    parse(spec)
    if device is not None:
        resolve_device(device)
    resolve_dtype(dtype)
    for opt, v in (("--max-len", max_len), ("--max-batch", max_batch), ("--max-waiting", max_waiting),
                   ("--chunk", chunk)):
        if v < 1:
            raise VattnError(f"{opt} must be >= 1, got {v}")
    if admission not in ADMISSIONS:
        raise VattnError(f"--admission must be one of {', '.join(ADMISSIONS)}, got {admission!r}")
    if kv_layout not in ("bhnd", "bnhd"):
        raise VattnError(f"--kv-layout must be bhnd or bnhd, got {kv_layout!r}")
    if budget_gb is not None and not budget_gb > 0:
        raise VattnError(f"--budget-gb must be > 0, got {budget_gb}")
    return dict(model=model, spec=spec, device=device, dtype=dtype, max_len=max_len, max_batch=max_batch,
                budget_bytes=None if budget_gb is None else int(budget_gb * 2**30), seed=seed,
                dense_layers=dense_layers, admission=admission, max_waiting=max_waiting, chunk_tokens=chunk,
                name=name, kv_layout=kv_layout)


def serve_command(
    model: str = typer.Option(None, help="A HF model dir or .gguf (default: the embedded SmolLM2)."),
    spec: str = typer.Option("dense", help="Attention spec of decode steps; a request may send its own (vattn_spec)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_len: int = typer.Option(4096, help="Most tokens per request (prompt + output)."),
    max_batch: int = typer.Option(8, help="Most requests decoding at once (KV slots)."),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when there is one)."),
    dtype: str = typer.Option(None, help="float32, float16 or bfloat16 (default: bf16 on GPU, fp32 on CPU)."),
    budget_gb: float = typer.Option(None, help="KV cache memory budget in GiB (default: what the device has)."),
    admission: str = typer.Option("vmem", help="vmem: admit when the prompt's pages fit; static: reserve "
                                  "max_len per request (the baseline)."),
    max_waiting: int = typer.Option(256, help="Queued requests beyond which new ones get HTTP 429."),
    chunk: int = typer.Option(2048, help="Prefill tokens per engine step (between decode steps)."),
    kv_layout: str = typer.Option("bhnd", help="KV cache layout: bhnd (head-major) or bnhd (token-major: "
                                  "slots grow, and vmem admits, in finer steps; docs/serve.md)."),
    dense_layers: int = typer.Option(None, help="Keep the first N layers dense."),
    name: str = typer.Option(None, "--served-model-name", help="The model name clients send (default: "
                             "smollm2, or the model path's last part)."),
    seed: int = typer.Option(0, help="Seed of sampled requests that send none."),
    ray: bool = typer.Option(False, "--ray", help="Run the engine replicas under Ray Serve."),
    replicas: int = typer.Option(1, help="With --ray: engine replicas (one GPU each on CUDA)."),
    log_level: str = typer.Option("info", help="uvicorn's log level."),
):
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)."""
    from vattn.console import console, fail
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if replicas != 1 and not ray:
            raise VattnError("--replicas needs --ray (one process serves one engine)")
        kw = engine_kwargs(model, spec, device, dtype, max_len, max_batch, budget_gb, seed, dense_layers,
                           admission, max_waiting, chunk, name, kv_layout)
        check_port(host, port)
        if ray:
            from vattn.serve.ray import serve_ray, shutdown
            console.print(f"starting {replicas} replica(s) under Ray Serve on http://{host}:{port}")
            serve_ray(kw, replicas=replicas, host=host, port=port, blocking=False)
            console.print(f"serving on http://{host}:{port}/v1 (Ctrl-C stops)")
            try:
                while True:
                    time.sleep(3600)
            finally:
                shutdown()
            return
        import uvicorn

        from vattn.serve.app import build_app, load_engine
        console.print(f"loading {model or 'the embedded SmolLM2'} ...")
        engine = load_engine(**kw)
        r = engine.runner
        console.print(f"serving {engine.model_name!r} on http://{host}:{port}/v1: spec {r.spec}, device {r.device}, "
                      f"max_len {r.max_len}, max_batch {r.max_batch}, admission {admission}")
        uvicorn.run(build_app(engine), host=host, port=port, log_level=log_level)
    except VattnError as e:
        fail(e)
