"""The family's quality gates: is the testbed able to show knowledge transfer at all?

Measured once, when the family is built, on each task's `gate` split (never val or test), with the
study's own scorer (lm-eval, GSM-style strict exact match) on the untrained models; on a v2 or v3 family
also the reachability gate: can training at the study's budget put the teacher-only facts into the
student at all (an oracle LoRA trained on the gate items themselves). Saved in
family_stats.json under "gates": name -> {"value", "threshold", "passed", "split", "what"}; a gate
passes when value >= threshold. `gate_lines(stats)` renders them for every report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCORED = ("facts-teacher-only", "facts-shared", "gsm")  # the study's tasks, gated on their gate split
SPLIT = "gate"


@dataclass(frozen=True)
class Thresholds:
    knowledge_gap: float = 0.3  # teacher minus student exact match on the teacher-only facts
    skill_gap: float = 0.15  # teacher minus student exact match on the skill task
    skill_floor: float = 0.05  # the untrained student's exact match on the skill task
    facts_floor: float = 0.2  # the untrained student's exact match on the shared facts
    # share of the teacher-only facts the untrained student gets wrong: chance is 10%, and a student
    # guessing 32 gate items at chance misses less than 75% in under 1% of families (binomial)
    blind: float = 0.75
    headroom: float = 0.3  # share of the skill task and the shared facts the untrained student gets wrong
    reach_gap: float = 0.3  # an oracle LoRA on the gate's teacher-only facts minus the untrained student


def gate_scores(family_root: str | Path, member: str) -> dict[str, float]:
    """A member's exact match on the gate split of every scored task (zero-shot, untrained)."""
    from .. import evaluate, models

    path = Path(family_root) / member
    model, tok = models.load_model(path), models.load_tokenizer(path)
    return {task: evaluate.evaluate(model, tok, "gsm", Path(family_root) / "tasks" / task, split=SPLIT)
            .summary["exact_match/strict-match"] for task in SCORED}


def gate(value: float, threshold: float, what: str) -> dict:
    return {"value": round(value, 4), "threshold": threshold, "passed": bool(value >= threshold), "split": SPLIT,
            "what": what}


def gates(teacher: dict[str, float], student: dict[str, float], t: Thresholds) -> dict[str, dict]:
    """The gates from the members' gate-split scores (task -> exact match)."""
    return {
        "teacher-above-student/facts-teacher-only": gate(
            teacher["facts-teacher-only"] - student["facts-teacher-only"], t.knowledge_gap,
            "teacher minus student exact match on facts only the teacher's corpus states"),
        "teacher-above-student/gsm": gate(
            teacher["gsm"] - student["gsm"], t.skill_gap, "teacher minus student exact match on the addition skill"),
        "student-off-floor/gsm": gate(
            student["gsm"], t.skill_floor, "the untrained student's exact match on addition"),
        "student-off-floor/facts-shared": gate(
            student["facts-shared"], t.facts_floor, "the untrained student's exact match on facts both corpora state"),
        "student-blind/facts-teacher-only": gate(
            1 - student["facts-teacher-only"], t.blind,
            "share of the teacher-only facts the untrained student misses (it never saw them)"),
        "headroom/gsm": gate(1 - student["gsm"], t.headroom, "room above the untrained student on addition"),
        "headroom/facts-shared": gate(1 - student["facts-shared"], t.headroom,
                                      "room above the untrained student on the shared facts"),
    }


REACH_TASK = "facts-teacher-only"


def oracle_score(family_root: str | Path, train: dict) -> float:
    """The student's exact match on the gate split of the teacher-only facts after a LoRA (peft's init)
    trained on those very items for train["steps"] optimizer steps with train's other TrainParams: the
    most training at that budget can put there."""
    from .. import data, evaluate, finetune, models

    path, task = Path(family_root) / "student", Path(family_root) / "tasks" / REACH_TASK
    model, tok = models.load_model(path), models.load_tokenizer(path)
    samples = data.load_encoded(task / f"{SPLIT}.jsonl", tok, train["max_length"])
    per_epoch = -(-len(samples) // train["batch_size"])
    params = finetune.TrainParams.from_dict({**train, "epochs": train["steps"] / per_epoch})
    wrapped, _, _ = finetune.peft_model(model, params)
    finetune.finetune(wrapped, samples, params, tok.pad_token_id, progress=False)
    scores = evaluate.evaluate(wrapped.merge_and_unload(), tok, "gsm", task, split=SPLIT)
    return scores.summary["exact_match/strict-match"]


def reach_gate(oracle: float, student: float, t: Thresholds) -> dict:
    """The reachability gate from the oracle's and the untrained student's exact match (oracle_score)."""
    return {f"reachable/{REACH_TASK}": gate(
        oracle - student, t.reach_gap, "an oracle LoRA trained at the study's budget on these teacher-only facts "
        "minus the untrained student (the endpoint is reachable by training at all)")}


def measure(family_root: str | Path, thresholds: Thresholds,
            reach_train: dict | None = None) -> tuple[dict, dict[str, dict[str, float]]]:
    """(gates, {member: task -> gate-split exact match}) of a built family; with reach_train (a v2 or v3
    family) also the reachability gate."""
    scores = {m: gate_scores(family_root, m) for m in ("teacher", "student")}
    out = gates(scores["teacher"], scores["student"], thresholds)
    if reach_train:
        out |= reach_gate(oracle_score(family_root, reach_train), scores["student"][REACH_TASK], thresholds)
    return out, scores


def failed(stats: dict) -> list[str]:
    return [name for name, g in stats.get("gates", {}).items() if not g["passed"]]


def gate_lines(stats: dict) -> list[str]:
    """The gates of a family_stats.json as report lines: a verdict, then one line per gate."""
    all_gates = stats.get("gates")
    if not all_gates:
        return ["quality gates: not measured (this family was built before pkt measured them)"]
    bad = failed(stats)
    head = (f"quality gates: all {len(all_gates)} passed" if not bad else
            f"QUALITY GATES FAILED: {len(bad)} of {len(all_gates)} ({', '.join(bad)}): this family cannot show "
            "what the study asks; read its results as unsupported")
    return [head] + [f"  {'pass' if g['passed'] else 'FAIL'} {name}: {g['value']:.3f} (needs >= {g['threshold']:.3f}, "
                     f"{g['split']} split): {g['what']}" for name, g in all_gates.items()]
