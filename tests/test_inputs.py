"""What is computed is what the key says (issue 19, item 1): every input a node reads has the
digest its key was computed from, or the node refuses with a sentence and records nothing."""
import json
import os
import shutil
from pathlib import Path

import pytest

from pkt.tasks import extract as extract_nodes

from pkt.tasks import sources
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
    sixty = sources.file_source(str(seeds))["digest"]
    real = sources.file_source

    def digest_then_replace(path):
        ref = real(path)
        write_seeds(Path(path), mini_family, 10)
        return ref

    monkeypatch.setattr(sources, "file_source", digest_then_replace)
    store = tmp_path / "store"
    args = dict(teacher=str(mini_family / "teacher"), seeds=str(seeds), students=[str(mini_family / "student")],
                rank=2, alpha=2.0, store=str(store))
    with pytest.raises(InputChanged, match=f"{seeds} changed after this run took its digest"):
        extract_teacher(**args)
    assert records(store, "sensitivity") == []  # nothing under the 60-sample key
    assert Store(store).verify() == []
    monkeypatch.setattr(sources, "file_source", real)
    extract_teacher(**args)  # the rerun keys the 10 samples it reads by their own digest
    [rec] = records(store, "sensitivity")
    assert rec["inputs"]["seeds"] == sources.file_source(str(seeds))["digest"] != sixty
    assert json.loads(Store(store).header(rec)["n_samples"]) == 10


def sensitivity_inputs(store: Store, teacher: Path, seeds: Path) -> dict:
    return {"teacher": sources.model_source(str(teacher), store), "seeds": sources.file_source(str(seeds))}


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
    assert build(extract_nodes.Sensitivity(), inputs, store)["status"] == "computed"
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
        build(extract_nodes.Sensitivity(), inputs, store)
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
    assert build(extract_nodes.Sensitivity(), inputs, store)["status"] == "computed"


# ---- issue 26: every input bounded before it is read ---------------------------------------------
import resource  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from pkt.core import inputs, models  # noqa: E402
from pkt.flows import cli, config, input_checks, sweep_size  # noqa: E402


def chat_line(q="1+1", a="2", **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra})


def one_sentence(capsys, argv, *expected) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for s in expected:
        assert s in err, (s, err)
    return err




def extract_argv(seeds, tmp_path):
    return ["extract", "--teacher", str(tmp_path / "no-teacher"), "--student", str(tmp_path / "no-student"),
            "--seeds", str(seeds), "--store", str(tmp_path / "store")]


def test_a_fifo_as_seeds_is_refused_at_once(tmp_path, capsys, no_work):
    """Replays 'a FIFO as --seeds hangs silently': nothing writes to it, and pkt does not wait."""
    fifo = tmp_path / "seeds.jsonl"
    os.mkfifo(fifo)

    class Waited(BaseException):
        pass

    def give_up(signum, frame):
        raise Waited

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(60)
    try:
        one_sentence(capsys, extract_argv(fifo, tmp_path), "is a FIFO (named pipe), not a regular file")
    except Waited:
        pytest.fail("pkt extract waited on a FIFO")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


CAPPED = """import resource, sys
vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))  # 1 GiB above what the imports took
"""


def test_pkt_extract_on_dev_zero_is_refused_under_a_memory_cap(tmp_path):
    """Replays 'pkt extract --seeds /dev/zero reads until the kernel's OOM killer ends it at 23.8 GB':
    refused before it is read, in a process whose memory is capped (a read would hit the cap)."""
    code = ("from pkt.flows import cli\n" + CAPPED +
            f"sys.exit(cli.main({extract_argv('/dev/zero', tmp_path)!r}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("pkt extract: error: /dev/zero: is a character device, not a "
                                                   "regular file; give a .jsonl file with one chat sample per line")


