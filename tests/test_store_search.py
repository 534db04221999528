"""A store a person can search (issue 19, item 5): each record keeps its node's label, what it is
about and the source paths it read; `pkt store ls` filters, `show` takes keys or digests and prints
the lineage both ways, `find` answers "the LoRA init for student S from teacher T"."""
import json
import os

from pkt.artifacts.store import Store
from pkt.flows.cli import main
from pkt.flows.extract import extract_teacher


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_records_are_labelled_and_found_by_teacher_student_and_kind(prefect_env, mini_family, tmp_path, capsys):
    fam, root = mini_family, str(tmp_path / "store")
    teacher, student = os.path.abspath(fam / "teacher"), os.path.abspath(fam / "student")
    out = extract_teacher(teacher=str(fam / "teacher"), seeds=str(fam / "tasks/gsm/seeds.jsonl"),
                          students=[str(fam / "student")], rank=2, alpha=2.0, store=root)
    refs = out[str(fam / "student")]
    store = Store(root)
    sens = store.record("sensitivity", refs["sensitivity"]["key"])
    assert sens["label"] == "sensitivity[teacher=teacher, seeds=gsm/seeds.jsonl, k=all]"
    assert sens["sources"] == {"teacher": teacher, "seeds": os.path.abspath(fam / "tasks/gsm/seeds.jsonl")}
    assert sens["about"] == {"teacher": teacher, "task": "gsm", "role": "teacher"}
    init = store.record("lora_init", refs["lora_init"]["key"])
    # inherited: an init depends on no student
    assert init["about"] == {"teacher": teacher, "task": "gsm", "role": "teacher"}
    assert init["label"].startswith("lora_init[teacher=teacher, seeds=gsm/seeds.jsonl") and init["sources"] == {}
    residual = store.record("residual_model", refs["residual_model"]["key"])
    assert residual["about"] == {"teacher": teacher, "student": student, "task": "gsm", "role": "teacher"}

    # the LoRA init for this student from this teacher: by path or by folder name
    for t, s in ((teacher, student), ("teacher", "student"), (str(fam / "teacher") + "/", "student/")):
        code, text, _ = run(capsys, "store", "find", "--teacher", t, "--student", s, "--kind", "lora_init",
                            "--store", root)
        assert code == 0 and text.splitlines()[0].split()[:2] == ["lora_init", init["key"]], text
        assert "1 artifacts match" in text
    code, text, _ = run(capsys, "store", "find", "--student", "teacher-early", "--kind", "lora_init", "--store", root)
    assert code == 1 and "0 artifacts match" in text
    code, text, _ = run(capsys, "store", "find", "--teacher", "teacher", "--store", root)
    assert code == 0 and f"{len(store.records())} artifacts match" in text  # every node here reads that teacher
    code, _, err = run(capsys, "store", "find", "--kind", "lora", "--store", root)
    assert code == 2 and "--kind lora: no artifact of that kind" in err and "lora_init" in err

    # ls shows labels and filters by kind and by text
    code, text, _ = run(capsys, "store", "ls", "--kind", "lora_init", "--store", root)
    assert code == 0 and init["label"] in text and "1 artifacts match" in text and "sensitivity[" not in text
    code, text, _ = run(capsys, "store", "ls", "seeds=gsm", "--store", root)
    assert {line.split()[0] for line in text.splitlines()[1:-1]} == {"sensitivity", "layer_plan", "extraction",
                                                                    "lora_init"}
    code, text, _ = run(capsys, "store", "ls", "--store", root)
    assert text.splitlines()[0].split()[:3] == ["KIND", "KEY", "LABEL"]  # a header names the columns
    assert len(text.splitlines()) == len(store.records()) + 1 and "no label" not in text

    # show takes the digest an input is cited by, and prints the lineage up and down with labels
    plan = store.record("layer_plan", refs["plan"]["key"])
    assert plan["inputs"]["sensitivity"] == sens["digest"]
    for handle in (sens["digest"], sens["digest"][:10], sens["key"][:10]):
        code, text, _ = run(capsys, "store", "show", handle, "--store", root)
        assert code == 0 and f"label: {sens['label']}" in text
        up = text[text.index("lineage up"):text.index("lineage down")]
        down = text[text.index("lineage down"):]
        assert f"teacher: source {teacher}" in up and "seeds: source " in up
        for kind in ("layer_plan", "extraction", "lora_init", "residual_model"):
            assert f"{kind} " in down, (kind, down)
        assert store.record("residual_model", refs["residual_model"]["key"])["label"] in down
    code, text, _ = run(capsys, "store", "show", refs["residual_model"]["key"], "--store", root)
    up = text[text.index("lineage up"):]
    assert f"student: source {student}" in up and init["label"] in up and sens["label"] in up
    code, _, err = run(capsys, "store", "show", "f" * 64, "--store", root)
    assert code == 1 and "key or digest" in err


def test_a_record_from_an_older_pkt_lists_without_a_label(tmp_path, capsys):
    import torch

    store = Store(tmp_path / "store")
    ref = store.put_tensors("scores", store.key("scores", {}, {}), {"x": torch.ones(2)}, params={}, inputs={})
    path = store.record_path(ref.kind, ref.key)
    rec = json.loads(path.read_text())
    assert "label" not in rec
    code, text, _ = run(capsys, "store", "ls", "--store", str(store.root))
    assert code == 0 and "scores[no label: recorded by an older pkt]" in text
    code, text, _ = run(capsys, "store", "show", ref.digest, "--store", str(store.root))
    assert code == 0 and "lineage up" in text
