"""transformers quantizer registration: ``AutoModelForCausalLM.from_pretrained(converted_dir)`` after
``import a2ats_tools`` loads the model with retrieval attention on.

The checkpoint's config.json carries ``"quantization_config": {"quant_method": "a2ats", "config_file":
"a2ats_config.json"}``. No weight is changed; after the weights load, the quantizer reads the codebooks from the
checkpoint directory (``config._name_or_path``, or the weight files' folder) and attaches the runtime.
Without ``import a2ats_tools`` transformers logs "Unknown quantization type ... we will skip the quantization"
and loads the plain dense model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "a2ats"


class A2atsQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` entry of a converted checkpoint's config.json."""

    def __init__(self, config_file: str = "a2ats_config.json", checkpoint_dir: str | None = None, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.config_file = config_file
        self.checkpoint_dir = checkpoint_dir  # optional: where the a2ats files are, if not beside config.json
        self.overrides = dict(kwargs.pop("overrides", {}) or {})

    def to_dict(self) -> dict[str, Any]:
        out = {"quant_method": QUANT_METHOD, "config_file": self.config_file}
        if self.overrides:
            out["overrides"] = self.overrides
        return out


class A2atsHfQuantizer(HfQuantizer):
    """Leaves the weights alone; attaches A²ATS retrieval attention once they are loaded."""

    requires_calibration = False

    def __init__(self, quantization_config: A2atsQuantizationConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        self._files: list[str] = []

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        self._files = list(checkpoint_files or [])
        return model

    def _checkpoint_dir(self, model) -> Path | None:
        candidates = [self.quantization_config.checkpoint_dir, getattr(model.config, "_name_or_path", None)]
        candidates += [str(Path(f).parent) for f in self._files]
        for cand in candidates:
            if cand and (Path(cand) / self.quantization_config.config_file).is_file():
                return Path(cand)
        return None

    def _process_model_after_weight_loading(self, model, **kwargs):
        from ..errors import ArtifactError
        from .loader import attach_from_dir

        directory = self._checkpoint_dir(model)
        if directory is None:
            raise ArtifactError(
                "a2ats checkpoint: could not find a2ats_config.json beside the model files; load it with "
                "a2ats_tools.load_converted(path) instead"
            )
        attach_from_dir(model, directory, **self.quantization_config.overrides)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer under ``quant_method="a2ats"`` (idempotent: transformers' own registry
    says whether it is done)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(A2atsQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(A2atsHfQuantizer)
