"""Generate with vLLM in a process of its own, for tests/test_vllm.py (vLLM's workers start with ``spawn``,
and each engine reads its A²ATS settings from the environment it starts in).

Reads ``{"model": DIR, "prompts": [...], "max_tokens": N, "llm": {LLM kwargs}}`` as JSON on stdin and prints
``{"texts": [...]}`` on the stdout line that starts with ``A2ATS-RESULT`` (vLLM logs to stdout too).
"""

from __future__ import annotations

import json
import sys

RESULT = "A2ATS-RESULT "


def main() -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(sys.stdin.read())
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, seed=0, **job.get("llm", {}))
    outputs = llm.generate(job["prompts"], SamplingParams(max_tokens=job["max_tokens"], temperature=0.0))
    print(RESULT + json.dumps({"texts": [o.outputs[0].text for o in outputs]}))


if __name__ == "__main__":
    main()