def test_a_line_longer_than_the_limit_is_refused_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    """Replays 'a seeds file with one 10 MB line passes 2.8 GB of memory during input checks'."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(chat_line() + "\n" + chat_line("x" * (2 * 2**20)) + "\n")
    with pytest.raises(data.DataError, match=r"seeds.jsonl line 2: longer than 1 MiB.*--max-input-mb"):
        data.read_jsonl(seeds)
    monkeypatch.setenv(inputs.ENV, "4")  # what --max-input-mb 4 sets
    assert len(data.read_jsonl(seeds)) == 2
    monkeypatch.setenv(inputs.ENV, "1")
    with pytest.raises(data.DataError, match=r"MiB, above the 1 MiB pkt reads of one input; .*--max-input-mb 3"):
        data.read_jsonl(seeds)


def test_a_huge_integer_in_an_ignored_field_is_one_sentence(tmp_path):
    """Replays 'a 100,000-digit integer in an ignored seeds field' (a traceback on main)."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(chat_line() + "\n" + chat_line()[:-1] + ', "id": ' + "9" * 100_000 + "}\n")
    with pytest.raises(data.DataError, match="seeds.jsonl line 2: a number too long to read"):
        data.read_jsonl(seeds)


def test_ports_out_of_range_are_refused(capsys, no_work):
    """Replays 'pkt ui --port 99999' (a traceback) and '--port -1' ("Invalid host")."""
    for port in ("99999", "-1", "0", "http"):
        one_sentence(capsys, ["ui", "--port", port], f"--port {port}: give a port from 1 to 65535")


# ---- sweep configs: duplicates, seeds, size ------------------------------------------------------
@pytest.fixture
def task_dir(tmp_path):
    d = tmp_path / "gsm"
    d.mkdir()
    for name in ("train", "seeds", "test", "val"):
        (d / f"{name}.jsonl").write_text(chat_line() + "\n")
    return d


def sweep_yaml(tmp_path, task_dir, extra: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"teacher: {tmp_path}/teacher\nstudents: [{tmp_path}/student]\n"
                    f"tasks:\n  - {{name: gsm, dir: {task_dir}, benchmark: gsm}}\n{extra}")
    return path


@pytest.mark.parametrize("extra, expected", [
    ("variants: [lora, lora, transfer]\n", "field variants: 'lora' is given twice"),
    ("variants: [lora]\nseeds: [0, 0]\n", "field seeds: 0 is given twice"),
    ("variants: [lora]\nselection_seeds: [5]\ntrain_grid: {lr: [1e-3, 0.001]}\n", "field train_grid: lr: 0.001 is "
     "given twice"),
    ("variants: [lora]\nseeds: [1180591620717411303424]\n", "field seeds.0 = 1180591620717411303424: a seed must be"),
    ("variants: [lora]\nseeds: [-1]\n", "field seeds.0 = -1: a seed must be"),
    ("variants: [lora]\nseeds: [" + "9" * 100_000 + "]\n", "a number too long to read"),
])
def test_a_bad_sweep_config_is_refused_before_any_work_naming_the_field(extra, expected, tmp_path, task_dir, capsys,
                                                                        no_work):
    """Replays 'duplicate variants or seeds are refused only after all the work' and 'a sweep seed of
    2^70 (after the flow started)'."""
    one_sentence(capsys, ["sweep", "--config", str(sweep_yaml(tmp_path, task_dir, extra))], "sweep.yaml",
                 expected)


def test_duplicate_variants_on_the_command_line_name_the_flag(tmp_path, task_dir, capsys, no_work):
    one_sentence(capsys, ["transfer", "--teacher", "t", "--student", "s", "--task-dir", str(task_dir), "--variants",
                          "lora,lora,transfer"], "--variants: 'lora' is given twice")


def test_a_sweep_above_max_nodes_is_refused_with_its_count_and_estimate(tmp_path, task_dir, capsys, no_work,
                                                                        monkeypatch):
    """Replays '1000 learning rates x 1000 init scales (about 2 M adapters) is accepted and starts
    training': refused at once with the count, and the estimate from the store's recorded seconds."""
    grid = (f"variants: [lora, transfer]\nselection_seeds: [100]\ntrain_grid:\n  lr: {[1e-4 * (i + 1) for i in range(1000)]}"
            f"\n  init_scale: {[0.001 * (i + 1) for i in range(1000)]}\nvariant_grid:\n  lora: "
            f"{{alpha: {list(range(1, 1001))}}}\n")
    cfg = sweep_yaml(tmp_path, task_dir, grid)
    store = tmp_path / "store"
    import torch

    for i, seconds in enumerate((10.0, 30.0)):  # two recorded adapters: 20 s each on average
        Store(store).put_tensors("adapter", f"{i:064d}", {"w": torch.zeros(1)}, params={}, inputs={}, seconds=seconds)
    err = one_sentence(capsys, ["sweep", "--config", str(cfg), "--store", str(store)], "above --max-nodes 50,000",
                       "--yes")
    adapters = 2 * (1000 * 1000 * 1) + 2  # lora and transfer: a million settings x 1 selection seed, + 1 test seed
    assert f"{adapters:,} adapter" in err
    assert f"about {adapters * 20 / 3600:,.1f} h" in err
    monkeypatch.setattr(input_checks, "check_sweep_inputs", lambda cfg: None)
    with pytest.raises(AssertionError, match="work started"):  # --yes goes on
        cli.main(["sweep", "--config", str(cfg), "--store", str(store), "--yes"])


