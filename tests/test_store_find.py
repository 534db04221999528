"""Search by what an artifact is for (issue 26, case 9): find --teacher matches the teacher itself,
not a random model of its config; lineage goes by node, so two nodes with equal bytes stay apart;
show takes a printed path; ls has a header, stops quietly in a pipe, and labels tables."""
import subprocess
import sys

import torch

from pkt.artifacts import catalog
from pkt.artifacts.store import Store
from pkt.flows.cli import main
from pkt.tasks.node import digests, identities


def node(store, kind, label, params, inputs, folder=None):
    """Record a node as tasks/node.py does: key by identities, record digests and the description."""
    upstream = [store.record(r["kind"], r["key"]) for r in inputs.values() if r["kind"] not in catalog.SOURCE_KINDS]
    desc = catalog.describe(label, params, inputs, upstream)
    key = store.key(kind, params, identities(inputs))
    kw = dict(params=params, inputs=digests(inputs), description=desc)
    if folder is None:
        ref = store.put_tensors(kind, key, {"x": torch.arange(3.0)}, **kw)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text('{"r": 2}')  # equal bytes for every init
        ref = store.put_tree(kind, key, folder, **kw)
    return ref.as_dict()


def family_store(tmp_path):
    store = Store(tmp_path / "store")
    teacher = {"kind": "model", "key": str(tmp_path / "teacher"), "digest": "a" * 64}
    student = {"kind": "model", "key": str(tmp_path / "student"), "digest": "b" * 64}
    random_model = node(store, "random_model", "random_model[like=teacher, seed=0]", {"seed": 0}, {"like": teacher},
                        tmp_path / "rm")
    sens = node(store, "sensitivity", "sensitivity[teacher]", {}, {"teacher": teacher})
    sens_r = node(store, "sensitivity", "sensitivity[untrained]", {}, {"teacher": random_model})
    inits = {name: node(store, "lora_init", f"lora_init[{name}]", {"selector": name}, {"extraction": s},
                        tmp_path / name)
             for name, s in (("transfer", sens), ("block-influence", sens), ("untrained-teacher", sens_r))}
    adapters = {name: node(store, "adapter", f"adapter[{name}]", {"variant": name},
                           {"student": student, "init": init}) for name, init in inits.items()}
    return store, inits, adapters


def find(capsys, root, *args):
    code = main(["store", "find", *args, "--store", str(root)])
    return code, [line.split()[1] for line in capsys.readouterr().out.splitlines()[:-1]]


def test_find_matches_the_teacher_itself_and_lineage_goes_by_node(tmp_path, capsys):
    store, inits, adapters = family_store(tmp_path)
    assert len({store.manifest(i).get("adapter_config.json") for i in inits.values()}) == 1  # equal bytes
    code, keys = find(capsys, store.root, "--teacher", "teacher", "--student", "student", "--kind", "lora_init")
    assert code == 0 and set(keys) == {inits["transfer"]["key"], inits["block-influence"]["key"]}
    code, keys = find(capsys, store.root, "--variant", "transfer", "--kind", "lora_init")
    assert keys == [inits["transfer"]["key"]]
    code, keys = find(capsys, store.root, "--role", "untrained teacher", "--kind", "lora_init")
    assert keys == [inits["untrained-teacher"]["key"]]
    assert main(["store", "show", inits["transfer"]["key"], "--store", str(store.root)]) == 0
    down = capsys.readouterr().out.split("lineage down")[1]
    assert adapters["transfer"]["key"][:12] in down and adapters["block-influence"]["key"][:12] not in down


def test_show_takes_the_path_pkt_printed(tmp_path, capsys):
    store, inits, _ = family_store(tmp_path)
    printed = store.path(inits["transfer"])
    for path in (printed, printed / "adapter_config.json"):
        assert main(["store", "show", str(path), "--store", str(store.root)]) == 0
        assert "label: lora_init[transfer]" in capsys.readouterr().out


def test_ls_has_a_header_labels_tables_and_stops_quietly_in_a_pipe(tmp_path, capsys):
    store = Store(tmp_path / "store")
    for i in range(150):  # more than a pipe holds (64 kB)
        params, data = {"name": f"runs-{i}-{'x' * 400}.csv"}, f"a,b\n{i},2\n".encode()
        store.put_blob("table", store.key("table", params, {"csv": str(i)}), data, params=params, inputs={"csv": "c"})
    assert main(["store", "ls", "--store", str(store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["KIND", "KEY", "LABEL"] and len(lines) == 151
    assert "older pkt" not in "\n".join(lines) and all(" table[runs-" in line for line in lines[1:])
    proc = subprocess.Popen([sys.executable, "-m", "pkt.flows.cli", "store", "ls", "--store", str(store.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"KIND")  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(120) == 0 and err == "", err
