"""The server on the real engine (Runner): the tiny Llama for batching, chunked prefill, per-request
specs and admission by memory; the embedded SmolLM2 for chat through its template."""
import concurrent.futures as cf
import time

import httpx2
import openai
import pytest

from vattn.engine.llm import LLM
from vattn.engine.runner import Runner
from vattn.engine.sampling import SamplingParams
from vattn.serve.app import Engine, ServerThread, build_app


def serve(runner, **kw):
    engine = Engine(runner, model_name="tiny", idle_trim_s=0.1, **kw)
    return engine, ServerThread(build_app(engine)).start()


def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)


PROMPTS = [[5 + i, 9, 17 + 3 * i] * (1 + 4 * i) for i in range(4)]  # 3 to 39 tokens


def test_batched_chunked_equals_offline(tiny_dir):
    # Reference: each prompt alone through the offline API (same engine and shapes, no scheduler;
    # float32 so that a GPU run does not flip a near-tie in bf16).
    llm = LLM(str(tiny_dir), spec="dense", max_len=64, max_batch=4, dtype="float32")
    ref = [llm.generate(prompt_token_ids=[p], params=SamplingParams(max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].token_ids for p in PROMPTS]
    engine, srv = serve(Runner(str(tiny_dir), max_len=64, max_batch=4, dtype="float32"), chunk_tokens=8)
    try:
        c = client(srv)

        def one(p):
            r = c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
            return engine.tokenizer(r.choices[0].text, add_special_tokens=False).input_ids, r
        with cf.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(one, PROMPTS))
        for (ids, r), want in zip(got, ref):
            assert r.usage.completion_tokens == 10
            assert r.choices[0].text == engine.tokenizer.decode(want, skip_special_tokens=True)
        assert engine.scheduler.max_running >= 2  # they really ran together
    finally:
        srv.stop()


def test_sparse_spec_per_request(tiny_dir):
    engine, srv = serve(Runner(str(tiny_dir), max_len=64, max_batch=2))
    try:
        body = {"model": "tiny", "prompt": [7, 8, 9] * 10, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        dense = httpx2.post(srv.url + "/v1/completions", json=body, timeout=60).json()
        sparse = httpx2.post(srv.url + "/v1/completions", json={**body, "vattn_spec": "sink(2)+window(4)"},
                             timeout=60).json()
        assert dense["vattn"][0]["density"] == 1.0 and dense["vattn"][0]["spec"] == "dense"
        assert 0 < sparse["vattn"][0]["density"] < 0.5, sparse["vattn"]
        bad = httpx2.post(srv.url + "/v1/completions", json={**body, "vattn_spec": "topk(("}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "vattn_spec"
    finally:
        srv.stop()


def test_admission_by_memory_real_runner(tiny_dir):
    # A budget of two slots' pages: six requests queue, two run at a time, none fails.
    probe = Runner(str(tiny_dir), max_len=64, max_batch=1)
    page = probe.kv.stats().page_bytes
    probe.close()
    engine, srv = serve(Runner(str(tiny_dir), max_len=64, max_batch=4, budget_bytes=2 * page))
    try:
        body = {"model": "tiny", "prompt": [11, 12, 13], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda _: httpx2.post(srv.url + "/v1/completions", json=body, timeout=60), range(6)))
        assert [r.status_code for r in rs] == [200] * 6
        assert len({r.json()["choices"][0]["text"] for r in rs}) == 1
        m = engine.scheduler.metrics()
        assert m["max_running"] == 2 and m["failed"] == 0 and m["finished"] == 6
        assert engine.runner.kv.stats().slots_in_use == 0
        end = time.monotonic() + 10  # idle: the pages freed slots held go back
        while engine.runner.kv.stats().mapped_bytes and time.monotonic() < end:
            time.sleep(0.05)
        assert engine.runner.kv.stats().mapped_bytes == 0
    finally:
        srv.stop()


@pytest.mark.slow
def test_embedded_chat_stream_and_errors():
    engine, srv = serve(Runner(None, max_len=128, max_batch=2))
    engine.model_name = "smollm2"
    try:
        c = client(srv)
        msgs = [{"role": "user", "content": "Say hi."}]
        r = c.chat.completions.create(model="smollm2", messages=msgs, max_tokens=6, temperature=0)
        text = r.choices[0].message.content
        assert text and r.usage.completion_tokens <= 6
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="smollm2", messages=msgs, max_tokens=6, temperature=0, stream=True) if ch.choices)
        assert streamed == text
        with pytest.raises(openai.BadRequestError, match="max_len is 128"):
            c.completions.create(model="smollm2", prompt="hello " * 200, max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="bad vattn_spec"):
            c.completions.create(model="smollm2", prompt="hello", max_tokens=4, extra_body={"vattn_spec": "x(("})
    finally:
        srv.stop()


def test_cli_serve(tiny_dir):
    import signal
    import socket
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "vattn.cli", "serve", "--model", str(tiny_dir), "--max-len", "64",
           "--log-level", "warning", "--port"]
    with socket.socket() as busy:  # a taken port is an error before the model loads
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = subprocess.run(cmd + [str(busy.getsockname()[1])], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "cannot listen" in out.stdout, out.stdout + out.stderr
        port = busy.getsockname()[1]
    p = subprocess.Popen(cmd + [str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, end = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert p.poll() is None, p.stdout.read()
            try:
                if httpx2.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < end, "vattn serve did not come up"
            time.sleep(0.2)
        r = httpx2.post(url + "/v1/completions", json={"prompt": "w1 w2", "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == tiny_dir.name
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    assert p.returncode == 0


@pytest.mark.slow
def test_incremental_text_equals_full_decode():
    # The streamed pieces of a byte-level BPE (multi-byte characters split over tokens) add up
    # to the full decode, also when cut at a stop string.
    import random

    from vattn.models import load_model
    from vattn.serve.app import _Text
    _, tok = load_model()
    ids = tok("Héllo wörld! 你好，世界 🙂🚀 The  quick\n\tbrown fox — “quotes” café naïve. " * 3).input_ids
    full = tok.decode(ids, skip_special_tokens=True)
    for stop in ([], ["fox"], ["世界"]):
        t, out, i, rng = _Text(tok, stop), "", 0, random.Random(0)
        while i < len(ids) and not t.stopped:
            k = rng.randint(1, 3)
            out += t.add(ids[i:i + k])
            i += k
        out += t.flush()
        assert out == (full[:full.index(stop[0])] if stop else full), stop
