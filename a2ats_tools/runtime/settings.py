"""Runtime settings: read from ``a2ats_config.json`` and overridable per call."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import A2atsError
from ..rope import WROPE_DISTANCE, DistanceBuckets
from ..scoring import AGGREGATIONS

if TYPE_CHECKING:
    from ..artifacts.checkpoint import A2atsConfig

OFFLOADS = (None, "cpu")
RECORDED = ("budget", "n_sink", "window", "aggregation", "rerank")  # settings a checkpoint carries as defaults
SCORE_DTYPES = ("auto", "float32", "bfloat16")
KERNELS = ("auto", "torch", "triton", "cpu")


@dataclass(frozen=True)
class RuntimeSettings:
    """How decode steps pick the tokens they attend to.

    ``budget``: top-K size per KV head, a fraction of the context in (0, 1] or a token count >= 1 (int; strings
    such as ``"5%"`` are accepted, :func:`parse_budget` is the rule); sinks and window come on top. ``rerank``:
    over-fetch factor for exact re-ranking (0 = off; the default 3.0 fetches 3K candidates by approximate score
    and keeps the K best by exact score). ``rerank_aggregation``: how the exact logits of a GQA group's query
    heads rank the candidates (``softmax``, the default: each head's softmax over the candidates, summed, i.e.
    the group's attention mass; ``sum``: summed logits; ``max``). ``prefill_chunk``: prefill in chunks of this
    many tokens (None = one pass). ``score_dtype``: precision of the per-step score table ``q_w · codebook``
    (``auto``: float32 on the CPU, bfloat16 on accelerators; selection only, attention stays exact).
    ``kernels``: who runs the decode step's work (``auto``: on the CPU the fused C++ kernel of
    ``kernels/cpu_decode`` — tables, top-K, re-rank and attention in one call, built on first use where a C++
    compiler is found — on CUDA the Triton kernels (encode, score gather, sparse attention), the torch paths
    otherwise; ``torch``: always the torch paths, e.g. to rule a kernel out; ``cpu``: the fused CPU kernel, an
    error where it cannot be built; ``triton``: always the Triton kernels, which on CPU tensors needs
    ``TRITON_INTERPRET=1`` and is for tests; the Triton score gather serves ``aggregation=sum`` only, the fused
    CPU kernel every aggregation on left-padded or unpadded batches with float32 K/V and tables).
    """

    budget: float | int = 0.03
    n_sink: int = 8
    window: int = 64
    buckets: DistanceBuckets = DistanceBuckets.single()
    aggregation: str = "sum"
    selector: str = "a2ats"
    offload: str | None = None
    rerank: float = 3.0
    rerank_aggregation: str = "softmax"
    prefill_chunk: int | None = None
    max_distance: int = 8192  # the longest distance log buckets must cover (the model's context)
    dense_layers: tuple[int, ...] = ()  # layers that decode with exact dense attention (no selection)
    score_dtype: str = "auto"
    kernels: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget", parse_budget(self.budget))  # validated and normalised by the one rule
        if self.n_sink < 0 or self.window < 1:
            raise A2atsError("n_sink must be >= 0 and window >= 1")
        if self.aggregation not in AGGREGATIONS:
            raise A2atsError(f"unknown aggregation {self.aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
        if self.rerank_aggregation not in AGGREGATIONS:
            raise A2atsError(
                f"unknown rerank_aggregation {self.rerank_aggregation!r}; choose from {', '.join(AGGREGATIONS)}"
            )
        if self.offload not in OFFLOADS:
            raise A2atsError(f"unknown offload {self.offload!r}; use 'cpu' or none")
        if self.rerank and self.rerank < 1.0:
            raise A2atsError(f"rerank is an over-fetch factor >= 1 (or 0 for off), got {self.rerank}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise A2atsError("prefill_chunk must be a positive number of tokens")
        if self.score_dtype not in SCORE_DTYPES:
            raise A2atsError(f"unknown score_dtype {self.score_dtype!r}; choose from {', '.join(SCORE_DTYPES)}")
        if self.kernels not in KERNELS:
            raise A2atsError(f"unknown kernels {self.kernels!r}; choose from {', '.join(KERNELS)}")
        if self.kernels == "triton" and self.offload == "cpu":
            raise A2atsError("kernels=triton cannot read K/V offloaded to the host; use kernels=auto with offload=cpu")
        if any(i < 0 for i in self.dense_layers):
            raise A2atsError(f"dense_layers are layer indices >= 0, got {self.dense_layers}")

    def to_record(self) -> dict[str, Any]:
        """Every setting as JSON-ready values (buckets as their config), for the results files that ran them."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["buckets"] = self.buckets.to_config()
        record["dense_layers"] = list(self.dense_layers)
        return record

    def with_overrides(self, **overrides: Any) -> RuntimeSettings:
        """A copy with ``overrides`` applied (``None`` values are ignored; ``buckets`` accepts a spec string)."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise A2atsError(f"unknown runtime setting(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
        values = {k: v for k, v in overrides.items() if v is not None or k == "offload"}
        if "offload" in values and values["offload"] in ("none", "", False):
            values["offload"] = None
        if "budget" in values:
            values["budget"] = parse_budget(values["budget"])
        if "dense_layers" in values:
            values["dense_layers"] = parse_layers(values["dense_layers"])
        if "buckets" in values:
            values["buckets"] = parse_buckets(values["buckets"], self.buckets, values.get("max_distance", self.max_distance))
        return replace(self, **values)

    def recorded(self, spec: str) -> dict[str, Any]:
        """The checkpoint fields that ``convert --settings`` sets from ``spec`` (``"rerank=8,aggregation=max"``),
        checked as runtime overrides; only the settings a checkpoint records are accepted."""
        overrides = parse_overrides(spec)
        other = sorted(set(overrides) - set(RECORDED))
        if other:
            raise A2atsError(f"a checkpoint records only {', '.join(RECORDED)}; {', '.join(other)} is set at load time")
        checked = self.with_overrides(**overrides)
        return {k: getattr(checked, k) for k in overrides}

    @classmethod
    def from_config(cls, config: A2atsConfig, **overrides: Any) -> RuntimeSettings:
        base = cls(
            **{name: getattr(config, name) for name in RECORDED},
            buckets=config.distance_buckets(),
            max_distance=config.geometry.max_position_embeddings,
            dense_layers=tuple(config.dense_layers),
        )
        return base.with_overrides(**overrides)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU advertises bf16 dot-product instructions (AVX512-BF16 or AMX-BF16; Linux only; read once)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def use_triton(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether the ``kernels`` setting sends work on ``tensors`` to a Triton kernel (``auto``: all on CUDA and
    Triton installed). Imports Triton only when it may be used; ``triton`` where it cannot run is a user error."""
    if kernels in ("torch", "cpu") or (kernels == "auto" and not all(t.is_cuda for t in tensors)):
        return False
    from ..kernels._dispatch import resolve_backend

    try:
        return resolve_backend(kernels, *tensors) == "triton"
    except RuntimeError as err:  # triton missing, or CPU tensors outside the interpreter
        raise A2atsError(f"kernels={kernels}: {err}; use kernels=auto or torch") from None


