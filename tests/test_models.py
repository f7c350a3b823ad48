"""Model resolution, geometry and the supported-architecture check (tiny models; no weights downloaded)."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.errors import A2atsError, UnsupportedModelError
from a2ats_tools.models import (
    EMBEDDED_NAME,
    attention_modules,
    check_supported,
    geometry,
    resolve_source,
    rotary,
)

from .conftest import TINY_ARCHS, build_tiny_model


def test_embedded_source_resolves_to_a_gguf():
    source = resolve_source(None)
    assert source.gguf_file and source.gguf_file.endswith(".gguf") and source.display_name == EMBEDDED_NAME
    assert resolve_source("smollm2") == source


def test_local_sources(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(str(gguf)).gguf_file == "m.gguf"
    assert resolve_source(str(tmp_path)).gguf_file == "m.gguf"  # a folder with exactly one .gguf
    (tmp_path / "n.gguf").write_bytes(b"")
    with pytest.raises(A2atsError, match="several .gguf"):
        resolve_source(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(A2atsError, match="neither a config.json"):
        resolve_source(str(empty))
    with pytest.raises(A2atsError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"))
    assert resolve_source("org/model").path_or_id == "org/model"  # a Hub id is passed through


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_supported(arch):
    model = build_tiny_model(arch)
    geo = check_supported(model)
    assert (geo.num_layers, geo.num_heads, geo.num_kv_heads, geo.head_dim, geo.group_size) == (2, 4, 2, 16, 2)
    assert [m.layer_idx for m in attention_modules(model)] == [0, 1]
    assert torch.allclose(rotary(model).matrix(0), torch.eye(16, dtype=torch.float64), atol=1e-6)


def test_gpt2_is_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=100, n_positions=64))
    with pytest.raises(UnsupportedModelError, match="no rotary position embeddings"):
        check_supported(model)


def test_geometry_round_trips():
    from a2ats_tools.models import Geometry

    geo = geometry(build_tiny_model("qwen3"))
    assert Geometry.from_dict(geo.to_dict()) == geo
    other = Geometry.from_dict({**geo.to_dict(), "head_dim": 32})
    assert "head_dim" in geo.mismatch(other) and geo.mismatch(geo) is None
