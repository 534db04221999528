"""The weight-inheritance nodes (activations, the block-influence and evenly-spaced layer plans, the
weight-selection and subcloning extractions) beside the sensitivity pass and the paper's
extraction, on one synthetic Llama with a real-size vocabulary (152,064 tokens, Qwen2's).

Each node is computed in a process of its own, through pkt's node wrapper (tasks/node.py), so its
seconds and peak resident set are what the store's record says (pkt_core/memory.py: the process's
resident set sampled every 10 ms while the node computes; `added` is peak minus the resident set
when the node started). Upstream nodes come from the store (computed by an earlier step).

    python bench/weight_inheritance.py                       # 152k vocabulary, hidden 256, 4 layers: ~3 min on 2 cores
    python bench/weight_inheritance.py --hidden 1024 --layers 8 --k 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# (step name, what it is): each is one node; the rows marked * existed before
STEPS = [("sensitivity", "* |θ·∇θ| over the seeds (forward + backward)"),
         ("activations", "activation magnitudes and block influence (forward only)"),
         ("plan-block-influence", "layer plan: the highest-BI layers"),
         ("plan-evenly-spaced", "layer plan: evenly spaced layers (no data)"),
         ("plan-sensitivity", "* layer plan: the most sensitive layers"),
         ("extraction-submatrix", "* extraction: max-sensitivity windows"),
         ("extraction-weight-selection", "extraction: evenly spaced indices (no data)"),
         ("extraction-subcloning", "extraction: activation-ranked indices")]


def child(args) -> None:
    from pkt.artifacts.store import Store
    from pkt.core import arch, models
    from pkt.tasks import extract as extract_nodes
    from pkt.tasks import sources
    from pkt.tasks.node import build

    work = Path(args.work)
    store = Store(work / "store")
    teacher = sources.model_source(str(work / "teacher"), store)
    seeds = sources.file_source(str(work / "gsm" / "seeds.jsonl"))
    data = dict(k=args.k, max_length=args.max_length)
    sens = lambda: build(extract_nodes.Sensitivity(**data), {"teacher": teacher, "seeds": seeds}, store)  # noqa: E731
    acts = lambda: build(extract_nodes.Activations(**data), {"teacher": teacher, "seeds": seeds}, store)  # noqa: E731
    layers = arch.shape_of(models.load_config(work / "student"))["num_hidden_layers"]
    scores = {"sensitivity": sens, "activations": acts, "teacher": lambda: teacher}

    def plan(selector):
        spec = extract_nodes.LayerPlan(student_layers=layers, selector=selector)
        return build(spec, {name: scores[name]() for name in spec.INPUTS}, store)

    def extraction(selector, reducer):
        spec = extract_nodes.Extraction(student_shape=arch.shape_of(models.load_config(work / "student")),
                                        reducer=reducer)
        inputs = {name: plan(selector) if name == "plan" else scores[name]() for name in spec.INPUTS}
        return build(spec, inputs, store)

    step = {"sensitivity": sens, "activations": acts,
            "plan-block-influence": lambda: plan("block-influence"),
            "plan-evenly-spaced": lambda: plan("evenly-spaced"), "plan-sensitivity": lambda: plan("sensitivity"),
            "extraction-submatrix": lambda: extraction("sensitivity", "submatrix"),
            "extraction-weight-selection": lambda: extraction("evenly-spaced", "weight-selection"),
            "extraction-subcloning": lambda: extraction("sensitivity", "subcloning")}[args.child]
    ref = step()
    rec = store.record(ref["kind"], ref["key"])
    print(json.dumps({"status": ref["status"], "seconds": rec["seconds"], "peak": rec["peak_rss_bytes"],
                      "start": rec["start_rss_bytes"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152_064)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="seed samples (paper: 32)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline import synthetic_llama  # a saved random Llama whose tokenizer is padded to the vocabulary

    from pkt.core.mini.tasks import write_task

    work = Path(tempfile.mkdtemp(prefix="pkt-bench-selectors-"))
    synthetic_llama(work / "teacher", args.hidden, args.layers, args.vocab)
    synthetic_llama(work / "student", args.hidden // 2, max(1, args.layers // 2), args.vocab)
    write_task(work / "gsm", "gsm", n_train=64, n_val=0, n_test=0, n_seeds=max(32, args.k))
    rows = {}
    for step, _ in STEPS:
        cmd = [sys.executable, __file__, "--child", step, "--work", str(work), "--k", str(args.k),
               "--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
        rows[step] = json.loads(out.stdout.strip().splitlines()[-1])
        assert rows[step]["status"] == "computed", (step, rows[step])  # its own process measured it
    print(f"synthetic Llama teacher: vocab {args.vocab:,}, hidden {args.hidden}, {args.layers} layers; student "
          f"hidden {args.hidden // 2}, {max(1, args.layers // 2)} layers; {args.k} seed samples; CPU, float32")
    print(f"{'node':30s} {'seconds':>8s} {'x sens.':>8s} {'peak RSS MiB':>13s} {'added MiB':>10s}  what")
    base = rows["sensitivity"]["seconds"]
    for step, what in STEPS:
        r = rows[step]
        print(f"{step:30s} {r['seconds']:8.2f} {r['seconds'] / base:8.3f} {r['peak'] / 2**20:13.0f} "
              f"{(r['peak'] - r['start']) / 2**20:10.0f}  {what}")
    act, sens = rows["activations"], rows["sensitivity"]
    print(f"activations / sensitivity: seconds {act['seconds'] / sens['seconds']:.2f}, added RSS "
          f"{(act['peak'] - act['start']) / max(1, sens['peak'] - sens['start']):.2f}")


if __name__ == "__main__":
    main()
