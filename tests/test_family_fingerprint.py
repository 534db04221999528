"""The family builder's version is in every family's key, and the test family's bytes are held to the digest
recorded beside it: a change that makes build_family write other bytes for the same recipe fails here until
BUILDER_VERSION is bumped (a new key, so no store answers with the old bytes) and BUILDER_DIGEST re-recorded."""
import json

import pytest
import torch

from pkt.core.mini import family

RERECORD = ("the family builder's output changed: bump BUILDER_VERSION and re-record the digest "
            "(pkt_core/mini/family.py: {name} = {got!r}); the old version's keys would otherwise answer "
            "with bytes this code does not write")


def test_the_test_familys_data_is_the_recorded_builders(mini_family):
    """Tasks, tokenizer and configs: pure Python and seeded draws, the same bytes on any machine."""
    got = family.fingerprint(mini_family, weights=False)
    assert got == family.BUILDER_DATA_DIGEST, RERECORD.format(name="BUILDER_DATA_DIGEST", got=got)


def test_the_test_familys_weights_are_the_recorded_builders(mini_family):
    """The trained weights (and the losses and gates that follow from them): the same bytes at any torch
    thread count here, but they depend on the CPU instruction set torch's kernels use, so the digest is
    recorded per capability."""
    got, cpu = family.fingerprint(mini_family), torch.backends.cpu.get_cpu_capability()
    if cpu not in family.BUILDER_DIGEST:
        pytest.skip(f"no weights digest recorded for CPU capability {cpu}: if the data digest passes, add "
                    f"BUILDER_DIGEST[{cpu!r}] = {got!r}")
    assert got == family.BUILDER_DIGEST[cpu], RERECORD.format(name=f"BUILDER_DIGEST[{cpu!r}]", got=got)


def test_the_builders_version_is_in_the_family_key():
    from pkt.tasks import family as family_nodes

    def key(builder=family.BUILDER_VERSION, seed=0):
        return family_nodes.Family(size="study", recipe=family.recipe_params("study", seed, builder=builder)).key({})

    assert family.recipe_params("study", 0)["builder"] == family.BUILDER_VERSION >= 2
    assert "builder" not in family.recipe_params("study", 0, builder=1)  # the keys that stores from before the version hold
    assert key(1) == "9be4256ca20a1adffc9c0e541dc7312bc2d3195373358a88248c14d1146afab6"  # docs/study's family 0
    assert len({key(1), key(), key(family.BUILDER_VERSION + 1)}) == 3
    assert key(seed=1) != key()
    family.check_builder(family.recipe_params("test"))
    for old in (family.recipe_params("test", builder=1), None):  # builder 1's keys (no "builder"): other bytes
        with pytest.raises(ValueError, match=f"keyed for builder 1, but this code is builder {family.BUILDER_VERSION}"):
            family.check_builder(old)


def _family_dir(root, *, stats_seconds=1.5, transformers_version="5.25.0", prompts=True, fact=47):
    """A family's layout with small stand-in files (the fingerprint reads bytes, not models)."""
    (root / "tasks" / "facts-shared").mkdir(parents=True)
    (root / "student").mkdir()
    (root / "tasks" / "facts-shared" / "train.jsonl").write_text(json.dumps({"a": fact}) + "\n")
    if prompts:
        (root / "tasks" / "facts-shared" / "prompts.jsonl").write_text('{"prompt": "q"}\n')
    (root / "student" / "model.safetensors").write_bytes(b"\x08\x00weights")
    (root / "student" / "config.json").write_text(json.dumps({"hidden_size": 32,
                                                               "transformers_version": transformers_version}))
    (root / "family_stats.json").write_text(json.dumps({"student": {"final_loss": 0.6658, "seconds": stats_seconds},
                                                        "teacher": {"final_loss": 0.5597}}))
    return root


def test_the_fingerprint_sees_bytes_a_model_or_task_reads_and_nothing_else(tmp_path):
    def fp(name, **kw):
        return family.fingerprint(_family_dir(tmp_path / name, **kw))

    base = fp("base")
    # the build's duration and the writing library's version: no model or task reads them
    assert fp("slower", stats_seconds=99.0) == fp("newer", transformers_version="9.9.9") == base
    # a file the builder no longer writes (builder 1 had no prompts.jsonl) and one changed fact
    assert len({base, fp("no-prompts", prompts=False), fp("other-fact", fact=48)}) == 3
    data = family.fingerprint(tmp_path / "base", weights=False)
    other_weights = _family_dir(tmp_path / "other-weights")
    (other_weights / "student" / "model.safetensors").write_bytes(b"\x08\x00others")
    assert family.fingerprint(other_weights, weights=False) == data != base != family.fingerprint(other_weights)
    assert family.fingerprint(tmp_path / "no-prompts", weights=False) != data
    renamed = _family_dir(tmp_path / "renamed")
    (renamed / "student").rename(renamed / "teacher")
    assert family.fingerprint(renamed) != base
