"""Errors a user causes (issue 13, item 7), each replayed as the issue lists it: one sentence on
stderr naming the input and a fix that exists, exit 2, no traceback, and no work started (the
Prefect API is never entered). Numbers given as strings are accepted and reach the flow as numbers.
"""
import contextlib
import json
import shutil
import struct

import pytest

from pkt.core import models
from pkt.flows import cli, server
from pkt.flows import demo as demo_flow, extract as extract_flow, sweep as sweep_flow


@pytest.fixture
def no_work(no_work, monkeypatch):
    """conftest's no_work (no Prefect API, no process), and loading weights fails the test too."""
    def no_weights(*a, **kw):
        raise AssertionError("weights loaded before the input was refused")

    monkeypatch.setattr(models, "load_model", no_weights)


@pytest.fixture
def captured(monkeypatch):
    """The flows replaced by recorders (inputs accepted: what would the flow have received?)."""
    calls = {}
    result = {"table": [], "headline": [], "computed": 0, "nodes": [], "report": {}}

    def recorder(name):
        def record(*args, **kwargs):
            calls[name] = kwargs or {"config": args[0]}
            return {"_ledger": []} if name == "extract_teacher" else result
        return record

    for module, name in ((extract_flow, "extract_teacher"), (sweep_flow, "transfer"), (sweep_flow, "sweep"),
                         (demo_flow, "demo")):
        monkeypatch.setattr(module, name, recorder(name))
    monkeypatch.setattr(server, "prefect_api", contextlib.nullcontext)
    return calls


@pytest.fixture(scope="module")
def fx(mini_family, tmp_path_factory):
    """The bad inputs of the issue, built once next to the test-size family."""
    d = tmp_path_factory.mktemp("cases")
    fam = mini_family
    seeds = (fam / "tasks/gsm/seeds.jsonl").read_bytes()
    (d / "deep.jsonl").write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    shutil.copytree(fam / "tasks/gsm", d / "badtest")
    (d / "badtest/test.jsonl").write_text(json.dumps(_chat("1+1", "2")) + "\nnot json\n")
    (d / "runs.csv").write_text("student,task,benchmark,metric,variant,seed,value\n")
    (d / "latin1.jsonl").write_bytes(json.dumps(_chat("café", "x"), ensure_ascii=False).encode("latin-1") + b"\n")
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + seeds)
    (d / "emptyans.jsonl").write_text(json.dumps(_chat("q", "")) + "\n")
    _liar(fam / "teacher", d / "liar")
    (d / "noweights").mkdir()
    shutil.copy(fam / "student/config.json", d / "noweights")
    _gpt2(fam / "teacher", d / "gpt2")
    _other_tokenizer(fam / "student", d / "othertok")
    base = (f"teacher: {fam}/teacher\nstudents: [{fam}/student]\n"
            f"tasks:\n  - {{name: gsm, dir: {fam}/tasks/gsm, benchmark: gsm}}\nvariants: [lora]\n")
    for name, extra in {"lr": "train: {lr: 3e-4}\n", "rank": 'train: {rank: "2"}\n', "seeds": "seeds: []\n",
                        "gate": "train: {modules: gate}\n", "gat": "train: {modules: [gat]}\n",
                        "inf": "train: {epochs: .inf}\n"}.items():
        (d / f"{name}.yaml").write_text(base + extra)
    _issue19_inputs(fam, d)
    return d


