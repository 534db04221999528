"""A node's key covers every byte it reads, and it reads each byte once (issue 26, cases 1 and 2):
a source is read into a private snapshot whose digest is taken of the very bytes the node parses;
a score's model identity covers the generation defaults, a forward pass's does not."""
import hashlib
import json
import os
import shutil
import threading
import time

import pytest
import torch

from pkt.artifacts.keys import InputChanged
from pkt.artifacts.model_id import GENERATION_FILES
from pkt.artifacts.store import Store
from pkt.core import data
from pkt.tasks import extract as extract_nodes
from pkt.tasks import scores as score_nodes
from pkt.tasks import sources
from pkt.tasks.node import build


def test_generation_defaults_are_in_a_scores_key_and_not_in_a_forward_pass(mini_family, tmp_path):
    student = shutil.copytree(mini_family / "student", tmp_path / "student")
    gen = student / "generation_config.json"
    if not gen.exists():
        gen.write_text(json.dumps({"bos_token_id": 1}))
    store = Store(tmp_path / "store")
    data = sources.dir_source(str(mini_family / "tasks/gsm"), score_nodes.score_data_files("test"))
    spec = score_nodes.Scores(benchmark="gsm", split="test", limit=2)

    def keys():
        generator = sources.model_source(str(student), store, list(GENERATION_FILES))
        forward = sources.model_source(str(student), store)
        return spec.key({"student": generator, "data": data}), forward["digest"], generator

    score_key, forward, generator = keys()
    # case 1: the digits suppressed in generation: every generated score changes, the forward pass does not
    cfg = json.loads(gen.read_text())
    os.chmod(gen, 0o644)
    gen.write_text(json.dumps({**cfg, "suppress_tokens": list(range(3, 13))}))
    score_key2, forward2, generator2 = keys()
    assert score_key2 != score_key and forward2 == forward
    # the score's node reads the generation defaults its key covers; a forward node never sees them
    snap = sources.read_source(store, generator2, extra=GENERATION_FILES)
    assert json.loads((tmp_path / snap / "generation_config.json").read_text())["suppress_tokens"] == list(range(3, 13))
    forward_snap = sources.read_source(store, sources.model_source(str(student), store))
    assert not os.path.exists(os.path.join(forward_snap, "generation_config.json"))
    with pytest.raises(InputChanged):  # the snapshot is checked against the digest the key was taken of
        sources.read_source(store, generator, extra=GENERATION_FILES)


def _versions(seeds: bytes) -> tuple[bytes, bytes]:
    """Two same-size versions of a seeds file whose every byte-wise mix is also a valid seeds file."""
    return seeds, seeds.translate(bytes.maketrans(b"0123456789", b"1234567890"))


def test_a_file_torn_between_its_check_and_its_parse_is_not_what_the_node_reads(mini_family, tmp_path, monkeypatch):
    """Case 2 at its moment: the node checked the seeds file's digest, then half of another version
    is written in place while it parses, then the first version is put back (mtime too)."""
    a, b = _versions((mini_family / "tasks/gsm/seeds.jsonl").read_bytes())
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(a)
    times = os.stat(path)
    real = data.load_encoded

    def torn_parse(*args, **kw):
        with open(path, "r+b") as f:
            f.write(b[: len(b) // 2])
        try:
            return real(*args, **kw)
        finally:
            with open(path, "r+b") as f:
                f.write(a[: len(a) // 2])
            os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))

    teacher = str(mini_family / "teacher")
    store, clean = Store(tmp_path / "store"), Store(tmp_path / "clean")
    monkeypatch.setattr(data, "load_encoded", torn_parse)
    got = build(extract_nodes.Sensitivity(), {"teacher": sources.model_source(teacher, store),
                                              "seeds": sources.file_source(str(path))}, store)
    monkeypatch.undo()
    assert store.record("sensitivity", got["key"])["inputs"]["seeds"] == hashlib.sha256(a).hexdigest()
    want = build(extract_nodes.Sensitivity(), {"teacher": sources.model_source(teacher, clean),
                                               "seeds": sources.file_source(str(path))}, clean)
    assert got["key"] == want["key"]
    got, want = store.tensors(got), clean.tensors(want)
    assert all(torch.equal(got[n], want[n]) for n in want), "a torn read was stored under the clean key"


@pytest.mark.slow
@pytest.mark.ci
def test_a_source_rewritten_in_place_during_a_run_never_lands_torn(mini_family, tmp_path):
    a, b = _versions((mini_family / "tasks/gsm/seeds.jsonl").read_bytes())
    half = len(a) // 2
    states = {hashlib.sha256(x).hexdigest(): x for x in (a, b, b[:half] + a[half:], a[:half] + b[half:])}
    path = tmp_path / "seeds.jsonl"
    path.write_bytes(a)
    times = os.stat(path)
    stop, rewrites = threading.Event(), [0]

    def rewrite():  # in place, half a file at a time, the mtime put back: what issue 26's case 2 did
        with open(path, "r+b", buffering=0) as f:
            while not stop.is_set():
                for version in (b, a):
                    f.seek(0)
                    f.write(version[:half])
                    time.sleep(0.002)
                    f.write(version[half:])
                    os.utime(path, ns=(times.st_atime_ns, times.st_mtime_ns))
                    rewrites[0] += 1
                    time.sleep(0.003)

    store = Store(tmp_path / "race")
    teacher = sources.model_source(str(mini_family / "teacher"), store)
    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    computed = refused = 0
    try:
        for i in range(12):
            try:
                seeds = sources.file_source(str(path))
                build(extract_nodes.Sensitivity(k=4, sample_seed=i), {"teacher": teacher, "seeds": seeds}, store)
                computed += 1
            except InputChanged:
                refused += 1
    finally:
        stop.set()
        writer.join()
    assert rewrites[0] >= 50, rewrites
    assert computed + refused == 12
    # every stored artifact is what a quiet run computes from the bytes its record names
    clean_file, clean = tmp_path / "clean" / "seeds.jsonl", Store(tmp_path / "clean-store")
    clean_file.parent.mkdir()
    recs = [r for r in store.records() if r["kind"] == "sensitivity"]
    assert len(recs) == computed
    for rec in recs:
        digest = rec["inputs"]["seeds"]
        if digest not in states and store.blob_path(digest).exists():
            states[digest] = store.read_bytes(digest)  # other torn bytes, kept: their sha256 is the digest
        assert digest in states, "a sensitivity was recorded from bytes no version or half-write holds"
        clean_file.write_bytes(states[digest])
        inputs = {"teacher": sources.model_source(str(mini_family / "teacher"), clean),
                  "seeds": sources.file_source(str(clean_file))}
        want = clean.tensors(build(extract_nodes.Sensitivity(**rec["params"]), inputs, clean))
        got = store.tensors(rec)
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), rec["key"]