def use_cpu_kernel(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether the ``kernels`` setting sends a decode step on ``tensors`` to the fused CPU kernel (``auto``: all on
    the CPU and the kernel builds here; ``cpu``: required, so a missing compiler is a user error)."""
    if kernels not in ("auto", "cpu") or not all(t.device.type == "cpu" for t in tensors):
        if kernels == "cpu":
            raise A2atsError("kernels=cpu needs the cache and the model on the CPU; use kernels=auto")
        return False
    from ..kernels import cpu_decode

    if cpu_decode.available():
        return True
    if kernels == "cpu":
        raise A2atsError(f"kernels=cpu: {cpu_decode.unavailable_reason()}; use kernels=auto or torch")
    return False


def resolve_score_dtype(score_dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The score table's dtype on ``device``. ``auto``: float32 on the CPU, where the fused CPU kernel builds its
    tables in float32 (and where the torch fallback's bf16 table would be a float32 product of bf16-rounded
    operands on CPUs without bf16 instructions); bfloat16 on accelerators (half the bytes to gather, 16-bit
    top-K keys)."""
    if score_dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return getattr(torch, score_dtype)


def parse_overrides(spec: str) -> dict[str, Any]:
    """``"score_dtype=bfloat16,rerank=2"`` -> ``{"score_dtype": "bfloat16", "rerank": 2}``.

    Commas inside a value are kept (``"dense_layers=0,1,budget=5%"``); numbers become int or float, and the
    values are checked by :meth:`RuntimeSettings.with_overrides`.
    """
    parts: list[str] = []
    for piece in spec.split(","):
        if "=" in piece or not parts:
            parts.append(piece)
        else:
            parts[-1] += "," + piece
    out: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise A2atsError(f"runtime overrides are KEY=VALUE pairs such as 'score_dtype=bfloat16', got {spec!r}")
        text = value.strip()
        for cast in (int, float):
            try:
                out[key.strip()] = cast(text)
                break
            except ValueError:
                continue
        else:
            out[key.strip()] = text
    return out


BUDGET_RULE = (
    "budget must be a fraction in (0, 1] (0.03), a percentage in (0%, 100%] (3%) or a whole token count >= 1 (256)"
)


def parse_budget(value: Any) -> float | int:
    """The one budget rule, for every way a budget arrives (settings, CLI, ``load_converted``, ``configure``, the
    config file): ``0.05`` or ``"5%"`` -> the fraction 0.05; ``512``, ``512.0`` or ``"512"`` -> 512 tokens.

    Fractions lie in (0, 1], percentages in (0%, 100%], token counts are whole numbers >= 1; anything else (0,
    negatives, 1.5, "150%", "0%", NaN, text) is an :class:`A2atsError` naming the rule, never a silent
    one-token budget. Exactly one is read by its spelling: the int ``1`` and ``"1"`` are one token, the float
    ``1.0``, ``"1.0"`` and ``"100%"`` the whole context.
    """
    if isinstance(value, bool):
        raise A2atsError(f"{BUDGET_RULE}, got {value!r}")
    if isinstance(value, (int, float)):
        return _budget_number(value, isinstance(value, float), value)
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text[:-1] if percent else text)
    except ValueError:
        raise A2atsError(f"{BUDGET_RULE}, got {value!r}") from None
    if percent:
        if not 0.0 < number <= 100.0:  # NaN fails too
            raise A2atsError(f"{BUDGET_RULE}, got {value!r}")
        return number / 100.0
    return _budget_number(number, "." in text, value)


