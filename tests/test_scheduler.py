"""Scheduler: admission by KV memory, chunked prefill, preemption by recompute, cancellation.

FakeRunner keeps the Runner contract on a real vmem KVCache (CPU), so memory, budget and
out-of-memory behaviour are the cache's own. Its toy model reads the cache: the next token
is a position-weighted sum of the tokens stored in the slot, mod V. A wrong recompute after a preemption
(or tokens written to the wrong place) changes every later token.
"""
import threading

import pytest
import torch

from vattn.cache.kv import KVCache
from vattn.cache.vmem import VattnOutOfMemory
from vattn.engine.sampling import SamplingParams
from vattn.engine.scheduler import QueueFull, Request, Scheduler
from vattn.errors import VattnError


class _Tok:
    eos_token_id = None


def req(prompt, max_tokens, spec=None, on_event=None, **params):
    return Request(prompt_ids=list(prompt), params=SamplingParams(max_tokens=max_tokens, **params), spec=spec,
                   on_event=on_event)


class FakeRunner:
    """Runner contract (alloc/free/fits/prefill/decode/length/density) over a 1-layer KVCache whose
    pages hold one token each (granule 4 KiB = 1024 float32), so budgets count tokens."""

    def __init__(self, max_len=64, max_batch=4, budget_tokens=None, vocab=128, tokenizer=None, fail_on=None):
        self.max_len, self.max_batch, self.V = max_len, max_batch, vocab
        self.tokenizer = tokenizer or _Tok()
        eos = self.tokenizer.eos_token_id
        self.eos_ids = frozenset() if eos is None else frozenset([eos])
        self.device = torch.device("cpu")
        self.spec = "dense"
        self.kv = KVCache(1, max_batch, max_len, 1, 1024, dtype=torch.float32, granule=4096, ahead_tokens=0,
                          budget_bytes=None if budget_tokens is None else budget_tokens * 8192)
        self.fail_on = fail_on      # a token id whose prefill raises (an engine bug)
        self.calls = []             # ("prefill"|"decode", slots, n tokens, spec)
        self._spec = {}
        self._len = {}  # tokens written per slot (the cache's own length counts mapped-ahead tokens)

    def alloc(self):
        s = self.kv.alloc()
        self._len[s] = 0
        return s

    def free(self, slot):
        self.kv.free(slot)
        del self._len[slot]

    def _free_pages(self):
        st = self.kv.stats()
        if st.budget_bytes is None:
            return 1 << 30
        return st.budget_bytes // st.page_bytes - st.pages_mapped + st.pages_cached

    def fits(self, n):
        return n <= self._free_pages()

    def _next(self, slot):
        n = self._len[slot]
        return toy_next(self.kv.k(0)[slot, 0, :n, 0].long().tolist(), self.V)

    def _logits(self, tok):
        out = torch.full((self.V,), -1e9)
        out[tok] = 0.0
        return out

    def prefill(self, slot, ids, start=0, spec=None):
        if start != self._len[slot]:
            raise RuntimeError(f"prefill at {start} but slot {slot} holds {self._len[slot]} tokens")
        if self.fail_on in ids:
            raise RuntimeError("poisoned token")
        self.kv.grow([slot], start + len(ids))
        self.kv.k(0)[slot, 0, start:start + len(ids), 0] = torch.tensor(ids, dtype=torch.float32)
        self._len[slot] = start + len(ids)
        self._spec[slot] = spec
        self.calls.append(("prefill", [slot], len(ids), spec))
        return self._logits(self._next(slot))

    def decode(self, slots, tokens, spec=None, greedy=False):
        if len(slots) > self._free_pages():  # all or nothing, like the real runner
            raise VattnOutOfMemory(f"need {len(slots)} pages")
        self.calls.append(("decode", list(slots), len(slots), spec))
        out = []
        for s, t in zip(slots, tokens):
            n = self._len[s]
            self.kv.grow([s], n + 1)
            self.kv.k(0)[s, 0, n, 0] = float(t)
            self._len[s] = n + 1
            out.append(self._logits(self._next(s)))
        out = torch.stack(out)
        return out.argmax(-1) if greedy else out

    def length(self, slot):
        return self._len[slot]

    def density(self, slot):
        return None if self._spec.get(slot) in (None, "dense") else 0.25


def toy_next(toks, V=128):
    return (sum((i + 1) * t for i, t in enumerate(toks)) + len(toks)) % V


