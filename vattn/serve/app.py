"""The OpenAI-compatible HTTP server: FastAPI routes over one engine (Runner + Scheduler).

    engine = load_engine(model=None, spec="vattention", max_len=4096)
    app = build_app(engine)                 # uvicorn.run(app) or ServerThread(app).start()

Routes: POST /v1/completions and /v1/chat/completions (streaming SSE and not), GET /v1/models,
/health and /metrics (Prometheus text). The engine loop runs on its own thread (started and
stopped with the app); a request reaches it through `Scheduler.submit` and its tokens come
back through `loop.call_soon_threadsafe` onto the event loop. A client that disconnects has
its requests cancelled (slot freed). Over capacity, requests wait in the scheduler's queue;
past `max_waiting` they get HTTP 429.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from vattn.engine.sampling import SamplingParams
from vattn.engine.scheduler import BadRequest, EngineDown, QueueFull, Request, Scheduler
from vattn.errors import VattnError
from vattn.serve.protocol import ApiError, ChatRequest, CompletionRequest, parse, unsupported

log = logging.getLogger(__name__)


class Engine:
    """A Runner and its Scheduler, as the HTTP side sees them."""

    def __init__(self, runner, *, model_name: str, admission: str = "vmem", max_waiting: int = 256,
                 chunk_tokens: int = 2048, seed: int = 0, idle_trim_s: float | None = 1.0):
        self.runner, self.tokenizer, self.model_name = runner, runner.tokenizer, model_name
        self.spec = runner.spec
        self.scheduler = Scheduler(runner, admission=admission, max_waiting=max_waiting,
                                   chunk_tokens=chunk_tokens, seed=seed, idle_trim_s=idle_trim_s)
        arch = getattr(runner, "arch", None)  # ids the model embeds (the tokenizer may know fewer)
        self.vocab = min(len(self.tokenizer), arch.vocab) if arch is not None else len(self.tokenizer)
        self.created = int(time.time())


def model_name(model) -> str:
    """The name clients send as `model`: the embedded model's, or the path's last part."""
    if model is None or str(model).lower() in ("smollm2", "smollm2-135m", "embedded", "default"):
        return "smollm2"
    return os.path.basename(os.path.normpath(str(model))) or str(model)


def load_engine(model=None, *, spec: str = "dense", device=None, dtype=None, max_len: int = 4096,
                max_batch: int = 8, budget_bytes: int | None = None, seed: int = 0, dense_layers=None,
                admission: str = "vmem", max_waiting: int = 256, chunk_tokens: int = 2048,
                name: str | None = None, kv_layout: str = "bhnd") -> Engine:
    """Load the model into a Runner and wrap it for serving."""
    from vattn.engine.runner import Runner
    runner = Runner(model, spec=spec, device=device, dtype=dtype, max_len=max_len, max_batch=max_batch,
                    budget_bytes=budget_bytes, seed=seed, dense_layers=dense_layers, kv_layout=kv_layout)
    return Engine(runner, model_name=name or model_name(model), admission=admission, max_waiting=max_waiting,
                  chunk_tokens=chunk_tokens, seed=seed)


# ---------------------------------------------------------------- text
class _Text:
    """Incremental detokenization of one choice, cut at the first stop string.

    Each step decodes a short window (from `prefix` on) rather than all ids: the new text is
    what decode(ids[prefix:]) adds to decode(ids[prefix:read]), so a tokenizer that drops a
    leading space at the start of a decode is diffed consistently (vLLM's method)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok, self.stop, self.ids = tokenizer, [s for s in stop if s], []
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may be starting
        self.text, self.sent, self.stopped = "", 0, False
        self.prefix = self.read = 0

    def _decode(self, final: bool = False) -> None:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):  # else: a split character
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        self._decode()
        if self.stop:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self._take(len(self.text))
            return self._take(len(self.text) - self.hold)
        return self._take(len(self.text))

    def flush(self) -> str:
        if not self.stopped:
            self._decode(final=True)
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


def _engine_error(r: Request) -> ApiError:
    if r.error_code in ("kv_out_of_memory", "bad_spec"):
        return ApiError(r.error, 400, param="vattn_spec" if r.error_code == "bad_spec" else None, code=r.error_code)
    return ApiError(r.error or "engine error", 500, code=r.error_code, type="server_error")


