"""RULER-style long-context tasks, generated offline and reproducibly.

Each task is a function `task(rng) -> build(n)`: the task draws its secrets (keys,
values, depths) from `rng` once; `build(n)` returns the sample's parts with n units
of filler. `make_sample` searches n so that context + question + answer_prefix +
answer fits the target length in the model's tokens. Same (task, length, seed,
tokenizer) -> same sample.
"""
from __future__ import annotations

import json
import random
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vattn.errors import VattnError
from vattn.eval import haystack
from vattn.eval.scoring import METRICS
from vattn.eval.words import ADJECTIVES, COMMON_WORDS, EXTRA_WORDS, NOUNS


@dataclass
class Sample:
    task: str
    context: str            # goes into the dense prefill
    question: str           # fed with the sparse method, after the context
    answer_prefix: str      # start of the model's answer, also fed sparse
    answers: list[str]      # references for scoring
    length: int             # target length in tokens (measured length for JSONL samples)
    seed: int
    metric: str = "string_match_all"
    tokens: int = 0         # measured tokens of context+question+answer_prefix+answer
    meta: dict = field(default_factory=dict)
    max_new_tokens: int = 0  # decode budget sized from the answers (answer_budget); 0: not sized

    def to_dict(self) -> dict:
        return asdict(self)


def full_text(context: str, question: str, answer_prefix: str, answer: str) -> str:
    """The text whose tokens count toward a sample's length."""
    return f"{context}\n\n{question}\n{answer_prefix} {answer}"


ANSWER_MARGIN = 8  # new tokens beyond the answers' own (a separator, a period, a leading space)


def answer_budget(tokenizer, answers: list[str], metric: str = "string_match_all") -> int:
    """New tokens a sample needs, sized from its answers as RULER sizes tokens_to_generate
    per task: all references listed (", "-joined) for string_match_all, the longest one for
    string_match_part, plus max(ANSWER_MARGIN, a quarter). niah_multivalue's 4 numbers
    need ~34 tokens; a passkey 5."""
    text = max(answers, key=len) if metric == "string_match_part" else ", ".join(answers)
    n = haystack.count_tokens(tokenizer, " " + text)
    return n + max(ANSWER_MARGIN, n // 4)


# ---------------------------------------------------------------- draws

def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _distinct(draw, rng: random.Random, k: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        x = draw(rng)
        if x not in avoid and x not in out:
            out.append(x)
    return out


# ---------------------------------------------------------------- tasks

def passkey(rng: random.Random):
    key = str(rng.randint(10_000, 99_999))
    depth = rng.random()
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    intro = ("There is an important info hidden inside a lot of irrelevant text. "
             "Find it and memorize it. I will quiz you about the important information there.")

    def build(n):
        context = intro + "\n\n" + haystack.insert(haystack.noise_units(n), [needle], [depth])
        return context, "What is the pass key?", "The pass key is", [key], {"depth": depth}
    return build


def niah(haystack_kind: str, keys: str = "words", values: str = "numbers",
         n_keys: int = 1, n_values: int = 1, n_queries: int = 1):
    """Needle-in-a-haystack family. haystack_kind: noise | prose | needles (every
    filler line is a distractor needle with another key)."""
    draw_key = _word_key if keys == "words" else _uuid
    draw_value = _number if values == "numbers" else _uuid

    def task(rng: random.Random):
        ks = _distinct(draw_key, rng, n_keys)
        vs = [_distinct(draw_value, rng, n_values) for _ in ks]
        needles = [f"One of the special magic {values} for {k} is: {v}." for k, v_list in zip(ks, vs) for v in v_list]
        depths = [rng.random() for _ in needles]
        asked = ks[:n_queries]
        answers = [v for v_list in vs[:n_queries] for v in v_list]
        fill_seed = rng.getrandbits(64)
        q_keys = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        intro = (f"Some special magic {values} are hidden within the following text. "
                 f"Make sure to memorize it. I will quiz you about the {values} afterwards.")

        def build(n):
            if haystack_kind == "noise":
                units, sep = haystack.noise_units(n), " "
            elif haystack_kind == "prose":
                units, sep = haystack.prose_units(n), " "
            else:  # distractor needles: same form, other keys, drawn from their own stream
                fill = random.Random(fill_seed)
                other = _distinct(draw_key, fill, n, avoid=set(ks))
                units = [f"One of the special magic {values} for {k} is: {draw_value(fill)}." for k in other]
                sep = "\n"
            context = intro + "\n" + haystack.insert(units, needles, depths, sep=sep)
            question = f"What are all the special magic {values} for {q_keys} mentioned in the provided text?"
            prefix = f"The special magic {values} for {q_keys} mentioned in the provided text are"
            return context, question, prefix, answers, {"keys": ks, "depths": depths}
        return build
    return task


def vt(rng: random.Random, n_chains: int = 1, n_hops: int = 4):
    """Variable tracking: VAR A = 12345, VAR B = VAR A, ... (n_hops links per chain)."""
    names = _distinct(lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)),
                      rng, n_chains * (n_hops + 1))
    values = _distinct(lambda r: str(r.randint(10_000, 99_999)), rng, n_chains)
    chains, lines = [], []
    for c in range(n_chains):
        chain = names[c * (n_hops + 1):(c + 1) * (n_hops + 1)]
        chains.append(chain)
        lines.append([f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])])
    # Each chain's lines go in order at sorted random depths.
    needles, depths = [], []
    for chain_lines in lines:
        ds = sorted(rng.random() for _ in chain_lines)
        needles += chain_lines
        depths += ds
    query, answers = values[0], chains[0]

    def build(n):
        context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                   + haystack.insert(haystack.noise_units(n), needles, depths))
        question = f"Question: Find all variables that are assigned the value {query} in the text above."
        prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
                  f"{len(answers)} variables are assigned the value {query}, they are:")
        return context, question, prefix, answers, {"chains": chains}
    return build


