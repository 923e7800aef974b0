"""`vattn generate`: generation with a sparse attention spec on a real model.

The prompt is prefilled with dense attention; every generated token uses the spec
(hf.patch with sparse_from = prompt length). Greedy by default; --temperature and
--top-p sample (seeded by --seed). The prompt comes as an argument, from --file, from
stdin (`-` or piped), or many from --batch (one a line, run one after another). Prints
the text (--stream: as it is generated), then one summary line; --json prints one JSON
object a prompt instead.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer

from vattn.errors import VattnError
from vattn.paths import check_writable_file


def check_sampling(temperature: float, top_p: float):
    if not temperature >= 0:
        raise VattnError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise VattnError(f"--top-p must be in (0, 1], got {top_p}")
    if top_p < 1 and temperature == 0:
        raise VattnError("--top-p samples, so it needs --temperature > 0 (e.g. --temperature 0.7)")


def run(prompt: str, spec: str = "dense", max_new_tokens: int = 64, chat: bool = False,
        device: str = "cpu", dtype: str = "float32", model: str | None = None, metrics: bool = False,
        metrics_out: Path | None = None, dense_layers: int = 0, seed: int = 0, cache: str = "dynamic",
        temperature: float = 0.0, top_p: float = 1.0, on_text=None, engine: str = "auto") -> dict:
    """Generate and return {"text", "prompt_tokens", "new_tokens", "seconds", "summary", "engine",
    "fallback"}.

    temperature 0: greedy; else sampling (top_p nucleus), seeded by `seed`.
    on_text(piece): called with each new piece of text as it is generated.
    engine: "auto" = the vattn engine (vattn/engine) when it runs this model and these options,
    else transformers + vattn.patch, saying why in "fallback"; "on" = the engine or an error;
    "off" = transformers + vattn.patch.
    """
    import torch

    from vattn.hf import cache_keyword, patch
    from vattn.models import context_length, load_model, resolve_device, resolve_dtype
    from vattn.spec import parse

    # Everything the user can get wrong is checked before the (slow) model load.
    parsed = parse(spec)
    resolve_device(device)
    resolve_dtype(dtype)
    check_sampling(temperature, top_p)
    if metrics_out is not None:
        check_writable_file(metrics_out, "--metrics-out")
    if cache not in ("dynamic", "vmem", "static"):
        raise VattnError(f"--cache must be dynamic, vmem or static, got {cache!r}")
    if max_new_tokens < 1:
        raise VattnError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if max_new_tokens == 1 and not parsed.is_dense:
        raise VattnError("the spec never ran: with --max-new-tokens 1 the only new token comes from the dense "
                         "prefill; ask for 2 or more tokens")
    if not prompt or not prompt.strip():
        raise VattnError("the prompt is empty: give it as an argument or with --file")
    if engine not in ("auto", "on", "off"):
        raise VattnError(f"--engine must be auto, on or off, got {engine!r}")
    from vattn.engine.model import UnsupportedModel
    fallback = "--engine off" if engine == "off" else engine_misfit(model, device, metrics or metrics_out is not None)
    if fallback is None:
        try:
            return run_engine(prompt, parsed, max_new_tokens, chat, device, dtype, model, dense_layers, seed,
                              temperature, top_p, on_text)
        except UnsupportedModel as e:
            fallback = str(e).split(";")[0]
    if engine == "on":
        raise VattnError(f"--engine on, but the engine cannot run this: {fallback}")
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
    clock = _Clock(tok, on_text)
    kv = None
    if cache == "vmem":  # contiguous virtual K/V buffers, physical pages mapped as they grow
        from vattn.cache.hf import VmemCache
        kv = VmemCache.for_model(mdl, max_batch=1, max_len=n + max_new_tokens)
    try:
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
            torch.manual_seed(seed)
        else:  # the model's generation_config may carry sampling defaults: greedy means greedy
            sampling.update(temperature=None, top_p=None, top_k=None)
        start = time.perf_counter()
        with torch.no_grad():
            out = mdl.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=tok.pad_token_id, streamer=clock, **sampling,
                               **({} if kv is None else {cache_keyword(mdl): kv}),
                               # static: one cache of prompt + new tokens; on CUDA transformers then
                               # compiles the decode step, which the patch runs as one graph
                               **({"cache_implementation": "static"} if cache == "static" else {}))
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
            "summary": summary, "engine": False, "fallback": fallback}


def engine_misfit(model, device, metrics: bool) -> str | None:
    """Why the engine cannot serve this run (None: it can). The architecture of a GGUF file is
    known only once loaded: run_engine raises UnsupportedModel then."""
    from vattn.engine.loader import check_supported
    from vattn.engine.model import UnsupportedModel
    if metrics:
        return "the engine does not measure error and recall (--metrics, --metrics-out)"
    if str(device).startswith("mps"):
        return "the engine's KV cache runs on CPU and CUDA, not MPS"
    try:
        check_supported(model)
    except UnsupportedModel as e:
        return str(e).split(";")[0]
    return None


_ENGINES: dict = {}  # one Runner per model and settings, reused across --batch prompts


def run_engine(prompt, spec, max_new_tokens, chat, device, dtype, model, dense_layers, seed,
               temperature, top_p, on_text) -> dict:
    """`run` on the vattn engine: dense prefill, then one decode step per new token with the
    spec's plan in every sparse layer (CUDA-graphed on a GPU)."""
    from vattn.engine.runner import Runner, next_pow2
    from vattn.engine.sampling import Sampler, SamplingParams
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    key = (str(model), str(device), str(dtype), str(dense_layers), seed)
    r = _ENGINES.get(key)
    if r is None:
        _ENGINES.clear()  # one model in memory at a time
        r = _ENGINES[key] = Runner(model, spec="dense", device=device, dtype=dtype, max_len=4096,
                                   max_batch=1, seed=seed, dense_layers=dense_layers)
    tok = r.tokenizer
    if chat:
        if not getattr(tok, "chat_template", None):
            raise VattnError("this model's tokenizer has no chat template; drop --chat")
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = list(tok(prompt, add_special_tokens=not chat).input_ids)
    n = len(ids)
    limit = r.arch.max_positions
    if limit is not None and n + max_new_tokens > limit:
        raise VattnError(f"the prompt has {n} tokens and {max_new_tokens} new tokens were asked for, but "
                         f"the model's context is {limit} tokens; shorten the prompt or lower --max-new-tokens")
    if n + max_new_tokens > r.max_len:  # a longer run than this Runner holds: a bigger cache (virtual)
        r.close()
        eos = r.eos_ids
        r = _ENGINES[key] = Runner(r.model, spec="dense", device=device, dtype=r.dtype,
                                   max_len=next_pow2(n + max_new_tokens), max_batch=1, seed=seed,
                                   dense_layers=dense_layers, tokenizer=tok)
        r.eos_ids = eos  # a Runner built on a Decoder knows no eos of its own
    sampler = Sampler(params, seed, r.device)
    slot = r.alloc()
    out, shown, times = [], "", []
    try:
        start = time.perf_counter()
        logits = r.prefill(slot, ids)
        plan = r.plan(spec)
        for i in range(max_new_tokens):
            if not i:
                nxt = sampler(logits)
            elif sampler.gen is None:  # greedy: the step's own argmax
                nxt = r.decode([slot], [out[-1]], spec=spec, greedy=True)[0]
            else:
                nxt = sampler(r.decode([slot], [out[-1]], spec=spec)[0])
            out.append(int(nxt))
            times.append(time.perf_counter())
            if on_text is not None:
                text = tok.decode(out, skip_special_tokens=True)
                if not text.endswith("\ufffd") and text.startswith(shown):
                    on_text(text[len(shown):])
                    shown = text
            if out[-1] in r.eos_ids:
                break
        seconds = time.perf_counter() - start
        density = r.density(slot)
    finally:
        r.free(slot)
    if not spec.is_dense and density is None:
        raise VattnError("the spec never ran: the only new token came from the dense prefill")
    sparse = 0 if spec.is_dense else sum(1 for i in range(r.arch.layers) if r.sparse_layer(i, plan))
    summary = {"density": density if density is not None else 1.0, "error": None, "recall": None,
               "calls": (len(out) - 1) * sparse, "never_ran": None,
               "path": "dense" if plan is None else plan.path}
    return {"text": tok.decode(out, skip_special_tokens=True), "prompt_tokens": n, "new_tokens": len(out),
            "seconds": seconds, "first_token_seconds": times[0] - start, "summary": summary,
            "engine": True, "fallback": None}


