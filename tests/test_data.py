import json

import pytest

from pkt.core import data
from pkt.core.data import DataError
from pkt.core.mini.tokenizer import build_tokenizer


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


def chat(q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"dataset": "x", "id": "1", "messages": msgs}


def test_paper_format_and_answer_only_labels(tmp_path):
    tok = build_tokenizer()
    p = write(tmp_path, [chat("1+2?", "3"), chat("hi", "yo", system="be nice")])
    rows = data.read_jsonl(p)
    samples = data.to_samples(rows)
    assert samples[0].prompt == "<|user|>\n1+2?\n\n<|assistant|>\n"
    assert samples[1].prompt.startswith("<|system|>\nbe nice\n\n<|user|>\nhi")
    enc = data.encode(samples[0], tok)
    labels = enc["labels"][0].tolist()
    answer = [i for i in labels if i != -100]
    assert tok.decode(answer[:-1]) == "3" and answer[-1] == tok.eos_token_id
    assert len(labels) == enc["input_ids"].shape[1]


@pytest.mark.parametrize("line,match", [
    ("{not json", "line 2: not valid JSON"),
    ({"messages": []}, "line 2: \"messages\" is missing or empty"),
    ({"messages": [{"role": "user", "content": "q"}]}, "line 2: \"messages\" has no assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, r"line 2: messages\[0\] must be"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no user turn"),
])
def test_bad_lines_name_file_line_and_fix(tmp_path, line, match):
    p = write(tmp_path, [chat("q", "a"), line])
    with pytest.raises(DataError, match=match) as e:
        data.read_jsonl(p)
    assert str(p) in str(e.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        data.read_jsonl(write(tmp_path, [""]))
    with pytest.raises(DataError, match="no such file"):
        data.read_jsonl(tmp_path / "nope.jsonl")


def test_answer_cut_away_by_length_limit_is_an_error(tmp_path):
    p = write(tmp_path, [chat("a long question " * 5, "42")])
    with pytest.raises(DataError, match="line 1: the prompt alone is .* raise max_length"):
        data.load_encoded(p, build_tokenizer(), max_length=20)


def test_seed_choice_is_deterministic_and_distinct():
    a = data.choose_seeds(100, 32, seed=3)
    assert a == data.choose_seeds(100, 32, seed=3) and len(set(a)) == 32 and a == sorted(a)
    assert a != data.choose_seeds(100, 32, seed=4)
    with pytest.raises(DataError, match="only 10"):
        data.choose_seeds(10, 32)


from hypothesis import given, settings, strategies as st

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": text})


@settings(max_examples=60, deadline=None)
@given(samples=st.lists(st.tuples(text, text.filter(str.strip)), min_size=1, max_size=5))
def test_valid_samples_round_trip(tmp_path_factory, samples):
    p = tmp_path_factory.mktemp("h") / "d.jsonl"
    p.write_text("\n".join(json.dumps(chat(q, a)) for q, a in samples) + "\n")
    rows = data.read_jsonl(p)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows] == samples


@settings(max_examples=100, deadline=None)
@given(line=st.one_of(text, st.lists(turn, max_size=3).map(lambda m: json.dumps({"messages": m})),
                      st.dictionaries(text, text, max_size=3).map(json.dumps)))
def test_any_line_either_loads_or_raises_a_data_error(tmp_path_factory, line):
    p = tmp_path_factory.mktemp("h") / "d.jsonl"
    p.write_text(line.replace("\n", " ") + "\n")
    try:
        rows = data.read_jsonl(p)
    except DataError as e:
        assert str(p) in str(e)
    else:
        assert rows and all(r["messages"][-1]["role"] == "assistant" for r in rows)