def expected(prompt, n, V=128):
    """What the toy model generates greedily."""
    toks = list(prompt)
    for _ in range(n):
        toks.append(toy_next(toks, V))
    return toks[len(prompt):]


def run_all(sched, reqs, limit=10_000):
    for r in reqs:
        sched.submit(r)
    for _ in range(limit):
        if not sched.step() and not sched.has_work():
            return
    raise AssertionError("scheduler did not finish")


def test_outputs_and_memory_back():
    runner = FakeRunner()
    sched = Scheduler(runner, chunk_tokens=8)
    reqs = [req([i + 1] * (3 + 5 * i), 6) for i in range(3)]
    run_all(sched, reqs)
    for r in reqs:
        assert r.output_ids == expected(r.prompt_ids, 6)
        assert r.finish_reason == "length" and r.stats.ttft is not None and r.stats.output_tokens == 6
    st = runner.kv.stats()
    assert st.slots_in_use == 0 and st.used_bytes == 0
    assert sched.counts["finished"] == 3 and sched.counts["output_tokens"] == 18


def test_decode_launches_before_the_step_before_is_read():
    """A decode step takes the previous step's ids on the device (a tensor, not host ints): the host
    reads a step's tokens while the next one runs, and the last step is read when the request ends."""
    runner = FakeRunner()
    log = []
    decode = runner.decode

    def spy(slots, tokens, spec=None, greedy=False):
        log.append(("decode", type(tokens).__name__, greedy))
        return decode(slots, tokens, spec, greedy)
    runner.decode = spy
    r = req([3, 4, 5], 5, on_event=lambda r, toks, fin: log.extend(("token", t) for t in toks))
    run_all(Scheduler(runner), [r])
    out = expected([3, 4, 5], 5)
    assert r.output_ids == out and r.finish_reason == "length"
    assert log == [("token", out[0]), ("decode", "list", True), ("decode", "Tensor", True), ("token", out[1]),
                   ("decode", "Tensor", True), ("token", out[2]), ("decode", "Tensor", True), ("token", out[3]),
                   ("token", out[4])]  # greedy: the runner's own argmax
    assert runner.kv.stats().slots_in_use == 0


def test_a_stopped_request_drops_the_step_already_launched():
    """A stop token read while the next step runs: that step's token is dropped, its batch mates go on."""
    tok = _Tok()
    out = expected([5, 7], 8)
    tok.eos_token_id = out[2]
    runner = FakeRunner(tokenizer=tok)
    a, b = req([5, 7], 8), req([5, 7], 8, ignore_eos=True)
    run_all(Scheduler(runner), [a, b])
    assert a.finish_reason == "stop" and a.output_ids == out[:3]
    assert b.finish_reason == "length" and b.output_ids == out
    assert runner.kv.stats().slots_in_use == 0


def test_chunked_prefill_interleaves_with_decode():
    runner = FakeRunner()
    sched = Scheduler(runner, chunk_tokens=4)
    short = req([1, 2], 20)
    sched.submit(short)
    sched.step()
    sched.step()  # short is decoding now
    long = req(list(range(1, 25)), 2)
    run_all(sched, [long])
    prefills = [c for c in runner.calls if c[0] == "prefill" and c[1] == [long.slot or 0]]
    # the 24-token prompt went in 4-token chunks, and short decoded between them
    long_chunks = [i for i, c in enumerate(runner.calls) if c[0] == "prefill" and c[2] == 4]
    assert len(long_chunks) == 6, prefills
    between = runner.calls[long_chunks[0]:long_chunks[-1]]
    assert sum(c[0] == "decode" for c in between) >= 5
    assert short.output_ids == expected([1, 2], 20) and long.output_ids == expected(long.prompt_ids, 2)


def test_admission_by_memory_vs_static():
    # 48 tokens of KV; requests of 10 prompt + 2 output tokens; max_len 24.
    def peak(admission):
        runner = FakeRunner(max_len=24, max_batch=8, budget_tokens=48)
        sched = Scheduler(runner, admission=admission, chunk_tokens=64)
        reqs = [req([i + 1] * 10, 2) for i in range(8)]
        run_all(sched, reqs)
        assert all(r.output_ids == expected(r.prompt_ids, 2) for r in reqs)
        assert runner.kv.stats().slots_in_use == 0
        return sched.max_running, sched.counts["preempted"]
    vmem, static = peak("vmem"), peak("static")
    assert static == (2, 0)          # 48 // 24: two max-length reservations
    assert vmem[0] >= 4              # memory follows actual lengths


