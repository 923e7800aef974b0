"""The offline API, as vLLM users know it.

    llm = vattn.LLM(spec="vattention")                       # the embedded SmolLM2, or a path
    outs = llm.generate(["Hello", "Tell me"], vattn.SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].density, outs[0].finish_reason

generate() runs its prompts through the serve Scheduler (vattn/engine/scheduler.py), stepped
on this thread: the same admission, batched decode and stop rules as `vattn serve`. One rule
differs, by the scheduler's option over_len: a prompt + max_tokens over max_len is clipped
(finish_reason "length" at max_len, as vLLM's LLM does) where the server refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass

from vattn.cache.vmem import VattnOutOfMemory
from vattn.engine.runner import Runner
from vattn.engine.sampling import SamplingParams
from vattn.engine.scheduler import Request, Scheduler
from vattn.errors import VattnError


@dataclass
class Output:
    """One prompt's result. token_ids include the stop token when one ended it (as vLLM's do);
    text is the decoded new tokens without it (special tokens skipped); density: attended /
    dense keys over the decode steps' sparse layers (None when no decode step ran)."""
    prompt: str | None
    prompt_token_ids: list
    token_ids: list
    text: str
    density: float | None
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens, or prompt + output reached max_len)


class LLM:
    """model: None (embedded SmolLM2), a HF directory, a .gguf file or a transformers model.
    spec: the sparse attention of decode steps ("dense" for exact). The other arguments go
    to the Runner (docs/engine.md)."""

    def __init__(self, model=None, spec="vattention", device=None, dtype=None, max_len: int = 4096,
                 max_batch: int = 8, *, seed: int = 0, dense_layers=None, budget_bytes=None, tokenizer=None,
                 chunk: int = 4096, graphs=None):
        self.runner = Runner(model, spec=spec, device=device, dtype=dtype, max_len=max_len, max_batch=max_batch,
                             budget_bytes=budget_bytes, seed=seed, dense_layers=dense_layers, tokenizer=tokenizer,
                             chunk=chunk, graphs=graphs)
        self.tokenizer = self.runner.tokenizer
        self.seed = seed

    def encode(self, prompt: str, chat: bool = False) -> list:
        tok = self.tokenizer
        if tok is None:
            raise VattnError("this model came without a tokenizer: pass prompt_token_ids=, or LLM(..., tokenizer=tok)")
        if not isinstance(prompt, str):
            raise VattnError(f"a prompt must be a str, got {type(prompt).__name__}")
        if not prompt.strip():
            raise VattnError("a prompt is empty; give some text")
        if chat:
            if not getattr(tok, "chat_template", None):
                raise VattnError("this model's tokenizer has no chat template; use chat=False")
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tok(prompt, add_special_tokens=not chat).input_ids)

    def generate(self, prompts=None, params: SamplingParams | None = None, *, chat: bool = False,
                 prompt_token_ids=None, use_tqdm: bool = True, spec=None) -> list[Output]:
        """One Output per prompt, in order. prompts: a str or a list of str; or prompt_token_ids:
        a list of token-id lists. params: one SamplingParams for all, or a list, one each."""
        if (prompts is None) == (prompt_token_ids is None):
            raise VattnError("give prompts (text) or prompt_token_ids, one of the two")
        texts = None
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            ids = [self.encode(p, chat) for p in texts]
        else:
            ids = [list(p) for p in prompt_token_ids]
        if not ids:
            return []
        plist = params if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(ids)
        if len(plist) != len(ids):
            raise VattnError(f"{len(plist)} SamplingParams for {len(ids)} prompts: give one, or one each")
        r = self.runner
        # A fresh scheduler per call: request i's default seed is self.seed + i, whatever ran before.
        sched = Scheduler(r, chunk_tokens=r.chunk, max_waiting=len(ids), seed=self.seed, over_len="clip")
        reqs = []
        for i, (p, sp) in enumerate(zip(ids, plist)):
            if not isinstance(sp, SamplingParams):
                raise VattnError(f"params must be vattn.SamplingParams, got {type(sp).__name__}")
            r.check_ids(p, f"prompt {i}")
            q = Request(prompt_ids=p, params=sp, spec=spec)
            try:
                sched.check(q)
            except VattnError as e:
                raise VattnError(f"prompt {i}: {e}") from None
            reqs.append(q)
        bar = _bar(len(reqs)) if use_tqdm and len(reqs) > 1 else None
        if bar is not None:  # it counts finished prompts
            for q in reqs:
                q.on_event = lambda q, toks, finished: finished and bar.update(1)
        try:
            for q in reqs:
                sched.submit(q)
            while sched.has_work():
                sched.step()
        finally:
            for q in reqs:  # a step that raised leaves its slots taken
                if q.slot is not None:
                    r.free(q.slot)
                    q.slot = None
            if bar is not None:
                bar.close()
        for i, q in enumerate(reqs):
            if q.finish_reason == "error":
                err = VattnOutOfMemory if q.error_code == "kv_out_of_memory" else VattnError
                raise err(f"prompt {i}: {q.error}")
        tok = self.tokenizer
        return [Output(texts[i] if texts else None, q.prompt_ids, list(q.output_ids),
                       "" if tok is None else tok.decode(q.text_ids, skip_special_tokens=True),
                       q.stats.density, q.finish_reason) for i, q in enumerate(reqs)]


def _bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="prompt", leave=False)
