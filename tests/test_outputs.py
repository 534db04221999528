"""Never clobber (issue 19, item 3): `pkt export` and every report directory write only where
nothing of the user's is replaced; --force never allows a model input's own directory."""
import hashlib
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from pkt.core.models import load_model
from pkt.flows.cli import main
from pkt.flows.outputs import MARKER


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0".encode() + f.read_bytes())
    return h.hexdigest()


def make_adapter(model_dir: Path, out: Path, pickled: bool = False) -> Path:
    torch.manual_seed(0)
    model = get_peft_model(load_model(model_dir), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                             init_lora_weights=False))
    model.save_pretrained(out, safe_serialization=not pickled)
    return out


@pytest.fixture
def student(mini_family, tmp_path):
    return Path(shutil.copytree(mini_family / "student", tmp_path / "student"))


@pytest.fixture
def adapter(student, tmp_path):
    return make_adapter(student, tmp_path / "adapter")


@pytest.fixture(autouse=True)
def no_allow_bin_left_behind(monkeypatch):
    monkeypatch.delenv("PKT_ALLOW_BIN", raising=False)  # main() sets it for --allow-bin


def export(student, adapter, out, *extra, store=None):
    return main(["export", "--student", str(student), "--adapter", str(adapter), "--out", str(out),
                 "--store", str(store or Path(out).parent / "store"), *extra])


def one_sentence(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("pkt ")]  # not transformers' bars
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert "merged model written" not in captured.out
    return lines[0]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_export_never_writes_over_the_students_own_directory(student, adapter, tmp_path, capsys, force):
    """Replays '--out = the student's own directory overwrote the student's weights'."""
    before = tree_digest(student)
    assert export(student, adapter, student, *force) == 2
    assert "is the model input" in one_sentence(capsys) and tree_digest(student) == before
    assert export(student, adapter, adapter, *force) == 2  # nor the adapter's
    assert "is the model input" in one_sentence(capsys)
    assert export(student, adapter, student.parent, *force) == 2  # nor a folder holding one (export replaces it)
    assert "holds the model input" in one_sentence(capsys) and tree_digest(student) == before


def test_export_refuses_a_non_empty_out_unless_forced(student, adapter, tmp_path, capsys):
    """Replays 'a non-empty directory had its config.json replaced'."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    assert export(student, adapter, out) == 2
    msg = one_sentence(capsys)
    assert "is not empty (config.json)" in msg and "--force" in msg
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert export(student, adapter, out, "--force") == 0  # forced: replaced whole
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("config")) == ["config.json"]
    assert "mine" not in (out / "config.json").read_text()
    assert not [p for p in tmp_path.iterdir() if ".pkt-" in p.name]  # no temp or old copies left beside it


def test_export_to_an_existing_file_is_refused(student, adapter, tmp_path, capsys):
    """Replays '--out an existing file wrote nothing and still printed "merged model written" with exit 0'."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert export(student, adapter, out) == 2
    assert "is an existing file" in one_sentence(capsys) and out.read_text() == "mine"


def test_export_fails_when_nothing_was_written(student, adapter, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, *a, **kw: None)  # writes nothing
    out = tmp_path / "merged"
    assert export(student, adapter, out) == 2
    assert "the merged model was not written" in one_sentence(capsys)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".pkt-" in p.name]


def test_export_reads_a_pickled_adapter_only_with_allow_bin(student, tmp_path, capsys):
    """Replays 'it also reads a pickled adapter_model.bin without --allow-bin'."""
    pickled = make_adapter(student, tmp_path / "pickled", pickled=True)
    assert (pickled / "adapter_model.bin").exists() and not (pickled / "adapter_model.safetensors").exists()
    assert export(student, pickled, tmp_path / "merged") == 2
    msg = one_sentence(capsys)
    assert "adapter_model.bin" in msg and "--allow-bin" in msg and not (tmp_path / "merged").exists()
    assert export(student, pickled, tmp_path / "merged", "--allow-bin") == 0


def test_export_names_a_shape_mismatch(mini_family, student, tmp_path, capsys):
    teachers = make_adapter(mini_family / "teacher", tmp_path / "teacher-adapter")  # wider than the student
    assert export(student, teachers, tmp_path / "merged") == 2
    msg = one_sentence(capsys)
    assert "does not fit student" in msg and "size mismatch" in msg and "lora" in msg
    assert not (tmp_path / "merged").exists()


def test_export_writes_the_merged_model(student, adapter, tmp_path, capsys):
    assert export(student, adapter, tmp_path / "merged") == 0
    merged = load_model(tmp_path / "merged")
    stock = PeftModel.from_pretrained(load_model(student), str(adapter)).eval()  # peft's own loading: the oracle
    ids = torch.tensor([[5, 12, 7, 36, 35, 24]])
    assert torch.allclose(merged(ids).logits, stock(ids).logits, atol=1e-4)


# ---- report directories -------------------------------------------------------------------------
@pytest.fixture
def runs_csv(tmp_path):
    rows = [{"student": "s", "task": "gsm", "benchmark": "gsm", "metric": "exact_match", "variant": v, "seed": s,
             "value": 0.1 * s + (0.05 if v == "transfer" else 0)} for v in ("lora", "transfer") for s in range(3)]
    path = tmp_path / "in" / "runs.csv"
    path.parent.mkdir()
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_a_report_is_never_written_over_a_users_files(runs_csv, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "report.md").write_text("my own report")
    argv = ["report", "--runs", str(runs_csv), "--metric", "exact_match", "--out", str(mine)]
    assert main(argv) == 2
    assert "is not empty (report.md)" in one_sentence(capsys) and (mine / "report.md").read_text() == "my own report"
    assert main(argv + ["--force"]) == 0 and (mine / MARKER).exists()
    assert main(argv) == 0  # pkt wrote it now: the next report replaces its own files
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    assert main(["report", "--runs", str(runs_csv), "--out", str(tmp_path / "file")]) == 2
    assert "is an existing file" in one_sentence(capsys)


def test_a_transfer_report_dir_may_not_be_a_model_input(mini_family, student, tmp_path, capsys):
    before = tree_digest(student)
    for extra in ([], ["--force"]):
        assert main(["transfer", "--teacher", str(mini_family / "teacher"), "--student", str(student), "--task-dir",
                     str(mini_family / "tasks/gsm"), "--report-dir", str(student), "--store", str(tmp_path / "s"),
                     *extra]) == 2
        assert "is the model input" in one_sentence(capsys)
    assert tree_digest(student) == before and not (tmp_path / "s").exists()  # refused before any work


def test_a_sweep_flow_refuses_a_users_report_dir_before_any_work(prefect_env, mini_family, tmp_path):
    from pkt.flows.outputs import OutputRefused
    from pkt.flows.sweep import sweep

    mine = tmp_path / "report"
    mine.mkdir()
    (mine / "summary.csv").write_text("mine")
    config = {"teacher": str(mini_family / "teacher"), "students": [str(mini_family / "student")],
              "tasks": [{"name": "gsm", "dir": str(mini_family / "tasks/gsm"), "benchmark": "gsm"}],
              "variants": ["vanilla"], "seeds": [0], "store": str(tmp_path / "store"), "report_dir": str(mine)}
    with pytest.raises(OutputRefused, match="is not empty"):
        sweep(config)
    assert (mine / "summary.csv").read_text() == "mine" and not list((tmp_path / "store").glob("keys/*/*"))
