"""`vattn serve --ray`: two engine replicas (tiny Llama) under Ray Serve on a local CPU cluster."""
import concurrent.futures as cf
import socket

import httpx2
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'vattn[ray]')")
pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster at a time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_one_endpoint(tiny_dir):
    from ray import serve

    from vattn.serve.ray import serve_ray, shutdown
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve_ray(dict(model=str(tiny_dir), device="cpu", max_len=64, max_batch=2), replicas=2,
                  host="127.0.0.1", port=port, blocking=False)
        app = serve.status().applications["vattn"]
        reps = app.deployments["VattnReplica"].replica_states
        assert reps.get("RUNNING") == 2, reps
        body = {"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda _: httpx2.post(url + "/v1/completions", json=body, timeout=60), range(12)))
        assert [r.status_code for r in rs] == [200] * 12
        assert len({r.json()["choices"][0]["text"] for r in rs}) == 1  # same weights, greedy
        seen = set()
        with cf.ThreadPoolExecutor(8) as pool:  # concurrent, so the router spreads them
            for _ in range(5):
                seen |= {r.json()["replica"] for r in pool.map(
                    lambda _: httpx2.get(url + "/health", timeout=30), range(24))}
                if len(seen) == 2:
                    break
        assert len(seen) == 2, seen
        with httpx2.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 6
        bad = httpx2.post(url + "/v1/completions", json={**body, "max_tokens": 0}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    finally:
        shutdown()