def cwe(rng: random.Random, length: int, n_common: int = 10):
    """Common words extraction: n_common words repeat freq_cw times among words seen freq_ucw times."""
    common = rng.sample(COMMON_WORDS, n_common)
    freq_cw = max(2, min(30, length // 70))      # RULER's 30 once the length allows it
    freq_ucw = max(1, min(3, freq_cw // 10))
    fill_seed = rng.getrandbits(64)

    def uncommon(n):
        fill = random.Random(fill_seed)
        pool = rng_shuffled(EXTRA_WORDS, fill)
        if n > len(pool):  # compounds of two filler words when the list runs out
            compounds = [a + b for a in EXTRA_WORDS for b in EXTRA_WORDS if a != b]
            pool += [w for w in rng_shuffled(compounds, fill) if not any(c in w for c in common)]
        return pool[:n]

    def build(n):
        words = common * freq_cw + uncommon(n) * freq_ucw
        random.Random(fill_seed + n).shuffle(words)
        listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        context = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.\n" + listing)
        question = f"Question: What are the {n_common} most common words in the above list?"
        prefix = f"Answer: The top {n_common} words that appear most often in the list are:"
        return context, question, prefix, list(common), {"freq_cw": freq_cw, "freq_ucw": freq_ucw}
    return build


def fwe(rng: random.Random, alpha: float = 2.0, n_answers: int = 3):
    """Frequent words extraction: coded words with Zipf counts; rank 1 is the dots noise."""
    fill_seed = rng.getrandbits(64)

    def build(n):
        fill = random.Random(fill_seed)
        ranks = [(r + 1) ** -alpha for r in range(max(8, int(n ** 0.5) + 4))]
        counts = [int(n * w / sum(ranks)) for w in ranks]
        for r in range(n_answers, -1, -1):  # answers must win strictly, whatever n is
            counts[r] = max(counts[r], counts[r + 1] + 1)
        vocab = ["...."] + _distinct(lambda g: "".join(g.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)),
                                     fill, len(counts) - 1)
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        fill.shuffle(words)
        context = ("Read the following coded text and track the frequency of each coded word. "
                   "Find the three most frequently appeared coded words. " + " ".join(words))
        question = ("Question: Do not provide any explanation. Please ignore the dots '....'. "
                    "What are the three most frequently appeared words in the above coded text?")
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return context, question, prefix, vocab[1:n_answers + 1], {"counts": counts[:n_answers + 2]}
    return build


def rng_shuffled(items, rng: random.Random) -> list:
    out = list(items)
    rng.shuffle(out)
    return out


TASKS = {
    "passkey": passkey,
    "niah_single_1": niah("noise"),
    "niah_single_2": niah("prose"),
    "niah_single_3": niah("prose", values="uuids"),
    "niah_multikey_1": niah("prose", n_keys=4),
    "niah_multikey_2": niah("needles"),
    "niah_multikey_3": niah("needles", keys="uuids", values="uuids"),
    "niah_multivalue": niah("prose", n_values=4),
    "niah_multiquery": niah("prose", n_keys=4, n_queries=4),
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
}


def make_sample(task: str, length: int, seed: int, tokenizer) -> Sample:
    """One sample of `task` whose context+question+answer_prefix+answer is <= length tokens."""
    if task not in TASKS:
        raise VattnError(f"unknown task {task!r}; choose from {', '.join(TASKS)} or pass --jsonl-tasks")
    rng = random.Random(f"{task}:{length}:{seed}")
    build = TASKS[task](rng, length) if task == "cwe" else TASKS[task](rng)

    def measure(n):
        context, question, prefix, answers, _ = build(n)
        return haystack.count_tokens(tokenizer, full_text(context, question, prefix, " ".join(answers)))

    n = haystack.fit(measure, length)
    context, question, prefix, answers, meta = build(n)
    metric = "string_match_all"
    return Sample(task, context, question, prefix, answers, length, seed, metric, measure(n),
                  {**meta, "units": n}, answer_budget(tokenizer, answers, metric))


def load_jsonl(path: str | Path, tokenizer=None) -> list[Sample]:
    """Bring-your-own samples, one JSON object a line.

    Fields: context, question, answer_prefix (optional), answers (list or str),
    task (default: file stem), metric (default string_match_all). LongBench-style
    `input` is read as the question; RULER-style `input`/`outputs` without a
    context puts the whole prompt in the context.
    """
    path = Path(path)
    if not path.is_file():
        raise VattnError(f"--jsonl-tasks file {path} does not exist" if not path.exists()
                         else f"--jsonl-tasks {path} is not a file: give a JSONL file (one sample a line)")
    samples = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise VattnError(f"{path}:{i + 1}: not JSON ({e})") from None
        if "context" in rec:
            context, question = rec["context"], rec.get("question", rec.get("input", ""))
        elif "input" in rec:
            context, question = rec["input"], rec.get("question", "")
        else:
            raise VattnError(f"{path}:{i + 1}: needs a 'context' (or RULER's 'input') field")
        answers = rec.get("answers", rec.get("outputs"))
        if answers is None:
            raise VattnError(f"{path}:{i + 1}: needs 'answers' (a list of reference strings)")
        answers = [answers] if isinstance(answers, str) else [str(a) for a in answers]
        metric = rec.get("metric", "string_match_all")
        if metric not in METRICS:
            raise VattnError(f"{path}:{i + 1}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        prefix = rec.get("answer_prefix", "")
        tokens = haystack.count_tokens(tokenizer, full_text(context, question, prefix, answers[0])) if tokenizer else 0
        if not answers:
            raise VattnError(f"{path}:{i + 1}: 'answers' is empty; give at least one reference string")
        budget = answer_budget(tokenizer, answers, metric) if tokenizer else 0
        samples.append(Sample(rec.get("task", path.stem), context, question, prefix, answers,
                              int(rec.get("length", tokens)), int(rec.get("seed", i)), metric, tokens,
                              max_new_tokens=budget))
    if not samples:
        raise VattnError(f"--jsonl-tasks file {path} holds no samples; write one JSON object a line "
                         "(see docs/eval.md)")
    return samples
