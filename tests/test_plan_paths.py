"""vattn.plan's topk, hashtopk and quest kernel paths: the reference's keys, no host sync.

On CPU the paths run with fused=True (the Triton interpreter, conftest); most tests swap the
sparse kernel for its torch twin (sparse_decode_ref) to stay fast, one runs the kernel."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse: unwritten outputs read as NaN / -7)
from helpers import rand_qkv, rel
from vattn.errors import VattnError
from vattn.kernels.common import triton_available
from vattn.plan import GRAPHABLE_PATHS, compile, kernel_form
from vattn.spec import parse

# CPU tensors through fused=True: the interpreter's (on a GPU, test_kernels_select.py holds the
# paths compiled for CUDA to the reference)
pytestmark = pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="fused=True on CPU tensors needs TRITON_INTERPRET=1")

TOPK = ["topk(5)", "sink(2)+topk(0.2)", "window(3)+topk(7)", "sink(3)+window(4)+topk(0.1)",
        "sink(0.05)+window(0.1)+topk(0.15)", "sink(30)+window(30)+topk(30)"]
QUEST = ["quest(8,page=4)", "sink(2)+window(3)+quest(0.2,page=8)", "window(5)+quest(16,page=4)",
         "sink(0.05)+quest(0.3,page=16)", "sink(3)+window(4)+quest(20,page=4,dense_layers=1)",
         "sink(1)+window(2)+quest(1.0,page=8)", "sink(2)+window(3)+quest(0.2,page=8,share='kv')",
         "quest(8,page=4,share='kv')"]
HASH = ["hashtopk(5,bits=32)", "sink(2)+window(3)+hashtopk(0.2,bits=48,seed=3)", "window(3)+hashtopk(7,bits=64)",
        "sink(2)+window(3)+hashtopk(0.2,bits=16,share='kv')"]
SCALE = 0.25


def bounds(b=3, t=2, n=80, seed=1):
    """Ragged rows: random lengths and left padding, row 0 without keys."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t, n + 1, (b,), generator=g)
    lengths[-1] = n
    starts = torch.minimum(torch.randint(0, n // 3, (b,), generator=g), lengths - t)
    starts[0] = lengths[0]
    ends = lengths[:, None] - t + 1 + torch.arange(t)
    return starts, ends.clamp(min=0)


def rows(sel, hq):
    """Per query-head row, the sorted valid key positions (and none twice)."""
    idx, _, ok = sel.per_query_head(hq)
    out = [sorted(i[o].tolist()) for i, o in zip(idx.reshape(-1, idx.shape[-1]), ok.reshape(-1, ok.shape[-1]))]
    assert all(len(r) == len(set(r)) for r in out)
    return out


def step(plan, layer, q, k, v, starts, ends):
    ctx = plan.context(starts, ends, SCALE)
    plan.append(layer, k, v, ctx)
    return plan.run(layer, q, k, v, ctx)


@pytest.fixture
def torch_kernel(monkeypatch):
    """The sparse kernel's torch twin in its place (the interpreter is slow)."""
    import vattn.kernels.sparse as sp
    monkeypatch.setattr(sp, "sparse_decode", sp.sparse_decode_ref)


def check_equal(spec, q, k, v, starts, ends, layers=(0,), device="cpu"):
    fused, ref = compile(spec, device, fused=True), compile(spec, device, fused=False)
    assert fused.path == f"{kernel_form(parse(spec))}-kernel" and ref.path == "reference"
    for layer in layers:
        out, sel = step(fused, layer, q, k, v, starts, ends)
        want, wsel = step(ref, layer, q, k, v, starts, ends)
        assert rows(sel, q.shape[1]) == rows(wsel, q.shape[1]), (spec, layer)
        hq = q.shape[1]
        assert sel.count.sum() * (hq // sel.count.shape[1]) == wsel.count.sum() * (hq // wsel.count.shape[1])
        live = (ends > starts[:, None])[:, None].expand(out.shape[:3])
        assert rel(out[live], want[live]) < 1e-5
        assert not out[~live].any()  # rows without keys: zeros
        assert fused.path.endswith("-kernel")  # it did not fall back


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("spec", TOPK + QUEST + HASH)
def test_kernel_path_chooses_the_reference_keys(spec, t, torch_kernel):
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=t, n=80, seed=t)
    starts, ends = bounds(t=t, seed=t)
    check_equal(spec, q, k, v, starts, ends, layers=(0, 1))


def test_shared_quest_without_groups_chooses_the_reference_keys(torch_kernel):
    """share='kv' on a model with one query head a KV head: a group of one, the per-head rule."""
    q, k, v = rand_qkv(b=3, hq=2, hkv=2, t=2, n=80, seed=5)
    starts, ends = bounds(t=2, seed=5)
    check_equal("sink(2)+window(3)+quest(0.2,page=8,share='kv')", q, k, v, starts, ends)


def test_quest_layers_of_one_step_share_their_page_update(torch_kernel):
    # the engine's step: one context for every layer; which pages to bound again is worked out
    # once (ctx.memo), each layer bounds them over its own keys and picks the reference's keys
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=80, seed=11)
    starts, ends = bounds(t=1, seed=11)
    spec = "sink(2)+window(3)+quest(0.2,page=8)"
    fused, ref = compile(spec, "cpu", fused=True), compile(spec, "cpu", fused=False)
    ctx = fused.context(starts, ends, SCALE)
    live = (ends > starts[:, None])[:, None].expand(q.shape[:3])
    for layer, kk in ((0, k), (1, torch.randn_like(k)), (2, -k)):
        fused.append(layer, kk, v, ctx)
        out, sel = fused.run(layer, q, kk, v, ctx)
        want, wsel = step(ref, layer, q, kk, v, starts, ends)
        assert rows(sel, q.shape[1]) == rows(wsel, q.shape[1]), layer
        assert rel(out[live], want[live]) < 1e-5
    assert sum(isinstance(key, tuple) and key[0] == "pages" for key in ctx.memo) == 1


@pytest.mark.parametrize("spec,t", [("sink(3)+window(4)+topk(0.1)", 2), ("sink(30)+window(30)+topk(30)", 1),
                                    ("sink(2)+window(3)+quest(0.2,page=8)", 2), ("window(3)+quest(10,page=1)", 1)])
def test_rows_over_several_programs_choose_the_reference_keys(spec, t, torch_kernel, monkeypatch):
    import vattn.kernels.select as ks
    import vattn.plan_select as ps
    monkeypatch.setattr(ks, "BLOCK", 16)  # small blocks: each row's select spans several programs
    monkeypatch.setattr(ps, "PAGE_BLOCK", 4)  # (Quest's pages: 10 or 80 a row)
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=t, n=80, seed=t)
    starts, ends = bounds(t=t, seed=t)
    check_equal(spec, q, k, v, starts, ends)


