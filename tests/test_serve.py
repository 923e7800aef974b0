"""The HTTP server with the official `openai` client, on the fake runner of test_scheduler
(a real vmem KVCache, a toy model): protocol, streaming, errors, queueing, disconnects, load.
The same server on the real engine: test_serve_model.py."""
import concurrent.futures as cf
import json
import threading
import time

import httpx2
import openai
import pytest

from conftest import tiny_tokenizer
from test_scheduler import FakeRunner, expected
from vattn.serve.app import Engine, ServerThread, build_app

TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def toy_out(prompt_ids, n):
    """The toy model's greedy tokens (ids < 4 are specials the text leaves out)."""
    return expected(prompt_ids, n)


class SlowRunner(FakeRunner):
    """A FakeRunner whose steps wait on a gate and take `delay` seconds (requests stay in flight)."""

    def __init__(self, *a, delay=0.0, **kw):
        super().__init__(*a, **kw)
        self.gate, self.delay = threading.Event(), delay
        self.gate.set()

    def prefill(self, *a, **kw):
        self.gate.wait()
        time.sleep(self.delay)
        return super().prefill(*a, **kw)

    def decode(self, *a, **kw):
        self.gate.wait()
        time.sleep(self.delay)
        return super().decode(*a, **kw)


def start(runner, **kw):
    if runner.tokenizer.chat_template is None:
        runner.tokenizer.chat_template = TEMPLATE
    engine = Engine(runner, model_name="toy", idle_trim_s=0.1, **kw)
    return engine, ServerThread(build_app(engine)).start()


@pytest.fixture
def served():
    engine, srv = start(FakeRunner(max_len=64, max_batch=4, tokenizer=tiny_tokenizer()))
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
    yield engine, srv, client
    srv.stop()


def metrics(url):
    out = {}
    for line in httpx2.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_completions_and_stream(served):
    engine, srv, client = served
    tok = engine.tokenizer
    ids = tok("w1 w2 w3").input_ids
    want = tok.decode(toy_out(ids, 6), skip_special_tokens=True)
    r = client.completions.create(model="toy", prompt="w1 w2 w3", max_tokens=6, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 6
    parts, reasons, usage = [], [], None
    for chunk in client.completions.create(model="toy", prompt="w1 w2 w3", max_tokens=6, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.text)
            reasons.append(c.finish_reason)
    assert "".join(parts) == want and reasons[-1] == "length" and len(parts) >= 6
    assert usage.completion_tokens == 6
    # token ids as the prompt, and two prompts in one request
    r = client.completions.create(model="toy", prompt=[[5, 6], [7]], max_tokens=3, temperature=0)
    assert [c.text for c in r.choices] == [tok.decode(toy_out(p, 3), skip_special_tokens=True) for p in ([5, 6], [7])]


def test_chat_and_models(served):
    engine, srv, client = served
    tok = engine.tokenizer
    ids = tok("w4 w5 ", add_special_tokens=False).input_ids  # what TEMPLATE renders
    want = tok.decode(toy_out(ids, 5), skip_special_tokens=True)
    msgs = [{"role": "user", "content": "w4"}, {"role": "user", "content": "w5"}]
    r = client.chat.completions.create(model="toy", messages=msgs, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="toy", messages=msgs, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert text == want
    assert [m.id for m in client.models.list().data] == ["toy"]
    assert httpx2.get(srv.url + "/health").json()["status"] == "ok"


def test_stop_string(served):
    engine, srv, client = served
    tok = engine.tokenizer
    out = toy_out(tok("w9").input_ids, 8)
    stop = tok.decode(out[3:4])
    r = client.completions.create(model="toy", prompt="w9", max_tokens=8, temperature=0, stop=[stop])
    full = tok.decode(out, skip_special_tokens=True)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]
    assert wait_for(lambda: engine.scheduler.metrics()["finished"] == 1)
    assert engine.scheduler.metrics()["cancelled"] == 0


def test_bad_requests(served):
    engine, srv, client = served

    def err(fn, param=None, msg=""):
        with pytest.raises(openai.BadRequestError) as e:
            fn()
        assert e.value.status_code == 400
        body = e.value.body if isinstance(e.value.body, dict) and "message" in e.value.body \
            else e.value.response.json()["error"]
        assert msg in body["message"], body
        assert param is None or body["param"] == param, body
        return body
    c = client.completions
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=3, extra_body={"vattn_spec": "nope((("}),
        "vattn_spec", "bad vattn_spec")
    err(lambda: c.create(model="toy", prompt=" ".join(["w1"] * 70), max_tokens=3), "prompt", "max_len is 64")
    err(lambda: c.create(model="toy", prompt="w1 w2", max_tokens=63), "max_tokens", "at most")
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=0), "max_tokens", ">= 1")
    err(lambda: c.create(model="gpt-9", prompt="w1", max_tokens=3), "model", "serves 'toy'")
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=3, n=2), "n")
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=3, presence_penalty=0.5), "presence_penalty")
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=3, temperature=-1), "temperature")
    err(lambda: c.create(model="toy", prompt="w1", max_tokens=3, temperature=0.5, top_p=0), "top_p")
    err(lambda: c.create(model="toy", prompt=[500], max_tokens=3), "prompt", "token ids")
    err(lambda: client.chat.completions.create(model="toy", messages=[], max_tokens=3), "messages")
    for raw, msg in [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                     (b'{"model": "toy"}', "'prompt' is required"),
                     (b'{"prompt": "w1", "max_tokens": "many"}', "max_tokens")]:
        r = httpx2.post(srv.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and msg in e["message"], e
    assert engine.scheduler.alive


def test_queue_limit_429():
    runner = SlowRunner(max_len=64, max_batch=1, tokenizer=tiny_tokenizer())
    engine, srv = start(runner, max_waiting=1)
    try:
        runner.gate.clear()
        body = {"model": "toy", "prompt": "w1", "max_tokens": 2, "temperature": 0}
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx2.post, srv.url + "/v1/completions", json=body, timeout=30)
            assert wait_for(lambda: engine.scheduler.metrics()["running"] == 1)
            second = pool.submit(httpx2.post, srv.url + "/v1/completions", json=body, timeout=30)
            assert wait_for(lambda: engine.scheduler.metrics()["waiting"] == 1)
            third = httpx2.post(srv.url + "/v1/completions", json=body, timeout=30)
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            runner.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        runner.gate.set()
        srv.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_slot(stream):
    runner = SlowRunner(max_len=64, max_batch=2, tokenizer=tiny_tokenizer(), delay=0.01)
    engine, srv = start(runner)
    try:
        base = metrics(srv.url)["vattn_kv_mapped_bytes"]
        body = {"model": "toy", "prompt": "w1 w2", "max_tokens": 60, "temperature": 0, "stream": stream,
                "ignore_eos": True}
        with httpx2.Client(timeout=30) as c:
            if stream:
                with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                    lines = r.iter_lines()
                    assert next(lines).startswith("data: ")  # one token arrived, then we hang up
            else:
                with pytest.raises(httpx2.ReadTimeout):
                    c.post(srv.url + "/v1/completions", json=body, timeout=0.3)
        assert wait_for(lambda: metrics(srv.url)["vattn_requests_running"] == 0)
        m = metrics(srv.url)
        assert m['vattn_requests_total{outcome="cancelled"}'] == 1 and m["vattn_kv_used_bytes"] == 0
        assert runner.kv.stats().slots_in_use == 0
        assert wait_for(lambda: metrics(srv.url)["vattn_kv_mapped_bytes"] == base)  # idle trim gives pages back
    finally:
        srv.stop()


