"""A realistic fixture (tests/chat_fixture.py: Qwen2's architecture, a byte-level BPE tokenizer with
Qwen2's special tokens and ChatML template, GSM8K-style rows): pkt renders its samples in the model's own
chat template, trains on the answer only, and generates to the end of the turn."""
import json

import pytest
import torch

import chat_fixture as fx
from pkt.core import answers, data, evaluate
from pkt.core.models import load_model, load_tokenizer

TWO_TURNS = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                          {"role": "assistant", "content": "#### 4"}, {"role": "user", "content": "And 12+30?"},
                          {"role": "assistant", "content": "12 + 30 = 42\n#### 42"}]}


@pytest.fixture(scope="module")
def tok():
    return fx.build_tokenizer()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tok):
    """A Qwen2 student whose greedy answer to any question in the chat template is '#### 42'."""
    root = tmp_path_factory.mktemp("scripted")
    return fx.write_model(root / "model", tok, 2, 32, 48, script=fx.SCRIPTED_ANSWER), fx.write_task(root / "task")


@pytest.mark.parametrize("row", [fx.gsm_row(0), TWO_TURNS], ids=["gsm", "system+two turns"])
def test_prompts_are_the_chat_templates_own(tok, row, tmp_path):
    history = row["messages"][:-1]
    prompt, answer = data.render(row["messages"], tok, data.resolve_format("auto", tok))
    assert prompt == tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert data.tokenize(tok, prompt) == tok.apply_chat_template(history, add_generation_prompt=True)["input_ids"]
    # prompt + answer is the template's whole conversation, up to and including the last <|im_end|>
    assert prompt + answer == tok.apply_chat_template(row["messages"], tokenize=False).removesuffix("\n")
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    cfg = evaluate.task_config("gsm", tmp_path, tokenizer=tok, prompt_format="chat")
    assert cfg["doc_to_text"](row) == prompt  # what lm-eval is given to generate from
    assert cfg["generation_kwargs"]["until"] == ["<|im_end|>"] and cfg["generation_kwargs"]["max_gen_toks"] >= 512


def test_a_tokenizer_without_a_template_keeps_the_papers_layout(tok):
    from pkt.core.mini.tokenizer import build_tokenizer

    mini = build_tokenizer()
    assert data.resolve_format("auto", mini) == "paper"
    assert data.render(fx.gsm_row(0)["messages"], mini, "paper")[0].endswith("<|assistant|>\n")
    assert data.resolve_format("paper", tok) == "paper"
    with pytest.raises(data.DataError, match="--prompt-format chat: the tokenizer has no chat template"):
        data.resolve_format("chat", mini)