@pytest.mark.parametrize("spec", ["sink(3)+window(4)+topk(8)", "topk(0.05)"])
def test_candidate_lists_choose_the_reference_keys(spec, torch_kernel, monkeypatch):
    import vattn.kernels.select as ks
    monkeypatch.setattr(ks, "SAMPLE", 16)  # lists pay at this length only with a small sample and margin
    monkeypatch.setattr(ks, "Z", 1.0)
    assert ks.candidate_width(256, 13, ks.SAMPLE, ks.Z) > 0
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=256, seed=5)
    starts, ends = bounds(t=1, n=256, seed=5)
    check_equal(spec, q, k, v, starts, ends)


def test_kernel_path_in_bfloat16_and_dense_layers(torch_kernel):
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=80, seed=7, dtype=torch.bfloat16)
    starts, ends = bounds(t=1, seed=7)
    check_equal("sink(2)+window(3)+topk(9)", q, k, v, starts, ends)
    check_equal("sink(2)+window(3)+hashtopk(9)", q, k, v, starts, ends)
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=80, seed=8)
    check_equal("sink(3)+window(4)+quest(20,page=4,dense_layers=1)", q, k, v, starts, ends, layers=(0, 1))


@pytest.mark.parametrize("spec", ["sink(2)+window(3)+topk(6)", "window(2)+quest(8,page=4)", "hashtopk(6,bits=8)"])
def test_ties_break_alike(spec, torch_kernel):
    """Equal scores (repeated keys) and equal page bounds (repeated pages): both paths keep the
    lowest positions among equals (kernels.select.topk_ref), so they keep the same keys (the
    Triton kernels too: tests/test_kernels_select.py)."""
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=64, seed=5)
    k[:, :, 8:24] = k[:, :, 8:12].repeat(1, 1, 4, 1)  # pages 2..5 of 4 keys alike, every key 4 times
    k[:, :, 40:44] = k[:, :, 8:12]
    starts, ends = torch.tensor([0, 3]), torch.tensor([[64], [50]])
    check_equal(spec, q, k, v, starts, ends)


