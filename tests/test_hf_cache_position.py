"""vattn.hf follows the cache position under every transformers cache keyword, and a
sparse spec that never ran (or lost track of the cache) is an error, not a dense result."""
import pytest
import torch

from conftest import tiny_model
from vattn import hf
from vattn.errors import VattnError
from vattn.hf import cache_keyword, output_cache, patch
from vattn.methods import base

SPEC = "sink(2)+window(3)+quest(0.3,page=4)"  # stateful: page bounds live in p.states


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def ids(n=24, seed=3):
    return torch.randint(4, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_generate_with_sparse_from_runs_the_spec_once_per_sequence(model):
    x = ids()
    with patch(model, SPEC, sparse_from=x.shape[1]) as p, torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
    s = p.summary()
    assert s["calls"] == 3 * 5 and s["never_ran"] is None  # 3 layers x 5 decode steps
    assert 0 < s["density"] < 1
    assert p.sequences == 1  # state and generator built once for the whole generation
    assert sorted(p.states) == [0, 1, 2] and all(p.states[i] for i in p.states)


@pytest.mark.parametrize("keyword", hf.CACHE_KEYWORDS)
def test_each_cache_keyword_keeps_state_across_steps(model, keyword, monkeypatch):
    """Prefill, then decode steps passing the cache by `keyword`: quest's page bounds are
    built once and then only extended (never rebuilt from page 0), and records carry the
    true positions."""
    import inspect

    from transformers import DynamicCache

    from vattn.methods import quest
    if keyword == "cache" and keyword not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers takes no `cache=` (older than 5.24)")
    built = []
    real = quest.page_minmax
    monkeypatch.setattr(quest, "page_minmax", lambda ctx, page, lo, n: built.append(lo) or real(ctx, page, lo, n))
    x = ids()
    with patch(model, SPEC, metrics=True) as p, torch.no_grad():
        p.sparse = False
        out = model(x, use_cache=True, **{keyword: DynamicCache()})
        p.sparse = True
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(4):
            out = model(nxt, use_cache=True, **{keyword: output_cache(out)})
            nxt = out.logits[:, -1:].argmax(-1)
    assert p.sequences == 1
    assert [r["pos"] for r in p.records if r["layer"] == 0] == [24, 25, 26, 27]
    assert built.count(0) == 3  # one build per layer at the first sparse step, then extensions
    assert len(built) == 3 * 4 and all(lo > 0 for lo in built[3:])


def test_lost_cache_is_an_error(model, monkeypatch):
    """If the hook cannot see the cache (a transformers that renames the keyword again),
    the first attention call notices the mismatch and refuses to go on."""
    monkeypatch.setattr(hf, "find_cache", lambda args, kwargs: None)
    x = ids()
    with patch(model, SPEC, sparse_from=x.shape[1]), torch.no_grad():
        with pytest.raises(VattnError, match="lost track of the cache"):
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False,
                           pad_token_id=0)


def test_check_ran_and_summary_say_when_the_spec_never_ran(model):
    x = ids()
    with patch(model, SPEC, sparse_from=100) as p, torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0)
    s = p.summary()
    assert s["calls"] == 0 and "the spec never ran" in s["never_ran"] and "sparse_from=100" in s["never_ran"]
    with pytest.raises(VattnError, match="the spec never ran"):
        p.check_ran()


def test_cache_keyword_matches_the_installed_transformers(model):
    import inspect
    assert cache_keyword(model) in inspect.signature(model.forward).parameters


@pytest.mark.parametrize("spec", ["sink(2)+window(4)", "sink(2)+window(4)+topk(0.2)"])
def test_static_cache_generate_equals_dynamic(spec):
    """generate(cache_implementation="static"): the prompt runs without a mask (SDPA's is_causal,
    aligned at key 0, over a key buffer longer than the prompt); bounds must follow SDPA's rule."""
    import vattn
    from conftest import tiny_model
    m = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    outs = []
    for kw in ({}, {"cache_implementation": "static"}):
        with vattn.patch(m, spec, sparse_from=40) as p:
            outs.append(m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, **kw))
            assert 0 < p.summary()["density"] < 1
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("spec", ["sink(2)+window(4)+topk(0.2)", "dense", SPEC,
                                  "sink(2)+window(3)+hashtopk(0.2,bits=32,cut='sample')"
                                  "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)"])
