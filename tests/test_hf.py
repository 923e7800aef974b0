"""vattn.hf on tiny random-weight models: exactness at full budget, phases, undo, metrics."""
from dataclasses import dataclass

import pytest
import torch

from conftest import ARCHS, tiny_model
from vattn.errors import VattnError
from vattn.hf import bounds_from_mask, patch
from vattn.methods import base

FULL = ["dense", "sink(1.0)", "topk(1.0)", "sink(4)+window(4)+topk(0.1)+verified(eps=0.0)"]


def batch():
    """Two prompts of 16 tokens, the second left-padded by 5 (windows of 8 cut in)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def run(model, ids, mask, n=5):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        g = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                           output_logits=True, return_dict_in_generate=True)
    return logits, g.sequences, torch.stack(g.logits)


@pytest.fixture(scope="module")
def models():
    return {a: tiny_model(a) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_unpatched(models, arch):
    model = models[arch]
    ids, mask = batch()
    ref_logits, ref_seq, ref_steps = run(model, ids, mask)
    for spec in FULL:
        with patch(model, spec) as p:
            logits, seq, steps = run(model, ids, mask)
        assert p.summary()["calls"] > 0, spec
        assert p.summary()["density"] == pytest.approx(1.0), spec
        keep = mask.bool()
        torch.testing.assert_close(logits[keep], ref_logits[keep], atol=2e-5, rtol=1e-5, msg=spec)
        assert torch.equal(seq, ref_seq), spec
        torch.testing.assert_close(steps, ref_steps, atol=2e-5, rtol=1e-5, msg=spec)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_low_budget_is_used_and_differs(models, arch):
    model = models[arch]
    ids, mask = batch()
    ref_logits = run(model, ids, mask)[0]
    with patch(model, "sink(2)+window(2)") as p:
        logits = run(model, ids, mask)[0]
    assert p.summary()["density"] < 0.5
    assert not torch.allclose(logits, ref_logits, atol=1e-3)


def test_undo_is_exact(models):
    model = models["gemma3"]
    ids, mask = batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    impls = model.config._attn_implementation
    p = patch(model, "sink(2)+window(4)+verified(eps=0.2,delta=0.2)")
    assert model.config._attn_implementation == "vattn"
    run(model, ids, mask)
    p.undo()
    p.undo()  # idempotent
    assert model.config._attn_implementation == impls
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)


def test_undo_restores_eager():
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    patch(model, "topk(0.5)").undo()
    assert model.config._attn_implementation == "eager"


def test_sparse_flag_and_sparse_from(models):
    """sparse_from=n on a whole prompt == dense prefill of n tokens, then p.sparse=True."""
    model = models["qwen2"]
    ids, mask = batch()
    spec = "sink(2)+window(3)+topk(0.2)"
    n = 12
    with patch(model, spec, sparse_from=n, metrics=True) as p:
        _, seq_a, steps_a = run(model, ids, mask)
    assert min(r["pos"] for r in p.records) == n
    assert p.records[0]["rows"] == 16 - n  # the prompt's tail rows after the boundary
    with patch(model, spec) as p2:
        p2.sparse = False
        with torch.no_grad():
            pos = (mask[:, :n].cumsum(-1) - 1).clamp(min=0)  # as generate numbers padded rows
            out = model(ids[:, :n], attention_mask=mask[:, :n], position_ids=pos, use_cache=True)
        assert p2.summary()["calls"] == 0
        p2.sparse = True
        with torch.no_grad():
            g = model.generate(ids, attention_mask=mask, past_key_values=out.past_key_values, max_new_tokens=5,
                               do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(g.sequences, seq_a)
    torch.testing.assert_close(torch.stack(g.logits), steps_a, atol=1e-5, rtol=1e-5)


def test_sparse_off_is_dense(models):
    model = models["llama"]
    ids, mask = batch()
    ref = run(model, ids, mask)
    with patch(model, "sink(1)+window(1)") as p:
        p.sparse = False
        got = run(model, ids, mask)
    assert p.summary()["calls"] == 0
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_metrics_records_and_jsonl(models, tmp_path):
    model = models["mistral"]
    ids, mask = batch()
    with patch(model, "oracle-topk", metrics=True, dense_layers=1, layer_specs={2: "topk(1.0)"}) as p:
        run(model, ids, mask, n=3)
    layers = {r["layer"] for r in p.records}
    assert layers == {1, 2}
    for r in p.records:
        assert set(r) >= {"layer", "error", "density", "recall", "rows"}
        if r["layer"] == 2:
            assert r["error"] < 1e-5 and r["density"] == pytest.approx(1.0) and r["recall"] == pytest.approx(1.0)
        else:
            assert 0 < r["density"] < 1 and r["error"] > 0 and 0 < r["recall"] < 1
    s = p.summary()
    assert s["calls"] == len(p.records) and s["error"] is not None
    p.write_jsonl(tmp_path / "m.jsonl")
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == len(p.records)
    p.reset_metrics()
    s = p.summary()
    assert {k: s[k] for k in ("density", "error", "recall", "calls", "path")} == {
        "density": None, "error": None, "recall": None, "calls": 0, "path": "reference"}
    assert s["never_ran"].startswith("the spec never ran: ")


def test_density_without_metrics_and_set_spec(models):
    model = models["llama"]
    ids, mask = batch()
    with patch(model, "topk(0.25)", sparse_from=16) as p:
        run(model, ids, mask, n=2)
        s = p.summary()
        assert s["error"] is None and 0.2 < s["density"] < 0.4 and p.records == []
        p.reset_metrics()
        p.set_spec("dense")
        run(model, ids, mask, n=2)
        assert p.summary()["density"] == 1.0


def test_seeded_sampling_is_reproducible(models):
    model = models["qwen3"]
    ids, mask = batch()
    with patch(model, "sink(2)+uniform(0.3)", seed=3):
        a = run(model, ids, mask)
        b = run(model, ids, mask)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@dataclass
class _Counter:
    """Attends every key; counts calls in the per-layer state."""

    def select(self, ctx, out):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        n = ctx.k.shape[2]
        idx = torch.arange(n).expand(*out.chosen.shape[:3], n)
        out.add(idx, None, ctx.allowed().expand_as(idx))


@pytest.fixture
def counter_part():
    base.register("_test_counter")(_Counter)
    yield
    base.PARTS.pop("_test_counter", None)  # other tests list the registry


def test_layer_state_is_kept_per_layer_and_reset(models, counter_part):
    model = models["llama"]
    ids, mask = batch()
    with patch(model, "_test_counter", sparse_from=16) as p:
        run(model, ids, mask, n=4)  # prefill dense, then 3 sparse decode steps
        assert sorted(p.states) == [0, 1, 2]
        assert all(s["calls"] == 3 for s in p.states.values())
        run(model, ids, mask, n=4)  # a new sequence starts from empty state
        assert all(s["calls"] == 3 for s in p.states.values())


def test_bounds_from_mask():
    n, t = 10, 3
    pos = torch.arange(n)
    ends = torch.tensor([8, 9, 10])
    mask = (pos >= 2) & (pos < ends[:, None])  # left padding 2, causal
    starts, e = bounds_from_mask(mask[None, None], 1, t, n)
    assert starts.tolist() == [[2, 2, 2]] and e.tolist() == [[8, 9, 10]]
    win = mask & (pos > ends[:, None] - 1 - 4)  # window of 4
    starts, e = bounds_from_mask(win[None, None], 1, t, n, window=4)
    assert starts.tolist() == [[4, 5, 6]]
    with pytest.raises(VattnError, match="mask"):
        bounds_from_mask(win[None, None], 1, t, n)  # a window the layer did not declare
    holes = mask.clone()
    holes[:, 5] = False  # packed sequences / custom masks cannot be expressed
    with pytest.raises(VattnError, match="mask"):
        bounds_from_mask(holes[None, None], 1, t, n)
    starts, e = bounds_from_mask(None, 2, 1, n, window=3)
    assert starts.tolist() == [[7], [7]] and e.tolist() == [[10], [10]]


def test_bad_arguments(models):
    model = models["llama"]
    with pytest.raises(VattnError, match="unknown part"):
        patch(model, "nosuchpart(3)")
    with pytest.raises(VattnError, match="sparse_from"):
        patch(model, "topk(0.1)", sparse_from="later")
    with patch(model, "topk(0.1)"):
        with pytest.raises(VattnError, match="already patched"):
            patch(model, "topk(0.1)")
    assert model.config._attn_implementation == "sdpa"


def test_vmem_cache(models):
    """The paged-free cache hands views of its buffers to the attention function."""
    from vattn.cache.hf import VmemCache
    model = models["llama"]
    ids, mask = batch()
    with patch(model, "oracle-topk", sparse_from=12) as p:
        a = run(model, ids, mask)
        with torch.no_grad():
            g = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                               past_key_values=VmemCache.for_model(model, max_batch=2, max_len=64),
                               output_logits=True, return_dict_in_generate=True)
    assert p.summary()["density"] < 1
    assert torch.equal(g.sequences, a[1])
    torch.testing.assert_close(torch.stack(g.logits), a[2], atol=1e-5, rtol=1e-5)
