"""Continuous batching over a Runner: waiting and running queues, admission by KV memory,
chunked prefill interleaved with decode steps, preemption by recompute, cancellation.

    sched = Scheduler(runner, spec="vattention")
    sched.start()                                   # the engine loop, one background thread
    sched.submit(Request(prompt_ids=ids, params=SamplingParams(max_tokens=64), on_event=callback))
    sched.cancel(request_id)

One `step()`:
  1. new requests join `waiting`; cancelled ones end (their slot is freed);
  2. admission, first come first served: with admission="vmem" a request is admitted when
     its prompt's pages can be mapped now (`runner.fits`), not when a max-length slot is
     free; admission="static" reserves max_len per request (capacity = budget // one slot
     at max_len), the baseline a static KV allocation gives at equal memory;
  3. one decode step for every request past its prefill (one runner call per spec);
  4. up to `chunk_tokens` prompt tokens of prefill (long prompts take several steps, so
     running requests keep decoding meanwhile).
The rules, as vLLM has them: a stop token (the request's stop ids, or the model's eos) ends a
request; it is kept in `output_ids` (vLLM's token_ids) but no event carries it, so no text shows
it. A request ends with "length" at max_tokens or when prompt + output reach max_len; what
happens to a request whose prompt + max_tokens exceeds max_len is the one option `over_len`:
"refuse" (the server: `check` raises BadRequest, HTTP 400) or "clip" (`vattn.LLM`: it runs and
ends with "length" at max_len).
With vmem admission the prompt's pages are mapped at admission, so a prefill does not run
out of memory half-way. When a decode step's growth cannot be mapped, the latest admitted
request is preempted: its slot is freed and it goes back to the front of `waiting` with
prompt + generated tokens, which are prefilled again (recompute) once a running request
has ended (admitting it sooner would only preempt it again). A request that does not fit
even alone ends with an error; the loop never dies on a request's failure.

Events reach the caller through `Request.on_event(request, new_token_ids, finished)`,
called on the engine thread: keep it short (hand over to another thread or event loop).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from vattn.cache.vmem import VattnOutOfMemory
from vattn.engine.runner import StepIds
from vattn.engine.sampling import Sampler, SamplingParams
from vattn.errors import VattnError

log = logging.getLogger(__name__)

ADMISSIONS = ("vmem", "static")
OVER_LEN = ("refuse", "clip")  # prompt + max_tokens > max_len: HTTP 400 (vLLM's server), or end at max_len (its LLM)
# KV pages that cannot be mapped, or a step's activations that the device cannot hold (the KV
# took the memory): both are handled by preempting, not by failing the request.
OUT_OF_MEMORY = (VattnOutOfMemory, torch.OutOfMemoryError)


class BadRequest(VattnError):
    """A request that can never run here; `param` names the field to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class EngineDown(Exception):
    """The engine loop has stopped (a bug or a broken device): no request can run."""


class QueueFull(Exception):
    """The waiting queue is at its limit: the caller should retry later (HTTP 429)."""