def _budget_number(number: float, one_is_fraction: bool, value: Any) -> float | int:
    """A fraction in (0, 1) (or exactly 1 with ``one_is_fraction``), else a whole token count >= 1."""
    if math.isfinite(number):
        if 0.0 < number < 1.0 or (number == 1.0 and one_is_fraction):
            return float(number)
        if number >= 1.0 and number == int(number):
            return int(number)
    raise A2atsError(f"{BUDGET_RULE}, got {value!r}")


def parse_layers(value: Any) -> tuple[int, ...]:
    """``"0,1"``, ``[0, 1]`` or ``"none"`` -> sorted distinct layer indices."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none"):
            return ()
        try:
            value = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise A2atsError(f"dense layers must be a comma list of layer indices such as '0,1', got {value!r}") from None
    if isinstance(value, int):
        value = [value]
    return tuple(sorted({int(i) for i in value}))


def parse_buckets(spec: Any, current: DistanceBuckets, max_distance: int = 1 << 17) -> DistanceBuckets:
    """``"single"``, ``"single:2048"``, ``"log"`` (ratio 2 from 64 up to ``max_distance``: the buckets ``a2ats
    convert`` writes by default) or ``"log:RATIO"``, a config dict, or a DistanceBuckets."""
    if isinstance(spec, DistanceBuckets):
        return spec
    if isinstance(spec, dict):
        return DistanceBuckets.from_config(spec)
    mode, _, arg = str(spec).partition(":")
    try:
        if mode == "single":
            return DistanceBuckets.single(int(arg) if arg else (current.centres[0] if current.mode == "single" else WROPE_DISTANCE))
        if mode == "log":
            return DistanceBuckets.log_spaced(max_distance, **({"ratio": float(arg)} if arg else {}))
    except ValueError:
        pass
    raise A2atsError(f"buckets must be 'single', 'single:DISTANCE', 'log' or 'log:RATIO' (RATIO > 1), got {spec!r}")
