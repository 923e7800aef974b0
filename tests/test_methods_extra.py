"""heads(): listed heads dense, others sink + window."""
import pytest
import torch

import vattn
from vattn.attend import dense_attend


def test_listed_heads_are_dense_and_others_streaming():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 2, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g), torch.randn(2, 2, 40, 8, generator=g)
    lengths, starts = torch.tensor([40, 30]), torch.tensor([0, 3])
    out, sel = vattn.sparse_attention(q, k, v, "heads(full='1 3.2', sink=2, window=5)", lengths=lengths, starts=starts)
    ref = dense_attend(q, k, v, lengths=lengths, starts=starts)
    assert torch.allclose(out[:, 1], ref[:, 1], atol=2e-6)
    assert not torch.allclose(out[:, 2], ref[:, 2], atol=1e-3)  # 3.2: layer 3 only
    stream = vattn.sparse_attention(q, k, v, "sink(2)+window(5)", lengths=lengths, starts=starts)[0]
    assert torch.allclose(out[:, 0], stream[:, 0], atol=2e-6)
    out3, _ = vattn.sparse_attention(q, k, v, "heads(full='1 3.2', sink=2, window=5)", lengths=lengths, starts=starts)
    sel3 = vattn.select("heads(full='1 3.2', sink=2, window=5)", q, k, v, lengths=lengths, starts=starts, layer=3)
    assert torch.allclose(vattn.attend(q, k, v, sel3)[:, 2], ref[:, 2], atol=2e-6)


@pytest.mark.parametrize("spec, words", [
    ("heads(full='1,2')", ["heads", "full"]),
    ("heads(full='a')", ["heads", "full"]),
    ("heads(full='1', sink=-1)", ["heads", "sink"]),
])
def test_invalid_parameters(spec, words):
    with pytest.raises(vattn.VattnError) as e:
        vattn.parse(spec)
    assert all(w in str(e.value) for w in words)