def _issue19_inputs(fam, d):
    """Issue 19's inputs: runs.csv files that are not tables of numbers, a seed longer than the cutoff,
    a model whose config needs custom code."""
    header = "student,task,benchmark,metric,variant,seed,value\n"
    rows = [f"s,gsm,gsm,m,{v},{seed},{0.1 * seed + (v == 'transfer')}" for v in ("lora", "transfer") for seed in range(3)]
    rows[4] = rows[4].rsplit(",", 1)[0] + ","  # one empty cell: transfer, seed 1
    (d / "emptycell.csv").write_text(header + "\n".join(rows) + "\n")
    (d / "nonnumeric.csv").write_text(header + "s,gsm,gsm,m,lora,0,abc\n")
    (d / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (d / "latin1.csv").write_bytes(header.encode() + "s,gsm,gsm,m,lora,0,0.5 café\n".encode("latin-1"))
    (d / "long.jsonl").write_text(json.dumps(_chat("x" * 2100, "1")) + "\n")
    shutil.copytree(fam / "student", d / "custom")
    config = json.loads((d / "custom/config.json").read_text())
    config.update(model_type="mything", auto_map={"AutoConfig": "configuration_mything.MyConfig"})
    (d / "custom/config.json").write_text(json.dumps(config))
    (d / "custom/configuration_mything.py").write_text(
        "from transformers import PretrainedConfig\nclass MyConfig(PretrainedConfig):\n    model_type = 'mything'\n")


def _chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _liar(src, dst):
    """A safetensors file whose header claims twice the rows the bytes hold."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    b = f.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] *= 2
    text = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + b[8 + n:])


def _gpt2(tokenizer_from, dst):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=108)).save_pretrained(dst)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(dst)


def _other_tokenizer(src, dst):
    """Same vocabulary size, two tokens' ids swapped: a different token -> id map."""
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))


def refused(capsys, argv, *expected, absent=()):
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"pkt {argv[0]}: error: "), err
    assert "Traceback" not in err
    for s in expected:
        assert s in err, (s, err)
    for s in absent:
        assert s not in err, (s, err)
    return err


def extract(fam, *extra, seeds=None):
    return ["extract", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--seeds",
            str(seeds or fam / "tasks/gsm/seeds.jsonl"), "--rank", "2", *extra]


def transfer(fam, *extra, task=None):
    return ["transfer", "--teacher", str(fam / "teacher"), "--student", str(fam / "student"), "--task-dir",
            str(task or fam / "tasks/gsm"), "--variants", "lora", *extra]


