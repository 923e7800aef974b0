"""`vattn generate`: greedy generation with a sparse attention spec on a real model.

The prompt is prefilled with dense attention; every generated token uses the spec
(hf.patch with sparse_from = prompt length). Prints the text, then one summary line.
"""
from __future__ import annotations

import time
from pathlib import Path

import typer

from vattn.errors import VattnError


def run(prompt: str, spec: str = "dense", max_new_tokens: int = 64, chat: bool = False,
        device: str = "cpu", dtype: str = "float32", model: str | None = None, metrics: bool = False,
        metrics_out: Path | None = None, dense_layers: int = 0, seed: int = 0, cache: str = "dynamic") -> dict:
    """Generate and return {"text", "prompt_tokens", "new_tokens", "seconds", "summary"}."""
    import torch

    from vattn.hf import cache_keyword, patch
    from vattn.models import context_length, load_model, resolve_device, resolve_dtype
    from vattn.spec import parse

    # Everything the user can get wrong is checked before the (slow) model load.
    parsed = parse(spec)
    resolve_device(device)
    resolve_dtype(dtype)
    if cache not in ("dynamic", "vmem"):
        raise VattnError(f"--cache must be dynamic or vmem, got {cache!r}")
    if max_new_tokens < 1:
        raise VattnError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens == 1 and not parsed.is_dense:
        raise VattnError("the spec never ran: with --max-new-tokens 1 the only new token comes from the dense "
                         "prefill; ask for 2 or more tokens")
    if not prompt or not prompt.strip():
        raise VattnError("the prompt is empty: give it as an argument or with --file")
    mdl, tok = load_model(model, device=device, dtype=dtype)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise VattnError("this model's tokenizer has no chat template; drop --chat")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=not chat).input_ids.to(mdl.device)
    n = ids.shape[1]
    limit = context_length(mdl)
    if limit is not None and n + max_new_tokens > limit:
        raise VattnError(f"the prompt has {n} tokens and {max_new_tokens} new tokens were asked for, but "
                         f"the model's context is {limit} tokens; shorten the prompt or lower --max-new-tokens")
    p = patch(mdl, parsed, dense_layers=dense_layers, metrics=metrics or metrics_out is not None,
              sparse_from=n, seed=seed)
    clock = _Clock()
    kv = None
    if cache == "vmem":  # contiguous virtual K/V buffers, physical pages mapped as they grow
        from vattn.cache.hf import VmemCache
        kv = VmemCache.for_model(mdl, max_batch=1, max_len=n + max_new_tokens)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            out = mdl.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id, streamer=clock,
                               **({} if kv is None else {cache_keyword(mdl): kv}))
        seconds = time.perf_counter() - start
        if not parsed.is_dense:
            p.check_ran()
            if p.sequences != 1:  # method state and sampling seed must live for the whole generation
                raise VattnError(f"method state was rebuilt {p.sequences} times in one generation; "
                                 "vattn lost track of the cache (report this transformers version)")
        if metrics_out is not None:
            p.write_jsonl(metrics_out)
        summary = p.summary()
    finally:
        p.undo()
        if kv is not None:
            kv.close()
    new = out[0, n:]
    first = (clock.times[1] - start) if len(clock.times) > 1 else seconds
    return {"text": tok.decode(new, skip_special_tokens=True), "prompt_tokens": n,
            "new_tokens": int(new.shape[0]), "seconds": seconds, "first_token_seconds": first,
            "summary": summary}


class _Clock:
    """A generate() streamer that only notes when tokens arrive: put #0 is the prompt,
    put #1 the first new token (so the prefill time), then one per decode step."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def summary_line(r: dict, spec: str) -> str:
    s = r["summary"]
    decode = r["seconds"] - r["first_token_seconds"]
    steps = r["new_tokens"] - 1
    parts = [f"{r['new_tokens']} tokens in {r['seconds']:.2f}s",
             f"prefill {r['prompt_tokens']} tokens (dense) {r['first_token_seconds']:.2f}s",
             f"decode {steps / decode:.2f} tok/s" if steps > 0 and decode > 0 else "decode -",
             f"spec {spec}"]
    if s["density"] is not None:
        parts.append(f"mean density {s['density']:.3f}")
    if s["error"] is not None:
        parts.append(f"mean error {s['error']:.4f}")
        parts.append(f"mean recall {s['recall']:.3f}")
    return " | ".join(parts)


def generate_command(
    prompt: str = typer.Argument(None, help="The prompt (or use --file)."),
    file: Path = typer.Option(None, "--file", "-f", help="Read the prompt from this file."),
    spec: str = typer.Option("dense", "--spec", "-s", help="Method spec or preset, e.g. vattention."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    model: str = typer.Option(None, "--model", "-m", help="HF model dir or .gguf (default: embedded SmolLM2)."),
    metrics: bool = typer.Option(False, help="Measure error and mass recall against dense (slower)."),
    metrics_out: Path = typer.Option(None, help="Write per-layer, per-step metrics as JSONL here."),
    dense_layers: int = typer.Option(0, help="Keep the first N layers dense."),
    seed: int = typer.Option(0, help="Seed for sampling parts."),
    cache: str = typer.Option("dynamic", help="KV cache: dynamic (transformers) or vmem (contiguous virtual memory)."),
):
    """Generate text greedily with sparse attention on the generated tokens."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        if prompt is not None and file is not None:
            raise VattnError("give the prompt as an argument or with --file, not both")
        if file is not None:
            if not file.is_file():
                raise VattnError(f"prompt file {file} does not exist")
            prompt = file.read_text()
        if prompt is None:
            raise VattnError("no prompt: give it as an argument or with --file")
        r = run(prompt, spec, max_new_tokens, chat, device, dtype, model, metrics, metrics_out, dense_layers, seed, cache)
    except VattnError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(r["text"])
    typer.echo(summary_line(r, spec))
    if metrics_out is not None:
        typer.echo(f"wrote {metrics_out}")