def test_the_loss_covers_the_answer_and_its_end_of_turn_only(tok):
    row = fx.gsm_row(5)
    enc = data.encode(data.to_samples([row], tok, "chat")[0], tok)
    ids, labels = enc["input_ids"][0].tolist(), enc["labels"][0].tolist()
    n_prompt = len(tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)["input_ids"])
    assert labels[:n_prompt] == [data.IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == row["messages"][-1]["content"] + "<|im_end|>"
    assert ids == tok.apply_chat_template(row["messages"])["input_ids"][:-1]  # the template's, less the "\n"


def test_generation_stops_at_the_end_of_turn_and_scores_the_stated_answer(scripted):
    model_dir, task = scripted
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    rows = [fx.gsm_row(0), fx.gsm_row(1)]  # 12+30 = 42 (what the model writes) and 13+32 = 45
    for split in ("train", "test"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate.evaluate(model, tok, "gsm", task, prompt_format="chat")
    # past <|im_end|> the scripted head writes the answer again: a missed stop would repeat it to 512 tokens
    assert list(res.outputs) == [fx.SCRIPTED_ANSWER] * 2
    assert res.per_example["exact_match"].tolist() == [1.0, 0.0]
    gen = model.generate(torch.tensor([data.tokenize(tok, data.render(rows[0]["messages"], tok, "chat")[0])]),
                         max_new_tokens=20, do_sample=False)
    assert tok.decode(gen[0]).count("<|im_end|>") >= 2  # generate's eos stop does not end the turn: pkt's stop does


def test_the_output_check_fires_on_broken_answers_and_names_the_format(tmp_path, tok):
    model_dir = fx.write_model(tmp_path / "model", tok, 2, 32, 48, script="")  # ends every turn at once
    task = fx.write_task(tmp_path / "task", n=4)
    model = load_model(model_dir)
    with pytest.raises(evaluate.BrokenAnswers, match=r"in the chat prompt format are all empty.*--no-check"):
        evaluate.check_answers(model, tok, "gsm", task, prompt_format="chat", who="student")


@pytest.mark.parametrize("outputs,problem", [
    (["", "  "], "are all empty"), (["#### 42", "#### 42"], "are all the same"),
    (["I'm sorry, but I can't assist with that.", "I cannot help with that request."], "are refusals"),
    (["Let me think.", "Sure thing!"], "state no answer")])
def test_broken_answers_are_told_apart(outputs, problem):
    assert problem in answers.broken(outputs, needs_number=True)
    assert answers.broken(["The answer is 5.", "17 + 2 = 19\n#### 19"], needs_number=True) is None


def test_the_check_runs_in_the_paper_layout_only_when_asked(mini_family):
    """The test family's student answers gsm with blank lines (it cannot add, by design): the check sees that,
    but a sweep runs it by default only for a student scored in its chat template (the format mistake it
    exists for); check: true runs it in the paper's layout too, check: false never."""
    from pkt.flows.config import parse_config
    from pkt.flows.sweep import check_answers

    model, tok = load_model(mini_family / "student"), load_tokenizer(mini_family / "student")
    with pytest.raises(evaluate.BrokenAnswers, match="paper prompt format are all empty"):
        evaluate.check_answers(model, tok, "gsm", mini_family / "tasks" / "gsm", prompt_format="auto")
    raw = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
           "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks" / "gsm"), "benchmark": "gsm"}],
           "variants": ["vanilla"], "seeds": [0]}
    check_answers(parse_config(raw))  # default: the paper's layout is not checked
    with pytest.raises(evaluate.BrokenAnswers):
        check_answers(parse_config({**raw, "check": True}))


