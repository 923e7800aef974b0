"""vattn.plan: compile picks the path once; the fused streaming path equals the reference."""
import os

import pytest
import torch

from helpers import rand_qkv, rel
from vattn.errors import VattnError
from vattn.kernels.common import triton_available
from vattn.plan import compile, is_streaming, streaming_selection
from vattn.spec import parse

STREAMING = ["sink(4)", "window(6)", "sink(3)+window(5)", "sink(0.1)+window(0.2)", "sink(40)+window(40)"]


def bounds(b=3, t=2, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t, n + 1, (b,), generator=g)
    starts = torch.minimum(torch.randint(0, n // 3, (b,), generator=g), lengths - t)
    starts[0] = lengths[0]  # a row with no keys (all left padding)
    ends = lengths[:, None] - t + 1 + torch.arange(t)
    return starts, ends.clamp(min=0)


def run(plan, q, k, v, starts, ends, layer=0, scale=0.25):
    return plan.run(layer, q, k, v, plan.context(starts, ends, scale))


def rows(sel, hq):
    """Per row, the sorted valid key positions (order inside a row does not matter)."""
    idx, _, ok = sel.per_query_head(hq)
    return [sorted(i[o].tolist()) for i, o in zip(idx.reshape(-1, idx.shape[-1]), ok.reshape(-1, ok.shape[-1]))]


@pytest.mark.parametrize("spec", STREAMING)
def test_streaming_selection_is_the_reference_set(spec):
    q, k, v = rand_qkv(b=3, t=2, n=48)
    starts, ends = bounds()
    fused = streaming_selection(parse(spec), k, starts, ends)
    ref = run(compile(spec, "cpu", fused=False), q, k, v, starts, ends)[1]
    assert rows(fused, 4) == rows(ref, 4)


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter on CPU)")
@pytest.mark.parametrize("spec", STREAMING[2:])
def test_fused_streaming_plan_equals_reference(spec):
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: the interpreter (conftest)
    q, k, v = (x.to(dev) for x in rand_qkv(b=3, t=2, n=48))
    starts, ends = (x.to(dev) for x in bounds())
    plan = compile(spec, dev, fused=True)
    assert plan.path == "streaming-kernel"
    out, sel = run(plan, q, k, v, starts, ends)
    ref, _ = run(compile(spec, dev, fused=False), q, k, v, starts, ends)
    assert plan.path == "streaming-kernel"  # it did not fall back
    assert rel(out[1:], ref[1:]) < 1e-5
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the row with no keys
    pick = torch.tensor([2, 1, 2], device=dev)  # a decoder's batch order, a row twice (padding)
    picked, _ = plan.run(0, q, k, v, plan.context(starts, ends, 0.25, pick=pick))
    assert torch.equal(picked, out[pick])  # the merge writes those rows, in that order


def test_compile_paths_and_errors():
    assert compile("sink(4)+window(4)", "cpu").path == "reference"  # fused only by default on CUDA
    assert compile("oracle-topk", "cpu").path == "reference"
    with pytest.raises(VattnError, match="no fused GPU path"):
        compile("topp(0.9)", "cpu", fused=True)
    assert is_streaming(parse("sink(2)+window(3)")) and not is_streaming(parse("window(3)+sink(2)"))
    assert not is_streaming(parse("sink(2)+topk(3)"))


def test_plan_owns_state_and_seed():
    q, k, v = rand_qkv(b=1, t=1, n=256)
    starts, ends = torch.zeros(1, dtype=torch.long), torch.full((1, 1), 256)
    plan = compile("sink(4)+window(4)+uniform(0.2)", "cpu", seed=5)  # always samples
    a = run(plan, q, k, v, starts, ends)[0]
    b = run(plan, q, k, v, starts, ends)[0]
    assert not torch.equal(a, b)  # the generator moves on between steps
    plan.reset()
    assert torch.equal(run(plan, q, k, v, starts, ends)[0], a)  # and restarts with the sequence
    quest = compile("sink(2)+quest(0.2,page=8)", "cpu")
    run(quest, q, k, v, starts, ends, layer=3)
    assert quest.states[3]  # page bounds kept for layer 3
    quest.reset()
    assert quest.states == {}


SCAN = "sink(8)+window(16)+hashtopk(0.1,bits=64,cut='sample')+verified(eps=0.1,delta=0.1,draws='iid',mode='denominator')"


def scan_inputs(n=1500, b=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, 4, 1, 32), (b, 2, n, 32), (b, 2, n, 32)))
    k[:, :, 300:310] += 3 * q[:, ::2].reshape(b, 2, 1, 32)  # a few keys that matter
    return q, k, v


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_scan_plan_runs_one_algorithm_on_kernel_and_reference(monkeypatch):
    """The scan chain: the fused kernels (on CUDA, else in the interpreter) and the reference
    plan make the same choices."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (x.to(dev) for x in scan_inputs())
    starts, ends = torch.zeros(2, dtype=torch.long, device=dev), torch.tensor([[1500], [1100]], device=dev)
    outs = {}
    for fused in (True, False):
        plan = compile(SCAN, dev, seed=7, fused=fused)
        assert plan.path == ("scan-kernel" if fused else "scan-reference")
        ctx = plan.context(starts, ends, 32 ** -0.5)
        plan.append(2, k, v, ctx)
        outs[fused] = plan.run(2, q, k, v, ctx)
        pick = torch.tensor([1, 1, 0], device=dev)  # a decoder's batch order, a row twice
        picked, sel = plan.run(2, q, k, v, plan.context(starts, ends, 32 ** -0.5, pick=pick))
        assert torch.equal(picked, outs[fused][0][pick]) and sel.count.shape[0] == 2
    (a, sa), (r, sr) = outs[True], outs[False]
    assert rel(a, r) < 1e-4
    assert torch.equal(sa.count, sr.count)  # the same keys attended, per KV head
    assert 0.1 < float(sr.count.float().mean()) / 1300 < 0.6
    with pytest.raises(VattnError, match="holds only counts"):
        sa.valid()


def test_scan_plan_signs_keys_of_a_fixed_length_cache():
    """A static cache: N never grows, each step's key is written at its row's position, and
    append signs it; a plan that signed all N at first must follow."""
    from vattn.kernels.bits import sign_bits
    from vattn.methods.hashing import simhash_proj
    q, k, v = scan_inputs(n=600, b=1)
    buf_k, buf_v = torch.zeros_like(k), torch.zeros_like(v)
    plan = compile(SCAN, "cpu")
    for n in (500, 501, 502):
        buf_k[:, :, :n], buf_v[:, :, :n] = k[:, :, :n], v[:, :, :n]
        ctx = plan.context(torch.zeros(1, dtype=torch.long), torch.tensor([[n]]), 0.2)
        plan.append(0, buf_k, buf_v, ctx)
        plan.run(0, q, buf_k, buf_v, ctx)
    sig = plan.states[0]["sig"][:, :, :502]
    assert torch.equal(sig, sign_bits(k[:, :, :502], simhash_proj(32, 64, 0, 0, "cpu")))


def test_scan_chain_is_one_form():
    for bad, why in [
        ("sink(8)+hashtopk(0.1,cut='sample')", "one algorithm with their front"),
        ("sink(8)+topp(0.9)+verified(draws='iid',mode='denominator')", "one algorithm with their front"),
        ("topk(0.1)+sink(8)+verified(draws='iid',mode='denominator')", "one algorithm with their front"),
        ("verified(draws='iid',mode='denominator')", "one algorithm with their front"),
        ("sink(0.1)+hashtopk(0.1,cut='sample')+verified(draws='iid',mode='denominator')", "key counts"),
        ("sink(4)+window(0.1)+topk(0.1)+verified(draws='iid',mode='denominator')", "key counts"),
        ("hashtopk(0.1,cut='sample')+verified(draws='iid',mode='denominator',heavy=0.2)", "heavy"),
        ("hashtopk(0.1,bits=48,cut='sample')+verified(draws='iid',mode='denominator')", "bits in 32"),
    ]:
        with pytest.raises(VattnError, match=why):
            parse(bad)
    assert compile("vattention-scan", "cpu").recipe.topk == 0.05
    assert compile("hashtopk(0.1,cut='sample')+verified(draws='iid')", "cpu").recipe.mode == "output"  # the default
    p = compile("sink(8)+window(16)+quest(0.1)+verified(eps=0.1,draws='iid')", "cpu")
    got = (p.path, p.recipe, p.sampled.sink, p.sampled.window, p.sampled.eps)
    assert got == ("sampled-reference", None, 8, 16, 0.1)
    assert [x.name for x in p.front.parts] == ["sink", "window", "quest"]
    p = compile("sink(8)+hashtopk(0.1,bits=32)+verified(draws='iid')", "cpu")  # an exact signature front
    assert (p.path, p.recipe, p.sampled.sink) == ("sampled-reference", None, 8)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_scan_chain_through_a_patched_model(arch):
    """vattn.patch runs the scan chain's plan on every sparse layer (the CPU twin here)."""
    import vattn
    from conftest import tiny_model
    model = tiny_model(arch)
    ids = torch.randint(0, 100, (1, 40))
    spec = ("sink(2)+window(4)+hashtopk(0.2,bits=32,cut='sample')"
            "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)")
    with vattn.patch(model, spec, sparse_from=30) as p:
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
        assert p._path() == "scan-reference" and p.summary()["calls"] > 0 and p.summary()["density"] < 1
        assert all(st["signed"] >= 40 for st in p.states.values())
    assert out.shape == (1, 43)