def test_node_counts_match_the_runs_the_sweep_submits(tmp_path, task_dir):
    """The count's oracle is the flow's own run lists (flows/sweep.py: selection and test runs)."""
    from pkt.flows.sweep import chosen_runs, selection_runs
    from pkt.flows.variants import VARIANTS

    cfg = config.parse_config(yaml_dict(tmp_path, task_dir, variants=["vanilla", "lora", "transfer", "shuffled"],
                                        seeds=[0, 1, 2], selection_seeds=[7, 8], benchmarks=["answer_nll", "gsm"],
                                        train_grid={"lr": [1e-3, 1e-2], "init_scale": [0.5, 1.0]},
                                        variant_grid={"lora": {"alpha": [8, 16]}}))
    runs = list(selection_runs(cfg)) + list(chosen_runs(cfg, {}))
    trained = [r for r in runs if VARIANTS[r[0].name].trains]
    counts = sweep_size.node_counts(cfg)
    assert counts["adapter"] == len(trained) == 3 * (4 * 2 + 3)
    n_selection = len(list(selection_runs(cfg)))
    assert counts["scores"] == n_selection + (len(runs) - n_selection) * 2  # gsm and answer_nll on test


def yaml_dict(tmp_path, task_dir, **kw) -> dict:
    return {"teacher": str(tmp_path / "teacher"), "students": [str(tmp_path / "student")],
            "tasks": [{"name": "gsm", "dir": str(task_dir), "benchmark": "gsm"}], **kw}


# ---- tracebacks that become sentences --------------------------------------------------------------
RUNS_HEADER = "student,task,benchmark,metric,variant,seed,value\n"


