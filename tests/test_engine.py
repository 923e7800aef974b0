"""The engine on the CPU (fp32): logits equal transformers' (max abs diff < 1e-4), sparse
specs equal the HF-patch path, chunked prefill equals one-shot, batched decode equals each
sequence alone, and bad inputs give VattnErrors."""
import pytest
import torch

import vattn
from conftest import ARCHS, tiny_model, tiny_tokenizer
from vattn.cache.vmem import VattnOutOfMemory
from vattn.engine.runner import Runner, length_bucket
from vattn.errors import VattnError

TOL = 1e-4  # fp32: the same ops in the same order give ~1e-7; 1e-4 leaves room for BLAS blocking


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def ids_for(n, seed=0, vocab=128):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers(arch):
    model = tiny_model(arch)
    r = Runner(model, device="cpu", max_len=64, max_batch=2)
    ids = ids_for(30)
    ref = hf_logits(model, ids)
    s = r.alloc()
    got = [r.prefill(s, ids[:18], chunk=7)]  # chunks cut across sliding windows (8, 12)
    for t in ids[18:]:
        got.append(r.decode([s], [t])[0])
    diff = (torch.stack(got) - ref[17:]).abs().max().item()
    assert diff < TOL, f"{arch}: max abs diff {diff}"
    assert r.length(s) == 30
    assert r.density(s) == 1.0  # dense spec


@pytest.mark.parametrize("rope", [dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16),
                                  dict(rope_type="linear", factor=4.0),
                                  dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=128),
                                  dict(rope_type="dynamic", factor=2.0)])
def test_scaled_rope_logits_equal_transformers(rope):
    """Llama 3.1's rope scaling and the other types the engine takes (HF's own tables)."""
    import transformers as tf
    from conftest import TINY
    models = []
    for p in (rope, {"rope_type": "default"}):
        torch.manual_seed(0)
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY, rope_parameters={"rope_theta": 10000.0, **p})).eval()
        m.config._attn_implementation_internal = "sdpa"
        models.append(m)
    ids = ids_for(40, seed=5)
    ref = hf_logits(models[0], ids)
    if rope["rope_type"] != "dynamic":  # (dynamic scales only past the trained positions: 512 here)
        assert (ref - hf_logits(models[1], ids)).abs().max() > 1e-3  # the scaling moves these logits
    r = Runner(models[0], device="cpu", max_len=64, max_batch=1)
    s = r.alloc()
    got = [r.prefill(s, ids[:30])] + [r.decode([s], [t])[0] for t in ids[30:]]
    assert (torch.stack(got) - ref[29:]).abs().max().item() < TOL
    if rope["rope_type"] == "dynamic":  # one table for all positions: not past the trained length
        with pytest.raises(VattnError, match="max_len must be <= 512"):
            Runner(models[0], device="cpu", max_len=1024, max_batch=1)


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("qwen3")
    r = Runner(model, device="cpu", max_len=64, max_batch=2)
    ids = ids_for(40, seed=1)
    a, b = r.alloc(), r.alloc()
    one, chunked = r.prefill(a, ids), r.prefill(b, ids, chunk=6)
    assert (one - chunked).abs().max() < TOL
    for x, y in zip(r.kv.view(2, a, 1, 40), r.kv.view(2, b, 1, 40)):  # K and V of the last layer
        assert (x - y).abs().max() < TOL
    r.free(b)  # prefill in two calls (start=) is the same again
    b = r.alloc()
    r.prefill(b, ids[:25])
    assert (r.prefill(b, ids[25:], start=25) - one).abs().max() < TOL


@pytest.mark.parametrize("spec", ["dense", "sink(2)+window(6)+quest(0.3,page=4)"])
def test_token_major_cache_layout_decodes_alike(spec):
    """kv_layout='bnhd' (the cache grows in finer steps) gives the same logits as 'bhnd'."""
    model = tiny_model("qwen3")
    ids, new = ids_for(30, seed=5), ids_for(5, seed=6)
    out = []
    for layout in ("bhnd", "bnhd"):
        r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=2, kv_layout=layout)
        assert r.kv.layout == layout
        s = r.alloc()
        got = [r.prefill(s, ids, chunk=8)] + [r.decode([s], [t])[0] for t in new]
        out.append(torch.stack(got))
    assert (out[0] - out[1]).abs().max() < TOL


