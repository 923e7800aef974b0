"""vattn.plan: compile picks the path once; the fused streaming path equals the reference."""
import pytest
import torch

from helpers import rand_qkv, rel
from vattn.errors import VattnError
from vattn.kernels._common import triton_available
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


def rows(sel, hq):
    """Per row, the sorted valid key positions (order inside a row does not matter)."""
    idx, _, ok = sel.per_query_head(hq)
    return [sorted(i[o].tolist()) for i, o in zip(idx.reshape(-1, idx.shape[-1]), ok.reshape(-1, ok.shape[-1]))]


@pytest.mark.parametrize("spec", STREAMING)
def test_streaming_selection_is_the_reference_set(spec):
    q, k, v = rand_qkv(b=3, t=2, n=48)
    starts, ends = bounds()
    fused = streaming_selection(parse(spec), k, starts, ends)
    ref = compile(spec, "cpu", fused=False).run(0, q, k, v, starts, ends, 0.25)[1]
    assert rows(fused, 4) == rows(ref, 4)


@pytest.mark.skipif(not triton_available(), reason="needs triton (interpreter on CPU)")
@pytest.mark.parametrize("spec", STREAMING[2:])
def test_fused_streaming_plan_equals_reference(spec):
    q, k, v = rand_qkv(b=3, t=2, n=48)
    starts, ends = bounds()
    plan = compile(spec, "cpu", fused=True)
    assert plan.path == "streaming-kernel"
    out, sel = plan.run(0, q, k, v, starts, ends, 0.25)
    ref, _ = compile(spec, "cpu", fused=False).run(0, q, k, v, starts, ends, 0.25)
    assert plan.path == "streaming-kernel"  # it did not fall back
    assert rel(out[1:], ref[1:]) < 1e-5
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # the row with no keys


def test_compile_paths_and_errors():
    assert compile("sink(4)+window(4)", "cpu").path == "reference"  # fused only by default on CUDA
    assert compile("oracle-topk", "cpu").path == "reference"
    with pytest.raises(VattnError, match="no fused GPU path"):
        compile("topk(0.1)", "cpu", fused=True)
    assert is_streaming(parse("sink(2)+window(3)")) and not is_streaming(parse("window(3)+sink(2)"))
    assert not is_streaming(parse("sink(2)+topk(3)"))


def test_plan_owns_state_and_seed():
    q, k, v = rand_qkv(b=1, t=1, n=256)
    starts, ends = torch.zeros(1, dtype=torch.long), torch.full((1, 1), 256)
    plan = compile("sink(4)+window(4)+verified(eps=0.3,delta=0.3)", "cpu", seed=5)
    a = plan.run(0, q, k, v, starts, ends, 0.25)[0]
    b = plan.run(0, q, k, v, starts, ends, 0.25)[0]
    assert not torch.equal(a, b)  # the generator moves on between steps
    plan.reset()
    assert torch.equal(plan.run(0, q, k, v, starts, ends, 0.25)[0], a)  # and restarts with the sequence
    quest = compile("sink(2)+quest(0.2,page=8)", "cpu")
    quest.run(3, q, k, v, starts, ends, 0.25)
    assert quest.states[3]  # page bounds kept for layer 3
    quest.reset()
    assert quest.states == {}
