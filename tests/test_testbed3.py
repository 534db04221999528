"""Testbed 3 (issue 24): v1's one-token names, each also said without its number in both corpora, so the
student's corpus trains every teacher-only name's token while it still never states a teacher-only fact.
Checked by scanning the corpus text and its tokens here, not through the module's own bookkeeping."""
import hashlib
import json
import re
from collections import Counter

import pytest

from pkt.core.mini import family, tasks
from pkt.core.mini.tokenizer import build_tokenizer

RECIPES = (("test", None), ("study", 0), ("study", 1))


def teacher_only(r):
    book = tasks.fact_book(r.tasks, r.seed, r.testbed)
    return [f for s in tasks.HELD_SPLITS for f in book[f"teacher-only/{s}"]]


@pytest.mark.parametrize("size,seed", RECIPES)
def test_every_teacher_only_name_is_in_the_students_corpus_and_no_student_document_states_its_fact(size, seed):
    r = family.recipe(size, seed, 3)
    facts = teacher_only(r)
    docs = family.corpus("student", r)
    words = Counter(w for d in docs for w in re.findall(r"[a-z]+", d))
    # every name said 2 x NAME_MENTIONS times (each reversal phrase holds it twice: asked and answered)
    assert {words[n] for n, _ in facts} == {2 * tasks.NAME_MENTIONS}, size
    for d in docs:
        named = {n for n, _ in facts} & set(re.findall(r"[a-z]+", d))
        if named:  # a document with a teacher-only name holds no digit, so no value of it
            assert not re.search(r"\d", d), d
            assert d.startswith("<|user|>\nReverse the order of the words: "), d
    # and the tokenizer reads each name as its one token, which the student's corpus trains
    tok = build_tokenizer(3)
    ids = Counter(i for row in tok(docs, add_special_tokens=False)["input_ids"] for i in row)
    for name, _ in facts:
        [token] = tok(name, add_special_tokens=False)["input_ids"]
        assert ids[token] == 2 * tasks.NAME_MENTIONS and token != tok.unk_token_id, name


@pytest.mark.parametrize("size,seed", RECIPES)
def test_the_corpora_differ_by_the_teacher_only_fact_sentences_alone(size, seed):
    """The teacher's corpus is the student's plus each teacher-only fact sentence fact_repeats times, as
    multisets of documents: the name documents are the same text in both."""
    r = family.recipe(size, seed, 3)
    teacher, student = (Counter(family.corpus(m, r)) for m in ("teacher", "student"))
    assert not student - teacher
    assert teacher - student == Counter({tasks.fact_sentence(n, v): r.fact_repeats for n, v in teacher_only(r)})


@pytest.mark.parametrize("size,seed", RECIPES)
def test_v3_is_v1_plus_reversals_of_the_names(size, seed):
    """Same tokenizer, tasks and facts as v1; each corpus is v1's plus word-reversal documents of names only
    that hold every fact's name (and only those) NAME_MENTIONS times."""
    v1, v3 = family.recipe(size, seed, 1), family.recipe(size, seed, 3)
    assert build_tokenizer(3).get_vocab() == build_tokenizer(1).get_vocab()
    assert tasks.fact_book(v3.tasks, v3.seed, 3) == tasks.fact_book(v1.tasks, v1.seed, 1)
    for task in tasks.TASKS:
        assert tasks.make_splits(task, v3.tasks, v3.seed, 3) == tasks.make_splits(task, v1.tasks, v1.seed, 1), task
    names = {n for facts in tasks.fact_book(v1.tasks, v1.seed, 1).values() for n, _ in facts}
    for member in ("teacher", "student"):
        old, new = Counter(family.corpus(member, v1)), Counter(family.corpus(member, v3))
        assert not old - new
        said = Counter()
        for doc, k in (new - old).items():
            prompt, answer = re.fullmatch(r"<\|user\|>\nReverse the order of the words: (.*)\n\n<\|assistant\|>\n(.*)",
                                          doc).groups()
            assert answer.split() == prompt.split()[::-1] and 1 <= len(prompt.split()) <= 5, doc
            said.update(prompt.split() * k)
        assert set(said) == names and set(said.values()) == {tasks.NAME_MENTIONS}, member


V1_CORPUS_SHA256 = {  # sha256 of json.dumps(family.corpus(member, recipe)), recorded before testbed 3 was added
    ("test", None, "teacher"): "b44d13fe9cb390bb209fb2f3582be412a7b95785b284e8d97df984627d2201c0",
    ("test", None, "student"): "641a73ac7cdec264dd93519fe5d8bdb9b02dcf627e01981fe0a1064579d38084",
    ("study", 0, "teacher"): "a5d5164b90e225f10aee4504a9c3496f2599f294302f47fa4badd6acdbc060a2",
    ("study", 0, "student"): "8a8b5ec9c70da54d73bfa80311d9ff98e6eac1d55382add9b8450052d4fc1402",
}


def test_v1_corpora_are_unchanged():
    for (size, seed, member), digest in V1_CORPUS_SHA256.items():
        got = hashlib.sha256(json.dumps(family.corpus(member, family.recipe(size, seed))).encode()).hexdigest()
        assert got == digest, (size, seed, member)


def test_v3_recipes_are_gated_on_reachability_and_keyed_apart_from_v1_and_v2():
    from pkt.flows.cli import parser
    from pkt.tasks import family as family_nodes

    r = family.recipe("study", 0, 3)
    assert r.testbed == 3 and r.reach_train == family.REACH_TRAIN
    assert family.recipe("study", 0).testbed == 1 and family.recipe("study", 0).reach_train is None  # v1 the default
    keys = {tb: family_nodes.Family(size="study", recipe=family.recipe_params("study", 0, tb)).key({})
            for tb in (1, 2, 3)}
    assert len(set(keys.values())) == 3
    assert parser().parse_args(["demo", "--study", "--testbed", "3"]).testbed == 3
    with pytest.raises(ValueError, match="unknown testbed 4"):
        family.recipe("study", 0, 4)