@pytest.mark.parametrize("spec", ["dense", "sink(2)+window(6)", "sink(2)+window(2)+topk(0.25)"])
def test_batched_decode_equals_alone(spec):
    model = tiny_model("mistral")  # window 12: sliding layers in the batch too
    p1, p2 = ids_for(9, seed=2), ids_for(21, seed=3)
    new = ids_for(6, seed=4)
    alone = []
    for p in (p1, p2):
        r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=4)
        s = r.alloc()
        r.prefill(s, p)
        alone.append(torch.stack([r.decode([s], [t])[0] for t in new]))
    r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=4)
    r.alloc()  # an idle slot between them: rows of the cache with no keys
    s1, s2 = r.alloc(), r.alloc()
    r.prefill(s2, p2)
    r.prefill(s1, p1)
    both = torch.stack([r.decode([s2, s1], [t, t]) for t in new])  # [steps, 2, V]
    assert (both[:, 1] - alone[0]).abs().max() < TOL
    assert (both[:, 0] - alone[1]).abs().max() < TOL
    if spec != "dense":
        assert 0 < r.density(s1) < 1 and 0 < r.density(s2) < 1


def test_greedy_decode_returns_the_argmax_ids():
    model = tiny_model("llama")
    runs = []
    for greedy in (False, True):
        r = Runner(model, device="cpu", max_len=64, max_batch=2)
        slots = [r.alloc(), r.alloc()]
        for s, p in zip(slots, (ids_for(9, seed=1), ids_for(12, seed=2))):
            r.prefill(s, p)
        toks, seen = [5, 6], []
        for _ in range(4):
            out = r.decode(slots, toks, greedy=greedy)
            if greedy:
                assert out.dtype == torch.long and out.shape == (2,)
            toks = (out if greedy else out.argmax(-1)).tolist()
            seen.append(toks)
        runs.append(seen)
    assert runs[0] == runs[1]


@pytest.mark.parametrize("spec", ["sink(4)+window(8)", "sink(2)+window(2)+topk(0.25)",
                                  "sink(2)+window(4)+uniform(6)",
                                  "quest(0.25, page=4)",
                                  "sink(2)+window(4)+hashtopk(0.1,bits=128,cut='sample')"
                                  "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=8)",
                                  "sink(2)+window(4)+quest(0.2,page=4)"
                                  "+verified(eps=0.3,delta=0.3,draws='iid',min_pilot=8,mode='denominator')"])
def test_sparse_equals_hf_patch(spec):
    """Prefill dense, decode with the spec: the engine's logits are the HF-patch path's
    (uniform(...) samples: the same seeded draws, per sequence, in the same order)."""
    from vattn.hf import cache_keyword, output_cache, patch
    model = tiny_model("llama")
    ids = ids_for(40, seed=5)
    n = 24
    p = patch(model, spec, sparse_from=n, seed=3)
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids[:n]]), use_cache=True)
            cache, ref = output_cache(out), [out.logits[0, -1]]
            for t in ids[n:]:
                out = model(torch.tensor([[t]]), **{cache_keyword(model): cache}, use_cache=True)
                cache = output_cache(out)
                ref.append(out.logits[0, -1])
        hf_density = p.summary()["density"]
    finally:
        p.undo()
    r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=2, seed=3)
    s = r.alloc()
    got = [r.prefill(s, ids[:n])] + [r.decode([s], [t])[0] for t in ids[n:]]
    diff = (torch.stack(got) - torch.stack(ref)).abs().max().item()
    assert diff < TOL, f"{spec}: max abs diff {diff}"
    # ours: keys attended / keys allowed over all steps; HF's summary: the mean of per-call ratios
    assert r.density(s) == pytest.approx(hf_density, rel=0.05) and r.density(s) < 1
    if spec == "sink(4)+window(8)":  # 12 of n = 25..40 keys in every layer
        assert r.density(s) == pytest.approx(12 * 16 / sum(range(25, 41)))


def test_greedy_text_equals_hf(tiny_dir):
    from vattn.models import load_model
    llm = vattn.LLM(str(tiny_dir), spec="dense", device="cpu", max_len=64, max_batch=2)
    prompts = ["w1 w2 w3", "w5 w9 w7 w7 w3 w100"]
    outs = llm.generate(prompts, vattn.SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)
    model, tok = load_model(str(tiny_dir), dtype=torch.float32)
    for p, o in zip(prompts, outs):
        ids = tok(p, return_tensors="pt").input_ids
        assert o.prompt_token_ids == ids[0].tolist()
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           temperature=None, top_p=None, top_k=None, pad_token_id=0, eos_token_id=None)
        assert o.token_ids == g[0, ids.shape[1]:].tolist()
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.finish_reason == "length" and len(o.token_ids) == 10