def test_scan_plan_signs_each_rows_own_key_in_a_ragged_batch():
    """Rows of unequal length share one buffer of N keys: a short row's new key sits below N,
    where an earlier step signed whatever was there; append must sign it again."""
    from vattn.kernels.bits import sign_bits
    from vattn.methods.hashing import simhash_proj
    _, k, v = scan_inputs(n=300, b=2)
    buf = torch.zeros_like(k)
    plan = compile(SCAN, "cpu")
    lens = [[200, 100], [201, 101], [202, 102]]
    for la, lb in lens:
        buf[0, :, :la], buf[1, :, :lb] = k[0, :, :la], k[1, :, :lb]
        ctx = plan.context(torch.zeros(2, dtype=torch.long), torch.tensor([[la], [lb]]), 0.2)
        plan.append(0, buf[:, :, :la], buf[:, :, :la], ctx)  # the view: N = the longest row
    sig, want = plan.states[0]["sig"], sign_bits(k, simhash_proj(32, 64, 0, 0, "cpu"))
    assert torch.equal(sig[0, :, :202], want[0, :, :202]) and torch.equal(sig[1, :, :102], want[1, :, :102])
    assert not sig[1, :, 102:202].any()  # nothing past a row's end was signed (a paged cache may not map it)


def test_reserved_signature_buffer_never_moves():
    """A CUDA graph captured at one cache length holds the buffer's address: a reserved plan
    keeps one buffer however the keys grow, and refuses more keys than it reserved."""
    q, k, v = scan_inputs(n=600, b=1)
    plan = compile(SCAN, "cpu").reserve(600)
    ptrs = set()
    for n in (100, 300, 600):
        ctx = plan.context(torch.zeros(1, dtype=torch.long), torch.tensor([[n]]), 0.2)
        plan.append(0, k[:, :, :n], v[:, :, :n], ctx)
        ptrs.add(plan.states[0]["sig"].data_ptr())
    assert len(ptrs) == 1
    with pytest.raises(VattnError, match="reserve"):
        big = torch.cat([k, k], 2)
        plan.append(0, big, big, plan.context(torch.zeros(1, dtype=torch.long), torch.tensor([[1200]]), 0.2))


