"""VmemCache in transformers generate(): same greedy tokens as DynamicCache, views not copies."""
import inspect
import os

import pytest
import torch

# transformers imports triton; triton's language helpers are bound to interpreter mode only if
# TRITON_INTERPRET is set before that first import, so set it here too (CPU) for the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from vattn.cache.hf import VmemCache  # noqa: E402
from vattn.errors import VattnError  # noqa: E402
from vattn.hf import CACHE_KEYWORDS  # noqa: E402


# The keyword this transformers takes the cache by (`cache` from 5.24 on): no deprecation warning.
CKW = next(k for k in CACHE_KEYWORDS if k in inspect.signature(LlamaForCausalLM.forward).parameters)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
KW = {} if DEV == "cuda" else {"granule": 4096}


def _model(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval().to(DEV)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, different per row
    mask[1, :2] = 0
    ids[mask == 0] = 0
    return ids.to(DEV), mask.to(DEV)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_generate_matches_dynamic_cache(attn):
    m = _model(attn)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    ref = m.generate(ids, **{CKW: DynamicCache()}, **kw)
    cache = VmemCache.for_model(m, max_batch=4, max_len=64, **KW)
    out = m.generate(ids, **{CKW: cache}, **kw)
    assert torch.equal(ref, out)
    n = ids.shape[1] + 24 - 1
    assert cache.get_seq_length() == n
    st = cache.kv.stats()
    assert 0 < st.mapped_bytes < st.static_bytes or DEV == "cuda"
    # The layers hand out views of the contiguous buffers, not copies.
    for i, layer in enumerate(cache.layers):
        assert layer.keys.shape == (3, 2, n, 16)
        assert layer.keys.untyped_storage().data_ptr() == cache.kv.k(i).untyped_storage().data_ptr()
        assert torch.equal(layer.keys, cache.kv.k(i)[:3, :, :n])
    # A second batch reuses the slots after reset; results stay identical.
    cache.reset()
    assert cache.kv.stats().slots_in_use == 0
    out2 = m.generate(ids, **{CKW: cache}, **kw)
    assert torch.equal(ref, out2)
    cache.close()


def test_forward_logits_match_and_errors():
    m = _model("sdpa")
    ids, mask = _batch()
    dyn, vm = DynamicCache(), VmemCache.for_model(m, max_batch=3, max_len=16, **KW)
    a = m(ids, attention_mask=mask, **{CKW: dyn}).logits
    b = m(ids, attention_mask=mask, **{CKW: vm}).logits
    assert torch.allclose(a, b, atol=1e-5)
    nxt = torch.full((3, 1), 5, device=DEV)
    mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
    a = m(nxt, attention_mask=mask2, **{CKW: dyn}).logits
    b = m(nxt, attention_mask=mask2, **{CKW: vm}).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(VattnError, match="max_len"):
        m(torch.ones((3, 8), dtype=torch.long, device=DEV), **{CKW: vm})
    small = VmemCache.for_model(m, max_batch=2, max_len=16, **KW)
    with pytest.raises(VattnError, match="free slots"):
        m(ids, **{CKW: small})
