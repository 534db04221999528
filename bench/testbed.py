"""The study's budget on this machine: one study family's build, one adapter node and one scores node
(their computations, as the nodes run them), then the arithmetic for the whole study.

    python bench/testbed.py [--family-seed 0] [--root DIR]   # builds the family under DIR unless it is there

Prints wall and CPU seconds (this process, one torch thread: a process-pool worker's setting) and
the node counts of the study design (issue 17: ~17 variants x 6 settings x (2 selection + 6 test
seeds) x 8 families x 3 tasks).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


class Clock:
    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        print(f"{self.what}: {self.wall:.2f} s wall, {self.cpu:.2f} s CPU", flush=True)


def adapter_and_scores(root: Path, task: str, train: dict, out: Path) -> tuple[float, float]:
    """CPU seconds of one adapter node (lora init, the study's training) and of one scores node."""
    from pkt.core import data, evaluate, finetune, lora_init, models
    from pkt.core import arch

    with Clock(f"adapter node ({task}, lora, {train})") as a:
        student, tok = models.load_model(root / "student"), models.load_tokenizer(root / "student")
        tp = finetune.TrainParams.from_dict(train)
        samples = data.load_encoded(root / "tasks" / task / "train.jsonl", tok, tp.max_length)[: tp.n_train]
        res = finetune.train_adapter(student, samples, tp, tok.pad_token_id, "lora", progress=False)
        cfg = arch.config_from_shape(arch.shape_of(student.config))
        lora_init.save_adapter(out, res.state, cfg, res.rank, res.alpha, tp.dropout, {"pkt_kind": "adapter"})
    scores = []
    for bench, split in (("answer_nll", "val"), ("gsm", "test")):
        with Clock(f"scores node ({task}, {bench}, {split})") as s:
            model = models.with_adapter(models.load_model(root / "student"), out)
            evaluate.evaluate(model, models.load_tokenizer(root / "student"), bench, root / "tasks" / task, split=split)
        scores.append(s.cpu)
    return a.cpu, sum(scores) / len(scores)


def study_nodes(variants=17, settings=6, selection_seeds=2, test_seeds=6, families=8, tasks=3, trained_tasks=2,
                size_controls=4) -> dict:
    """Node counts of the study (the two facts tasks share train.jsonl, so their adapters are shared:
    trained_tasks=2 of 3; test runs train at the chosen setting only, plus the size controls at
    transfer's)."""
    selection = variants * settings * selection_seeds
    test = (variants + size_controls) * test_seeds
    return {"adapters": families * trained_tasks * (selection + test),
            "scores": families * tasks * (selection + 2 * test),  # val: the selection metric; test: 2 benchmarks
            "adapters_full_grid": families * trained_tasks * variants * settings * (selection_seeds + test_seeds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family-seed", type=int, default=0)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from pkt.core.mini import family, gates
    from pkt.flows.study import STUDY_TRAIN

    root = Path(args.root or tempfile.mkdtemp(prefix="pkt-testbed-"))
    if not (root / "student").exists():
        with Clock(f"family build (study, seed {args.family_seed})") as b:
            stats = family.build_family(root, "study", log=print, progress=False, seed=args.family_seed)
        (root / "family_stats.json").write_text(json.dumps(stats))
        build = b.cpu
    else:
        stats, build = json.loads((root / "family_stats.json").read_text()), float("nan")
    print("\n".join(gates.gate_lines(stats)))
    adapter, score = adapter_and_scores(root, "facts-teacher-only", STUDY_TRAIN, root / "bench-adapter")
    n = study_nodes()
    compute = n["adapters"] * adapter + n["scores"] * score + 8 * build
    print(f"\nstudy: {n['adapters']} adapter nodes x {adapter:.2f} s + {n['scores']} scores nodes x {score:.2f} s "
          f"+ 8 family builds x {build:.0f} s = {compute:.0f} CPU s = {compute / 3600 / 2:.2f} h on 2 cores "
          "(node compute only, perfectly parallel)")
    print(f"(training every setting for every seed instead: {n['adapters_full_grid']} adapter nodes)")


if __name__ == "__main__":
    main()