def test_static_capacity_error():
    with pytest.raises(VattnError, match="raise the budget or lower max_len"):
        Scheduler(FakeRunner(max_len=64, budget_tokens=32), admission="static")


def test_preemption_recomputes_same_tokens():
    # Four requests that together outgrow the 60-token budget while decoding.
    runner = FakeRunner(max_len=32, max_batch=4, budget_tokens=60)
    sched = Scheduler(runner, chunk_tokens=64)
    reqs = [req([i + 2] * 8, 12) for i in range(4)]
    run_all(sched, reqs)
    assert sched.counts["preempted"] > 0
    assert sum(r.stats.preemptions for r in reqs) == sched.counts["preempted"]
    for r in reqs:
        assert r.finish_reason == "length"
        assert r.output_ids == expected(r.prompt_ids, 12)
    st = runner.kv.stats()
    assert st.slots_in_use == 0 and st.used_bytes == 0 and st.mapped_bytes <= 60 * 8192


def test_too_large_alone_fails_and_server_goes_on():
    runner = FakeRunner(max_len=64, budget_tokens=20)
    sched = Scheduler(runner)
    big, small = req([1] * 30, 2), req([3] * 5, 3)
    run_all(sched, [big, small])
    assert big.finish_reason == "error" and big.error_code == "kv_out_of_memory"
    assert "shorten the prompt" in big.error
    assert small.output_ids == expected([3] * 5, 3)
    assert runner.kv.stats().slots_in_use == 0


def test_cancel_running_and_waiting():
    runner = FakeRunner(max_batch=1)
    sched = Scheduler(runner)
    events = []
    a = req([1, 2, 3], 50, on_event=lambda r, t, f: events.append((r.id, t, f)))
    b = req([4], 5)
    sched.submit(a)
    sched.submit(b)
    for _ in range(3):
        sched.step()
    assert a.slot is not None and b in sched.waiting
    sched.cancel(a.id)
    sched.cancel(b.id)
    sched.step()
    assert a.finish_reason == "cancelled" and b.finish_reason == "cancelled"
    assert events[-1] == (a.id, [], True)
    assert runner.kv.stats().slots_in_use == 0 and not sched.has_work()


def test_stop_ids_and_eos():
    tok = _Tok()
    prompt = [5, 7]
    out = expected(prompt, 10)
    tok.eos_token_id = out[4]
    sched = Scheduler(FakeRunner(tokenizer=tok))
    events = []
    a = req(prompt, 10, on_event=lambda r, t, f: events.extend(t))
    b = req(prompt, 10, ignore_eos=True, stop_token_ids=[out[6]])
    run_all(sched, [a, b])
    # vLLM's rule: the stop token is in output_ids (token_ids), not in the text (no event carries it)
    assert a.finish_reason == "stop" and a.output_ids == out[:5] and a.text_ids == events == out[:4]
    assert b.finish_reason == "stop" and b.output_ids == out[:7] and b.text_ids == out[:6]
    assert a.stats.output_tokens == 5


def test_over_len_refuse_or_clip():
    prompt = [1] * 10
    with pytest.raises(VattnError, match="at most 6"):
        Scheduler(FakeRunner(max_len=16)).check(req(prompt, 8))  # the server: HTTP 400
    sched = Scheduler(FakeRunner(max_len=16), over_len="clip")  # vattn.LLM: it runs to max_len
    r = req(prompt, 8)
    run_all(sched, [r])
    assert r.finish_reason == "length" and r.output_ids == expected(prompt, 6)
    with pytest.raises(VattnError, match="max_len is 16"):
        sched.check(req([1] * 16, 1))  # no room for one output token: refused either way
    with pytest.raises(VattnError, match="over_len"):
        Scheduler(FakeRunner(), over_len="truncate")


def test_queue_limit_and_checks():
    sched = Scheduler(FakeRunner(max_len=16), max_waiting=2)
    sched.submit(req([1], 1))
    sched.submit(req([1], 1))
    with pytest.raises(QueueFull):
        sched.submit(req([1], 1))
    for r, msg in [(req([], 1), "empty"), (req([1] * 16, 1), "shorten the prompt"),
                   (req([1] * 10, 8), "at most 6")]:
        with pytest.raises(VattnError, match=msg):
            sched.check(r)
    with pytest.raises(VattnError, match="admission"):
        Scheduler(FakeRunner(), admission="paged")


