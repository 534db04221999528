"""The positive controls in the sweep (flows/variants.py): the teacher scored as a model beside every
variant, and the oracle, the student's LoRA trained on the very items it is scored on."""
import pytest

from pkt.artifacts.store import Store
from pkt.core import evaluate, models, report
from pkt.artifacts.keys import file_digest

EM = "exact_match/strict-match"


@pytest.mark.slow  # ~1-2 min on 2 shared cores: 3 adapters of 64 steps, 5 scores
@pytest.mark.ci
def test_oracle_moves_the_endpoint_and_the_teacher_is_scored_as_a_model(prefect_env, mini_family, tmp_path):
    from pkt.flows.sweep import sweep

    task = mini_family / "tasks" / "facts-teacher-only"
    store, out_dir = tmp_path / "store", tmp_path / "report"
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "facts-teacher-only", "dir": str(task), "benchmark": "gsm"}],
              "variants": ["vanilla", "teacher", "lora", "oracle"], "seeds": [0], "benchmarks": [],
              "train": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "lr": 1e-2, "epochs": 64, "batch_size": 16,
                        "micro_batch": 16, "max_length": 64},
              "store": str(store), "report_dir": str(out_dir)}
    out = sweep(config)
    runs = report.read_csv(out_dir / "runs.csv")
    em = runs[runs["metric"] == EM].set_index("variant")["value"]
    assert set(em.index) == {"vanilla", "teacher", "lora", "oracle"}
    assert em["oracle"] - em["vanilla"] >= 0.3  # training at this budget can put the scored facts there
    # the teacher row is the teacher itself on the test split, scored here directly (no adapter)
    teacher = models.load_model(mini_family / "teacher")
    direct = evaluate.evaluate(teacher, models.load_tokenizer(mini_family / "teacher"), "gsm", task, split="test")
    assert em["teacher"] == direct.summary[EM]
    # what each adapter trained on: the oracle the test split, lora the task's train split
    st = Store(store)
    trained_on = {}
    for kind, key, _ in out["nodes"]:
        if kind == "adapter":
            rec = st.record("adapter", key)
            trained_on[rec["params"]["variant"]] = rec["inputs"]["train"]
    assert trained_on == {"oracle": file_digest(task / "test.jsonl"), "lora": file_digest(task / "train.jsonl")}