CASES = {  # name: (argv(fam, fx), substrings the sentence must hold, substrings it must not)
    "--dtype float64": (lambda f, d: extract(f, "--dtype", "float64"), ["--dtype float64", "float32"], []),
    "--device gpu": (lambda f, d: extract(f, "--device", "gpu"), ["--device gpu", "cpu"], []),
    "transfer --seeds 0": (lambda f, d: transfer(f, "--seeds", "0"), ["--seeds 0", "at least 1"], []),
    "transfer --max-gen-toks 0": (lambda f, d: transfer(f, "--max-gen-toks", "0"), ["--max-gen-toks 0", "at least 1"],
                                  []),
    "demo --seeds 0": (lambda f, d: ["demo", "--size", "test", "--seeds", "0"], ["--seeds", "at least 1"], []),
    "demo --size huge": (lambda f, d: ["demo", "--size", "huge"], ["--size huge", "'test'"], []),
    "seeds: []": (lambda f, d: ["sweep", "--config", str(d / "seeds.yaml")], ["seeds.yaml", "field seeds",
                                                                             "at least 1"], []),
    "modules: [gat]": (lambda f, d: ["sweep", "--config", str(d / "gat.yaml")], ["train.modules", "'gat'", "gate"],
                       []),
    "--k -1": (lambda f, d: extract(f, "--k", "-1"), ["--k -1", "at least 1"], []),
    "--k 0": (lambda f, d: extract(f, "--k", "0"), ["--k 0", "at least 1"], []),
    "--k above the file": (lambda f, d: extract(f, "--k", "999"), ["--k 999", "only", "lower --k"], []),
    "deep JSON seeds": (lambda f, d: extract(f, seeds=d / "deep.jsonl"), ["deep.jsonl line 1", "nested too deeply"],
                        []),
    "malformed test.jsonl": (lambda f, d: transfer(f, task=d / "badtest"), ["test.jsonl line 2", "not valid JSON"],
                             []),
    "report on a header-only CSV": (lambda f, d: ["report", "--runs", str(d / "runs.csv"), "--out", str(d / "r")],
                                    ["runs.csv", "no rows"], []),
    "lying safetensors header": (lambda f, d: ["extract", "--teacher", str(d / "liar"), "--student",
                                               str(f / "student"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                 ["liar/model.safetensors", "re-download or re-save"], []),
    "non-UTF-8 seeds": (lambda f, d: extract(f, seeds=d / "latin1.jsonl"), ["latin1.jsonl line 1", "UTF-8"], []),
    "directory as a file": (lambda f, d: extract(f, seeds=f / "tasks/gsm"), ["is a directory", "seeds.jsonl"], []),
    "empty assistant answer": (lambda f, d: extract(f, seeds=d / "emptyans.jsonl"),
                               ["emptyans.jsonl line 1", "answer is empty"], []),
    "--rank 0": (lambda f, d: extract(f, "--rank", "0"), ["--rank 0", "at least 1"], ["lower"]),
    "--rank -1": (lambda f, d: extract(f, "--rank", "-1"), ["--rank -1", "at least 1"], ["lower"]),
    "--rank above the student": (lambda f, d: extract(f, "--rank", "99"), ["--rank 99", "at most 16"], []),
    "--rank not a number": (lambda f, d: extract(f, "--rank", "two"), ["--rank two", "whole number"], []),
    "a directory with no weights": (lambda f, d: ["extract", "--teacher", str(f / "teacher"), "--student",
                                                  str(d / "noweights"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                    ["noweights", "no weights"], ["--allow-bin"]),
    "unsupported teacher architecture": (lambda f, d: ["extract", "--teacher", str(d / "gpt2"), "--student",
                                                       str(f / "student"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                         ["gpt2", "not supported", "llama"], []),
    "student with another tokenizer": (lambda f, d: ["extract", "--teacher", str(f / "teacher"), "--student",
                                                     str(d / "othertok"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                       ["do not share one tokenizer", "token 'a'"], ["layers", "drop embed"]),
    "a hub id not reachable from here": (lambda f, d: ["extract", "--teacher", "nobody/no-such-model", "--student",
                                                       str(f / "student"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                         ["nobody/no-such-model", "cannot be read", "HF_HUB_OFFLINE"], []),
    "--train not JSON": (lambda f, d: transfer(f, "--train", "{lr: 1}"), ["--train", "not valid JSON"], []),
    "--train unknown field": (lambda f, d: transfer(f, "--train", '{"learning_rate": 1}'),
                              ["--train learning_rate", "not a field pkt knows", "lr"], []),
    "--svd magic": (lambda f, d: extract(f, "--svd", "magic"), ["--svd magic", "'full'"], []),
    # issue 19
    "--alpha inf": (lambda f, d: extract(f, "--alpha", "inf"), ["--alpha inf", "finite number"], []),
    "epochs: .inf": (lambda f, d: ["sweep", "--config", str(d / "inf.yaml")], ["inf.yaml", "train.epochs",
                                                                             "finite number"], []),
    "--families x,y": (lambda f, d: ["demo", "--study", "--families", "x,y"], ["--families x,y", "whole numbers"],
                       []),
    '--adapter ""': (lambda f, d: ["export", "--student", str(f / "student"), "--adapter", "", "--out",
                                   str(d / "exported")], ["--adapter is empty", "pkt store ls --kind adapter"], []),
    "runs.csv with one empty cell": (lambda f, d: ["report", "--runs", str(d / "emptycell.csv"), "--out",
                                                   str(d / "r")], ["emptycell.csv line 6", "value is empty"],
                                     ["p = 0.000", "n/a"]),
    "non-numeric runs.csv": (lambda f, d: ["report", "--runs", str(d / "nonnumeric.csv"), "--out", str(d / "r")],
                             ["nonnumeric.csv line 2", "'abc', not a number"], []),
    "binary runs.csv": (lambda f, d: ["report", "--runs", str(d / "binary.csv"), "--out", str(d / "r")],
                        ["binary.csv", "a binary file, not a CSV table"], []),
    "extract seed longer than the cutoff": (lambda f, d: extract(f, seeds=d / "long.jsonl"),
                                            ["long.jsonl line 1", "2048 tokens", "raise --max-length"],
                                            ["sweep config", "max_length"]),
    "--store is a file": (lambda f, d: extract(f, "--store", str(d / "binary.csv")),
                          ["--store", "binary.csv: is a file"], []),
    "demo --store is a file": (lambda f, d: ["demo", "--size", "test", "--store", str(d / "binary.csv")],
                               ["--store", "is a file"], []),
    # issue 26
    "LaTen counts above the training file": (lambda f, d: transfer(f, "--variants", "lora,laten", "--laten-extract",
                                                                   "1000"),
                                             ["train", "lower --laten-extract/--laten-align"], ["laten.n_extract"]),
    "a model with custom code": (lambda f, d: ["extract", "--teacher", str(f / "teacher"), "--student",
                                               str(d / "custom"), "--seeds", str(f / "tasks/gsm/seeds.jsonl")],
                                 ["custom", "needs custom code", "never runs", "llama"], ["HF_TOKEN", "hub"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_errors_are_one_sentence_before_any_work(case, mini_family, fx, no_work, capsys):
    argv, expected, absent = CASES[case]
    refused(capsys, argv(mini_family, fx), *expected, absent=absent)


def test_numbers_given_as_strings_reach_the_flows_as_numbers(mini_family, fx, captured, capsys):
    fam = mini_family
    assert cli.main(transfer(fam, "--train", '{"lr": "1e-3", "rank": "2"}')) == 0
    assert captured["transfer"]["train"]["lr"] == 1e-3 and captured["transfer"]["train"]["rank"] == 2
    assert cli.main(["sweep", "--config", str(fx / "lr.yaml")]) == 0  # YAML reads 3e-4 as a string
    assert captured["sweep"]["config"]["train"]["lr"] == 3e-4
    assert cli.main(["sweep", "--config", str(fx / "rank.yaml")]) == 0
    assert captured["sweep"]["config"]["train"]["rank"] == 2
    assert cli.main(["sweep", "--config", str(fx / "gate.yaml")]) == 0  # a single module type
    assert captured["sweep"]["config"]["train"]["modules"] == ["gate"]
    assert cli.main(extract(fam, "--alpha", "8", "--k", "3")) == 0
    assert captured["extract_teacher"]["alpha"] == 8.0 and captured["extract_teacher"]["k"] == 3


def test_a_utf8_file_with_a_byte_order_mark_is_accepted(mini_family, fx, captured):
    from pkt.core.data import read_jsonl

    assert read_jsonl(fx / "bom.jsonl") == read_jsonl(mini_family / "tasks/gsm/seeds.jsonl")
    assert cli.main(extract(mini_family, seeds=fx / "bom.jsonl")) == 0
    assert captured["extract_teacher"]["seeds"] == str(fx / "bom.jsonl")


def test_no_message_suggests_a_fix_that_does_not_exist():
    """Every flag a pkt error message names is a flag of some pkt command."""
    import re
    from pathlib import Path

    root = Path(cli.__file__).resolve().parents[1]
    flags = set(re.findall(r"add_argument\(\"(--[a-z-]+)\"", (root / "flows/cli.py").read_text()))
    for path in [*root.glob("pkt_core/*.py"), *root.glob("flows/*.py"), *root.glob("artifacts/*.py"),
                 *root.glob("tasks/*.py")]:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", path.read_text()):
            assert flag in flags | {"--help", "--no-prompt", "--all", "--pool", "--name", "--port-file", "--parent",
                                    "--host", "--port", "--checkout", "--param"}, (path.name, flag)


def test_a_pkt_error_inside_a_flow_prints_its_sentence_without_tracebacks(prefect_env, mini_family, tmp_path,
                                                                          monkeypatch, capfd):
    """An input problem only a node can see (here: raised from inside the sensitivity pass) reaches
    the user as pkt's one sentence; Prefect's log lines for it carry no traceback."""
    from pkt.core import sensitivity
    from pkt.core.data import DataError

    def fails(*a, **kw):
        raise DataError("seeds.jsonl line 3: the answer is cut away; shorten the prompt")

    monkeypatch.setattr(sensitivity, "compute_sensitivity", fails)
    code = cli.main(extract(mini_family, "--store", str(tmp_path / "store")))
    out, err = capfd.readouterr()
    assert code == 2
    assert "Traceback" not in out + err, err
    assert err.strip().splitlines()[-1] == ("pkt extract: error: seeds.jsonl line 3: the answer is cut away; "
                                            "shorten the prompt")


# ---- issue 19: cases that need more than the parametrized replay --------------------------------
def test_report_on_a_bad_runs_csv_writes_nothing(mini_family, fx, capsys, tmp_path):
    for name in ("emptycell.csv", "nonnumeric.csv", "binary.csv", "latin1.csv"):
        refused(capsys, ["report", "--runs", str(fx / name), "--out", str(tmp_path / "out")], name)
        assert not (tmp_path / "out").exists()


def test_an_adapter_of_the_wrong_shape_is_one_sentence(mini_family, tmp_path, capsys):
    """An adapter trained for the teacher, exported onto the student: a sentence, not peft's traceback."""
    from peft import LoraConfig, get_peft_model

    from pkt.core.models import load_model

    get_peft_model(load_model(str(mini_family / "teacher")), LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "teacher-adapter")
    out = tmp_path / "merged"
    err = refused(capsys, ["export", "--student", str(mini_family / "student"), "--adapter",
                           str(tmp_path / "teacher-adapter"), "--out", str(out)],
                  "does not fit student", "size mismatch", "the student it was trained for")
    assert "teacher-adapter" in err and not out.exists()


def test_a_bad_startup_timeout_is_one_sentence_before_prefect_loads(mini_family, tmp_path):
    """PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=abc breaks Prefect's own settings when Prefect is
    imported: pkt refuses it first, in a fresh process as a user runs it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, server.TIMEOUT_VAR: "abc", "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "pkt.flows.cli", *extract(mini_family)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pkt extract: error: {server.TIMEOUT_VAR}='abc' is not a positive number of seconds (a whole number); "
        "set it to e.g. 300 or unset it"], proc.stderr


def test_a_quoted_tilde_store_is_the_home_directory(mini_family, tmp_path, monkeypatch, captured, capsys):
    """`--store '~/pkt-store'` (the shell leaves a quoted ~ alone) means the home directory, not a
    folder named ~ in the working directory."""
    from pkt.artifacts.store import Store

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert cli.main(extract(mini_family, "--store", "~/pkt-store")) == 0
    assert captured["extract_teacher"]["store"] == str(home / "pkt-store")
    assert cli.main(["demo", "--size", "test", "--store", "~/pkt-store"]) == 0
    assert captured["demo"]["store"] == str(home / "pkt-store")
    store = Store("~/pkt-store")
    assert store.root == home / "pkt-store"
    store.put_bytes(b"x")
    assert cli.main(["store", "ls", "--store", "~/pkt-store"]) == 0
    assert not (work / "~").exists()


def test_transfer_max_gen_toks_reaches_the_flow(mini_family, captured):
    assert cli.main(transfer(mini_family, "--max-gen-toks", "1024")) == 0
    assert captured["transfer"]["max_gen_toks"] == 1024
    assert cli.main(transfer(mini_family)) == 0
    assert captured["transfer"]["max_gen_toks"] is None  # the benchmark's own budget


def test_extract_max_length_reaches_the_flow(mini_family, fx, captured):
    assert cli.main(extract(mini_family, "--max-length", "4096", seeds=fx / "long.jsonl")) == 0
    assert captured["extract_teacher"]["max_length"] == 4096


def test_the_printed_summary_shows_a_dash_and_a_footnote_for_undefined_cells(capsys):
    """The demo's table: vanilla is one run (no std, no init size), lora has no difference to itself,
    transfer none to itself: those cells print '-' with a footnote, never NaN."""
    import pandas as pd

    from pkt.core import report

    runs = pd.DataFrame([{"student": "s", "task": "gsm", "benchmark": "gsm", "metric": "answer_nll", "variant": v,
                          "seed": seed, "value": 1.0 + 0.1 * seed + (v == "transfer")}
                         for v, seeds in (("vanilla", [0]), ("lora", [0, 1, 2]), ("transfer", [0, 1, 2]))
                         for seed in seeds])
    summary = report.summarize(runs)
    assert summary.isna().any().any()  # the undefined cells are there ...
    cli._print_result({"table": summary.to_dict(orient="records"), "headline": [], "computed": 0, "nodes": [],
                       "report": {}})
    out = capsys.readouterr().out
    assert "NaN" not in out and "nan" not in out  # ... and print as a dash with a footnote
    assert " - " in out and cli.UNDEFINED_NOTE in out


@pytest.mark.slow  # three servers, one after another: about a minute on 2 shared cores
def test_commands_on_a_fresh_prefect_home_set_its_database_up_one_at_a_time(tmp_path, monkeypatch):
    """Two (here three) pkt commands started at once on a fresh PREFECT_HOME: each starts Prefect's
    temporary server, which creates the database; at once they raced ("table block_type already
    exists", "no such column"). The setup lock makes them take turns: every server starts."""
    import threading

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "fresh-home"))
    servers = [server.TemporaryServer() for _ in range(3)]
    errors = []

    def start(s):
        try:
            s.start(240)
        except server.PrefectUnavailable as e:
            errors.append(str(e))

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert all(s.process.poll() is None for s in servers)
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow  # a transfer run with scores: about a minute
def test_a_run_outside_a_git_checkout_writes_no_bars_warnings_or_git_errors(mini_family, tmp_path):
    """Output redirected to files, outside any git checkout: no tqdm bars from lm-eval, transformers
    or datasets, no FutureWarning, no "fatal: not a git repository" from lm-eval; the run succeeds."""
    import os
    import subprocess
    import sys

    work = tmp_path / "not-a-checkout"
    work.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "GIT_CEILING_DIRECTORIES": str(tmp_path)}
    for name in ("PREFECT_API_URL", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        code = subprocess.run([sys.executable, "-m", "pkt.flows.cli", *transfer(mini_family, "--train",
                               '{"n_train": 16, "batch_size": 8, "micro_batch": 8, "rank": 2, "alpha": 2}'),
                               "--store", str(tmp_path / "store")], cwd=work, env=env, stdout=out, stderr=err,
                              timeout=900).returncode
    text = (tmp_path / "out.txt").read_text() + (tmp_path / "err.txt").read_text()
    assert code == 0, text[-3000:]
    assert "nodes computed" in text
    for noise in ("fatal: not a git repository", "FutureWarning", "it/s]", "\r", "%|"):
        assert noise not in text, (noise, text[-3000:])


# ---- issue 26, case 8: Ctrl-C twice, Prefect's crash lines, a full PREFECT_HOME ------------------
def test_a_second_ctrl_c_while_stopping_is_not_raised_again(capsys):
    """Replays 'a second Ctrl-C half a second after the first aborted the process' (a KeyboardInterrupt
    inside the cleanup left torch's threads running at exit: SIGABRT): the first stops, the second
    only says so."""
    import signal

    from pkt.core import stop

    cli._SIGNALS.clear()
    stop.clear()
    try:
        with pytest.raises(KeyboardInterrupt):
            cli._on_signal(signal.SIGINT, None)
        assert stop.requested()
        assert cli._on_signal(signal.SIGINT, None) is None  # not raised in the middle of the cleanup
        assert "already stopping" in capsys.readouterr().err
    finally:
        cli._SIGNALS.clear()
        stop.clear()


def test_prefect_crash_lines_after_ctrl_c_are_silenced():
    """Replays 'Ctrl-C prints Prefect's "Crash detected!" 4 times before pkt's one line'."""
    import logging

    from pkt.core import stop

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    for lg in loggers:
        lg.addHandler(handler)
    quiet = cli._quiet_user_tracebacks()
    try:
        for lg in loggers:
            lg.error("Crash detected! Execution was interrupted by an unexpected exception: KeyboardInterrupt")
        assert seen == ["Crash detected! Execution was interrupted by an unexpected exception: KeyboardInterrupt"] * 2
        seen.clear()
        stop.request("stopped by SIGINT")
        for lg in loggers:
            lg.error("Crash detected! Execution was interrupted by an unexpected exception: KeyboardInterrupt")
            lg.error("a node failed")  # anything else is still said
        assert seen == ["a node failed"] * 2
    finally:
        quiet()
        stop.clear()
        for lg in loggers:
            lg.removeHandler(handler)


def test_a_prefect_home_on_a_full_disk_says_so(tmp_path, monkeypatch, capsys):
    """Replays 'PREFECT_HOME on a full disk says nothing about the disk'."""
    import collections
    import shutil as shutil_

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))

    def no_server(*a, **kw):
        raise AssertionError("a Prefect server was started on a full disk")

    monkeypatch.setattr(server.TemporaryServer, "start", no_server)
    refused(capsys, ["demo", "--size", "test", "--store", str(tmp_path / "store"), "--report-dir",
                     str(tmp_path / "r")], f"PREFECT_HOME {tmp_path / 'home'}", "1.0 MiB free",
            "point PREFECT_HOME at a disk with room")