def test_too_large_for_memory_is_400():
    runner = FakeRunner(max_len=64, budget_tokens=16, tokenizer=tiny_tokenizer())
    engine, srv = start(runner)
    try:
        r = httpx2.post(srv.url + "/v1/completions", json={"prompt": " ".join(["w1"] * 30), "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_out_of_memory"
        assert httpx2.post(srv.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2}).status_code == 200
    finally:
        srv.stop()


def test_bounded_load_no_failures_memory_back():
    # 24 requests, 8 at a time, on a budget that forces preemptions (60 tokens: two or three of up to
    # 27 tokens each, also when a busy CPU lets few requests overlap); every answer must be exact.
    runner = SlowRunner(max_len=48, max_batch=6, budget_tokens=60, tokenizer=tiny_tokenizer(), delay=0.002)
    engine, srv = start(runner)
    tok = engine.tokenizer
    try:
        base = metrics(srv.url)["vattn_kv_mapped_bytes"]

        def one(i):
            prompt = " ".join(f"w{(i * 7 + j) % 100}" for j in range(5 + i % 11))
            ids = tok(prompt).input_ids
            r = httpx2.post(srv.url + "/v1/completions", timeout=60, json={
                "model": "toy", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "stream": bool(i % 2)})
            assert r.status_code == 200, r.text
            if i % 2:
                chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            else:
                text = r.json()["choices"][0]["text"]
            assert text == tok.decode(toy_out(ids, 12), skip_special_tokens=True)
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(24)))
        m = metrics(srv.url)
        assert m['vattn_requests_total{outcome="finished"}'] == 24
        assert m['vattn_requests_total{outcome="failed"}'] == 0 and m["vattn_preemptions_total"] > 0
        assert m["vattn_kv_used_bytes"] == 0
        assert wait_for(lambda: metrics(srv.url)["vattn_kv_mapped_bytes"] == base)
    finally:
        srv.stop()