def runs_csv(path: Path, change=None) -> Path:
    rows = [f"s,gsm,gsm,m,{v},{s},{0.1 * s + (v == 'transfer')}" for v in ("lora", "transfer") for s in range(3)]
    if change:
        change(rows)
    path.write_text(RUNS_HEADER + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("cell, expected", [("inf", "value is 'inf', not a finite number"),
                                            ("1e400", "value is 'inf', not a finite number"),
                                            ("-inf", "not a finite number")])
def test_report_on_a_non_finite_value_is_one_sentence_and_writes_nothing(cell, expected, tmp_path, capsys):
    """Replays 'pkt report on a runs table with inf or 1e400' (a traceback, and half a report)."""
    def edit(rows):
        rows[3] = rows[3].rsplit(",", 1)[0] + "," + cell

    one_sentence(capsys, ["report", "--runs", str(runs_csv(tmp_path / "runs.csv", edit)), "--out",
                          str(tmp_path / "out")], "runs.csv line 5", expected)
    assert not (tmp_path / "out").exists()


def test_an_empty_variant_cell_is_refused_with_its_line(tmp_path, capsys):
    def edit(rows):
        rows[2] = "s,gsm,gsm,m,,2,0.5"

    one_sentence(capsys, ["report", "--runs", str(runs_csv(tmp_path / "runs.csv", edit)), "--out",
                          str(tmp_path / "out")], "runs.csv line 4: variant is empty")


def test_a_report_that_fails_midway_leaves_its_folder_as_it_was(tmp_path, monkeypatch):
    from pkt.core import report

    runs = runs_csv(tmp_path / "runs.csv")
    assert cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert {"report.md", "summary.csv", "report.png"} <= set(before)

    def broken(*a, **kw):
        raise RuntimeError("the figure failed")

    monkeypatch.setattr(report, "bar_chart", broken)
    runs_csv(runs, lambda rows: rows.append("s,gsm,gsm,m,lora,3,0.9"))
    with pytest.raises(RuntimeError, match="the figure failed"):
        cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "out")])
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    with pytest.raises(RuntimeError):
        cli.main(["report", "--runs", str(runs), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if "pkt-tmp" in p.name]


def test_an_unknown_benchmark_is_refused_before_any_work(tmp_path, task_dir, capsys, no_work, monkeypatch):
    """Replays 'pkt transfer --benchmark nosuchbench (after 41 s of work)'."""
    from pkt.core import evaluate

    monkeypatch.setattr(evaluate, "lm_eval_task_names", lambda: {"gsm8k", "mmlu"})  # lm-eval's index takes ~20 s
    one_sentence(capsys, ["transfer", "--teacher", "t", "--student", "s", "--task-dir", str(task_dir), "--variants",
                          "lora", "--benchmark", "nosuchbench"], "--benchmark nosuchbench: neither a pkt benchmark")


def test_diagnose_with_no_variant_that_has_an_init_is_one_sentence(tmp_path, task_dir, capsys, no_work):
    """Replays 'pkt diagnose --variants vanilla' (a traceback after the flow ran)."""
    one_sentence(capsys, ["diagnose", "--teacher", "t", "--student", "s", "--task", str(task_dir), "--variants",
                          "vanilla"], "--variants vanilla: none of them trains from a LoRA init")


@pytest.mark.parametrize("url, expected", [("http://127.0.0.1:9/api", "no Prefect server answers there"),
                                           ("notaurl", "is not an http(s) URL")])
def test_deploy_at_a_dead_server_or_not_a_url_is_one_sentence(url, expected, capsys, monkeypatch):
    """Replays 'pkt deploy with PREFECT_API_URL at a dead server or not a URL' (httpx tracebacks)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = Path(cli.__file__).resolve().parents[1]
    with temporary_settings(updates={PREFECT_API_URL: url}):
        one_sentence(capsys, ["deploy", "--checkout", str(root)], f"PREFECT_API_URL {url!r}"
                     if "not" in expected else f"PREFECT_API_URL {url}", expected)


def test_transfer_takes_latens_sample_counts(tmp_path, task_dir, capsys, no_work):
    """Replays 'LaTen cannot be run from pkt transfer on a small training file': the counts are flags,
    and a bad one names the flag."""
    args = cli.parser().parse_args(["transfer", "--teacher", "t", "--student", "s", "--task-dir", str(task_dir),
                                    "--variants", "lora,laten", "--laten-extract", "4", "--laten-align", "8"])
    cfg = cli.transfer_config(args)
    assert (cfg.laten.n_extract, cfg.laten.n_align) == (4, 8)
    args.method_params, args.laten_align = '{"n_align": 9, "rate": 0.2}', None
    assert (cli.transfer_config(args).laten.n_align, cli.transfer_config(args).laten.rate) == (9, 0.2)
    one_sentence(capsys, ["transfer", "--teacher", "t", "--student", "s", "--task-dir", str(task_dir), "--variants",
                          "lora,laten", "--laten-extract", "0"], "--laten-extract 0: must be at least 1")


# ---- models with inf/NaN weights -----------------------------------------------------------------
def test_a_model_with_non_finite_weights_is_refused_when_loaded(tmp_path):
    """Replays 'a teacher with inf/NaN weights (NaN-derived sensitivity and extraction were recorded
    first)': the load that every node does refuses it, and so does the lazy reader extraction uses."""
    import torch

    from conftest import tiny_model

    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(models.NonFiniteWeights, match=r"nan: weight model.layers.1.mlp.down_proj.weight holds 1 inf "
                                                      "or NaN"):
        models.load_model(tmp_path / "nan")
    lazy = models.LazyWeights.from_model_dir(tmp_path / "nan")
    lazy["model.layers.0.mlp.down_proj.weight"]  # a finite tensor reads
    with pytest.raises(models.NonFiniteWeights):
        lazy["model.layers.1.mlp.down_proj.weight"]
