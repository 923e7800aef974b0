"""The vattn engine: our own decoder for the Llama family on a vmem KV cache, with plans in
every sparse layer and CUDA-graphed decode steps. See docs/engine.md.

    from vattn.engine.runner import Runner         # slots, prefill, batched decode (servers)
    from vattn.engine.llm import LLM                # offline generate(), vLLM-style
"""