class _Clock:
    """A generate() streamer that notes when tokens arrive: put #0 is the prompt, put #1
    the first new token (so the prefill time), then one per decode step. With on_text it
    also hands on each new piece of decoded text."""

    def __init__(self, tok=None, on_text=None):
        self.times, self.tok, self.on_text = [], tok, on_text
        self.ids, self.shown = [], ""

    def put(self, value):
        self.times.append(time.perf_counter())
        if self.on_text is None or len(self.times) == 1:  # the first put is the prompt
            return
        self.ids += value.reshape(-1).tolist()
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if text.startswith(self.shown):
            self.on_text(text[len(self.shown):])
        self.shown = text

    def end(self):
        pass


def summary_line(r: dict, spec: str) -> str:
    s = r["summary"]
    decode = r["seconds"] - r["first_token_seconds"]
    steps = r["new_tokens"] - 1
    parts = [f"{r['new_tokens']} tokens in {r['seconds']:.2f}s",
             f"prefill {r['prompt_tokens']} tokens (dense) {r['first_token_seconds']:.2f}s",
             f"decode {steps / decode:.2f} tok/s" if steps > 0 and decode > 0 else "decode -",
             f"spec {spec}", f"sparse calls {s['calls']} ({s.get('path') or '-'} path)",
             "vattn engine" if r.get("engine") else
             f"transformers + vattn.patch ({r['fallback']})" if r.get("fallback") else "transformers + vattn.patch"]
    if s["density"] is not None:
        parts.append(f"mean density {s['density']:.3f}")
    if s["error"] is not None:
        parts.append(f"mean error {s['error']:.4f}")
        parts.append(f"mean recall {s['recall']:.3f}")
    return " | ".join(parts)


