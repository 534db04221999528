"""A synthetic study's runs table for the report's tests: families (and twin families) x tasks x
metrics x variants x seeds, scored at three step counts, with the diagnostic's fields."""
import numpy as np
import pandas as pd

ENDPOINT_TASK = "facts-teacher-only"
TASKS = (ENDPOINT_TASK, "facts-shared", "addition")
# variant -> (exact-match effect over vanilla at the largest step count, inert?)
ARMS = {"teacher": (0.60, False), "oracle": (0.45, False), "kd": (0.20, False), "seq-kd": (0.15, False),
        "transfer": (0.0, False), "transfer-add": (0.0, False), "spectrum-matched": (0.0, False),
        "shuffled": (0.0, False), "untrained-teacher": (0.0, False), "random-submatrix": (0.0, False),
        "cross-task": (0.0, False), "pissa": (0.0, False), "laten": (0.0, True), "weight-selection": (0.0, False),
        "lora": (0.0, False), "vanilla": (0.0, False)}
UNTRAINED = ("teacher", "vanilla")
STEPS = (8, 32, 128)


def study_runs(families: int = 8, twins: int = 4, seeds: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    names = [f"family-{i}" for i in range(families)] + [f"twin-{i}" for i in range(twins)]
    for fam in names:
        base = rng.normal(0.10, 0.01)
        for task in TASKS:
            for variant, (effect, inert) in ARMS.items():
                if fam.startswith("twin") and variant not in ("transfer", "lora", "vanilla", "teacher"):
                    continue
                gain = effect + (0.3 if fam.startswith("twin") and variant == "transfer" else 0.0)
                for s in ([0] if variant in UNTRAINED else range(seeds)):
                    for steps in ([0] if variant in UNTRAINED else STEPS):
                        em = base + gain * (steps / STEPS[-1] if steps else 1.0) + rng.normal(0, 0.01)
                        extra = {"diag_cos": rng.normal(0, 0.003), "diag_share": rng.normal(0.19, 0.005)} \
                            if variant not in UNTRAINED + ("lora",) else {"diag_cos": np.nan, "diag_share": np.nan}
                        for metric, value in (("exact_match", em), ("answer_nll", 2.4 - em)):
                            rows.append({"student": f"{fam}-student", "task": task, "benchmark": task,
                                         "variant": variant, "seed": s, "setting": "{}", "metric": metric,
                                         "value": value, "n_items": 64, "steps": steps, "family": fam,
                                         "inert": inert, **extra})
    return pd.DataFrame(rows)


ENDPOINT = {"metric": "exact_match", "tasks": [ENDPOINT_TASK], "alpha": 0.05,
            "comparisons": [{"subject": "transfer", "control": "spectrum-matched"},
                            {"subject": "transfer", "control": "shuffled"}]}