def test_specs_batched_apart_and_density():
    runner = FakeRunner()
    sched = Scheduler(runner)
    reqs = [req([i + 1] * 4, 4, spec=s) for i, s in enumerate(["dense", "vattention"] * 2)]
    run_all(sched, reqs)
    for c in runner.calls:
        if c[0] == "decode":
            assert len(c[1]) == 2  # the two of one spec together, never mixed
    assert [r.stats.density for r in reqs] == [None, 0.25, None, 0.25]


def test_engine_error_fails_one_request():
    runner = FakeRunner(fail_on=99)
    sched = Scheduler(runner)
    bad, good = req([99], 3), req([1], 3)
    run_all(sched, [bad, good])
    assert bad.finish_reason == "error" and "poisoned" in bad.error
    assert good.output_ids == expected([1], 3)


def test_thread_loop():
    runner = FakeRunner()
    sched = Scheduler(runner)
    sched.start()
    try:
        done = threading.Event()
        seen = []

        def on_event(r, toks, finished):
            seen.extend(toks)
            if finished:
                done.set()
        r = req([3, 4], 5, on_event=on_event)
        sched.submit(r)
        assert done.wait(10)
        assert seen == expected([3, 4], 5)
        m = sched.metrics()
        assert m["running"] == 0 and m["finished"] == 1 and m["tokens_per_s"] > 0
        assert m["kv_mapped_bytes"] > 0 and m["kv_used_bytes"] == 0
    finally:
        sched.stop()
    assert not sched.alive


def test_sampling_seeded():
    class Noisy(FakeRunner):
        def _logits(self, tok):
            return torch.zeros(self.V)  # uniform: sampling picks anything
    outs = []
    for others in (0, 3):  # alone, then in a batch: a request's seed alone decides its tokens
        sched = Scheduler(Noisy())
        r = req([1], 8, temperature=1.0, seed=7)
        run_all(sched, [req([2] * 3, 8, temperature=1.0) for _ in range(others)] + [r])
        outs.append(r.output_ids)
    assert outs[0] == outs[1] and len(set(outs[0])) > 1


def test_preempted_request_waits_for_memory_no_thrashing():
    # A and B fit together at admission but not grown; B is preempted once and runs after A.
    runner = FakeRunner(max_len=32, budget_tokens=30)
    sched = Scheduler(runner)
    a, b = req([3] * 10, 15, ignore_eos=True), req([4] * 5, 15, ignore_eos=True)
    run_all(sched, [a, b], limit=200)
    assert sched.counts["preempted"] == 1 and b.stats.preemptions == 1
    assert a.output_ids == expected(a.prompt_ids, 15) and b.output_ids == expected(b.prompt_ids, 15)
    assert b.stats.finished > a.stats.finished


def test_device_oom_preempts_like_kv_oom():
    class Tight(FakeRunner):  # the device has no room for a 3-request step's activations
        def decode(self, slots, tokens, spec=None, greedy=False):
            if len(slots) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().decode(slots, tokens, spec, greedy)
    runner = Tight()
    sched = Scheduler(runner)
    reqs = [req([i + 1] * 3, 6) for i in range(3)]
    run_all(sched, reqs)
    assert sched.counts["preempted"] >= 1 and sched.counts["failed"] == 0
    assert all(r.output_ids == expected(r.prompt_ids, 6) for r in reqs)


def test_engine_loop_that_cannot_start_fails_requests_instead_of_hanging():
    """A loop that breaks before its first step (here: a device that cannot be selected) must end
    every queued request with an error and refuse new ones; clients must not wait forever."""
    from vattn.engine.scheduler import EngineDown
    runner = FakeRunner()
    runner.device = torch.device("cuda", 7) if torch.cuda.is_available() else torch.device("cuda")
    sched = Scheduler(runner)
    done = []
    a = req([1, 2], 3, on_event=lambda r, t, f: f and done.append(r))
    sched.submit(a)
    sched.start()
    sched._thread.join(timeout=10)
    assert not sched.alive and sched.dead and "engine loop stopped" in sched.dead
    assert done == [a] and a.finish_reason == "error" and a.error_code == "engine_error"
    with pytest.raises(EngineDown, match="restart the server"):
        sched.submit(req([1], 1))