@pytest.mark.parametrize("spec", ["sink(2)+window(3)+topk(0.1)", "sink(1)+window(4)+quest(12,page=4)",
                                  "quest(0.2,page=8)", "sink(2)+hashtopk(0.15,bits=32)",
                                  "sink(2)+hashtopk(0.15,bits=32,share='kv')", "sink(2)+window(3)+hashtopk(0.15,bits=40)"])
def test_decode_steps_follow_appends_in_a_ragged_batch(spec, torch_kernel):
    """A static buffer: each step writes one key per row at its end and appends; rows of
    unequal length, one joining late; slot reuse (a row restarts shorter): the page bounds
    follow, and every step keeps the reference's keys."""
    b, n = 3, 96
    q_all, k_all, v_all = rand_qkv(b=b, hq=4, hkv=2, t=12, n=n, seed=9)
    buf_k, buf_v = torch.full_like(k_all, 7.0), torch.full_like(v_all, 7.0)  # stale junk past each end
    fused, ref = compile(spec, "cpu", fused=True), compile(spec, "cpu", fused=False)
    lengths = torch.tensor([40, 17, 0])
    starts = torch.tensor([0, 5, 0])
    for s in range(12):
        if s == 4:
            lengths[2] = 30  # row 2 joins: a prefill of 30 keys, appended with all its rows
            buf_k[2, :, :30], buf_v[2, :, :30] = k_all[2, :, :30], v_all[2, :, :30]
            ends = torch.zeros(b, 30, dtype=torch.long)
            ends[2] = torch.arange(1, 31)
            for plan in (fused, ref):
                plan.append(0, buf_k, buf_v, plan.context(torch.zeros(b, dtype=torch.long), ends, SCALE))
        if s == 8:
            lengths[0] = 9  # row 0 restarts: a new sequence, a new start
            starts[0] = 2
            new = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(s))
            buf_k[0, :, :9] = new
            ends = torch.zeros(b, 9, dtype=torch.long)
            ends[0] = torch.arange(1, 10)
            for plan in (fused, ref):
                plan.append(0, buf_k, buf_v, plan.context(starts.clone(), ends, SCALE))
        live = lengths > 0
        pos = lengths.clone()
        buf_k[live, :, pos[live]] = k_all[live, :, 50 + s]
        buf_v[live, :, pos[live]] = v_all[live, :, 50 + s]
        lengths += live.long()
        ends = lengths[:, None].clone()
        q = q_all[:, :, s:s + 1]
        out, sel = step(fused, 0, q, buf_k, buf_v, starts, ends)
        want, wsel = step(ref, 0, q, buf_k, buf_v, starts, ends)
        assert rows(sel, 4) == rows(wsel, 4), (spec, s)
        assert rel(out, want) < 1e-5