@pytest.mark.slow
@pytest.mark.ci
def test_extract_transfer_and_report_in_the_models_chat_format(prefect_env, tmp_path, capsys):
    """The fixture pair through `pkt extract` and `pkt transfer` (lora, transfer; gsm): every node that reads
    text is keyed in the chat format, the teacher's extraction is reused, and the report says the format."""
    from pkt.artifacts.store import Store
    from pkt.flows.cli import main

    pair, store = fx.write_pair(tmp_path), str(tmp_path / "store")
    teacher, student, task = (str(pair[k]) for k in ("teacher", "student", "task"))
    assert main(["extract", "--teacher", teacher, "--seeds", f"{task}/seeds.jsonl", "--student", student,
                 "--rank", "2", "--store", store]) == 0
    assert "teacher teacher: its chat template; student student: its chat template" in capsys.readouterr().out
    train = json.dumps({"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 4, "micro_batch": 4, "n_train": 4})
    args = ["transfer", "--teacher", teacher, "--student", student, "--task-dir", task, "--variants",
            "lora,transfer", "--train", train, "--store", store, "--report-dir", str(tmp_path / "report")]
    # a random-weight student writes noise: what the check makes of it is the next test's business
    assert main(args + ["--no-check"]) == 0
    records = list(Store(store).records())
    for kind in ("sensitivity", "adapter", "scores"):
        assert all(r["params"]["chat_template"] for r in records if r["kind"] == kind), kind
    assert sum(r["kind"] == "sensitivity" for r in records) == 1  # extract's, reused by transfer
    report = (tmp_path / "report" / "report.md").read_text()
    assert "prompt format auto: teacher teacher: its chat template; student student: its chat template" in report
    scores = [r for r in records if r["kind"] == "scores" and r["params"]["benchmark"] == "gsm"]
    assert scores and all("max_gen_toks" not in r["params"] for r in scores)  # the YAML's 512 tokens
    # the paper's layout, asked for, is another node for every text reader
    assert main(["extract", "--teacher", teacher, "--seeds", f"{task}/seeds.jsonl", "--student", student,
                 "--rank", "2", "--store", store, "--prompt-format", "paper"]) == 0
    sens = [r for r in Store(store).records() if r["kind"] == "sensitivity"]
    assert sorted(r["params"]["chat_template"] for r in sens) == [False, True]


@pytest.mark.slow
@pytest.mark.ci
def test_transfer_stops_before_scoring_when_the_student_answers_nothing(prefect_env, tmp_path, capsys):
    from pkt.artifacts.store import Store
    from pkt.flows.cli import main

    pair = fx.write_pair(tmp_path)
    silent = fx.write_model(tmp_path / "silent", fx.build_tokenizer(), 2, 32, 48, script="")
    code = main(["transfer", "--teacher", str(pair["teacher"]), "--student", str(silent), "--task-dir",
                 str(pair["task"]), "--variants", "lora", "--store", str(tmp_path / "store"),
                 "--report-dir", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code != 0
    assert "silent: its gsm answers to 5 val items in the chat prompt format are all empty" in err
    assert "--no-check" in err
    assert not any(r["kind"] in ("adapter", "scores") for r in Store(tmp_path / "store").records())


def test_paper_format_nodes_keep_the_keys_they_had_before_the_option():
    """chat_template enters a key only when True: a node in the paper's format is keyed exactly as before
    the field existed (its params without it), so stored miniature-family artifacts stay reusable."""
    import dataclasses

    from pkt.artifacts.store import Store
    from pkt.tasks import laten as laten_nodes
    from pkt.tasks import scores as score_nodes
    from pkt.tasks import train as train_nodes
    from pkt.tasks.node import _plain, identities

    inputs = {"student": {"kind": "model", "key": "s", "digest": "a" * 64},
              "train": {"kind": "file", "key": "t", "digest": "b" * 64},
              "data": {"kind": "dir", "key": "d", "digest": "c" * 64}}
    for spec in (train_nodes.Adapter(train={"lr": 1e-3}), score_nodes.Scores(benchmark="gsm", task_definition="x"),
                 laten_nodes.LatenAttribution(index=3), train_nodes.Diagnostic()):
        used = {k: inputs["student" if k == "model" else k] for k in spec.INPUTS}
        before = {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)  # the fields it had
                  if not f.metadata.get("execution") and f.name not in ("chat_template", "max_gen_toks")}
        assert spec.key(used) == Store.key(spec.KIND, before, identities(used), spec.VERSION), spec.KIND
        chat = dataclasses.replace(spec, chat_template=True)
        assert chat.params()["chat_template"] is True and chat.key(used) != spec.key(used), spec.KIND


def test_sensitivity_training_and_evaluation_read_one_rendering(tmp_path, tok, monkeypatch):
    """The chat format through the real nodes: the sensitivity pass and the adapter get the same ids
    and labels, those are the template's, and lm-eval's forward passes read exactly those ids."""
    from test_formatting import _captured, _forward_inputs, _Stop

    from pkt.artifacts.store import Store
    from pkt.core import finetune, sensitivity
    from pkt.tasks import extract as extract_nodes
    from pkt.tasks import sources
    from pkt.tasks import train as train_nodes

    model_dir = fx.write_model(tmp_path / "model", tok, 2, 32, 48)
    task = tmp_path / "task"
    task.mkdir()
    for split in ("train", "seeds", "test"):
        (task / f"{split}.jsonl").write_text(json.dumps(TWO_TURNS) + "\n")
    store = Store(tmp_path / "store")
    ref = sources.model_source(str(model_dir), store)
    sens = _captured(monkeypatch, sensitivity, "compute_sensitivity", 1)
    with pytest.raises(_Stop):
        extract_nodes.Sensitivity(chat_template=True).compute(
            store, {"teacher": ref, "seeds": sources.file_source(str(task / "seeds.jsonl"))}, tmp_path)
    train = _captured(monkeypatch, finetune, "finetune", 1)
    with pytest.raises(_Stop):
        train_nodes.Adapter(train={"rank": 2, "alpha": 2, "modules": ["q"]}, chat_template=True).compute(
            store, {"student": ref, "train": sources.file_source(str(task / "train.jsonl"))}, tmp_path)
    tok = load_tokenizer(model_dir)  # as the nodes read it (AutoTokenizer: Qwen2's tokenizer class)
    ids = train[0][0]["input_ids"][0].tolist()
    assert ids == sens[0][0]["input_ids"][0].tolist() == tok.apply_chat_template(TWO_TURNS["messages"])["input_ids"][:-1]
    assert torch.equal(sens[0][0]["labels"], train[0][0]["labels"])
    n_prompt = int((train[0][0]["labels"][0] == data.IGNORE).sum())
    assert ids[:n_prompt] == tok.apply_chat_template(TWO_TURNS["messages"][:-1], add_generation_prompt=True)["input_ids"]

    model = load_model(model_dir)
    seen = _forward_inputs(model)
    evaluate.evaluate(model, tok, "answer_nll", task, batch_size=1, prompt_format="chat")
    assert seen[0] == [ids[:-1]]  # prompt + answer (with its <|im_end|>), less the last token
    seen.clear()
    evaluate.evaluate(model, tok, "gsm", task, batch_size=1, prompt_format="chat", max_gen_toks=4)
    assert seen[0] == [ids[:n_prompt]]  # generation starts from exactly the training prompt


def test_the_data_route_reads_prompts_in_each_models_own_format(scripted, tmp_path, monkeypatch):
    """kd encodes the prompts in the student's template; the teacher completes them in its own template and
    stops at its end of turn (the scripted model would write the answer again past it); the completions are
    answer rows, which seq-kd's adapter then renders in the student's template like any training data."""
    from pkt.artifacts.store import Store
    from pkt.core import distill, finetune
    from pkt.tasks import sources
    from pkt.tasks import train as train_nodes

    model_dir, task = scripted
    tok = load_tokenizer(model_dir)
    store = Store(tmp_path / "store")
    ref = sources.model_source(str(model_dir), store)
    prompts = sources.dir_source(str(task), [distill.prompt_file(task)])
    turns = distill.read_prompts(task)
    seen = []
    real = distill.encode_prompts
    monkeypatch.setattr(distill, "encode_prompts", lambda texts, *a, **k: seen.extend(texts) or real(texts, *a, **k))
    class Stop(Exception):
        pass

    monkeypatch.setattr(finetune, "train_adapter", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        train_nodes.KdAdapter(train={"rank": 2, "alpha": 2, "steps": 1}, chat_template=True).compute(
            store, {"student": ref, "teacher": ref, "prompts": prompts}, tmp_path)
    assert seen == [tok.apply_chat_template(t, tokenize=False, add_generation_prompt=True) for t in turns]

    out = tmp_path / "completions"
    out.mkdir()
    train_nodes.TeacherCompletions(max_new_tokens=8, chat_template=True).compute(
        store, {"teacher": ref, "prompts": prompts}, out)
    rows = data.read_jsonl(out / "train.jsonl")
    assert len(rows) == len(turns) and {r["messages"][-1]["content"].strip() for r in rows} == {fx.SCRIPTED_ANSWER}