@dataclass
class RequestStats:
    arrival: float = 0.0
    admitted: float | None = None      # first admission
    first_token: float | None = None
    finished: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    density: float | None = None       # measured by the runner for this request's slot

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.finished is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)  # max_tokens, sampling, stop ids
    spec: str | None = None            # None: the runner's spec
    on_event: Callable[["Request", list, bool], None] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # engine state
    output_ids: list = field(default_factory=list)
    slot: int | None = None
    done: int = 0                      # tokens of `tokens` already in the slot's KV
    prefilling: bool = True
    finish_reason: str | None = None   # "stop", "length", "cancelled" or "error"
    error: str | None = None
    error_code: str | None = None
    stats: RequestStats = field(default_factory=RequestStats)
    sampler: Sampler | None = None
    stop_ids: frozenset = frozenset()  # ids that end it (kept in output_ids, never in an event): params' and eos

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def text_ids(self) -> list[int]:
        """output_ids less the stop token that ended it: the ids the text shows."""
        return self.output_ids[:-1] if self.output_ids and self.output_ids[-1] in self.stop_ids else self.output_ids

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    """Continuous batching on one Runner. `submit`/`cancel`/`metrics` are thread-safe; everything
    else runs on the engine thread (`start()`), or call `step()` yourself (tests)."""

    def __init__(self, runner, *, spec: str | None = None, chunk_tokens: int = 2048, admission: str = "vmem",
                 max_waiting: int = 256, eos_ids=None, seed: int = 0, idle_trim_s: float | None = None,
                 over_len: str = "refuse"):
        if admission not in ADMISSIONS:
            raise VattnError(f"admission must be one of {', '.join(ADMISSIONS)}, got {admission!r}")
        if over_len not in OVER_LEN:
            raise VattnError(f"over_len must be one of {', '.join(OVER_LEN)}, got {over_len!r}")
        if chunk_tokens < 1:
            raise VattnError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        if max_waiting < 1:
            raise VattnError(f"max_waiting must be >= 1, got {max_waiting}")
        self.runner, self.spec, self.chunk, self.admission = runner, spec, chunk_tokens, admission
        self.max_waiting, self.over_len = max_waiting, over_len
        self.idle_trim_s = idle_trim_s  # give cached KV pages back after this long idle (None: keep them)
        self.eos_ids = frozenset(runner.eos_ids if eos_ids is None else eos_ids)
        self.capacity = self._static_capacity() if admission == "static" else runner.max_batch
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []   # admission order: the last is preempted first
        self._inbox: list[Request] = []
        self.dead: str | None = None  # why the engine loop stopped, once it has
        self._cancels: dict[str, str] = {}  # id -> finish reason
        self._cv = threading.Condition()
        self._seeds = itertools.count(seed)
        self._thread: threading.Thread | None = None
        self._stop = False
        # counters (engine thread writes; metrics() reads)
        self.counts = {"finished": 0, "failed": 0, "cancelled": 0, "preempted": 0,
                       "prompt_tokens": 0, "output_tokens": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, output tokens) of the last steps
        self._density, self._density_t = None, 0.0
        self.max_running = 0
        self._hold = False                # after a preemption: admit nothing until a running request ends
        self._running_s = 0.0             # integral of len(running) over time: request-seconds
        self._last_t = time.perf_counter()
        self._pending: dict = {}          # spec -> (requests, device ids): a decode step not read back yet

    def _static_capacity(self) -> int:
        st = self.runner.kv.stats()
        per_request = st.static_bytes // self.runner.max_batch  # one slot at max_len
        if st.budget_bytes is None:
            return self.runner.max_batch
        cap = min(self.runner.max_batch, st.budget_bytes // per_request)
        if cap < 1:
            raise VattnError(f"static admission: one request at max_len={self.runner.max_len} needs "
                             f"{per_request / 2**20:.1f} MiB of KV, more than the budget "
                             f"{st.budget_bytes / 2**20:.1f} MiB; raise the budget or lower max_len")
        return cap

    # ------------------------------------------------------------ any thread
    def check(self, req: Request) -> None:
        """Raise BadRequest saying what to change if `req` can never run here."""
        n, max_len = len(req.prompt_ids), self.runner.max_len
        if n == 0:
            raise BadRequest("the prompt is empty; send at least one token", "prompt")
        if n >= max_len:
            raise BadRequest(f"the prompt has {n} tokens but max_len is {max_len} (prompt + output); "
                             "shorten the prompt or raise max_len (LLM(max_len=...), vattn serve --max-len)", "prompt")
        m = req.params.max_tokens
        if n + m > max_len and self.over_len == "refuse":  # "clip": it ends with "length" at max_len
            raise BadRequest(f"the prompt has {n} tokens and max_tokens is {m}, together more "
                             f"than max_len {max_len}; lower max_tokens to at most {max_len - n}", "max_tokens")

    def submit(self, req: Request) -> None:
        """Queue a request. Raises VattnError (bad request) or QueueFull (retry later)."""
        self.check(req)
        with self._cv:
            if self.dead:
                raise EngineDown(f"{self.dead}; restart the server")
            if len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; retry later")
            req.stats.arrival = time.perf_counter()
            req.stats.prompt_tokens = len(req.prompt_ids)
            self._inbox.append(req)
            self._cv.notify()

    def cancel(self, request_id: str, reason: str = "cancelled") -> None:
        """End a request (waiting or running) and free its slot; unknown or finished ids are ignored.
        reason "stop": the caller found a stop string (the request counts as finished)."""
        with self._cv:
            self._cancels.setdefault(request_id, reason)
            self._cv.notify()

    def has_work(self) -> bool:
        with self._cv:
            return bool(self._inbox or self._cancels or self.waiting or self.running)

    def metrics(self) -> dict:
        """A snapshot for /metrics: queue sizes, KV memory, throughput, density."""
        now = time.perf_counter()
        with self._cv:
            recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
            out = {"running": len(self.running), "waiting": len(self.waiting) + len(self._inbox),
                   "max_running": self.max_running, **self.counts, "density": self._density,
                   "running_seconds": self._running_s + len(self.running) * (now - self._last_t)}
        st = self.runner.kv.stats()
        out.update(kv_mapped_bytes=st.mapped_bytes, kv_used_bytes=st.used_bytes,
                   kv_budget_bytes=st.budget_bytes)
        out["tokens_per_s"] = sum(n for _, n in recent) / 10.0 if recent else 0.0
        return out

    # ------------------------------------------------------------ the loop
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="vattn-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _idle(self) -> bool:
        return not (self._inbox or self._cancels or self.waiting or self.running)

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the loop itself broke: fail every request, so no client waits forever
            log.exception("the engine loop stopped")
            self.dead = f"the engine loop stopped: {type(e).__name__}: {e}"
            with self._cv:
                pending = self._inbox + list(self.waiting) + list(self.running)
                self._inbox = []
            for r in pending:
                try:
                    self._finish(r, "error", self.dead, "engine_error")
                except Exception:  # the runner may be what broke: the client still gets its error
                    r.slot = None
                    r.finish_reason, r.error, r.error_code = "error", self.dead, "engine_error"
                    self._event(r, [], True)

    def _serve(self) -> None:
        dev = getattr(self.runner, "device", None)
        if dev is not None and dev.type == "cuda":  # a new thread starts on cuda:0; graphs use the current device
            torch.cuda.set_device(dev.index if dev.index is not None else torch.cuda.current_device())
        trimmed = True
        while True:
            trim = False
            with self._cv:
                while not self._stop and self._idle() and not trim:
                    if trimmed or self.idle_trim_s is None:
                        self._cv.wait()
                    elif not self._cv.wait(self.idle_trim_s) and self._idle():
                        trim = True
                if self._stop:
                    break
            if trim:  # idle for a while: freed slots' pages go back to the device
                self.runner.kv.trim()
                trimmed = True
                continue
            trimmed = False
            try:
                self.step()
            except Exception as e:  # a bug must not take the server down: fail what was in flight
                log.exception("engine step failed")
                victims = list(self.running) or list(itertools.islice(self.waiting, 1))
                for r in victims:
                    self._finish(r, "error", f"engine error: {type(e).__name__}: {e}", "engine_error")
        for r in list(self.running) + list(self.waiting):
            self._finish(r, "cancelled")

    # ------------------------------------------------------------ engine thread
    def step(self) -> bool:
        """One iteration; returns False when there was nothing to do."""
        self._drain()
        now = time.perf_counter()
        with self._cv:  # the running set only changes inside steps
            self._running_s += len(self.running) * (now - self._last_t)
            self._last_t = now
        self._admit()
        if not self.running:
            self.flush()  # steps of requests cancelled since they launched
            return False
        new_tokens = self._decode() + self._prefill()
        now = time.perf_counter()
        densities = None
        if now - self._density_t > 1.0:  # density() reads device counters: not every step
            self._density_t = now
            densities = [d for d in (self.runner.density(r.slot) for r in self.running if r.slot is not None)
                         if d is not None]
        with self._cv:
            self._recent.append((now, new_tokens))
            while self._recent and now - self._recent[0][0] > 10.0:
                self._recent.popleft()
            if densities:
                self._density = sum(densities) / len(densities)
        return True

    def _drain(self) -> None:
        with self._cv:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, {}
        for r in inbox:
            p = r.params
            seed = next(self._seeds)  # drawn for every request: the k-th submitted defaults to seed + k
            r.sampler = Sampler(p, seed if p.seed is None else p.seed, self.runner.device)
            r.stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_ids)
            self.waiting.append(r)
        if cancels:
            for r in [r for r in list(self.running) + list(self.waiting) if r.id in cancels]:
                self._finish(r, cancels[r.id])

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.capacity:
            if self._hold and self.running:
                break  # memory ran out: wait until a running request ends (no admit-preempt thrashing)
            self._hold = False
            r = self.waiting[0]
            vmem = self.admission == "vmem"
            if vmem and self.running and not self.runner.fits(len(r.tokens) + 1):
                break  # first come first served: nobody overtakes the head
            try:
                r.slot = self.runner.alloc()
            except VattnError:
                break
            if vmem:  # map the prompt's pages now, so that the next admission sees them taken
                try:
                    self.runner.kv.grow([r.slot], len(r.tokens))
                except VattnOutOfMemory:
                    if self.running:
                        self.runner.free(r.slot)
                        r.slot = None
                        break
                    # Alone: admit anyway, so that a request too large for memory fails instead of waiting.
                    self._hold = True
            self.waiting.popleft()
            r.done, r.prefilling = 0, True
            if r.stats.admitted is None:
                r.stats.admitted = time.perf_counter()
            self.running.append(r)
        self.max_running = max(self.max_running, len(self.running))

    def _decode(self) -> int:
        """One decode step per spec group, launched before the previous step's tokens are read
        back: the step takes them on the device, so the host's work (reading, emitting, the next
        launch) runs while the GPU computes. A request that stopped in the step being read was
        also in the step just launched; that step's token for it is dropped."""
        groups: dict = {}
        for r in self.running:
            if not r.prefilling:
                groups.setdefault(r.spec, []).append(r)
        stale = [spec for spec in self._pending if spec not in groups]  # groups with no request left to step
        n = sum(self._read(self._pending.pop(spec)) for spec in stale)
        return n + sum(self._decode_group(spec, batch) for spec, batch in groups.items())

    def flush(self) -> int:
        """Read back every decode step still in flight; returns the tokens emitted."""
        n = 0
        for spec in list(self._pending):
            n += self._read(self._pending.pop(spec))
        return n

    def _decode_group(self, spec, batch) -> int:
        prev = self._pending.pop(spec, None)  # (requests, device ids) of this group's last step, unread
        n = 0
        while True:
            inflight = {id(r): i for i, r in enumerate(prev[0])} if prev else {}
            batch = [r for r in batch if r.slot is not None and not r.finished and self._room(r, id(r) in inflight)]
            if not batch:
                break
            greedy = all(r.sampler.gen is None for r in batch)  # then the step's own argmax (in its graph)
            try:
                out = self.runner.decode([r.slot for r in batch], self._inputs(batch, prev, inflight), spec=spec,
                                         greedy=greedy)
            except OUT_OF_MEMORY as e:
                n, prev = n + self._read(prev), None  # settle the step in flight first
                self._preempt_for(batch[0], e)  # frees a slot (or fails a lone request); retry
                continue
            except Exception as e:
                log.exception("decode failed")
                n, prev = n + self._read(prev), None
                for r in batch:
                    self._finish(r, "error", f"decode failed: {type(e).__name__}: {e}", "engine_error")
                break
            toks = out if greedy else torch.stack([r.sampler(out[i]).reshape(()) for i, r in enumerate(batch)])
            n, prev = n + self._read(prev), None  # the step before, while this one runs
            self._pending[spec] = (batch, StepIds(toks))  # its copy to the host queued before the next step
            break
        return n + self._read(prev)

    def _room(self, r: Request, inflight: bool) -> bool:
        """Whether r takes another decode step: its token in flight (if any) would not end it by length."""
        k = len(r.output_ids) + inflight
        return k < r.params.max_tokens and len(r.prompt_ids) + k < self.runner.max_len

    def _inputs(self, batch, prev, inflight):
        """The step's input ids: host ids where known, else the previous step's ids on the device."""
        host = [(r.output_ids or r.prompt_ids)[-1] for r in batch]  # (r.tokens copies the prompt)
        at = [(j, inflight[id(r)]) for j, r in enumerate(batch) if id(r) in inflight]
        if not at:
            return host
        ids = prev[1].ids
        if len(at) == len(batch) == len(ids) and all(j == i for j, i in at):
            return ids  # the same batch as the step before: its ids as they are
        dev = ids.device
        out = torch.tensor(host, dtype=torch.long).to(dev, non_blocking=True)
        dst, src = (torch.tensor(x, dtype=torch.long).to(dev, non_blocking=True) for x in zip(*at))
        return out.index_copy_(0, dst, ids.index_select(0, src))

    def _read(self, pending) -> int:
        """Emit a launched step's tokens (one host sync for the batch); requests that ended since drop theirs."""
        if pending is None:
            return 0
        batch, toks = pending
        n = 0
        for r, tok in zip(batch, toks.tolist()):
            if r.finished or r.slot is None or r.prefilling:  # ended, or preempted (and maybe readmitted) since
                continue
            r.done += 1
            self._emit(r, tok)
            n += 1
        return n

    def _prefill(self) -> int:
        budget, n = self.chunk, 0
        for r in list(self.running):
            if budget <= 0:
                break
            if not r.prefilling or r.slot is None:
                continue
            toks = r.tokens
            chunk = toks[r.done:r.done + budget]
            try:
                logits = self.runner.prefill(r.slot, chunk, start=r.done, spec=r.spec)
            except OUT_OF_MEMORY as e:
                self._preempt_for(r, e)
                break  # memory changed: the next step decides again
            except Exception as e:
                log.exception("prefill failed")
                code = "bad_spec" if isinstance(e, VattnError) else "engine_error"
                self._finish(r, "error", f"prefill failed: {e}", code)
                continue
            r.done += len(chunk)
            budget -= len(chunk)
            if r.done == len(toks):
                r.prefilling = False
                self._emit(r, int(r.sampler(logits)))
                n += 1
        return n

    def _preempt_for(self, r: Request, err: Exception) -> bool:
        """Out of memory while serving `r`: preempt the latest admitted request, or fail `r`
        when it runs alone (it cannot fit). Returns whether `r` itself is still running."""
        if len(self.running) <= 1:
            self._finish(r, "error", f"this request needs more KV memory than the server has ({err}); "
                         "shorten the prompt or lower max_tokens", "kv_out_of_memory")
            return False
        victim = self.running[-1]
        log.info("KV memory full: preempting request %s (%d tokens, recomputed later)", victim.id, len(victim.tokens))
        self.runner.free(victim.slot)
        victim.slot, victim.done, victim.prefilling = None, 0, True
        victim.stats.preemptions += 1
        self.running.remove(victim)
        self.waiting.appendleft(victim)
        self._hold = True
        with self._cv:
            self.counts["preempted"] += 1
        return victim is not r

    def _emit(self, r: Request, tok: int) -> None:
        now = time.perf_counter()
        if r.stats.first_token is None:
            r.stats.first_token = now
        r.output_ids.append(tok)
        r.stats.output_tokens = len(r.output_ids)
        if tok in r.stop_ids:  # in output_ids (vLLM's token_ids) but never in the text: no event carries it
            self._finish(r, "stop")
            return
        self._event(r, [tok], False)
        if len(r.output_ids) >= r.params.max_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.runner.max_len:
            self._finish(r, "length")

    def _event(self, r: Request, toks: list, finished: bool) -> None:
        if r.on_event is None:
            return
        try:
            r.on_event(r, toks, finished)
        except Exception:
            log.exception("on_event callback failed for request %s", r.id)

    def _finish(self, r: Request, reason: str, error: str | None = None, code: str | None = None) -> None:
        if r.finished:
            return
        if r.slot is not None:
            r.stats.density = self.runner.density(r.slot)
            self.runner.free(r.slot)
            r.slot = None
        if r in self.running:
            self.running.remove(r)
            self._hold = False  # its memory is free again
        elif r in self.waiting:
            self.waiting.remove(r)
        r.finish_reason, r.error, r.error_code = reason, error, code
        r.stats.finished = time.perf_counter()
        key = {"error": "failed", "cancelled": "cancelled"}.get(reason, "finished")
        with self._cv:
            self.counts[key] += 1
            self.counts["prompt_tokens"] += r.stats.prompt_tokens
            self.counts["output_tokens"] += r.stats.output_tokens
        self._event(r, [], True)
