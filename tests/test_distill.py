"""The data route (kd, seq-kd): it reads prompts only, never an answer, and each arm lowers its own loss."""
import json

import pytest

from conftest import tiny_model
from pkt.artifacts.store import Ref, Store
from pkt.core import data, distill, finetune, models
from pkt.core.mini.tasks import write_task
from pkt.core.mini.tokenizer import build_tokenizer
from pkt.tasks import sources
from pkt.tasks import train as train_nodes
from pkt.tasks.node import build

TASK = "facts-teacher-only"
TRAIN = {"rank": 4, "alpha": 8.0, "lr": 1e-2, "steps": 6, "checkpoints": [2, 6], "batch_size": 8, "micro_batch": 8,
         "dropout": 0.0, "max_length": 64, "n_train": 16}


@pytest.fixture
def spied(monkeypatch):
    """Every prompt text the data route's nodes encode or complete."""
    seen = []
    for name, at in (("encode_prompts", 0), ("greedy_completions", 2)):  # the position of the texts argument
        real = getattr(distill, name)

        def spy(*a, real=real, at=at, **kw):
            seen.extend(a[at])
            return real(*a, **kw)

        monkeypatch.setattr(distill, name, spy)
    return seen


def _answers(task_dir):
    return {r["messages"][-1]["content"] for s in ("train", "gate", "val", "test")
            for r in data.read_jsonl(task_dir / f"{s}.jsonl")}


@pytest.fixture
def family(tmp_path):
    """A miniature task directory and two small random models (teacher wider and deeper) on its tokenizer:
    what the data route reads, without pretraining a family."""
    write_task(tmp_path / "tasks" / TASK, TASK, n_train=32, n_gate=8, n_val=8, n_test=16, n_seeds=4)
    tok = build_tokenizer()
    for name, kw in (("teacher", {"layers": 3, "hidden": 48, "intermediate": 64}), ("student", {})):
        model = tiny_model(seed=len(name), vocab=len(tok), **kw)
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        tok.save_pretrained(tmp_path / name)
    return tmp_path


def test_the_prompts_are_the_pools_questions_without_answers(family, tmp_path):
    task = family / "tasks" / TASK
    assert distill.prompt_file(task) == distill.PROMPTS_FILE  # the miniature task writes its own
    texts = set(distill.prompt_texts(distill.read_prompts(task)))
    for split in ("train", "test"):  # the fine-tuning pool and the scored pool, each question once
        assert {data.format_prompt(r["messages"]) for r in data.read_jsonl(task / f"{split}.jsonl")} <= texts
    assert not any(a in t for a in _answers(task) for t in texts)
    # a task without prompts.jsonl: the user turns of its train.jsonl
    tmp = tmp_path / "plain"
    tmp.mkdir()
    (tmp / "train.jsonl").write_bytes((task / "train.jsonl").read_bytes())
    assert distill.prompt_file(tmp) == "train.jsonl"
    assert distill.prompt_texts(distill.read_prompts(tmp)) == [
        data.format_prompt(r["messages"]) for r in data.read_jsonl(tmp / "train.jsonl")]


def test_a_prompt_file_with_an_answer_is_refused(tmp_path):
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(data.DataError, match="prompts.jsonl line 1: a prompt ends with an assistant turn"):
        distill.read_prompts(tmp_path)


@pytest.mark.slow  # 159 s on 2 cores under a load of 30 (other sessions' tests)
@pytest.mark.ci
def test_kd_and_seq_kd_read_no_answer_and_lower_their_own_loss(family, tmp_path, spied):
    store = Store(tmp_path / "store")
    task = family / "tasks" / TASK
    teacher = sources.model_source(str(family / "teacher"), store)
    student = sources.model_source(str(family / "student"), store)
    prompts = sources.dir_source(str(task), [distill.prompt_file(task)])
    kd = build(train_nodes.KdAdapter(train=TRAIN), {"student": student, "teacher": teacher, "prompts": prompts}, store)
    completions = build(train_nodes.TeacherCompletions(max_new_tokens=8), {"teacher": teacher, "prompts": prompts},
                        store)
    seq = build(train_nodes.Adapter(variant="seq-kd", train=TRAIN), {"student": student, "train": completions}, store)
    # what they read: prompts, and not one answer of any split
    assert spied and not any(a in t for a in _answers(task) for t in spied)
    assert all(t.endswith("<|assistant|>\n") for t in spied)
    rows = data.read_jsonl(store.tree(Ref.of(completions)) / "train.jsonl")
    assert {data.format_prompt(r["messages"]) for r in rows} <= set(spied)  # the teacher answered the prompts

    def fresh_student():
        return models.load_model(str(family / "student"), dtype="float32", device="cpu")

    tok = models.load_tokenizer(str(family / "student"))
    t_model = models.load_model(str(family / "teacher"), dtype="float32", device="cpu")
    # kd's own loss, KL(teacher || student) on its prompts, before and after
    samples = distill.encode_prompts(distill.prompt_texts(distill.read_prompts(task)), tok, 64)[:16]
    before = distill.kd_loss(fresh_student(), t_model, samples, tok.pad_token_id)
    after = distill.kd_loss(models.with_adapter(fresh_student(), store.tree(Ref.of(kd))), t_model, samples,
                            tok.pad_token_id)
    assert after < before
    # seq-kd's own loss, the answer NLL of the teacher's completions
    encoded = data.load_encoded(store.tree(Ref.of(completions)) / "train.jsonl", tok, 64)[:16]
    before = finetune.answer_loss(fresh_student(), encoded, tok.pad_token_id).mean()
    after = finetune.answer_loss(models.with_adapter(fresh_student(), store.tree(Ref.of(seq))), encoded,
                                 tok.pad_token_id).mean()
    assert after < before
    # the checkpoint at step 2 of the same run is there, and reads back as an adapter of its own
    ckpt = build(train_nodes.AdapterCheckpoint(step=2), {"adapter": kd}, store)
    assert train_nodes.train_losses(store, ckpt) == train_nodes.train_losses(store, kd)[:2]
