"""Capture real Q/K/V from a model's decode-phase queries (for `vattn verify` and tests).

One forward over each prompt records, per layer, the queries of its last n tokens and
all keys and values. Those rows see exactly what they would see if the tokens were
decoded one by one after a dense prefill of the rest (rows are causal), so the capture
is the decode phase, teacher-forced, in one pass.

Prompts: natural prose (Python's own docs, pydoc_data) and a RULER-style passkey
haystack, both built here and fitted to a token length with the model's tokenizer.
"""
from __future__ import annotations

import random

import torch

from vattn.errors import VattnError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NAME = "vattn_capture"
_ACTIVE: dict = {}


def _prose_words() -> list[str]:
    from pydoc_data.topics import topics
    return " ".join(topics[k] for k in sorted(topics)).split()


def _fit(make, tokenizer, n_tokens: int) -> str:
    """The longest make(units) whose token count is <= n_tokens (binary search on units)."""
    lo, hi = 1, 1
    while len(tokenizer(make(hi)).input_ids) <= n_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(tokenizer(make(mid)).input_ids) <= n_tokens:
            lo = mid
        else:
            hi = mid
    return make(lo)


def prose_prompt(tokenizer, n_tokens: int, offset: int = 0) -> str:
    """About n_tokens of English prose from Python's documentation topics."""
    words = _prose_words()
    return _fit(lambda n: " ".join(words[(offset + i) % len(words)] for i in range(n)), tokenizer, n_tokens)


def passkey_parts(tokenizer, n_tokens: int, key: str, depth: float = 0.5):
    """(context, question) of a passkey haystack of about n_tokens, the key at `depth`."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    intro = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it."
    question = "\nWhat is the pass key? The pass key is"

    def make(n):
        at = int(n * depth)
        return intro + " " + " ".join([FILLER] * at) + needle + " " + " ".join([FILLER] * (n - at))

    budget = n_tokens - len(tokenizer(question).input_ids)
    return _fit(make, tokenizer, budget), question


def passkey_prompt(tokenizer, n_tokens: int, key: str | None = None, depth: float = 0.5, seed: int = 0):
    """(prompt, key): a passkey haystack of about n_tokens tokens."""
    key = key or str(random.Random(seed).randint(10000, 99999))
    context, question = passkey_parts(tokenizer, n_tokens, key, depth)
    return context + question, key


def default_prompts(tokenizer, lengths=(1024, 2048, 4096)) -> list[str]:
    """Prose and passkey prompts at each length (1K-4K tokens by default)."""
    out = []
    for i, n in enumerate(lengths):
        out.append(prose_prompt(tokenizer, n, offset=7919 * i))
        out.append(passkey_prompt(tokenizer, n, seed=i, depth=(i + 1) / (len(lengths) + 1))[0])
    return out


def _record(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    rec = _ACTIVE.get("rec")
    if rec is not None and (rec["layers"] is None or module.layer_idx in rec["layers"]):
        n = rec["n"]
        rec["out"].setdefault(module.layer_idx, []).append(
            (query[:, :, -n:].detach().clone(), key.detach(), value.detach(), scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def capture_qkv(model, tokenizer, prompts=None, n_queries: int = 16, layers=None) -> list[dict]:
    """Per prompt and layer: {"layer", "prompt", "q" [1, Hq, T, D], "k" [1, Hkv, N, D], "v",
    "lengths" [1], "starts" [1], "scale"} for the last T = n_queries tokens of the prompt.

    prompts: strings (default: `default_prompts`, prose and passkey, 1K-4K tokens).
    layers: layer indices to keep (default all). Rows follow vattn.attend's convention:
    row t sees keys [starts, lengths - T + 1 + t).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    if prompts is None:
        prompts = default_prompts(tokenizer)
    if isinstance(prompts, str):
        prompts = [prompts]
    if n_queries < 1:
        raise VattnError(f"n_queries must be >= 1, got {n_queries}")
    AttentionInterface.register(_NAME, _record)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, sdpa_mask)
    from vattn.hf import configs
    saved = [(c, c._attn_implementation) for c in configs(model)]
    device = next(model.parameters()).device
    out = []
    model.set_attn_implementation(_NAME)
    try:
        for i, text in enumerate(prompts):
            ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
            n = ids.shape[1]
            if n <= n_queries:
                raise VattnError(f"prompt {i} has {n} tokens: it needs more than n_queries={n_queries}")
            rec = {"n": n_queries, "layers": None if layers is None else set(layers), "out": {}}
            _ACTIVE["rec"] = rec
            with torch.no_grad():
                model(ids, use_cache=False)
            for layer in sorted(rec["out"]):
                q, k, v, scale = rec["out"][layer][0]
                out.append({"layer": layer, "prompt": i, "q": q, "k": k, "v": v, "scale": float(scale),
                            "lengths": torch.tensor([n], device=device),
                            "starts": torch.zeros(1, dtype=torch.long, device=device)})
    finally:
        _ACTIVE.pop("rec", None)
        for c, impl in saved:  # exactly the previous implementation, sub-configs too
            c._attn_implementation_internal = impl
    return out
