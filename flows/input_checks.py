"""The inputs behind a validated config, checked before any work: data files, seed counts, benchmarks,
every model's files, config and tokenizer, and the ranks the students allow. No weights are loaded."""
from __future__ import annotations

from pathlib import Path

from pkt.core import data, evaluate, inputs, laten, models, preflight

from .config import ConfigError, ExtractConfig, SweepConfig
from .variants import VARIANTS


def check_extract_inputs(cfg: ExtractConfig) -> None:
    """The seeds file, and every model's files, config and tokenizer: no weights are loaded."""
    _check_seeds(cfg.seeds, cfg.k, "--k")
    preflight.check_models(cfg.teacher, cfg.students, rank=cfg.rank, rank_name="--rank")
    # every seed's answer survives the cutoff (read with the teacher's tokenizer, as the sensitivity pass does)
    try:
        tok = models.load_tokenizer(cfg.teacher)
        data.load_encoded(cfg.seeds, tok, cfg.max_length, cfg.k, fmt=data.resolve_format(cfg.prompt_format, tok))
    except data.DataError as e:  # the sentence names the sweep's field; pkt extract's knob is a flag
        raise ConfigError(str(e).replace("raise max_length (a sweep config field)", "raise --max-length")) from None


def check_sweep_inputs(cfg: SweepConfig) -> None:
    """Every data file a sweep reads, every model's files, config and tokenizer, and the ranks the
    students allow: no weights are loaded."""
    for i, task in enumerate(cfg.tasks):
        check_benchmark(task.benchmark, f"field tasks.{i}.benchmark")
    for name in cfg.benchmarks:
        check_benchmark(name, "field benchmarks")
    for task in cfg.tasks:
        inputs.check_folder(task.dir, "the task directory")  # a FIFO among its files: one sentence, not a wait
        for name in ("train.jsonl", "test.jsonl") + (("val.jsonl",) if cfg.train_grid else ()):
            data.read_jsonl(Path(task.dir) / name)
        _check_seeds(str(Path(task.dir) / "seeds.jsonl"), cfg.k, "k")
    variants = [VARIANTS[v] for v in cfg.variants]
    if cfg.cross_task_seeds and any(v.seeds == "cross-task" for v in variants):
        _check_seeds(cfg.cross_task_seeds, cfg.k, "k")
    modules, rank = cfg.modules(), max(cfg.ranks())
    if any(v.extracted for v in variants):
        preflight.check_models(cfg.teacher, cfg.students, modules, rank, "train.rank")
        if any(v.teacher == "early" for v in variants):
            preflight.check_models(cfg.early_teacher, cfg.students, modules)
    else:
        for s in cfg.students:
            preflight.check_model_files(s)
            if any(v.trains for v in variants):
                preflight.check_rank(rank, models.load_config(s), modules, "train.rank")
    if any(v.chain == "laten" for v in variants):
        preflight.check_models(cfg.teacher, cfg.students)
        for task in cfg.tasks:
            laten.splits(len(data.read_jsonl(Path(task.dir) / "train.jsonl")), cfg.laten.n_extract, cfg.laten.n_align)
    if "winrate" in cfg.benchmarks:
        preflight.check_model_files(cfg.judge)


def check_benchmark(name: str, where: str) -> None:
    """A benchmark pkt ships, or a task lm-eval knows: refused before any work, not after the first
    adapter is trained (lm-eval's index is read only for a name that is not pkt's)."""
    if name in evaluate.BENCHMARKS or name == "winrate":
        return
    if name not in evaluate.lm_eval_task_names():
        raise ConfigError(f"{where} {name}: neither a pkt benchmark ({', '.join([*evaluate.BENCHMARKS, 'winrate'])}) "
                          "nor an lm-eval task; give one of those, or an lm-eval task name (`lm-eval ls tasks`)")


def _check_seeds(path: str, k: int | None, k_name: str) -> None:
    n = len(data.read_jsonl(path))
    if k is not None and k > n:
        raise ConfigError(f"{k_name} {k}: {path} holds only {n} seed samples; lower {k_name} or add samples")