def read_prompts(prompt: str | None, file: Path | None, batch: Path | None, stdin=None) -> list[str]:
    """The prompts to run: the argument, --file, stdin (`-` or piped) or --batch's lines."""
    stdin = stdin or sys.stdin
    given = [x for x in (prompt is not None and "prompt argument", file is not None and "--file",
                         batch is not None and "--batch") if x]
    if len(given) > 1:
        raise VattnError(f"give the prompt one way, not {' and '.join(given)}")

    def read(path: Path, what: str) -> str:
        if str(path) == "-":
            return stdin.read()
        if not path.is_file():
            raise VattnError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
        return path.read_text()

    if batch is not None:
        prompts = [line for line in read(batch, "--batch file").splitlines() if line.strip()]
        if not prompts:
            raise VattnError(f"--batch {batch} holds no prompts; write one prompt a line")
        return prompts
    if file is not None:
        return [read(file, "prompt file")]
    if prompt == "-" or (prompt is None and not stdin.isatty()):
        prompt = stdin.read()
        if not prompt.strip():
            raise VattnError("no prompt: stdin was empty; give it as an argument, with --file or on stdin")
    if prompt is None:
        raise VattnError("no prompt: give it as an argument, with --file, on stdin (-) or with --batch")
    return [prompt]


def generate_command(
    prompt: str = typer.Argument(None, help="The prompt; `-` (or a pipe) reads it from stdin."),
    file: Path = typer.Option(None, "--file", "-f", help="Read the prompt from this file (`-`: stdin)."),
    batch: Path = typer.Option(None, "--batch", "-b", help="Run each line of this file as a prompt, one after another (`-`: stdin)."),
    spec: str = typer.Option("dense", "--spec", "-s", help="Method spec or preset, e.g. vattention."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", "-T", help="0: greedy; > 0: sample at this temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling: keep the smallest token set with this probability (needs --temperature > 0)."),
    seed: int = typer.Option(0, help="Seed for sampling (--temperature) and for the spec's sampling parts."),
    stream: bool = typer.Option(False, "--stream", help="Print the text as it is generated."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object per prompt (text, tokens, times, metrics) instead."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help="float32 (fp32), float16 (fp16) or bfloat16 (bf16)."),
    model: str = typer.Option(None, "--model", "-m", help="HF model dir or .gguf (default: embedded SmolLM2)."),
    metrics: bool = typer.Option(False, help="Measure error and mass recall against dense (slower)."),
    metrics_out: Path = typer.Option(None, help="Write per-layer, per-step metrics as JSONL here."),
    dense_layers: int = typer.Option(0, help="Keep the first N layers dense."),
    cache: str = typer.Option("dynamic", help="KV cache of the transformers path: dynamic, vmem (contiguous virtual memory) or static (on CUDA transformers compiles the decode step: one CUDA graph, a compile of ~30 s first); the engine always uses vmem."),
    engine: str = typer.Option("auto", help="auto: the vattn engine when it runs the model (Llama, Qwen2/3, Mistral, Gemma 3), else transformers + vattn.patch; on; off."),
):
    """Generate text with sparse attention on the generated tokens (greedy unless --temperature)."""
    try:
        if stream and json_out:
            raise VattnError("--stream and --json do not mix; drop one")
        check_sampling(temperature, top_p)
        prompts = read_prompts(prompt, file, batch)
        if metrics_out is not None:
            if len(prompts) > 1:
                raise VattnError("--metrics-out takes one prompt; run --batch without it, or one prompt at a time")
            check_writable_file(metrics_out, "--metrics-out")
        from vattn.console import quiet_warnings
        quiet_warnings()
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        for text in prompts:
            on_text = (lambda piece: typer.echo(piece, nl=False)) if stream else None
            r = run(text, spec, max_new_tokens, chat, device, dtype, model, metrics, metrics_out, dense_layers,
                    seed, cache, temperature, top_p, on_text, engine)
            if json_out:
                typer.echo(json.dumps({"prompt": text, "spec": spec, **{k: r[k] for k in (
                    "text", "prompt_tokens", "new_tokens", "seconds", "first_token_seconds", "summary", "engine",
                    "fallback")}}))
                continue
            typer.echo("" if stream else r["text"])
            typer.echo(summary_line(r, spec))
    except VattnError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if metrics_out is not None and not json_out:
        typer.echo(f"wrote {metrics_out}")
