"""Parsing of the comma-list options shared by ``a2ats eval`` and ``a2ats bench``."""

from __future__ import annotations

from ..errors import A2atsError


def parse_int_list(spec: str, what: str) -> list[int]:
    """``"1024,2048"`` or ``"4k,8K"`` -> ``[1024, 2048]`` / ``[4096, 8192]``."""
    out = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if scale > 1 else part) * scale
        except ValueError:
            raise A2atsError(f"{what} must be a comma list of integers (e.g. 1024,2048 or 4k), got {spec!r}") from None
        if value < 1:
            raise A2atsError(f"{what} must be positive, got {part!r}")
        out.append(value)
    if not out:
        raise A2atsError(f"{what} is empty")
    return out


def parse_budget_list(spec: str) -> list[float | int]:
    """``"0.01,0.03,5%,256"`` -> fractions (<= 1) and token counts."""
    from ..runtime.settings import parse_budget

    out = [parse_budget(p) for p in spec.split(",") if p.strip()]
    if not out:
        raise A2atsError("--budgets is empty")
    return out