def test_compiled_forward_with_a_static_cache_equals_eager(spec, monkeypatch):
    """transformers compiles the forward when generate runs a static cache on a GPU: the prompt
    (several rows) runs the patch's host code between graphs, and every decode step after it
    runs whole in one graph, each layer's attention as the op vattn::decode (no host code, so
    CUDA graphs can capture the step); tokens and measured density equal the uncompiled run's."""
    import vattn
    from torch._dynamo.utils import counters
    m = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 40), generator=torch.Generator().manual_seed(1))
    outs, sums, fwd, calls = [], [], m.forward, []
    real = hf.Patch.graph_call
    monkeypatch.setattr(hf.Patch, "graph_call", lambda self, layer, *a: calls.append(layer) or real(self, layer, *a))
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        if compiled:
            m.forward = torch.compile(fwd, backend="eager")  # dynamo's tracing, no code generation
        try:
            with vattn.patch(m, spec, sparse_from=40) as p:
                outs.append(m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                       cache_implementation="static"))
                sums.append(p.summary())
        finally:
            m.forward = fwd
        if not compiled:
            assert calls == []  # eager runs never take the op
    breaks = {k: n for k, n in counters["graph_break"].items() if "torch.compiler.disable" not in k}
    assert counters["stats"]["unique_graphs"] > 0 and not breaks, breaks
    assert calls == [0, 1, 2] * 3  # 3 layers x 3 compiled decode steps, none between graphs
    assert torch.equal(outs[0], outs[1])
    assert sums[1]["calls"] == sums[0]["calls"] == 9
    assert sums[1]["density"] == pytest.approx(sums[0]["density"], rel=1e-6)
    assert (sums[0]["density"] == 1) == (spec == "dense")


@pytest.mark.parametrize("spec", [SPEC, "sink(2)+window(3)+hashtopk(0.2,bits=32,cut='sample')"
                                        "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)"])
def test_a_second_sequence_equals_a_fresh_patch(model, spec):
    """With sparse_from the prompt runs dense and never reaches the plan: a second, shorter
    sequence must not attend by the first one's key signatures or page bounds."""
    a, b = ids(60, seed=1), ids(40, seed=2)

    def scores(p, x):
        out = model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
        return torch.stack(out.scores)
    with torch.no_grad():
        with patch(model, spec, sparse_from=40) as p:
            scores(p, a)
            again = scores(p, b)
            assert p.sequences == 2
        with patch(model, spec, sparse_from=40) as p:
            fresh = scores(p, b)
    assert torch.equal(again, fresh)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("spec", ["dense", "streaming", "sink(16)+window(32)+topk(0.1)",
                                  "sink(16)+window(32)+quest(0.2,page=16)", "vattention",
                                  "sink(16)+window(32)+hashtopk(0.1,bits=32,cut='sample')"
                                  "+verified(eps=0.2,delta=0.2,draws='iid',mode='denominator')"])
def test_compiled_static_cache_on_cuda_captures_the_step(spec):
    """On a GPU, generate with a static cache compiles the decode step with CUDA graphs
    (mode reduce-overhead): no graph is skipped for the op, and the tokens and density equal
    the same generate with compilation off, two sequences in a row. In float32: inductor
    fuses the model's other ops differently from eager, and in bf16 that moved logits by up to
    0.14, enough to flip a near tie of this random model's argmax (H200, 2026-12-04)."""
    import transformers as tf

    import vattn
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    m = tf.LlamaForCausalLM(cfg).to("cuda").eval()
    prompts = [torch.randint(1, 256, (1, n), generator=torch.Generator().manual_seed(n)).cuda()
               for n in (1500, 1100)]
    torch._dynamo.reset()
    counters.clear()
    outs = {}
    with vattn.patch(m, spec, sparse_from=1000) as p:
        for compiled in (False, True):
            for i, x in enumerate(prompts):
                p.reset_metrics()
                out = m.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0, disable_compile=not compiled,
                                 cache_implementation="static", return_dict_in_generate=True, output_scores=True)
                outs[compiled, i] = (out.sequences, torch.stack(out.scores).float(), p.summary())
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    for i in range(2):
        (a, sa, da), (b, sb, db) = outs[False, i], outs[True, i]
        assert torch.equal(a, b), i
        assert (sa - sb).abs().max() < 1e-3, (sa - sb).abs().max()
        # 2 layers x (the prompt's sparse rows + 7 decode steps); verified's budget reads the
        # step's q and estimates, so bf16 noise can move a draw count: density to 2%
        assert da["calls"] == db["calls"] == 2 * 8 and da["density"] == pytest.approx(db["density"], rel=2e-2)


def test_a_copy_of_a_patched_model_needs_its_own_patch(model):
    """copy.deepcopy(model) copies no Patch: the copy says it is not patched instead of
    running the original's plans (or failing in copy)."""
    import copy
    with patch(model, "streaming"):
        twin = copy.deepcopy(model)
        with pytest.raises(VattnError, match="is not patched"), torch.no_grad():
            twin(ids(8))
        with patch(twin, "streaming") as q, torch.no_grad():
            twin(ids(8))
            assert q.summary()["calls"] == 3  # its own patch: one sparse call per layer
    assert not hasattr(model.model.layers[0].self_attn, hf.ATTR)
