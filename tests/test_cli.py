"""The pkt CLI: clear errors (input, problem, fix), non-zero exits, nothing written on bad input."""
import json
from pathlib import Path

import pytest

from pkt.flows.cli import main, parser


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

    from pkt.artifacts.store import Store

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


def test_every_pkt_command_in_the_readme_parses():
    """The README's pkt commands use real subcommands and flags (so they cannot silently rot)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        joined = block.replace("\\\n", " ")
        commands += [line.split("#")[0].strip() for line in joined.splitlines() if line.strip().startswith("pkt ")]
    assert len(commands) >= 8
    for cmd in commands:
        argv = [a.replace("<", "").replace(">", "") for a in shlex.split(cmd)[1:]]
        parser().parse_args(argv)  # SystemExit(2) on an unknown flag or subcommand


def test_extract_transfer_and_export_from_the_command_line(prefect_env, mini_family, tmp_path, capsys):
    import torch
    from peft import PeftModel

    from pkt.artifacts.store import Ref, Store
    from pkt.core.models import load_model

    store = str(tmp_path / "store")
    fam = mini_family
    assert main(["extract", "--teacher", str(fam / "teacher"), "--seeds", str(fam / "tasks/gsm/seeds.jsonl"),
                 "--student", str(fam / "student"), "--rank", "2", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "sensitivity" in out and "computed" in out
    init_dir = _printed(out, "LoRA init:")
    assert (Path(init_dir) / "adapter_config.json").exists()
    from safetensors import safe_open

    with safe_open(str(Path(init_dir) / "adapter_model.safetensors"), framework="pt") as f:
        errors = json.loads(f.metadata()["svd_relative_errors"])  # each piece's ||W - BA|| / ||W||
    assert errors and all(0 <= e < 1 for e in errors.values())
    # issue 20: per module type, what the rank-r init keeps of the pieces, said in words
    assert "what the rank-2 init keeps of the extracted teacher pieces" in out and "starts without" in out
    assert any(line.strip().startswith("gate ") and "%" in line for line in out.splitlines())
    sens = next(r for r in Store(store).records() if r["kind"] == "sensitivity")
    with safe_open(str(Store(store).blob_path(sens["digest"])), framework="pt") as f:  # as accumulated
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())

    train = json.dumps({"rank": 2, "alpha": 2.0, "epochs": 1, "batch_size": 8, "micro_batch": 8, "n_train": 8})
    assert main(["transfer", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--task-dir",
                 str(fam / "tasks/gsm"), "--variants", "lora,transfer", "--train", train, "--store", store,
                 "--report-dir", str(tmp_path / "report")]) == 0
    assert "transfer" in capsys.readouterr().out
    adapter = next(r for r in Store(store).records() if r["kind"] == "adapter" and r["params"]["variant"] == "transfer")
    assert main(["export", "--student", str(fam / "student"), "--adapter", adapter["key"][:12], "--store", store,
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    stock = PeftModel.from_pretrained(load_model(fam / "student"), str(Store(store).tree(Ref.of(adapter)))).eval()
    ids = torch.tensor([[5, 12, 7, 36, 35, 24]])
    assert torch.allclose(merged(ids).logits, stock(ids).logits, atol=1e-4)


def _printed(out: str, label: str) -> str:
    return next(line.split(label, 1)[1].strip() for line in out.splitlines() if line.strip().startswith(label))


def _readme_snippet() -> str:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Fine-tuning from `pkt extract`", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_what_extract_prints_is_the_student_at_step_0_used_as_the_readme_says(prefect_env, mini_family, tmp_path,
                                                                               capsys):
    """Run the README's fine-tuning snippet on exactly the folders `pkt extract` printed (with
    rank != alpha): its model computes the student's logits before training, and trains."""
    import torch

    from pkt.core.models import load_model

    fam = mini_family
    assert main(["extract", "--teacher", str(fam / "teacher"), "--seeds", str(fam / "tasks/gsm/seeds.jsonl"),
                 "--student", str(fam / "student"), "--rank", "2", "--alpha", "8",
                 "--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    base, init = _printed(out, "base model:"), _printed(out, "LoRA init:")
    code = _readme_snippet().replace('"BASE"', repr(base)).replace('"INIT"', repr(init))
    load, train = code.split("opt = ", 1)
    ns: dict = {}
    exec(load, ns)  # the README's loading lines, as written
    ids = torch.tensor([[5, 12, 7, 36, 35, 24, 40, 41]])
    student = load_model(fam / "student").eval()
    model = ns["model"].eval()
    with torch.no_grad():
        want, got = student(ids).logits, model(ids).logits
        assert (got - want).abs().max() < 1e-4
        # the base alone is not the student: the init really carries the difference
        assert not torch.allclose(load_model(base)(ids).logits, want, atol=1e-3)
    # the raw init on the *original* student is not the student: the warning printed is true
    from peft import PeftModel

    with torch.no_grad():
        raw = PeftModel.from_pretrained(load_model(fam / "student"), init).eval()(ids).logits
    assert not torch.allclose(raw, want, atol=1e-3)
    assert "NOT the student" in out
    exec("opt = " + train, ns)  # and the README's training lines run
    assert isinstance(ns["finetuned"], torch.nn.Module)
