"""What is computed is what the key says (issue 19, item 1): every input a node reads has the
digest its key was computed from, or the node refuses with a sentence and records nothing."""
import json
import os
import shutil
from pathlib import Path

import pytest

import pkt.tasks.nodes as nodes
from pkt.artifacts.keys import InputChanged
from pkt.artifacts.model_id import model_digest
from pkt.artifacts.store import Store
from pkt.core import data
from pkt.flows.extract import extract_teacher
from pkt.tasks.node import build


def write_seeds(path: Path, family: Path, n: int) -> None:
    rows = (family / "tasks/gsm/train.jsonl").read_text().splitlines()[:n]
    tmp = path.with_suffix(".new")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)  # replaced, as an editor or `cp` over it would


def records(store: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in store.glob(f"keys/{kind}/*.json")]


def test_a_seeds_file_replaced_after_its_digest_was_taken_is_refused(prefect_env, mini_family, tmp_path, monkeypatch):
    """Replays 'a seeds file replaced after its file[...] source task took the digest: the
    sensitivity ran on 10 samples and was recorded under the 60-sample key'."""
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, mini_family, 60)
    sixty = nodes.file_source(str(seeds))["digest"]
    real = nodes.file_source

    def digest_then_replace(path):
        ref = real(path)
        write_seeds(Path(path), mini_family, 10)
        return ref

    monkeypatch.setattr(nodes, "file_source", digest_then_replace)
    store = tmp_path / "store"
    args = dict(teacher=str(mini_family / "teacher"), seeds=str(seeds), students=[str(mini_family / "student")],
                rank=2, alpha=2.0, store=str(store))
    with pytest.raises(InputChanged, match=f"{seeds} changed after this run took its digest"):
        extract_teacher(**args)
    assert records(store, "sensitivity") == []  # nothing under the 60-sample key
    assert Store(store).verify() == []
    monkeypatch.setattr(nodes, "file_source", real)
    extract_teacher(**args)  # the rerun keys the 10 samples it reads by their own digest
    [rec] = records(store, "sensitivity")
    assert rec["inputs"]["seeds"] == nodes.file_source(str(seeds))["digest"] != sixty
    assert json.loads(Store(store).header(rec)["n_samples"]) == 10


def sensitivity_inputs(store: Store, teacher: Path, seeds: Path) -> dict:
    return {"teacher": nodes.model_source(str(teacher), store), "seeds": nodes.file_source(str(seeds))}


def test_a_seeds_file_changed_while_the_node_reads_it_is_not_read(mini_family, tmp_path, monkeypatch):
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds, mini_family, 12)
    store = Store(tmp_path / "store")
    inputs = sensitivity_inputs(store, mini_family / "teacher", seeds)
    real = data.load_encoded

    def read_then_change(path, *a, **kw):
        samples = real(path, *a, **kw)
        write_seeds(seeds, mini_family, 10)
        return samples

    # the node reads a private snapshot of the bytes its key names: a change to the file cannot reach it
    monkeypatch.setattr(data, "load_encoded", read_then_change)
    assert build(nodes.Sensitivity(), inputs, store)["status"] == "computed"
    [rec] = records(store.root, "sensitivity")
    assert rec["inputs"]["seeds"] == inputs["seeds"]["digest"] and store.header(rec)["n_samples"] == "12"


def restore_mtime_after(path: Path, change) -> None:
    st = path.stat()
    change(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def flip_a_weight_byte(path: Path) -> None:
    """One byte of the last tensor's data, in place: the same size, other weights."""
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        b = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x40]))


def test_a_same_size_weight_change_with_its_mtime_restored_is_another_model(mini_family, tmp_path):
    """Replays 'model identity's memo trusts (path, size, mtime): a same-size weight change with
    mtime restored keeps the old digest'."""
    teacher = Path(shutil.copytree(mini_family / "teacher", tmp_path / "teacher"))
    memo = tmp_path / "memo"
    before = model_digest(teacher, memo_dir=memo)
    assert model_digest(teacher, memo_dir=memo) == before  # the memo answers an unchanged model
    restore_mtime_after(teacher / "model.safetensors", flip_a_weight_byte)
    assert model_digest(teacher, memo_dir=memo) != before
    assert model_digest(teacher) == model_digest(teacher, memo_dir=memo)  # the memo agrees with a fresh hash


def test_a_teacher_changed_after_its_digest_was_taken_is_refused(mini_family, tmp_path):
    teacher = Path(shutil.copytree(mini_family / "teacher", tmp_path / "teacher"))
    store = Store(tmp_path / "store")
    inputs = sensitivity_inputs(store, teacher, mini_family / "tasks/gsm/seeds.jsonl")
    restore_mtime_after(teacher / "model.safetensors", flip_a_weight_byte)
    with pytest.raises(InputChanged, match=f"{teacher} changed after this run took its digest"):
        build(nodes.Sensitivity(), inputs, store)
    assert records(store.root, "sensitivity") == []


def test_a_hard_link_made_while_a_node_reads_a_model_is_no_change(mini_family, tmp_path, monkeypatch):
    """A link (the store's trees link blobs: a model inside a tree shares inodes with others) moves
    the ctime of unchanged bytes: the node still records."""
    teacher = Path(shutil.copytree(mini_family / "teacher", tmp_path / "teacher"))
    store = Store(tmp_path / "store")
    inputs = sensitivity_inputs(store, teacher, mini_family / "tasks/gsm/seeds.jsonl")
    real = data.load_encoded

    def read_and_link(*a, **kw):
        os.link(teacher / "model.safetensors", tmp_path / "another-tree-file")
        return real(*a, **kw)

    monkeypatch.setattr(data, "load_encoded", read_and_link)
    assert build(nodes.Sensitivity(), inputs, store)["status"] == "computed"
