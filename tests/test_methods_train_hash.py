"""train-hash: learned projections train, save, load into hashtopk, and rank better on their data."""
import pytest
import torch

import vattn
from vattn.attend import dense_attend
from vattn.methods.train_hash import recall, synthetic_records, train_hash
from vattn.train_hash import train_hash_command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    recs = synthetic_records(layers=1, hq=2, hkv=1, n=128, t=16, d=16)
    data = train_hash(recs, bits=16, steps=40, lr=0.05)
    path = tmp_path_factory.mktemp("hash") / "hash.pt"
    torch.save(data, path)
    return recs, data, str(path)


def test_learned_beats_random_on_its_data(trained):
    recs, data, _ = trained
    rec = recs[0]
    assert recall(data["layers"][0], rec, 16, frac=0.1) > recall(None, rec, 16, frac=0.1)


def test_file_loads_into_hashtopk(trained):
    recs, _, path = trained
    r = recs[0]
    q, k, v = r["q"][:, :, -1:], r["k"], r["v"]
    sel = vattn.select(f"hashtopk(10, bits=16, proj='{path}')", q, k, v)
    assert bool((sel.count == 10).all())
    out, _ = vattn.sparse_attention(q, k, v, f"hashtopk(1.0, bits=16, proj='{path}')")
    assert torch.allclose(out, dense_attend(q, k, v), atol=2e-6)


def test_a_learned_front_runs_the_reference_path(trained):
    """hashtopk with a learned projection has no kernel path (the scores kernel signs with the
    seeded SimHash): alone or before the iid sample, the plan runs the reference and says so."""
    from vattn.errors import VattnError
    from vattn.plan import compile
    _, _, path = trained
    for spec in (f"sink(2)+hashtopk(10,bits=16,proj='{path}')",
                 f"sink(2)+hashtopk(10,bits=16,proj='{path}')+verified(draws='iid')"):
        assert compile(spec, "cpu").path in ("reference", "sampled-reference")
        with pytest.raises(VattnError, match="no fused GPU path"):
            compile(spec, "cpu", fused=True)


def test_file_mismatches_are_named(trained):
    recs, _, path = trained
    with pytest.raises(vattn.VattnError, match="bits=16"):
        vattn.parse(f"hashtopk(0.1, bits=64, proj='{path}')")
    r = recs[0]
    with pytest.raises(vattn.VattnError, match="layer 3"):
        vattn.select(f"hashtopk(0.1, bits=16, proj='{path}')", r["q"], r["k"], r["v"], layer=3)
    with pytest.raises(vattn.VattnError, match="query / .* KV heads"):
        q = torch.randn(1, 4, 1, 16)
        vattn.select(f"hashtopk(0.1, bits=16, proj='{path}')", q, torch.randn(1, 2, 50, 16),
                     torch.randn(1, 2, 50, 16))


def test_bad_options():
    recs = synthetic_records(layers=1, n=64, t=4)
    with pytest.raises(vattn.VattnError, match="kind"):
        train_hash(recs, kind="cnn")
    with pytest.raises(vattn.VattnError, match="loss"):
        train_hash(recs, loss="mse")


def test_command_on_synthetic_data(tmp_path):
    out = tmp_path / "h.pt"
    train_hash_command(out=out, bits=8, steps=3, top=4, synthetic=True, kind="mlp", loss="bce")
    data = torch.load(out, weights_only=True)
    assert data["bits"] == 8 and set(data["layers"]) == {0, 1} and "w2" in data["layers"][0]["k"]
