"""SamplingParams (vLLM's names) and the per-request sampler: greedy, or temperature + top-p
drawn from the request's own seeded generator, so a request's text does not depend on what
else is in its batch."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vattn.errors import VattnError


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: new tokens at most; temperature 0 = greedy (the default), > 0 samples;
    top_p in (0, 1]: nucleus; seed: the request's generator (None: the LLM's seed + the
    prompt's index); stop_token_ids: more ids that end a request (the model's eos always
    does unless ignore_eos)."""
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise VattnError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise VattnError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise VattnError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_p < 1 and self.temperature == 0:
            raise VattnError("top_p samples, so it needs temperature > 0 (e.g. temperature=0.7)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise VattnError(f"seed must be an int or None, got {self.seed!r}")
        ids = self.stop_token_ids
        if ids is None:
            ids = ()
        if isinstance(ids, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise VattnError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))


class Sampler:
    """One request's token choice from float32 logits [V]."""

    def __init__(self, params: SamplingParams, seed: int, device):
        self.params = params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device).manual_seed(int(seed))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampled from: softmax(logits / T) restricted to the top-p nucleus
        (the smallest set of top tokens with mass >= top_p; transformers' TopPLogitsWarper)."""
        p = self.params
        x = logits.float() / p.temperature
        if p.top_p < 1:
            sx, order = x.sort(descending=False)
            cum = sx.softmax(-1).cumsum(-1)
            drop = cum <= 1 - p.top_p
            drop[..., -1] = False  # keep at least the most likely token
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return x.softmax(-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """A 0-dim int64 tensor on logits' device (no host sync here)."""
        if self.gen is None:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.gen)[0]
