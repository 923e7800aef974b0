"""Haystacks (the filler around needles) and fitting a text to a token budget.

A haystack is a list of "units" (sentences or lines). Tasks insert their needles
between units at fixed relative depths, and `fit` picks the number of units so
the whole sample fits the target length in the model's own tokens.
"""
from __future__ import annotations

import functools
from typing import Callable

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def noise_units(n: int) -> list[str]:
    """n copies of RULER's noise paragraph."""
    return [NOISE] * n


@functools.lru_cache(maxsize=1)
def _prose_words() -> tuple[str, ...]:
    # Python's own documentation topics ship with every CPython (~465K chars of English).
    from pydoc_data.topics import topics
    return tuple(" ".join(topics[k] for k in sorted(topics)).split())


def prose_units(n: int) -> list[str]:
    """The first n words of the prose corpus (wrapping around when n is larger).
    Words, not sentences, so the length can be fitted finely (as RULER's essays)."""
    corpus = _prose_words()
    return [corpus[i % len(corpus)] for i in range(n)]


def _sentence_start(units: list[str], i: int) -> int:
    # Move back to just after a unit that ends a sentence, so needles do not split one.
    while 0 < i < len(units) and not units[i - 1].endswith((".", "!", "?")):
        i -= 1
    return i


def insert(units: list[str], needles: list[str], depths: list[float], sep: str = " ") -> str:
    """Place needle i before unit ~depths[i] * len(units), at a sentence start; needles keep their order."""
    slots: dict[int, list[str]] = {}
    for needle, depth in sorted(zip(needles, depths), key=lambda nd: nd[1]):
        slots.setdefault(_sentence_start(units, round(min(max(depth, 0.0), 1.0) * len(units))), []).append(needle)
    out: list[str] = []
    for i in range(len(units) + 1):
        out.extend(slots.get(i, []))
        if i < len(units):
            out.append(units[i])
    return sep.join(out)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(measure: Callable[[int], int], target: int, start: int = 16) -> int:
    """Largest n >= 0 with measure(n) <= target (measure grows with n).

    Scales a first guess from one measurement, brackets, then binary searches;
    each step is one tokenization of the whole sample.
    """
    base = measure(0)
    if base > target:
        return 0
    per_unit = max((measure(start) - base) / start, 1e-3)
    guess = max(1, int((target - base) / per_unit))
    lo, hi = 0, guess
    if measure(hi) > target:
        lower = int(guess * 0.95)
        if measure(lower) <= target:
            lo = lower
    else:
        lo = hi
        hi = max(hi + 1, int(hi * 1.05) + 1)
        while measure(hi) <= target:
            lo, hi = hi, hi * 2
    # invariant: measure(lo) <= target < measure(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo
