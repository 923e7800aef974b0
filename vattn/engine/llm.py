"""The offline API, as vLLM users know it.

    llm = vattn.LLM(spec="vattention")                       # the embedded SmolLM2, or a path
    outs = llm.generate(["Hello", "Tell me"], vattn.SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].density, outs[0].finish_reason

Prompts run `max_batch` at a time: each is prefilled (dense) into a free slot, then every
live request advances one token per batched decode step; a finished request's slot takes
the next prompt.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from vattn.cache.vmem import VattnOutOfMemory
from vattn.engine.runner import Runner
from vattn.engine.sampling import Sampler, SamplingParams
from vattn.errors import VattnError

log = logging.getLogger(__name__)


@dataclass
class Output:
    """One prompt's result. token_ids include the stop token when one ended it; text is the
    decoded new tokens (special tokens skipped); density: attended / dense keys over the
    decode steps' sparse layers (None when no decode step ran)."""
    prompt: str | None
    prompt_token_ids: list
    token_ids: list
    text: str
    density: float | None
    finish_reason: str  # "stop" (a stop token) or "length" (max_tokens or max_len)


@dataclass
class _Request:
    index: int
    prompt: str | None
    ids: list
    params: SamplingParams
    sampler: Sampler
    stop: frozenset
    out: list = field(default_factory=list)
    slot: int | None = None
    result: Output | None = None


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
        reqs = []
        for i, (p, sp) in enumerate(zip(ids, plist)):
            if not isinstance(sp, SamplingParams):
                raise VattnError(f"params must be vattn.SamplingParams, got {type(sp).__name__}")
            if not p:
                raise VattnError(f"prompt {i} has no tokens; give some text")
            if len(p) > r.max_len:
                raise VattnError(f"prompt {i} has {len(p)} tokens but max_len is {r.max_len}; shorten it or "
                                 "build the LLM with a larger max_len")
            r.check_ids(p, f"prompt {i}")
            stop = frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else r.eos_ids)
            seed = sp.seed if sp.seed is not None else self.seed + i
            reqs.append(_Request(i, texts[i] if texts else None, p, sp, Sampler(sp, seed, r.device), stop))
        bar = _bar(len(reqs)) if use_tqdm and len(reqs) > 1 else None
        try:
            self._run(reqs, spec, bar)
        finally:
            for q in reqs:
                if q.slot is not None:
                    r.free(q.slot)
                    q.slot = None
            if bar is not None:
                bar.close()
        return [q.result for q in reqs]

    def _run(self, reqs, spec, bar):
        r = self.runner
        waiting, live = deque(reqs), []
        while waiting or live:
            while waiting and len(live) < r.max_batch:  # admit: dense prefill, first token
                q = waiting[0]
                q.slot = r.alloc()
                try:
                    logits = r.prefill(q.slot, q.ids, spec=spec)
                except VattnOutOfMemory:
                    r.free(q.slot)
                    q.slot = None
                    if not live:
                        raise
                    break  # memory frees up as live requests end
                waiting.popleft()
                if self._take(q, int(q.sampler(logits)), bar):
                    live.append(q)
            if not live:
                continue
            try:
                logits = r.decode([q.slot for q in live], [q.out[-1] for q in live], spec=spec)
            except VattnOutOfMemory as e:
                raise VattnOutOfMemory(f"{e}; or lower max_batch so fewer requests share the cache") from None
            toks = torch.stack([q.sampler(logits[j]) for j, q in enumerate(live)]).tolist()
            live = [q for q, t in zip(live, toks) if self._take(q, t, bar)]

    def _take(self, q: _Request, token: int, bar) -> bool:
        """Append a token; True while the request goes on (else it is finished and freed)."""
        r = self.runner
        q.out.append(token)
        reason = None
        if token in q.stop:
            reason = "stop"
        elif len(q.out) >= q.params.max_tokens or r.length(q.slot) + 1 > r.max_len:
            reason = "length"
        if reason is None:
            return True
        density = r.density(q.slot)
        r.free(q.slot)
        q.slot = None
        text = "" if self.tokenizer is None else self.tokenizer.decode(q.out, skip_special_tokens=True)
        q.result = Output(q.prompt, q.ids, list(q.out), text, density, reason)
        if bar is not None:
            bar.update(1)
        return False


def _bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="generate", unit="prompt", leave=False)
