"""The parsers of user files, fuzzed (issue 26, deliver 5): seeds files, sweep configs and runs tables
of every shape give a valid result, or exit code 2 with one sentence naming the file, never a
traceback; each parse runs under a memory cap it must not hit (the cap is set in the test)."""
import contextlib
import json
import resource
import string

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pkt.core import data
from pkt.flows import cli, input_checks, server

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
FEWER = settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))  # a CLI run each
HEADROOM = 2**30  # the parse may take at most 1 GiB more address space than the process has


@contextlib.contextmanager
def memory_cap():
    """RLIMIT_AS at what the process maps now plus HEADROOM: a parser reading unbounded input fails."""
    with open("/proc/self/status") as f:
        vm = int(f.read().split("VmSize:")[1].split()[0]) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def one_sentence_or_ok(capsys, argv, name: str) -> int:
    with memory_cap():
        code = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:  # one sentence per problem (a config with two bad fields says both), each naming the file
        lines = err.strip().splitlines()
        assert lines[0].startswith(f"pkt {argv[0]}: error: "), err
        assert all(name in line for line in lines), err
    return code


# ---- seeds files ----------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                    st.floats(allow_nan=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
turns = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot", 3]),
                               "content": st.one_of(st.text(max_size=30), st.integers())})
samples = st.one_of(json_values, st.fixed_dictionaries({"messages": st.lists(turns, max_size=4)},
                                                       optional={"id": json_values}))
raw_lines = st.one_of(samples.map(lambda x: json.dumps(x).encode()), st.binary(max_size=60),
                      st.just(b'{"id": ' + b"9" * 5000 + b"}"), st.just(b"[" * 5000))


@FAST
@given(lines=st.lists(raw_lines, max_size=6), crlf=st.booleans())
def test_any_seeds_file_is_samples_or_one_sentence(tmp_path_factory, lines, crlf):
    path = tmp_path_factory.mktemp("fuzz") / "seeds.jsonl"
    path.write_bytes((b"\r\n" if crlf else b"\n").join(lines))
    try:
        with memory_cap():
            rows = data.read_jsonl(path)
    except data.DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert rows and all(isinstance(r["messages"], list) for r in rows)


# ---- sweep configs --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    row = json.dumps({"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]})
    for name in ("train", "seeds", "test", "val"):
        (d / f"{name}.jsonl").write_text(row + "\n")
    return d


@pytest.fixture
def no_work(monkeypatch):
    """A config that passes every check reaches the flow's entry: recorded, not run."""
    @contextlib.contextmanager
    def entered():
        raise Accepted
        yield

    monkeypatch.setattr(server, "prefect_api", entered)
    monkeypatch.setattr(input_checks, "check_sweep_inputs", lambda cfg: None)  # the models are not there


class Accepted(Exception):
    pass


field_values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=6), scalars,
                                                                                 max_size=3))
fields = st.dictionaries(st.sampled_from(["variants", "seeds", "selection_seeds", "train", "train_grid", "k",
                                          "sample_seed", "init_scale", "laten", "benchmarks", "workers", "runner",
                                          "max_length", "variant_grid", "endpoint", "nonsense"]),
                         field_values, max_size=5)


@FEWER
@given(extra=fields, toml=st.booleans())
def test_any_sweep_config_is_accepted_or_one_sentence(tmp_path_factory, task_dir, no_work, capsys, extra, toml):
    base = {"teacher": "teacher", "students": ["student"], "tasks": [{"name": "t", "dir": str(task_dir)}]}
    d = tmp_path_factory.mktemp("cfg")
    if toml:
        path = d / "sweep.toml"
        try:
            import tomli_w  # noqa: F401  (not a dependency: TOML shapes are covered through YAML's)
        except ImportError:
            toml = False
    if not toml:
        import yaml

        path = d / "sweep.yaml"
        path.write_text(yaml.safe_dump({**base, **extra}))
    try:
        one_sentence_or_ok(capsys, ["sweep", "--config", str(path), "--store", str(d / "store")], "sweep")
    except Accepted:
        pass


@FEWER
@given(text=st.text(alphabet=string.printable + "é[]{}:-", max_size=200))
def test_any_yaml_text_is_a_config_or_one_sentence(tmp_path_factory, no_work, capsys, text):
    path = tmp_path_factory.mktemp("cfg") / "sweep.yaml"
    path.write_text(text)
    try:
        one_sentence_or_ok(capsys, ["sweep", "--config", str(path)], "sweep.yaml")
    except Accepted:
        pass


# ---- runs tables ----------------------------------------------------------------------------------
COLUMNS = ["student", "task", "benchmark", "metric", "variant", "seed", "value"]
cells = st.one_of(st.sampled_from(["", "inf", "-inf", "nan", "1e400", "NaN", "lora", "transfer", "0", "1", "2.5",
                                   "-1", "9" * 400, '"a,b"', "x"]),
                  st.integers(min_value=-3, max_value=5).map(str), st.floats(allow_nan=False).map(repr))


@FEWER
@given(header=st.one_of(st.just(COLUMNS), st.permutations(COLUMNS), st.lists(st.sampled_from(COLUMNS + ["x"]),
                                                                              max_size=8)),
       rows=st.lists(st.lists(cells, min_size=0, max_size=8), max_size=8))
def test_any_runs_table_is_a_report_or_one_sentence(tmp_path_factory, capsys, header, rows):
    d = tmp_path_factory.mktemp("runs")
    runs = d / "runs.csv"
    runs.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")
    code = one_sentence_or_ok(capsys, ["report", "--runs", str(runs), "--out", str(d / "out")], "runs.csv")
    if code == 2:
        assert not (d / "out").exists()  # a refused table writes nothing
    else:
        assert (d / "out/report.md").is_file()



def test_a_field_name_with_a_control_character_stays_one_line(tmp_path, task_dir, no_work, capsys):
    """A record separator (\\x1e) is a line break to str.splitlines(): hypothesis found it in a field name."""
    base = {"teacher": "teacher", "students": ["student"], "tasks": [{"name": "t", "dir": str(task_dir)}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps({**base, "train": {"\x1e": None}}))  # JSON is YAML
    assert one_sentence_or_ok(capsys, ["sweep", "--config", str(path), "--store", str(tmp_path / "store")],
                              "sweep") == 2


def test_a_runs_table_value_of_400_digits_is_one_sentence(tmp_path, capsys):
    """A whole number too long for int64 or a float (hypothesis found it): one sentence, not an OverflowError."""
    path = tmp_path / "runs.csv"
    path.write_text("student,task,benchmark,metric,variant,seed,value\ns,t,gsm,m,lora,0," + "9" * 400 + "\n")
    assert one_sentence_or_ok(capsys, ["report", "--runs", str(path), "--out", str(tmp_path / "out")], "report") == 2
