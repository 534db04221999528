"""Refusals that need no weights: what a model's config, its files' headers and its tokenizer tell.

Run before any expensive work, so that an unsupported teacher, a student with another
tokenizer or a rank too large for the student fails in about a second with one sentence,
instead of after a sensitivity pass.
"""
from __future__ import annotations

from pathlib import Path

from . import arch, models
from .align import ShapeMismatch, check_compatible
from .errors import UserError


class ModelFileError(UserError, ValueError):
    pass


def check_model_files(source: str | Path, allow_bin: bool | None = None) -> None:
    """A local model directory has config.json, weights, and safetensors headers that parse
    (shapes consistent with the bytes). Hub ids are left to the loader."""
    models.check_source(source)
    path = Path(source)
    if not path.exists():
        return
    if not path.is_dir():
        raise models.ModelNotFound(f"{path}: is a file; give the model's directory (config.json and *.safetensors)")
    models.check_weights_present(path, allow_bin)
    from safetensors import SafetensorError, safe_open

    for f in models.weight_files(path):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            raise ModelFileError(f"{f}: not a readable safetensors file ({e}); re-download or re-save the model") \
                from None


def same_token_map(teacher_tok, student_tok, teacher: str = "teacher", student: str = "student") -> None:
    """Teacher and student read text into the same token ids (not only the same vocabulary size)."""
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t == s:
        return
    differ = sorted(set(t.items()) ^ set(s.items()), key=lambda kv: (kv[1], kv[0]))
    token, _ = differ[0]
    where = (f"token {token!r} is id {t[token]} in the teacher and id {s[token]} in the student"
             if token in t and token in s else
             f"token {token!r} is only in the {'teacher' if token in t else 'student'}'s vocabulary")
    raise ShapeMismatch(f"{teacher} and {student} do not share one tokenizer ({len(t)} vs {len(s)} tokens; {where}); "
                        "pkt transfers between models that map text to the same token ids: pick a student of the "
                        "teacher's family")


def rank_limit(student_config, modules=arch.ALL_MODULE_TYPES) -> tuple[int, str]:
    """The largest LoRA rank every transferred matrix of the student allows, and the matrix that limits it."""
    d = arch.dims(student_config)
    return min((min(arch.module_shape(d, m)), m) for m in modules)


def check_rank(rank: int, student_config, modules=arch.ALL_MODULE_TYPES, what: str = "rank") -> None:
    limit, module = rank_limit(student_config, modules)
    if rank > limit:
        shape = "x".join(map(str, arch.module_shape(arch.dims(student_config), module)))
        raise ShapeMismatch(f"{what} {rank} is above {limit}, the smallest side of the student's {module} matrix "
                            f"({shape}); choose a {what} of at most {limit}")


def check_pair(teacher_config, student_config, teacher_tok, student_tok, modules=arch.ALL_MODULE_TYPES,
               teacher: str = "teacher", student: str = "student") -> None:
    """Everything about a (teacher, student) pair that the configs and tokenizers decide, most basic first."""
    for name, cfg in ((teacher, teacher_config), (student, student_config)):
        try:
            arch.architecture(cfg)
        except arch.UnsupportedArchitecture as e:
            raise arch.UnsupportedArchitecture(f"{name}: {e}") from None
    same_token_map(teacher_tok, student_tok, teacher, student)
    check_compatible(arch.dims(teacher_config), arch.dims(student_config), tuple(modules))


def check_models(teacher: str, students: list[str], modules=arch.ALL_MODULE_TYPES, rank: int | None = None,
                 rank_name: str = "rank", allow_bin: bool | None = None) -> None:
    """check_model_files on every model, then check_pair and check_rank for each student: configs,
    headers and tokenizers only, no weights."""
    for m in (teacher, *students):
        check_model_files(m, allow_bin)
    t_cfg, t_tok = _read(teacher)
    for s in students:
        s_cfg, s_tok = _read(s)
        check_pair(t_cfg, s_cfg, t_tok, s_tok, modules, f"teacher {teacher}", f"student {s}")
        if rank is not None:
            check_rank(rank, s_cfg, modules, rank_name)


def _read(source: str):
    """(config, tokenizer) of a model, or one sentence saying why they cannot be read."""
    try:
        return models.load_config(source), models.load_tokenizer(source)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        if "custom code" in str(e) or "trust_remote_code" in str(e):  # no token or network would help
            raise arch.UnsupportedArchitecture(
                f"{source}: its config needs custom code (auto_map in config.json), which pkt never runs; "
                f"supported architectures: {', '.join(sorted(arch.ARCHITECTURES))}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise models.ModelNotFound(f"{source}: its config or tokenizer cannot be read ({first}); give a local model "
                                   "directory, or a hub id reachable from here (unset HF_HUB_OFFLINE; HF_TOKEN for "
                                   "gated models)") from None