class Generation:
    """The scheduler requests of one HTTP request; iterate for (choice, new text, finish reason)."""

    def __init__(self, engine: Engine, reqs: list[Request], stop: list[str]):
        self.engine, self.reqs = engine, reqs
        self.texts = [_Text(engine.tokenizer, stop) for _ in reqs]
        self.reasons: list[str | None] = [None] * len(reqs)
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def callback(i):
            def on_event(r, toks, finished):
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, toks, finished))
            return on_event
        for i, r in enumerate(reqs):
            r.on_event = callback(i)
        done = []
        try:
            for r in reqs:
                engine.scheduler.submit(r)
                done.append(r)
        except QueueFull as e:
            for r in done:
                engine.scheduler.cancel(r.id)
            raise ApiError(str(e), 429, code="queue_full", type="rate_limit_error") from None
        except EngineDown as e:
            raise ApiError(str(e), 503, code="engine_down", type="server_error") from None

    async def __aiter__(self):
        pending = len(self.reqs)
        while pending:
            i, toks, finished = await self.queue.get()
            if self.reasons[i] is not None:
                continue  # already ended by a stop string
            r, text = self.reqs[i], self.texts[i]
            delta = text.add(toks) if toks else ""
            if text.stopped:
                self.engine.scheduler.cancel(r.id, "stop")
                finished, reason = True, "stop"
            elif finished:
                if r.finish_reason == "error":
                    raise _engine_error(r)
                delta += text.flush()
                reason = {"cancelled": "abort"}.get(r.finish_reason, r.finish_reason)
            else:
                reason = None
            if finished:
                self.reasons[i] = reason
                pending -= 1
            if delta or finished:
                yield i, delta, reason

    def close(self) -> None:
        """Cancel what has not finished (a client that went away frees its slots)."""
        for r, reason in zip(self.reqs, self.reasons):
            if reason is None and not r.finished:
                self.engine.scheduler.cancel(r.id)

    def usage(self) -> dict:
        p = sum(r.stats.prompt_tokens for r in self.reqs)
        c = sum(r.stats.output_tokens for r in self.reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def vattn_stats(self) -> list[dict]:
        return [{"spec": r.spec or self.engine.spec, "density": r.stats.density, "ttft_s": r.stats.ttft,
                 "preemptions": r.stats.preemptions} for r in self.reqs]


# ---------------------------------------------------------------- requests
def _check_model(engine: Engine, name: str | None) -> None:
    if name is not None and name != engine.model_name:
        raise ApiError(f"model {name!r} is not served here; this server serves {engine.model_name!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


def _spec(engine: Engine, spec: str | None) -> str | None:
    """The request's spec in canonical form; None when it is the server's (one decode batch)."""
    if spec is None:
        return None
    from vattn.spec import parse as parse_spec
    try:
        text = str(parse_spec(spec))
    except VattnError as e:
        raise ApiError(f"bad vattn_spec {spec!r}: {e}", param="vattn_spec", code="invalid_spec") from None
    return None if text == engine.spec else text


def _ids(engine: Engine, ids: list[int]) -> list[int]:
    bad = [t for t in ids if not 0 <= t < engine.vocab]
    if bad:
        raise ApiError(f"token ids must be in [0, {engine.vocab}); got {bad[:5]}", param="prompt")
    return ids


def _prompts(engine: Engine, prompt) -> list[list[int]]:
    """The completions `prompt`: a string, token ids, or a list of either."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise ApiError("prompt is empty; send a string or a list of token ids", param="prompt")
    return [_ids(engine, p) if isinstance(p, list) else engine.tokenizer(p).input_ids for p in prompt]


def _requests(engine: Engine, body, prompts: list[list[int]], max_tokens: int | None, default_max) -> list[Request]:
    unsupported(body)
    _check_model(engine, body.model)
    spec = _spec(engine, body.vattn_spec)
    out = []
    for ids in prompts:
        n = max_tokens if max_tokens is not None else default_max(len(ids))
        try:  # top_p means nothing when greedy; OpenAI clients may send it anyway
            temperature = 1.0 if body.temperature is None else body.temperature
            top_p = 1.0 if body.top_p is None or temperature == 0 else body.top_p
            params = SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p, seed=body.seed,
                                    stop_token_ids=body.stop_token_ids or (), ignore_eos=body.ignore_eos)
        except VattnError as e:
            field = str(e).split()[0]
            raise ApiError(str(e), param=field if field in type(body).model_fields else None,
                           code="invalid_value") from None
        r = Request(prompt_ids=ids, params=params, spec=spec)
        try:
            engine.scheduler.check(r)
        except BadRequest as e:
            code = "context_length_exceeded" if "max_len" in str(e) else "invalid_value"
            raise ApiError(str(e), param=e.param, code=code) from None
        out.append(r)
    return out


def _stops(body) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


def _chat_prompt(engine: Engine, body: ChatRequest) -> list[int]:
    tok = engine.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ApiError(f"the model {engine.model_name!r} has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    if not body.messages:
        raise ApiError("messages is empty; send at least one message", param="messages")
    msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template's own checks (roles, order) raise its errors
        raise ApiError(f"the chat template rejected the messages: {e}", param="messages") from None
    return tok(text, add_special_tokens=False).input_ids


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client goes away (after the body was read, receive() waits for that)."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _body(request: HttpRequest):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _respond(request: HttpRequest, engine: Engine, gen: Generation, body, chat: bool):
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": engine.model_name}

    def choice(i, text, reason):
        if chat:
            return {"index": i, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text, "logprobs": None, "finish_reason": reason}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                if chat:
                    for i in range(len(gen.reqs)):
                        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                async for i, text, reason in gen:
                    yield _sse({**head, "choices": [choice(i, text, reason)]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": gen.usage()})
            except ApiError as e:
                yield _sse(e.body())
            finally:
                gen.close()
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts, reasons = [""] * len(gen.reqs), [None] * len(gen.reqs)

    async def consume():
        async for i, text, reason in gen:
            texts[i] += text
            reasons[i] = reason
    task, watch = asyncio.ensure_future(consume()), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client went away: nothing to answer
            task.cancel()
            return PlainTextResponse("", status_code=499)
        task.result()  # raises the engine's ApiError
    finally:
        watch.cancel()
        gen.close()
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                    "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        obj = "text_completion"
    return {**head, "object": obj, "choices": choices, "usage": gen.usage(), "vattn": gen.vattn_stats()}


# ---------------------------------------------------------------- metrics
def prometheus(engine: Engine) -> str:
    m = engine.scheduler.metrics()
    rows = [
        ("vattn_requests_running", "gauge", "Requests admitted (prefilling or decoding).", m["running"]),
        ("vattn_requests_waiting", "gauge", "Requests queued for admission.", m["waiting"]),
        ("vattn_requests_running_max", "gauge", "Most requests running at once since start.", m["max_running"]),
        ("vattn_kv_mapped_bytes", "gauge", "KV cache bytes backed by physical memory.", m["kv_mapped_bytes"]),
        ("vattn_kv_used_bytes", "gauge", "KV cache bytes holding live tokens.", m["kv_used_bytes"]),
        ("vattn_tokens_per_second", "gauge", "Output tokens per second over the last 10 s.", m["tokens_per_s"]),
        ("vattn_density", "gauge", "Mean measured attention density of running sparse requests (NaN: none).",
         float("nan") if m["density"] is None else m["density"]),
        ("vattn_running_seconds_total", "counter", "Integral of running requests over time (request-seconds): "
         "its rate is the mean concurrency.", m["running_seconds"]),
        ("vattn_preemptions_total", "counter", "Requests preempted (recomputed later) for KV memory.",
         m["preempted"]),
        ("vattn_prompt_tokens_total", "counter", "Prompt tokens of ended requests.", m["prompt_tokens"]),
        ("vattn_output_tokens_total", "counter", "Output tokens of ended requests.", m["output_tokens"]),
    ]
    if m["kv_budget_bytes"] is not None:
        rows.append(("vattn_kv_budget_bytes", "gauge", "KV cache memory budget.", m["kv_budget_bytes"]))
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP vattn_requests_total Ended requests by outcome.", "# TYPE vattn_requests_total counter"]
    lines += [f'vattn_requests_total{{outcome="{k}"}} {m[k]}' for k in ("finished", "failed", "cancelled")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- app
def build_app(engine: Engine) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.scheduler.start()
        yield
        engine.scheduler.stop()

    app = FastAPI(title="vattn", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("request failed")
        return JSONResponse(ApiError(f"internal error: {type(e).__name__}: {e}", 500, type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if not engine.scheduler.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok", "replica": f"{socket.gethostname()}:{os.getpid()}"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "vattn",
            "max_model_len": engine.runner.max_len, "vocab_size": engine.vocab, "vattn_spec": engine.spec}]}

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        body = parse(CompletionRequest, await _body(request))
        _check_model(engine, body.model)
        reqs = _requests(engine, body, _prompts(engine, body.prompt), body.max_tokens, lambda n: 16)
        return await _respond(request, engine, Generation(engine, reqs, _stops(body)), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        body = parse(ChatRequest, await _body(request))
        _check_model(engine, body.model)
        unsupported(body)
        ids = _chat_prompt(engine, body)
        n = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        reqs = _requests(engine, body, [ids], n, lambda k: max(1, engine.runner.max_len - k))
        return await _respond(request, engine, Generation(engine, reqs, _stops(body)), body, chat=True)

    return app


class ServerThread:
    """uvicorn serving `app` on a background thread; port 0 picks a free port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="vattn-http")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
