"""Shared fixtures: tiny random RoPE decoders built in code (Llama, Mistral, Qwen2, Qwen3) and the embedded
SmolLM2 model. Tiny models use the embedded model's tokenizer so every data source works with them."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any kernel import
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(autouse=True)
def _retrieval_path_even_when_the_budget_covers_all(monkeypatch):
    """Tests exercise retrieval attention even where sinks + window + K cover the whole (tiny) cache; the
    runtime's dense shortcut for that case has its own test (``test_short_context_decodes_densely``)."""
    from a2ats_tools.runtime.selectors import TokenSelector

    monkeypatch.setattr(TokenSelector, "full_keep_shortcut", False)


def tiny_config(arch: str, vocab_size: int = 49152, **overrides):
    """A 2-layer random config of ``arch`` with GQA (4 query heads, 2 KV heads, head_dim 16)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


def build_tiny_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init gives near-uniform attention; a larger scale on q/k makes attention peaky like a real model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def embedded_source():
    from a2ats_tools.models import resolve_source

    return resolve_source(None)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, embedded_source) -> Path:
    """The embedded tokenizer, saved once as plain tokenizer files (fast to reload)."""
    from a2ats_tools.models import load_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(embedded_source).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A saved tiny model directory (weights, config, tokenizer) per architecture, for CLI tests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dirs = {}
    for arch in TINY_ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        build_tiny_model(arch).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def embedded_model(embedded_source):
    """SmolLM2-135M-Instruct, loaded once for the whole test run."""
    from a2ats_tools.models import load_model

    return load_model(embedded_source)
