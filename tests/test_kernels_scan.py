"""The four-launch vAttention decode (kernels/scan.py) against its float64 twin, in the
Triton interpreter: poisoned outputs, ragged and short rows, the exact fallback, and the
estimator's unbiasedness for a fixed sample size."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from helpers import poison_empty as _poison_empty  # noqa: F401 (autouse fixture)
from helpers import rel
from vattn.errors import VattnError
from vattn.kernels.bits import sign_bits
from vattn.kernels.decode import dense_decode_ref
from vattn.kernels.scan import scan_decode_ref, scan_density, var_inflation, vattention_scan_decode
from helpers import kernel_env

pytestmark, DEV = kernel_env()
KW = dict(sink=16, window=32, topk=200, m0=32, sub=512)
RUN = dict(splits=(3, 4), block_c=256, block_n=32)


def inputs(seed, B=2, Hq=8, Hkv=2, D=64, N=2048, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).to(DEV) for s in
               ((B, Hq, 1, D), (B, Hkv, N, D), (B, Hkv, N, D)))
    proj = torch.randn(D, 32, generator=g).to(DEV)
    return q, k, v, proj, sign_bits(k, proj)


@pytest.mark.parametrize("dtype,eps,seed", [(torch.float32, 0.1, 0), (torch.float32, 0.3, 1),
                                            (torch.bfloat16, 0.1, 2)])
def test_scan_decode_matches_float64_twin(dtype, eps, seed):
    q, k, v, proj, ks = inputs(seed, dtype=dtype)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=eps, delta=0.1, seed=seed, **KW)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **RUN, **kw)
    _, rs = scan_decode_ref(q, k, v, ks, proj, L, **kw)
    got, want = st["rows"].cpu().double(), rs["rows"]
    assert torch.equal(got[:, [0, 2, 4, 5]], want[:, [0, 2, 4, 5]])  # pilot, n_mid, exact, tau
    assert (got[:, 6] - want[:, 6]).abs().max() <= 8  # tie cut (2^24 units): float32 rounding, 5 seen on an H100
    assert ((got[:, [1, 3]] - want[:, [1, 3]]).abs() <= torch.clamp(want[:, [1, 3]] * 2e-3, min=1)).all()
    # with the kernel's own cuts the twin attends the same keys with the same weights
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, tau=got[:, 5].long(), thu=got[:, 6].long(),
                              total=got[:, 1].long(), exact=got[:, 4] > 0, **kw)
    assert torch.equal(st["exact_keys"].cpu(), rs["exact_keys"])
    assert torch.equal(st["sample_keys"].cpu(), rs["sample_keys"])
    assert rel(out, ref) < (2e-2 if dtype == torch.bfloat16 else 1e-5)
    # the approximate top-k takes about topk middle keys (sinks and window are the rest)
    taken = rs["exact_keys"].double() - KW["sink"] - KW["window"]
    assert 0.6 < taken.mean().item() / KW["topk"] < 1.4
    assert 0 < scan_density(st, L, k.shape[1]) < 1


@pytest.mark.parametrize("eps", [0.02, 0.3])
def test_scan_decode_early_draws_change_nothing(eps):
    # with 8 warps each sample program attends its first block before the budget is known; with
    # 4 it waits (the plain order). eps 0.3 sizes samples of 37..145 draws for 4 programs x 32:
    # some programs keep their early block, others must drop it (a draw past the total would
    # change sample_keys); eps 0.02 makes rows exact (the early block is dropped)
    q, k, v, proj, ks = inputs(3)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=eps, delta=0.1, seed=3, sample_bn=32, stats=True, **RUN, **KW)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, num_warps=8, **kw)
    totals = st["rows"][:, 1].cpu()
    assert ((totals % 32 != 0) & (totals < 4 * 32)).any() or (st["rows"][:, 4] > 0).any()
    for pre in (None, True):  # 4 warps: plain order by default, early blocks when asked
        got, sg = vattention_scan_decode(q, k, v, ks, proj, L, num_warps=4, pre=pre, **kw)
        assert torch.equal(sg["sample_keys"], st["sample_keys"]) and torch.equal(sg["rows"], st["rows"])
        assert rel(got, out) < 1e-6


def test_scan_decode_count_is_the_keys_attended():
    # count=True: the kernels sum each row's keys attended (scan and sample) themselves
    q, k, v, proj, ks = inputs(5)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=0.3, delta=0.1, seed=5, **RUN, **KW)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **kw)
    for _ in range(2):
        got, n = vattention_scan_decode(q, k, v, ks, proj, L, count=True, **kw)
        assert torch.equal(n, st["exact_keys"] + st["sample_keys"]) and torch.equal(got, out)


def test_scan_decode_leaves_its_counters_zero():
    # the cut kernel's per-row counter is zeroed by the program that used it last (no memset per
    # call): a second call must find it zero and give the same cut, sample and output
    from vattn.kernels.common import _ZEROED
    q, k, v, proj, ks = inputs(4)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=0.2, delta=0.1, seed=4, stats=True, **RUN, **KW)
    a, sa = vattention_scan_decode(q, k, v, ks, proj, L, **kw)
    assert all(int(b.abs().sum()) == 0 for bufs in _ZEROED.values() for b in bufs)
    b, sb = vattention_scan_decode(q, k, v, ks, proj, L, **kw)
    assert torch.equal(sa["rows"], sb["rows"]) and torch.equal(a, b)


def test_zeroed_counters_grow_without_freeing_what_a_graph_may_hold():
    from vattn.kernels.common import _ZEROED, zeroed_counters
    # a request past the largest buffer so far makes a new one; the old stays held
    small = zeroed_counters(3, torch.device("cpu"))
    n = max(b.numel() for b in _ZEROED["cpu"]) + 1
    big = zeroed_counters(n, torch.device("cpu"))
    assert big.numel() == n and not int(big.abs().sum()) and big.data_ptr() != small.data_ptr()
    held = _ZEROED["cpu"]
    assert any(b.data_ptr() == small.data_ptr() for b in held) and held[-1].data_ptr() == big.data_ptr()


def test_scan_decode_exact_fallback_and_short_rows_equal_dense():
    # a tiny eps asks for more draws than the residual holds: every row attends it exactly, so
    # the output is dense attention; the 40-key row has no middle at all
    q, k, v, proj, ks = inputs(5, B=3)
    L = torch.tensor([2048, 900, 40], dtype=torch.int32, device=DEV)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, eps=1e-4, delta=0.1, stats=True, **RUN, **KW)
    rows = st["rows"].cpu()
    assert (rows[:4, 4] == 1).all() and (rows[4:, 2] == 0).all()  # exact; no middle
    assert torch.equal((st["exact_keys"] + st["sample_keys"]).cpu(), L.cpu().repeat_interleave(2))
    assert rel(out, dense_decode_ref(q, k, v, L)) < 1e-5


def test_scan_decode_writes_the_newest_keys_signature():
    # update_sig: the cut kernel writes each row's newest signature (a decoder appends one key
    # per step); that key is in the window, so this step's output does not depend on it
    q, k, v, proj, ks = inputs(8)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    stale = ks.clone()
    stale[0, :, 2047] = 12345
    stale[1, :, 1499] = -7
    out = vattention_scan_decode(q, k, v, ks, proj, L, eps=0.1, delta=0.1, **RUN, **KW)
    got = vattention_scan_decode(q, k, v, stale, proj, L, eps=0.1, delta=0.1, update_sig=True, **RUN, **KW)
    assert torch.equal(stale, ks) and torch.equal(got, out)
    with pytest.raises(VattnError, match="window >= 1"):
        vattention_scan_decode(q, k, v, ks, proj, L, update_sig=True, **RUN, **(KW | dict(window=0)))
    with pytest.raises(VattnError, match="contiguous ksig"):
        vattention_scan_decode(q, k, v, ks.transpose(1, 2).contiguous().transpose(1, 2), proj, L, update_sig=True,
                               **RUN, **KW)


def test_scan_estimator_is_unbiased_for_a_fixed_sample_size():
    # independent draws over the whole middle, drawn top-k keys counted as 0: E[D_hat] = D
    q, k, v, proj, ks = inputs(7, B=1, Hkv=1, Hq=4, N=1024)
    q = q * 3  # peaked rows: a biased estimator would show
    ratios = []
    for seed in range(200):
        _, rs = scan_decode_ref(q, k, v, ks, proj, None, eps=0.1, delta=0.1, seed=seed,
                                total=torch.tensor([64]), exact=[False], **KW)
        ratios.append(rs["d_hat"] / rs["d"])
    r = torch.stack(ratios)  # [seeds, 1, 4]
    se = r.std(0) / 200 ** 0.5
    assert ((r.mean(0) - 1).abs() < 4 * se + 1e-9).all()
    assert (r.std(0) > 0).all()  # the sample varies with the seed


def test_scan_decode_bad_inputs():
    q, k, v, proj, ks = inputs(0, B=1)
    with pytest.raises(VattnError, match="T=1"):
        vattention_scan_decode(q.expand(1, 8, 2, 64), k, v, ks, proj)
    with pytest.raises(VattnError, match="ksig"):
        vattention_scan_decode(q, k, v, ks.float(), proj)
    with pytest.raises(VattnError, match="m0"):
        vattention_scan_decode(q, k, v, ks, proj, m0=1)
    with pytest.raises(VattnError, match="head dim"):
        vattention_scan_decode(q[..., :48], k[..., :48], v[..., :48], ks, proj[:48])
    with pytest.raises(VattnError, match="sinks and window"):
        vattention_scan_decode(q, k, v, ks, proj, splits=(1, 4))
    if DEV == "cpu":  # the timeline and programmatic dependent launch need a GPU
        with pytest.raises(VattnError, match="global timer"):
            vattention_scan_decode(q, k, v, ks, proj, trace={})
        with pytest.raises(VattnError, match="pdl=True"):
            vattention_scan_decode(q, k, v, ks, proj, pdl=True)


def test_scan_decode_smaller_cut_programs_match_the_twin():
    # sub_block only parts the same subsample among more cut programs (31 per row here, the
    # pilot spread over two): their histograms and the pilot must still add up to the twin's
    q, k, v, proj, ks = inputs(9)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=0.2, delta=0.1, seed=9, **(KW | dict(sub=1024)))
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, sub_block=64, **RUN, **kw)
    r = st["rows"].cpu().double()
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, sub_block=64, **kw)
    assert torch.equal(r[:, 5], rs["rows"][:, 5]) and (r[:, 6] - rs["rows"][:, 6]).abs().max() <= 8
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, sub_block=64, tau=r[:, 5].long(), thu=r[:, 6].long(),
                              total=r[:, 1].long(), exact=r[:, 4] > 0, **kw)
    assert torch.equal(st["exact_keys"].cpu(), rs["exact_keys"]) and rel(out, ref) < 1e-5
    with pytest.raises(VattnError, match="power of two >= 32"):
        vattention_scan_decode(q, k, v, ks, proj, L, sub_block=48, **RUN, **kw)


def test_scan_decode_two_word_signatures_match_the_twin():
    # W = 2 signature words per key (64 bits): agreement sums both words, the bins widen
    g = torch.Generator().manual_seed(10)
    q, k, v, _, _ = inputs(10)
    proj = torch.randn(64, 64, generator=g).to(DEV)
    ks = sign_bits(k, proj)
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=0.2, delta=0.1, seed=10, **KW)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **RUN, **kw)
    r = st["rows"].cpu().double()
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, **kw)
    assert torch.equal(r[:, 5], rs["rows"][:, 5]) and (r[:, 6] - rs["rows"][:, 6]).abs().max() <= 8
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, tau=r[:, 5].long(), thu=r[:, 6].long(),
                              total=r[:, 1].long(), exact=r[:, 4] > 0, **kw)
    assert torch.equal(st["exact_keys"].cpu(), rs["exact_keys"]) and rel(out, ref) < 1e-5


def test_var_inflation_is_the_chi_square_bound():
    # (m0 - 1) / x with P(chi2_{m0-1} <= x) = 1 - conf; it falls as the pilot grows (so a smaller
    # pilot may not borrow the configured size's factor); var_conf 0 is the plug-in variance
    for m0, delta, vc in ((128, 0.05, -1.0), (16, 0.1, 0.9), (2, 0.5, -1.0)):
        conf = 1 - delta / 2 if vc == -1.0 else vc
        x = (m0 - 1) / var_inflation(m0, delta, vc)
        cdf = torch.special.gammainc(torch.tensor((m0 - 1) / 2, dtype=torch.float64),
                                     torch.tensor(x / 2, dtype=torch.float64)).item()
        assert abs(cdf - (1 - conf)) < 1e-5
    assert var_inflation(64, 0.2, 0.0) == 1.0
    f = [var_inflation(m, 0.05) for m in (8, 16, 64, 128, 1024)]
    assert all(a > b > 1 for a, b in zip(f, f[1:]))
    with pytest.raises(VattnError, match="var_conf"):
        var_inflation(128, 0.05, 1.5)


def test_scan_decode_fractional_topk_strided_views_and_roomy_signatures():
    """What a plan passes: topk as a fraction of each row's length, K/V views of a longer cache
    (not copied) and a signature buffer with room for more keys; the twin agrees."""
    q, k, v, proj, _ = inputs(4, N=2560)
    k, v = k[:, :, :2048], v[:, :, :2048]  # views: batch/head strides of the 2560-key buffer
    ks = sign_bits(torch.cat([k, torch.zeros_like(k[:, :, :300])], 2), proj)  # room for 2348 keys
    L = torch.tensor([2048, 1200], dtype=torch.int32, device=DEV)
    kw = dict(eps=0.1, delta=0.1, seed=4, **{**KW, "topk": 0.1})
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **RUN, **kw)
    got = st["rows"].cpu().double()
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, tau=got[:, 5].long(), thu=got[:, 6].long(),
                              total=got[:, 1].long(), exact=got[:, 4] > 0, **kw)
    assert torch.equal(st["exact_keys"].cpu(), rs["exact_keys"])
    assert rel(out, ref) < 1e-5
    taken = rs["exact_keys"].double().view(2, 2) - KW["sink"] - KW["window"]
    want = torch.tensor([[205.0], [120.0]])  # ceil(0.1 * L) per batch row
    assert ((taken / want) - 1).abs().max() < 0.4
    sel = rs["selection"]  # the twin lists what it attended: counts agree with its stats
    assert sel.shared and torch.equal(sel.count.view(-1).cpu(), rs["exact_keys"] + rs["sample_keys"])


@pytest.mark.parametrize("eps,seed", [(0.1, 6), (0.2, 5)])
def test_scan_decode_output_mode_matches_twin(eps, seed):
    """Output mode: the budget from the pilot's spread of x_j (v_j - o) and a lower bound on
    ||o||; the kernels size the same samples as the float64 twin and attend the same keys."""
    q, k, v, proj, ks = inputs(seed)
    v = v + 1.5  # outputs away from 0: ||o|| is what output mode divides by
    L = torch.tensor([2048, 1500], dtype=torch.int32, device=DEV)
    kw = dict(eps=eps, delta=0.1, seed=seed, mode="output", **KW)
    out, st = vattention_scan_decode(q, k, v, ks, proj, L, stats=True, **RUN, **kw)
    _, rs = scan_decode_ref(q, k, v, ks, proj, L, **kw)
    got, want = st["rows"].cpu().double().clamp(max=1e300), rs["rows"].clamp(max=1e300)  # need: inf = exact
    assert torch.equal(got[:, [0, 2, 4, 5]], want[:, [0, 2, 4, 5]])
    assert ((got[:, [1, 3]] - want[:, [1, 3]]).abs() <= torch.clamp(want[:, [1, 3]] * 2e-3, min=1)).all()
    assert (got[:, 4] == 0).any() and (got[:, 1] > got[:, 0]).any()  # rows that sample beyond the pilot
    ref, rs = scan_decode_ref(q, k, v, ks, proj, L, tau=got[:, 5].long(), thu=got[:, 6].long(),
                              total=got[:, 1].long(), exact=got[:, 4] > 0, **kw)
    assert torch.equal(st["sample_keys"].cpu(), rs["sample_keys"])
    assert rel(out, ref) < 1e-5
    _, dn = scan_decode_ref(q, k, v, ks, proj, L, **{**kw, "mode": "denominator"})
    assert not torch.equal(want[:, 3], dn["rows"][:, 3])  # another budget than denominator mode's
    with pytest.raises(VattnError, match="mode must be"):
        vattention_scan_decode(q, k, v, ks, proj, L, **{**kw, "mode": "both"})


def test_scan_plan_fills_the_sms_with_spans_at_four_warps(monkeypatch):
    from vattn.kernels import common, scan
    monkeypatch.setattr(common, "sm_count", lambda i: 132)  # an H200's SMs
    monkeypatch.setattr(scan, "sm_count", lambda i: 132)
    monkeypatch.setattr(scan, "scan_resident", lambda i: 3)  # an H200's 228 KB an SM
    gpu = torch.device("cuda")
    # 4 warps: as many spans as 3 programs an SM hold (measured best at B=4 and B=8), never fewer
    # than two programs an SM ask; the sample keeps about two an SM
    assert scan.scan_plan(32, gpu, draws=128) == (13, 9)
    assert scan.scan_plan(64, gpu, draws=128) == (7, 5)
    assert scan.scan_plan(128, gpu, draws=128) == (4, 3)
    assert scan.scan_plan(256, gpu, draws=128) == (3, 2)
    # 8 warps (up to 16 KV rows) and the interpreter keep two programs an SM
    assert scan.scan_plan(8, gpu, num_warps=8, draws=128) == (33, 33)
    assert scan.scan_plan(32, torch.device("cpu"), draws=128) == (2, 2)


def test_scan_resident_counts_programs_by_shared_memory(monkeypatch):
    from types import SimpleNamespace
    from vattn.kernels import scan
    for smem, want in ((233472, 3), (167936, 2), (102400, 1)):  # H100/H200, A100, a 100 KB SM
        scan.scan_resident.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i, s=smem: SimpleNamespace(shared_memory_per_multiprocessor=s))
        assert scan.scan_resident(0) == want
    scan.scan_resident.cache_clear()
