"""Shared fixtures: tiny random-weight decoder models of the architectures vattn patches."""
import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. It must be set before anything
# (transformers included) imports triton, or the kernel tests depend on test order.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (./run test): one torch thread per worker, so two workers share two cores
# without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def tiny_model(arch: str):
    """A tiny eval-mode model: llama, qwen2, qwen3, mistral or gemma3 (GQA, 3 layers).

    Gemma 3 gets a sliding window of 8 on its first layers so windows cut in on short
    prompts; Mistral likewise (window 12)."""
    import transformers as tf
    torch.manual_seed(0)
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY))
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**TINY))
    elif arch == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **TINY))
    elif arch == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=12, **TINY))
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                  **TINY)
        model = tf.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation_internal = "sdpa"
    return model.eval()


ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]


@pytest.fixture(params=ARCHS)
def tiny(request):
    return request.param, tiny_model(request.param)


def tiny_tokenizer():
    """A word-level tokenizer over 128 ids (no download): 'w0'..'w123' plus specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": 4 + i for i in range(124)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A local HF model directory: tiny Llama (64 positions) + tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    import transformers as tf
    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY, "max_position_embeddings": 64})).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
