"""Loading causal LMs, tokenizers and raw weights from a local directory or a hub id."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import UserError
from .inputs import check_folder

# peft reads a property transformers 5 deprecated on every adapter it wraps: a warning a pkt user
# cannot act on, printed once per adapter node
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class ModelNotFound(UserError, FileNotFoundError):
    pass


class PickledWeights(UserError, ValueError):
    pass


def is_local(source: str | Path) -> bool:
    return Path(source).exists()


def check_source(source: str | Path) -> None:
    s = str(source)
    looks_like_path = s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s
    if looks_like_path and not Path(s).exists():
        raise ModelNotFound(
            f"model path {s!r} does not exist; give a local directory holding config.json and "
            "*.safetensors, or a hub id such as 'meta-llama/Llama-2-7b-hf'"
        )
    if Path(s).is_dir():  # a FIFO or a device among its files would block a digest or a loader
        check_folder(s, "the model directory")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | None) -> torch.dtype:
    """'auto' means bf16 on a CUDA device that supports it, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda = device is not None and str(device).startswith("cuda") or device == "auto"
        if cuda and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(
    source: str | Path,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "float32",
    device: str | None = "cpu",
    allow_bin: bool | None = None,
    trust_remote_code: bool = False,
):
    """A causal LM from a local dir or hub id. Only safetensors weights unless allow_bin
    (default: the PKT_ALLOW_BIN=1 that `pkt ... --allow-bin` sets); transformers then reads the
    pickle with torch.load(weights_only=True).

    device='auto' shards over the visible GPUs (or offloads) with accelerate's device_map.
    """
    if allow_bin is None:
        allow_bin = os.environ.get("PKT_ALLOW_BIN") == "1"
    from transformers import AutoModelForCausalLM

    check_source(source)
    if is_local(source):
        check_weights_present(Path(source), allow_bin)
    kwargs = dict(
        revision=revision,
        dtype=resolve_dtype(dtype, device),
        use_safetensors=None if allow_bin else True,
        trust_remote_code=trust_remote_code,
    )
    if device == "auto":
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    check_finite(model.state_dict().items(), source)
    if device not in (None, "auto"):
        model.to(device)
    return model


class NonFiniteWeights(UserError, ValueError):
    pass


def check_finite(tensors, source) -> None:
    """Refuse a model holding inf or NaN weights when it is loaded: everything computed from it
    (sensitivity, extraction, scores) would be NaN and stored as if it were a result."""
    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeights(f"{source}: weight {name} holds {bad} inf or NaN values; this model is broken "
                                   "(a failed save or training run): give one with finite weights")


def load_tokenizer(source: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_source(source)
    tok = AutoTokenizer.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(source: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoConfig

    check_source(source)
    return AutoConfig.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)


def check_weights_present(path: Path, allow_bin: bool | None = None) -> None:
    """A local model directory has config.json and weights pkt may load: *.safetensors, or pickled
    *.bin/*.pt only when allowed (--allow-bin)."""
    if allow_bin is None:
        allow_bin = os.environ.get("PKT_ALLOW_BIN") == "1"
    if not (path / "config.json").exists():
        raise ModelNotFound(f"{path}: no config.json; a model directory needs config.json and *.safetensors")
    if list(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt")))
    if not pickled:
        raise ModelNotFound(f"{path}: no weights (no *.safetensors file); give a model directory holding config.json "
                            "and its *.safetensors weights")
    if not allow_bin:
        raise PickledWeights(f"{path}: no *.safetensors weights, only pickled ones ({', '.join(pickled)}), which can run "
                             "code when loaded; convert them to safetensors, or pass --allow-bin to load them with "
                             "weights_only=True")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors weight files of a local model directory, in a stable order."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    return sorted(path.glob("*.safetensors"))


class LazyWeights:
    """Read-only mapping name -> tensor over safetensors files, loading one tensor at a time,
    so a teacher bigger than RAM can be sliced without materializing it."""

    def __init__(self, files: list[str | Path], device: str = "cpu"):
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._where[k] = Path(f)
        self.device = device

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "LazyWeights":
        files = weight_files(path)
        if not files:
            raise ModelNotFound(f"{path}: no *.safetensors files")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self):
        return self._where.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in {sorted(set(map(str, self._where.values())))}")
        with safe_open(str(self._where[name]), framework="pt", device=self.device) as h:
            t = h.get_tensor(name)
        check_finite([(name, t)], self._where[name].parent)
        return t


def with_adapter(model, adapter_dir: str | Path):
    """The model with a peft adapter folder merged into its weights (what evaluation scores)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