def test_scan_chain_on_sliding_layers_of_a_patched_model():
    """Gemma 3's sliding layers cut off key 0: under the scan chain they run their window exactly,
    its full layer runs the chain (it raised before)."""
    import vattn
    from conftest import tiny_model
    model = tiny_model("gemma3")
    ids = torch.randint(0, 100, (1, 40))
    spec = ("sink(2)+window(4)+hashtopk(0.2,bits=32,cut='sample')"
            "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)")
    with vattn.patch(model, spec, sparse_from=30) as p:
        model.generate(ids, max_new_tokens=3, do_sample=False)
        s = p.summary()
        assert s["path"] == "scan-reference" and s["density"] < 1
        assert list(p.states) == [2]  # only the full-attention layer kept signatures


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_scan_plan_output_mode_kernel_equals_reference(monkeypatch):
    """verified's default, output mode, runs in the fused scan kernels too: same keys as the reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = (x.to(dev) for x in scan_inputs(seed=4))
    v = v + 1.5
    spec = SCAN.replace("mode='denominator'", "mode='output'").replace("eps=0.1", "eps=0.2")
    starts, ends = torch.zeros(2, dtype=torch.long, device=dev), torch.tensor([[1500], [1100]], device=dev)
    runs = {}
    for fused in (True, False):
        plan = compile(spec, dev, seed=7, fused=fused)
        ctx = plan.context(starts, ends, 32 ** -0.5)
        plan.append(0, k, v, ctx)
        runs[fused] = plan.run(0, q, k, v, ctx)
    assert rel(runs[True][0], runs[False][0]) < 1e-4 and torch.equal(runs[True][1].count, runs[False][1].count)


@pytest.mark.parametrize("spec", [SCAN.replace("eps=0.1,delta=0.1", "eps=0.3,delta=0.3"),
                                  "sink(2)+window(4)+quest(0.3,page=8)"])
def test_reset_keeps_buffers_and_a_new_sequence_equals_a_fresh_plan(spec):
    """The engine resets a plan when a batch starts afresh, under graphs captured earlier: the
    buffers must stay where they are, and the next (shorter) sequence, appended by its
    prefill, must attend as it would in a fresh plan (no stale signatures or page bounds)."""
    fused = "quest" in spec  # quest's graphable path; the scan chain's twin on CPU
    if fused and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused quest path on CPU tensors runs in the Triton interpreter only (GPU machines: "
                    "test_kernels_select holds the CUDA path to the reference)")
    q, k, v = scan_inputs(n=1500, b=1)
    _, k2, v2 = scan_inputs(n=1500, b=1, seed=4)
    used = compile(spec, "cpu", seed=3, fused=fused or None).reserve(1500)
    def go(plan, k, v, n):  # a prefill's append (one row per key, as the engine's), then a decode step
        zero = torch.zeros(1, dtype=torch.long)
        plan.append(0, k[:, :, :n], v[:, :, :n], plan.context(zero, torch.arange(1, n + 1)[None], 0.25))
        return plan.run(0, q, k[:, :, :n], v[:, :, :n], plan.context(zero, torch.tensor([[n]]), 0.25))
    go(used, k, v, 1500)
    before = {name: t for name, t in used.states[0].items() if torch.is_tensor(t)}  # held: no address reuse
    assert before
    used.reset()
    fresh = compile(spec, "cpu", seed=3, fused=fused or None).reserve(1500)
    a, sa = go(used, k2, v2, 1000)
    b, sb = go(fresh, k2, v2, 1000)
    assert all(used.states[0][name] is t for name, t in before.items())
    assert torch.equal(a, b)
    assert torch.equal(sa.count, sb.count) and sa.count.sum() < 1000 * k.shape[1]  # sparse, not all exact
