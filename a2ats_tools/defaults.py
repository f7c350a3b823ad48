"""Numbers that two stages share, in a module free of torch so the CLI's help texts can show them."""

from __future__ import annotations

DEFAULT_CODES = 4096  # codes per (layer, KV head) that convert trains unless told otherwise
MIN_TOKENS = DEFAULT_CODES  # fewest training tokens (= keys per KV head) in a calibration: one per default code
