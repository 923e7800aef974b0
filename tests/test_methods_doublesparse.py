"""doublesparse: heavy channels, top-k of the channel score, full budget, label cache, files, errors."""
import math

import pytest
import torch

import vattn
from helpers import assert_parse_error, assert_full_budget_is_dense
from vattn.attend import row_bounds
from vattn.methods.doublesparse import calibrate_channels

LENGTHS, STARTS = torch.tensor([53, 41]), torch.tensor([0, 5])


def inputs(b=2, hq=4, hkv=2, t=3, n=53, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, n, d, generator=g),
            torch.randn(b, hkv, n, d, generator=g))


def brute_channels(k, starts, end, c):
    """Per KV head: the c channels with the largest mean |k_c| over positions [starts, end)."""
    return [sorted(range(k.shape[-1]), key=lambda j: -float(k[h, starts:end, j].abs().mean()))[:c]
            for h in range(k.shape[0])]


def keys_of(sel, bi, h, t):
    return set(sel.indices[bi, h, t, : sel.count[bi, h, t]].tolist())


def test_picks_top_k_of_the_channel_restricted_score():
    q, k, v = inputs()
    c, want = 4, 7
    state = {}
    sel = vattn.select(f"doublesparse({want}, channels={c})", q, k, v, lengths=LENGTHS, starts=STARTS, state=state)
    s, e = row_bounds(2, 3, k.shape[2], LENGTHS, STARTS)
    scale = 1 / math.sqrt(q.shape[-1])
    for bi in range(2):
        chans = brute_channels(k[bi], int(s[bi]), int(LENGTHS[bi]), c)
        assert [sorted(x) for x in state[f"doublesparse/{c}/"+"/channels"][bi].tolist()] == [sorted(x) for x in chans]
        for h in range(4):
            ch = chans[h // 2]
            for t in range(3):
                rows = range(int(s[bi]), int(e[bi, t]))
                approx = {j: scale * sum(float(q[bi, h, t, x] * k[bi, h // 2, j, x]) for x in ch) for j in rows}
                best = set(sorted(approx, key=lambda j: -approx[j])[:want])
                assert keys_of(sel, bi, h, t) == best


def test_all_channels_is_oracle_topk():
    q, k, v = inputs(seed=1)
    a = vattn.select("doublesparse(9, channels=64)", q, k, v, lengths=LENGTHS, starts=STARTS)
    b = vattn.select("topk(9)", q, k, v, lengths=LENGTHS, starts=STARTS)
    for bi in range(2):
        for h in range(4):
            for t in range(3):
                assert keys_of(a, bi, h, t) == keys_of(b, bi, h, t)


@pytest.mark.parametrize("channels", [1, 4, 16])
def test_full_budget_is_dense(channels):
    q, k, v = inputs(seed=2)
    assert_full_budget_is_dense(f"doublesparse(1.0, channels={channels})", q, k, v, LENGTHS, STARTS)


def test_composes_after_fixed_parts_and_before_verified():
    q, k, v = inputs(seed=3)
    sel = vattn.select("sink(2)+window(3)+doublesparse(5, channels=4)+verified(eps=0.3,delta=0.3)",
                       q, k, v, lengths=LENGTHS, starts=STARTS, seed=0)
    front = vattn.select("sink(2)+window(3)+doublesparse(5, channels=4)", q, k, v, lengths=LENGTHS, starts=STARTS)
    assert bool((front.count == 10).all())  # 2 + 3 + 5 distinct keys
    assert bool((sel.count >= front.count).all())


def test_label_cache_grows_with_appended_keys_and_matches_prefill_then_jump():
    q, k, v = inputs(t=1, n=70, seed=4)
    starts, spec, n0 = torch.tensor([0, 3]), "sink(2)+doublesparse(6, channels=5)", 37
    state = {}
    for n in [37, 38, 39, 41, 48, 57, 70]:
        lengths = torch.tensor([n, n - 2])
        inc = vattn.select(spec, q, k[:, :, :n], v[:, :, :n], lengths=lengths, starts=starts, state=state)
        # Rebuild: a fresh state from the same prefill, then straight to n keys.
        fresh = {}
        vattn.select(spec, q, k[:, :, :n0], v[:, :, :n0], lengths=torch.tensor([n0, n0 - 2]), starts=starts, state=fresh)
        new = vattn.select(spec, q, k[:, :, :n], v[:, :, :n], lengths=lengths, starts=starts, state=fresh)
        assert torch.equal(inc.indices, new.indices) and torch.equal(inc.count, new.count)
        chan = state["doublesparse/5//channels"]
        assert torch.equal(chan, fresh["doublesparse/5//channels"])
        labels = state["doublesparse/5/"]["meta"]
        want = torch.gather(k[:, :, :n], 3, chan[:, :, None, :].expand(2, 2, n, 5))
        for bi in range(2):  # every key a row can see is in the cache
            hi = int(lengths[bi])
            assert torch.equal(labels[bi, :, int(starts[bi]):hi], want[bi, :, int(starts[bi]):hi])


def test_calibration_file_ranks_by_mean_abs_q_times_k(tmp_path):
    q, k, v = inputs(b=1, seed=5)
    q[:, 2:4, :, 9] *= 20  # KV head 1's queries lean on channel 9 ...
    k[:, 1, :, 3] *= 10    # ... its keys on channel 3 (x10 < x20): 9 first, then 3
    recs = [{"layer": 0, "q": q, "k": k}, {"layer": 2, "q": q, "k": k}]
    data = calibrate_channels(recs, str(tmp_path / "chan.pt"))
    for h in range(2):
        ref = (q[0, 2 * h:2 * h + 2].abs().mean(1).sum(0) * k[0, h].abs().mean(0))
        assert data["layers"][0][h].tolist() == torch.argsort(ref, descending=True).tolist()
    assert data["layers"][0][1, :2].tolist() == [9, 3]
    path = str(tmp_path / "chan.pt")
    # The file's channels replace the prefill's: equal to an explicit restriction to them.
    sel = vattn.select(f"doublesparse(5, channels=2, calib='{path}')", q, k, v, state={})
    for h in range(4):
        ch = data["layers"][0][h // 2, :2]
        s = q[0, h, :, ch] @ k[0, h // 2, :, ch].T  # [T, N]; scale does not change the order
        for t in range(3):
            end = k.shape[2] - 2 + t
            assert keys_of(sel, 0, h, t) == set(torch.topk(s[t, :end], 5).indices.tolist())
    with pytest.raises(vattn.VattnError, match="no channels for layer 1"):
        vattn.select(f"doublesparse(5, calib='{path}')", q, k, v, layer=1)
    with pytest.raises(vattn.VattnError, match="KV heads"):
        vattn.select(f"doublesparse(5, calib='{path}')", q, k[:, :1], v[:, :1])


@pytest.mark.parametrize("spec, words", [
    ("doublesparse(1.5)", ["doublesparse", "k", "(0, 1]"]),
    ("doublesparse(-3)", ["doublesparse", "k"]),
    ("doublesparse(channels=0)", ["doublesparse", "channels", "[1, 1024]"]),
    ("doublesparse(channels=2.5)", ["doublesparse", "channels"]),
    ("doublesparse(calib='no/such/file.pt')", ["doublesparse", "calib", "calibrate_channels"]),
])
def test_invalid_parameters(spec, words):
    assert_parse_error(spec, words)


def test_not_a_channel_file(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"format": "other"}, p)
    with pytest.raises(vattn.VattnError, match="doublesparse: .* is not a channel file"):
        vattn.parse(f"doublesparse(calib='{p}')")