def test_embedded_smollm2_logits_and_greedy():
    """The embedded SmolLM2 (30 layers, 9:3 GQA, tied head): engine logits on a short prompt
    equal transformers', and greedy generate gives the same tokens."""
    from vattn.models import load_model
    model, tok = load_model(dtype=torch.float32)
    llm = vattn.LLM(spec="dense", device="cpu", max_len=128, max_batch=2)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    r = llm.runner
    s = r.alloc()
    got = r.prefill(s, ids[0].tolist())
    r.free(s)
    ref = hf_logits(model, ids[0].tolist())[-1]
    assert (got - ref).abs().max().item() < TOL
    out = llm.generate("The capital of France is", vattn.SamplingParams(max_tokens=8), use_tqdm=False)[0]
    g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                       temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    want = g[0, ids.shape[1]:].tolist()
    assert out.token_ids == want[:len(out.token_ids)]
    assert "Paris" in out.text


def test_sampling_is_seeded_per_request():
    model = tiny_model("qwen2")
    llm = vattn.LLM(model, spec="dense", device="cpu", max_len=64, max_batch=4)
    sp = vattn.SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    p = ids_for(5, seed=6)
    alone = llm.generate(prompt_token_ids=[p], params=sp)[0].token_ids
    batch = llm.generate(prompt_token_ids=[ids_for(9, seed=1), p, p], params=sp, use_tqdm=False)
    assert batch[1].token_ids == alone == batch[2].token_ids  # same seed, any batch
    unseeded = vattn.SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    both = llm.generate(prompt_token_ids=[ids_for(9, seed=1), p], params=unseeded, use_tqdm=False)
    own = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(
        max_tokens=8, temperature=1.0, seed=llm.seed + 1, ignore_eos=True))[0].token_ids
    assert both[1].token_ids == own  # no seed: the LLM's seed + the prompt's index
    other = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(
        max_tokens=8, temperature=1.0, seed=8, ignore_eos=True))[0].token_ids
    assert other != alone
    greedy = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(max_tokens=8, ignore_eos=True))
    tiny_p = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(
        max_tokens=8, temperature=1.0, top_p=1e-6, seed=1, ignore_eos=True))
    assert tiny_p[0].token_ids == greedy[0].token_ids  # a nucleus of one token is greedy


