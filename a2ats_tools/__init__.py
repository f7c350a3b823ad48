"""a2ats-tools: turn a Hugging Face RoPE language model into an A²ATS retrieval-attention checkpoint, and run it.

``import a2ats_tools`` registers the ``a2ats`` quantization method with transformers (lazily: the registration
runs when transformers' quantizer registry is first imported, so this import stays cheap), after which
``AutoModelForCausalLM.from_pretrained(converted_dir)`` loads with retrieval attention on.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

__all__ = ["__version__", "load_converted"]

_WATCHED = "transformers.quantizers.auto"


def _register_quantizer() -> None:
    from .runtime.quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers the quantizer right after transformers' quantizer registry module is executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            _register_quantizer()

        loader.exec_module = exec_module
        return spec


if _WATCHED in sys.modules:
    _register_quantizer()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name: str):
    if name == "load_converted":
        from .runtime.loader import load_converted

        return load_converted
    raise AttributeError(f"module 'a2ats_tools' has no attribute {name!r}")
