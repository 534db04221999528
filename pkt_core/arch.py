"""Architecture as data: where a decoder's transferable weights live and what shape they have.

Every family listed in ARCHITECTURES names its tensors the Llama way; adding a family with the
same naming is one line. Shapes come from the config alone, so a student can be planned for
without loading its weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

# module type -> path inside a decoder layer
LAYER_MODULES: dict[str, str] = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
GLOBAL_MODULES: dict[str, str] = {"embed": "model.embed_tokens", "lm_head": "lm_head"}
ALL_MODULE_TYPES: tuple[str, ...] = (*LAYER_MODULES, *GLOBAL_MODULES)


@dataclass(frozen=True)
class Architecture:
    layers_prefix: str = "model.layers"
    layer_modules: tuple[tuple[str, str], ...] = tuple(LAYER_MODULES.items())
    global_modules: tuple[tuple[str, str], ...] = tuple(GLOBAL_MODULES.items())
    final_norm: str = "model.norm"  # the norm before lm_head (LaTen's logit lens applies its gain)


LLAMA_NAMING = Architecture()
ARCHITECTURES: dict[str, Architecture] = {
    name: LLAMA_NAMING
    for name in ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "olmo2", "smollm3")
}


class UnsupportedArchitecture(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Dims:
    """The numbers that fix every transferable weight's shape."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def architecture(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "pkt needs a decoder with Llama-style names (model.layers.N.self_attn.q_proj, mlp.gate_proj, ...)."
        )
    return ARCHITECTURES[model_type]


def dims(config) -> Dims:
    architecture(config)  # validates the type
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Dims(
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def module_shape(d: Dims, module: str) -> tuple[int, int]:
    """(out, in) of a weight as stored (nn.Linear / nn.Embedding layout)."""
    shapes = {
        "q": (d.q_width, d.hidden),
        "k": (d.kv_width, d.hidden),
        "v": (d.kv_width, d.hidden),
        "o": (d.hidden, d.q_width),
        "gate": (d.intermediate, d.hidden),
        "up": (d.intermediate, d.hidden),
        "down": (d.hidden, d.intermediate),
        "embed": (d.vocab, d.hidden),
        "lm_head": (d.vocab, d.hidden),
    }
    if module not in shapes:
        raise ValueError(f"unknown module type {module!r}; known: {', '.join(ALL_MODULE_TYPES)}")
    return shapes[module]


def module_path(config, module: str, layer: int | None = None) -> str:
    """Dotted module path, e.g. model.layers.3.mlp.up_proj (without '.weight')."""
    arch = architecture(config)
    local = dict(arch.layer_modules)
    if module in local:
        if layer is None:
            raise ValueError(f"module {module!r} lives in a decoder layer: give its layer index")
        return f"{arch.layers_prefix}.{layer}.{local[module]}"
    globals_ = dict(arch.global_modules)
    if module in globals_:
        return globals_[module]
    raise ValueError(f"unknown module type {module!r}; known: {', '.join(ALL_MODULE_TYPES)}")


def weight_name(config, module: str, layer: int | None = None) -> str:
    return module_path(config, module, layer) + ".weight"


def layer_prefix(config, layer: int) -> str:
    return f"{architecture(config).layers_prefix}.{layer}."


def transferable_weights(config, modules: tuple[str, ...] = ALL_MODULE_TYPES) -> dict[str, tuple[str, int | None]]:
    """weight name -> (module type, layer) for every weight pkt transfers into this model.

    A tied lm_head is the embedding itself, so it is left out (the embedding carries it).
    """
    d = dims(config)
    out: dict[str, tuple[str, int | None]] = {}
    for layer in range(d.layers):
        for m in modules:
            if m in LAYER_MODULES:
                out[weight_name(config, m, layer)] = (m, layer)
    for m in modules:
        if m in GLOBAL_MODULES and not (m == "lm_head" and d.tied):
            out[weight_name(config, m)] = (m, None)
    return out


SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def shape_of(config) -> dict:
    """The part of a config that fixes every transferable shape: what an extraction depends on,
    so every student of one shape (base, chat, code variants) shares one extraction."""
    d = dims(config)
    return {"model_type": d.model_type, "num_hidden_layers": d.layers, "hidden_size": d.hidden,
            "intermediate_size": d.intermediate, "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
            "head_dim": d.head_dim, "vocab_size": d.vocab, "tie_word_embeddings": d.tied}


def config_from_shape(shape: dict):
    """A stand-in config for arch functions when only the shape is known."""
    from types import SimpleNamespace

    return SimpleNamespace(**{k: shape[k] for k in SHAPE_FIELDS})