def test_stop_tokens_and_max_len():
    model = tiny_model("llama")
    llm = vattn.LLM(model, spec="dense", device="cpu", max_len=20, max_batch=2, tokenizer=tiny_tokenizer())
    p = ids_for(6, seed=9)
    free = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(max_tokens=6, ignore_eos=True))[0]
    stop = free.token_ids[2]
    first = free.token_ids.index(stop)
    o = llm.generate(prompt_token_ids=[p], params=vattn.SamplingParams(max_tokens=6, stop_token_ids=[stop]))[0]
    assert o.token_ids == free.token_ids[:first + 1] and o.finish_reason == "stop"  # vLLM: token_ids keep it
    assert o.text == llm.tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)  # the text does not
    # over max_len: clipped (vLLM's LLM), prompt + output = max_len; the server refuses it instead
    o = llm.generate(prompt_token_ids=[ids_for(18)], params=vattn.SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(o.token_ids) == 2 and o.finish_reason == "length"


def test_bad_inputs(tmp_path, tiny_dir):
    model = tiny_model("llama")
    llm = vattn.LLM(str(tiny_dir), spec="dense", device="cpu", max_len=16, max_batch=1)
    with pytest.raises(VattnError, match="max_len is 16"):
        llm.generate(" ".join(["w1"] * 20))
    with pytest.raises(VattnError, match="empty"):
        llm.generate("   ")
    with pytest.raises(VattnError, match="max_tokens"):
        vattn.SamplingParams(max_tokens=0)
    with pytest.raises(VattnError, match="top_p"):
        vattn.SamplingParams(top_p=0.5)
    with pytest.raises(VattnError, match="temperature"):
        vattn.SamplingParams(temperature=-1)
    import transformers as tf
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(VattnError, match="llama, qwen2, qwen3, mistral, gemma3_text.*vattn.patch"):
        Runner(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(VattnError, match="'gpt2'"):
        vattn.LLM(str(tmp_path / "gpt2"))
    r = Runner(model, device="cpu", max_len=16, max_batch=1)
    with pytest.raises(VattnError, match="not allocated"):
        r.decode([0], [1])
    s = r.alloc()
    with pytest.raises(VattnError, match="no free slot"):
        r.alloc()
    with pytest.raises(VattnError, match="empty"):
        r.prefill(s, [])
    with pytest.raises(VattnError, match="token ids"):
        r.prefill(s, [1, 500])
    with pytest.raises(VattnError, match="max_len is 16"):
        r.prefill(s, [1] * 17)
    with pytest.raises(VattnError, match="one token per slot"):
        r.decode([s], [1, 2])
    with pytest.raises(VattnError, match="dense_layers"):
        Runner(model, device="cpu", dense_layers=[7])


def test_budget_fits_and_out_of_memory():
    model = tiny_model("llama")
    probe = Runner(model, device="cpu", max_len=65536, max_batch=2)  # a head's keys span 2 granules of 2 MiB
    page = probe.kv.stats().page_bytes
    r = Runner(model, device="cpu", max_len=65536, max_batch=2, budget_bytes=2 * page)
    assert r.pages_for(10) == 2 and r.pages_for(40000) == 4
    assert r.fits(10) and not r.fits(40000)
    s = r.alloc()
    with pytest.raises(VattnOutOfMemory):
        r.prefill(s, [1] * 40000)
    assert r.length(s) == 0  # nothing half-written
    r.prefill(s, [1] * 10)
    assert r.length(s) == 10


def test_dense_layers_and_length_bucket():
    model = tiny_model("llama")
    ids = ids_for(30, seed=11)
    r = Runner(model, device="cpu", spec="sink(1)+window(2)", dense_layers=3, max_len=64)  # every layer dense
    s = r.alloc()
    r.prefill(s, ids[:20])
    got = torch.stack([r.decode([s], [t])[0] for t in ids[20:]])
    assert (got - hf_logits(model, ids)[20:]).abs().max() < TOL
    assert r.density(s) == 1.0
    assert length_bucket(1, 10**6) == 256 and length_bucket(32769, 10**6) == 36864
    assert length_bucket(32769, 33000) == 33000


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_all_rows_step_in_the_interpreter(arch):
    """The GPU decode step (every slot row at once: the Triton dense kernel, sliding windows
    through the window plan, padding-free batch) run on the CPU by the Triton interpreter."""
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    model = tiny_model(arch)
    r = Runner(model, device="cpu", max_len=64, max_batch=3)
    r.all_rows = True
    p1, p2 = ids_for(14, seed=7), ids_for(25, seed=8)
    s1, s2 = r.alloc(), r.alloc()
    r.prefill(s1, p1)
    r.prefill(s2, p2)
    new = ids_for(3, seed=9)
    got = torch.stack([r.decode([s2, s1], [t, t]) for t in new])
    assert (got[:, 0] - hf_logits(model, p2 + new)[25:28]).abs().max() < TOL
    assert (got[:, 1] - hf_logits(model, p1 + new)[14:17]).abs().max() < TOL


def test_scan_chain_on_a_sliding_window_model_keeps_windows_exact():
    """Mistral's sliding layers cut off key 0, where the scan algorithm draws from: under the scan
    chain they attend their window exactly (and say so by density), full layers run the chain."""
    model = tiny_model("mistral")  # window 12 on every layer: the scan chain runs nowhere
    spec = ("sink(2)+window(4)+hashtopk(0.2,bits=32,cut='sample')"
            "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)")
    r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=1)
    d = Runner(model, device="cpu", spec="dense", max_len=64, max_batch=1)
    ids = ids_for(30, seed=2)
    outs = []
    for run in (r, d):
        s = run.alloc()
        run.prefill(s, ids[:20])
        outs.append(torch.stack([run.decode([s], [t])[0] for t in ids[20:]]))
    assert (outs[0] - outs[1]).abs().max().item() < TOL
    assert not any(r.sparse_layer(i, r.plan()) for i in range(len(model.model.layers)))


def test_scan_chain_all_rows_step_in_the_interpreter(monkeypatch):
    """The GPU decode step with the scan chain: the fused kernels over every slot
    row of the vmem cache, run by the Triton interpreter, equal the float64 twin run the same way."""
    import os

    import vattn.engine.runner as runner_mod
    from vattn.plan import compile as compile_plan
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without a GPU)")
    monkeypatch.setattr(runner_mod, "BATCHED_PATHS", ("streaming-kernel", "scan-kernel", "scan-reference"))
    model = tiny_model("llama")
    spec = ("sink(2)+window(4)+hashtopk(0.2,bits=32,cut='sample')"
            "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=8)")
    p1, p2, new = ids_for(30, seed=7), ids_for(41, seed=8), ids_for(3, seed=9)
    outs, dens = [], []
    for fused in (True, False):
        r = Runner(model, device="cpu", spec=spec, max_len=64, max_batch=2)
        r.all_rows = True
        text = str(r.plan().spec)
        r._plans[(text, None)] = compile_plan(text, "cpu", seed=r.seed, fused=fused).reserve(64)
        assert r.plan().path == ("scan-kernel" if fused else "scan-reference") and r.batched(r.plan())
        s1, s2 = r.alloc(), r.alloc()
        r.prefill(s1, p1)
        r.prefill(s2, p2)
        outs.append(torch.stack([r.decode([s2, s1], [t, t]) for t in new]))
        dens.append((r.density(s1), r.density(s2)))
    assert (outs[0] - outs[1]).abs().max().item() < 1e-3
    assert dens[0] == pytest.approx(dens[1]) and all(d < 1 for d in dens[0])
