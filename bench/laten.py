"""LaTen's nodes on a synthetic Llama pair with a real-size vocabulary, beside the sensitivity pass.

Each node runs in its own process through pkt's own node wrapper (tasks.node.build: load, compute,
store), so its seconds and peak resident set are its own. Printed side by side: seconds and peak
RSS of sensitivity (the teacher, the same seed samples), LaTen's attribution (teacher, student),
its translator (n_extract steps) and its update; and the teacher's attribution with the lens in one
vocabulary chunk and one neuron chunk (logits [f, V] at once, as the authors' code computes them)
against pkt's chunked lens.

    python bench/laten.py                           # vocab 152,064, teacher 256 x 4, student 128 x 2, CPU
    python bench/laten.py --vocab 32000 --t-hidden 512 --t-layers 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sensitivity import PeakRSS, rss_bytes  # noqa: E402  (the sampler the sensitivity bench uses)


def build(args, root: Path) -> None:
    """Teacher/student dirs (random weights, the miniature family's tokenizer: its ids all fall inside
    the big vocabulary) and a GSM-like train.jsonl."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pkt.core.mini import tasks
    from pkt.core.mini.tokenizer import save_tokenizer

    for name, hidden, layers, seed in (("teacher", args.t_hidden, args.t_layers, 0),
                                       ("student", args.s_hidden, args.s_layers, 1)):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                          num_key_value_heads=max(1, hidden // 64), max_position_embeddings=256,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(cfg).save_pretrained(root / name)
        save_tokenizer(root / name)
    rows = tasks.make_splits("gsm", n_train=args.n_extract + args.n_align + 8, n_val=1, n_test=1)["train"]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def specs(args, root: Path, store):
    """(spec, inputs) of each benchmarked node; upstream refs come from the store (built by earlier modes)."""
    from pkt.core import laten
    from pkt.tasks import extract as extract_nodes
    from pkt.tasks import laten as laten_nodes
    from pkt.tasks import sources
    from pkt.tasks.node import build

    teacher, student = (sources.model_source(str(root / n), store) for n in ("teacher", "student"))
    train = sources.file_source(str(root / "train.jsonl"))
    extract, align, pool = laten.splits(args.n_extract + args.n_align + 8, args.n_extract, args.n_align)
    def attr(model, i, **kw):
        return laten_nodes.LatenAttribution(index=i, max_length=96, **kw), {"model": model, "data": train}

    upstream = args.mode in ("translator", "delta")  # the extract samples' attributions, built (or reused) first
    translator = (laten_nodes.LatenTranslator(extract=tuple(extract), align=tuple(align), max_length=96,
                                              hparams=laten.LatenParams(align_per_step=args.align_per_step).as_dict()),
                  {"teacher": teacher, "student": student, "data": train,
                   "teacher_attr": [build(*attr(teacher, i), store) for i in extract] if upstream else [],
                   "student_attr": [build(*attr(student, i), store) for i in extract] if upstream else []})
    line = pool[0]
    from pkt.core import arch, models

    modes = {
        "sensitivity": (extract_nodes.Sensitivity(k=args.seeds, max_length=96), {"teacher": teacher, "seeds": train}),
        "attribution-teacher": attr(teacher, line),
        "attribution-student": attr(student, line),
        "attribution-teacher-one-chunk": attr(teacher, line, vocab_chunk=args.vocab),
        "translator": translator,
    }
    if args.mode == "delta":
        tr = build(*translator, store)
        shape = arch.shape_of(models.load_config(root / "student"))
        modes["delta"] = (laten_nodes.LatenDelta(step=args.n_extract, rate=0.1, student_shape=shape),
                          {"teacher": teacher, "translator": tr, "teacher_attr": build(*attr(teacher, line), store),
                           "student_attr": build(*attr(student, line), store)})
    return modes[args.mode]


def child(args) -> None:
    from pkt.artifacts.store import Store
    from pkt.core import laten
    from pkt.tasks.node import build

    from pkt.core import models

    root = Path(args.root)
    store = Store(root / "store")
    spec, inputs = specs(args, root, store)
    models.load_model(root / "student")  # warm: transformers' lazy imports are not any node's cost
    import gc

    gc.collect()
    if args.mode == "attribution-teacher-one-chunk":  # the authors' lens: one [f, V] block per layer
        original = laten.attribute
        laten.attribute = lambda *a, **kw: original(*a, **{**kw, "neuron_chunk": 1 << 30})
    base = rss_bytes()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        ref = build(spec, inputs, store)
        seconds = time.perf_counter() - t0
    assert ref["status"] == "computed", ref
    print(json.dumps({"mode": args.mode, "seconds": seconds, "peak_bytes": rss.peak, "extra_bytes": rss.peak - base}))


def run_mode(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--root", args.root] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "root", "mode")]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


MODES = ["sensitivity", "attribution-teacher", "attribution-student", "attribution-teacher-one-chunk", "translator",
         "delta"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--t-hidden", type=int, default=256)
    ap.add_argument("--t-layers", type=int, default=4)
    ap.add_argument("--s-hidden", type=int, default=128)
    ap.add_argument("--s-layers", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=8, help="seed samples of the sensitivity pass")
    ap.add_argument("--n-extract", type=int, default=3, help="translator steps")
    ap.add_argument("--n-align", type=int, default=8)
    ap.add_argument("--align-per-step", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.mode = args.child
        return child(args)
    with tempfile.TemporaryDirectory() as tmp:
        args.root = tmp
        build(args, Path(tmp))
        rows = [run_mode(m, args) for m in MODES]
    print(f"synthetic Llama pair, vocabulary {args.vocab:,}: teacher {args.t_hidden} x {args.t_layers} layers, "
          f"student {args.s_hidden} x {args.s_layers}; sensitivity over {args.seeds} samples; translator "
          f"{args.n_extract} steps x {args.align_per_step + 1} samples; CPU, fp32")
    for r in rows:
        print(f"  {r['mode']:31s} {r['seconds']:8.1f} s   peak RSS {r['peak_bytes'] / 2**20:7.0f} MiB   "
              f"above the process at start {r['extra_bytes'] / 2**20:7.0f} MiB")
    by = {r["mode"]: r for r in rows}
    one, chunked = by["attribution-teacher-one-chunk"], by["attribution-teacher"]
    print(f"teacher attribution / teacher sensitivity: time {chunked['seconds'] / by['sensitivity']['seconds']:.2f}, "
          f"peak {chunked['peak_bytes'] / by['sensitivity']['peak_bytes']:.2f}")
    print(f"chunked lens / one-chunk lens (teacher attribution): time {chunked['seconds'] / one['seconds']:.2f}, "
          f"memory above start {chunked['extra_bytes'] / one['extra_bytes']:.2f}")


if __name__ == "__main__":
    main()
