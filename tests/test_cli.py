"""The pkt CLI: clear errors (input, problem, fix), non-zero exits, nothing written on bad input."""
import json

import pytest

from flows.cli import main, parser


def test_help_everywhere(capsys):
    for cmd in [[], ["demo"], ["extract"], ["transfer"], ["sweep"], ["store"], ["store", "gc"], ["export"], ["ui"]]:
        with pytest.raises(SystemExit) as e:
            parser().parse_args(cmd + ["--help"])
        assert e.value.code == 0
    assert "extract" in capsys.readouterr().out


def test_extract_with_missing_teacher_is_a_clear_error(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    code = main(["extract", "--teacher", str(tmp_path / "nope"), "--seeds", str(seeds), "--student",
                 str(tmp_path / "nope2"), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and "nope" in err
    assert not (tmp_path / "store" / "keys").exists()


def test_sweep_config_errors_name_the_field(tmp_path, capsys):
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text("teacher: t\nstudents: [s]\ntasks: []\nvariants: [lora, magic]\n")
    assert main(["sweep", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "field tasks" in err and "field variants" in err and "magic" in err


def test_store_verify_exit_codes(tmp_path, capsys):
    import os

    import torch

    from artifacts.store import Store

    store = Store(tmp_path / "store")
    key = store.key("scores", {}, {})
    ref = store.put_tensors("scores", key, {"x": torch.ones(2)}, params={}, inputs={})
    assert main(["store", "verify", "--store", str(store.root)]) == 0
    assert main(["store", "ls", "--store", str(store.root)]) == 0
    assert key in capsys.readouterr().out
    blob = store.blob_path(ref.digest)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"garbage")
    assert main(["store", "verify", "--store", str(store.root)]) == 1
    assert f"scores {key}" in capsys.readouterr().out