def test_growing_cache_appends_only_new_pages(torch_kernel):
    """A cache that grows by one key a step (transformers' DynamicCache): pages past what was
    bounded are bounded once, and the bounds equal the reference's at every step."""
    q_all, k, v = rand_qkv(b=2, hq=4, hkv=2, t=6, n=70, seed=3)
    spec = "sink(2)+quest(10,page=4)"
    fused, ref = compile(spec, "cpu", fused=True), compile(spec, "cpu", fused=False)
    starts = torch.tensor([0, 4])
    for n in range(64, 70):
        ends = torch.tensor([[n], [n - 1]])
        out, sel = step(fused, 0, q_all[:, :, n - 64:n - 63], k[:, :, :n], v[:, :, :n], starts, ends)
        want, wsel = step(ref, 0, q_all[:, :, n - 64:n - 63], k[:, :, :n], v[:, :, :n], starts, ends)
        assert rows(sel, 4) == rows(wsel, 4)
        st = fused.states[0]
        assert st["built"] == n
        ref_meta = ref.states[0]["quest/4"]["meta"]
        assert torch.equal(st["pages"][:, :, :ref_meta.shape[2]], ref_meta)


def test_sparse_kernel_in_the_interpreter():
    """The Triton sparse kernel itself (interpreter on CPU) attends the path's Selection."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(dev) for x in rand_qkv(b=3, hq=4, hkv=2, t=2, n=48, seed=2))
    starts, ends = (x.to(dev) for x in bounds(t=2, n=48))
    for spec in ("sink(2)+window(3)+topk(5)", "sink(2)+quest(8,page=4)"):
        check_equal(spec, q, k, v, starts, ends)


class NoSync(TorchDispatchMode):
    """Raises on what waits for the device or sizes a tensor by its data."""
    BANNED = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "item", "argwhere",
              "masked_scatter", "repeat_interleave")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.split(".")[0] in self.BANNED or name.startswith("_unique"):
            raise AssertionError(f"host sync / data-dependent shape: aten.{name}")
        if name in ("index", "index_put", "index_put_"):  # boolean masks as indices size by their data
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
                raise AssertionError(f"aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", ["sink(2)+window(3)+topk(0.1)", "sink(0.05)+window(4)+quest(12,page=4)",
                                  "sink(2)+window(3)+hashtopk(0.1)",
                                  "sink(3)+window(4)+quest(20,page=4,dense_layers=1)", "sink(4)+window(0.1)",
                                  "sink(2)+window(3)+quest(12,page=4)+verified(eps=0.3,draws='iid',min_pilot=8)",
                                  "sink(2)+window(3)+quest(12,page=4,share='kv')+verified(eps=0.3,draws='iid',"
                                  "min_pilot=8)",
                                  "sink(2)+window(3)+hashtopk(12,bits=32)+verified(eps=0.3,draws='iid',min_pilot=8)"])
def test_paths_never_wait_for_the_device(spec, torch_kernel, monkeypatch):
    """append and run of the graphable paths: no .item()/.tolist()/bool() of a tensor, no
    nonzero or boolean-mask indexing (what a CUDA graph cannot capture)."""
    q, k, v = rand_qkv(b=3, hq=4, hkv=2, t=1, n=80, seed=4)
    starts, ends = bounds(t=1)
    plan = compile(spec, "cpu", fused=True).reserve(96)
    assert plan.path in GRAPHABLE_PATHS
    step(plan, 0, q, k, v, starts, ends)  # the first call sizes buffers (host numbers only, too)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        def banned(*a, _name=name, **kw):
            raise AssertionError(f"Tensor.{_name} in a graphable path")
        monkeypatch.setattr(torch.Tensor, name, banned)
    with NoSync():
        for layer in (0, 1):
            ctx = plan.context(starts, ends, SCALE)
            plan.append(layer, k, v, ctx)
            plan.run(layer, q, k, v, ctx)
    monkeypatch.undo()


def test_the_sync_check_catches_a_sync():
    with NoSync(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(3).sum().item()
    with NoSync(), pytest.raises(AssertionError, match="boolean mask"):
        torch.ones(3)[torch.ones(3) > 0]


def test_compile_picks_the_paths():
    for spec in TOPK:
        assert compile(spec, "cpu").path == "reference"  # the CPU default: the reference
        assert compile(spec, "cpu", fused=True).path == "topk-kernel"
    for spec in QUEST + ["oracle-topk"]:
        assert compile(spec, "cpu", fused=True).path.endswith("-kernel")
    for spec in HASH:
        assert compile(spec, "cpu", fused=True).path == "hashtopk-kernel"
    assert set(GRAPHABLE_PATHS) == {"streaming-kernel", "scan-kernel", "topk-kernel", "hashtopk-kernel", "quest-kernel",
                                    "sampled-kernel"}
    for bad in ("topk(3)+sink(2)", "window(2)+sink(2)+topk(3)", "sink(2)+topk(3)+quest(4)", "topp(0.9)",
                "hashtopk(0.1)+topk(3)"):
        assert kernel_form(parse(bad)) is None
        with pytest.raises(VattnError, match=r"no fused GPU path.*topk\(k\).*hashtopk.*quest"):
            compile(bad, "cpu", fused=True)


def test_reserved_page_bounds_never_move(torch_kernel):
    q, k, v = rand_qkv(b=1, hq=4, hkv=2, t=1, n=96, seed=6)
    plan = compile("sink(2)+quest(8,page=8)", "cpu", fused=True).reserve(96)
    ptrs = set()
    for n in (20, 50, 96):
        step(plan, 0, q, k[:, :, :n], v[:, :, :n], torch.zeros(1, dtype=torch.long), torch.tensor([[n]]))
        ptrs.add(plan.states[0]["pages"].data_ptr())
    assert len(ptrs) == 1
    big = torch.cat([k, k], 2)
    with pytest.raises(VattnError, match="reserve"):
        step(plan, 0, q, big, big, torch.zeros(1, dtype=torch.long), torch.tensor([[192]]))


def test_empty_inputs(torch_kernel):
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=0)
    for spec in ("sink(2)+topk(3)", "quest(4,page=4)"):
        out, sel = step(compile(spec, "cpu", fused=True), 0, q, k, v, torch.zeros(2, dtype=torch.long),
                        torch.zeros(2, 1, dtype=torch.long))
        assert out.shape == q.shape and not out.any() and sel.count.sum() == 0


def test_moving_starts_rebound_the_first_page(torch_kernel):
    """A sliding window moves each row's start every step: the page it cuts is bounded again
    over the keys the row still sees (as the reference does)."""
    q_all, k, v = rand_qkv(b=2, hq=4, hkv=2, t=8, n=64, seed=8)
    spec = "window(3)+quest(12,page=8)"
    fused, ref = compile(spec, "cpu", fused=True), compile(spec, "cpu", fused=False)
    for s in range(8):
        ends = torch.tensor([[40 + s], [55 + s]])
        starts = (ends[:, 0] - 29 - 2 * s).clamp(min=0)  # the window's start, a few keys further each step
        q = q_all[:, :, s:s + 1]
        out, sel = step(fused, 0, q, k, v, starts, ends)
        want, wsel = step(ref, 0, q, k, v, starts, ends)
        assert rows(sel, 4) == rows(wsel, 4), s
        assert rel(out, want) < 1e-5


def test_inputs_the_kernel_cannot_take():
    """Head dim 8 does not fit the sparse kernel: fused=True says so; a plan that chose the
    path itself runs the reference from then on (and plan.path says so)."""
    q, k, v = rand_qkv(b=2, hq=4, hkv=2, t=1, n=32, d=8)
    starts, ends = torch.zeros(2, dtype=torch.long), torch.tensor([[32], [20]])
    with pytest.raises(VattnError, match="topk-kernel path cannot take these inputs.*head dim"):
        step(compile("sink(2)+topk(4)", "cpu", fused=True), 0, q, k, v, starts, ends)
    plan = compile("sink(2)+quest(4,page=4)", "cpu", fused=True)
    plan.insist = False  # as fused=None picks it on CUDA
    out, sel = step(plan, 0, q, k, v, starts, ends)
    want, wsel = step(compile("sink(2)+quest(4,page=4)", "cpu"), 0, q, k, v, starts, ends)
    assert plan.path == "reference" and torch.equal(out, want) and rows(sel, 4) == rows(wsel, 4)
